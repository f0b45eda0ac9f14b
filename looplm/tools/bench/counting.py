"""A stand-in for the LoopLM in Recipe.loss that records what a step ran, for its FLOPs."""

import torch

from looplm.tools.bench.flops import Flops, ReadoutCall, looplm_step_flops


class CountingModel:
    """Stands in for the LoopLM in Recipe.loss and records what the step ran (for its FLOPs)."""

    def __init__(self, model):
        self._model = model
        self.forwards, self.readouts, self.gates = [], [], []

    def reset(self):
        self.forwards, self.readouts, self.gates = [], [], []

    def __call__(self, input_ids, n_loops=None, doc_ids=None, first_grad_loop=1, keep=None, cache=None):
        T = self._model.cfg.n_loops if n_loops is None else n_loops
        self.forwards.append((T, first_grad_loop, None if keep is None else tuple(keep)))
        return self._model(input_ids, n_loops=n_loops, doc_ids=doc_ids, first_grad_loop=first_grad_loop,
                           keep=keep, cache=cache)

    def token_loss(self, state, targets, chunk_size=None):
        w = self._model.lm_head.weight
        self.readouts.append(ReadoutCall(targets.numel(), state.requires_grad,
                                         w.requires_grad and torch.is_grad_enabled()))
        return self._model.token_loss(state, targets, chunk_size=chunk_size)

    def weighted_token_loss(self, states, targets, coeffs, chunk_size=None):
        w = self._model.lm_head.weight
        for state in states:
            self.readouts.append(ReadoutCall(targets.numel(), state.requires_grad,
                                             w.requires_grad and torch.is_grad_enabled(), fused=True))
        return self._model.weighted_token_loss(states, targets, coeffs, chunk_size=chunk_size)

    def exit_logits(self, gate_input):
        self.gates.append(ReadoutCall(gate_input.numel() // gate_input.shape[-1], gate_input.requires_grad,
                                      self._model.gate.weight.requires_grad and torch.is_grad_enabled()))
        return self._model.exit_logits(gate_input)

    def __getattr__(self, name):
        return getattr(self._model, name)

    def step_flops(self, batch: int, seq_len: int):
        total = Flops()
        for i, (T, first, keep) in enumerate(self.forwards):
            # read-outs belong to the forward they follow; recipes run one forward per step
            reads = self.readouts if i == len(self.forwards) - 1 else []
            gates = self.gates if i == len(self.forwards) - 1 else []
            f = looplm_step_flops(self._model.cfg, batch, seq_len, T, first, keep, reads, gates)
            total.model += f.model
            total.overhead += f.overhead
            for k, v in f.parts.items():
                total.parts[k] = total.parts.get(k, 0.0) + v
        return total
