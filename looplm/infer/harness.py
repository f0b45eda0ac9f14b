"""lm-evaluation-harness adapter: `@register_model("looplm")`, a LoopLM from a run folder scored
by loglikelihood, loglikelihood_rolling and generate_until, the loop count and exit rule as
model arguments:

    python -m looplm.infer.harness --model looplm --model_args run_dir=RUN,n_loops=4,exit_rule=q_exit=0.9 \
        --tasks my_task --include_path tasks/   (any other lm_eval option; the looplm model is registered)

Log-likelihoods are teacher-forced passes: every loop runs and the exit rule selects each token's
read-out loop. Generation uses looplm.infer.generate, where the rule skips the loops after each
exit, in batches of batch_size (schedule=lockstep) or as a queue over batch_size slots
(schedule=staggered). Text is tokenized by the run's task (its encode, tokenizer or vocabulary).
"""

import sys

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from looplm.infer.cache import MODES
from looplm.infer.generate import SCHEDULES, generate
from looplm.infer.held_out import parse_rule
from looplm.infer.load import RunError, encode, load_run


@register_model("looplm")
class LoopLMHarness(LM):
    def __init__(self, run_dir: str | None = None, n_loops: int | None = None, exit_rule: str = "all",
                 cache: str = "per_loop", batch_size: int = 16, max_length: int = 512,
                 max_gen_toks: int = 64, schedule: str = "lockstep", model=None, task=None, **unused):
        super().__init__()
        if model is None:
            if run_dir is None:
                raise RunError("model_args need run_dir=RUN_DIR (a looplm run folder)")
            model, task = load_run(run_dir)
        if cache not in MODES:
            raise RunError(f"cache={cache!r}: allowed are {MODES}")
        if schedule not in SCHEDULES:
            raise RunError(f"schedule={schedule!r}: allowed are {SCHEDULES}")
        self.schedule = schedule
        self.model, self.task = model.eval(), task
        self.n_loops = int(n_loops) if n_loops is not None else model.cfg.n_loops
        self.rule = parse_rule(str(exit_rule)) if isinstance(exit_rule, str) else exit_rule
        self.cache, self.batch_size = cache, int(batch_size)
        self.max_length, self.max_gen_toks = int(max_length), int(max_gen_toks)
        self.eos = getattr(task, "eos_id", None)
        self.prefix = self.eos if self.eos is not None else getattr(task, "pad_id", 0)

    # -- scoring ----------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return encode(self.task, text) if text else []

    @torch.no_grad()
    def _log_probs(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """Per row, log p(token j+1 | tokens <= j) at each token's exit loop, for j < len - 1."""
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)  # right padding: no earlier position sees it
        traj = self.model(ids.to(self.model.embed.weight.device), n_loops=self.n_loops)
        states = torch.stack(traj.states, 2)  # (B, S, T, d)
        if self.rule is None:
            chosen = states[:, :, -1]
        else:
            gates = torch.stack([self.model.exit_logits(g) for g in traj.gate_inputs], -1)
            loops = self.rule.exit_loops(gates, traj.states)
            chosen = states.gather(2, (loops - 1)[..., None, None].expand(-1, -1, 1, states.shape[-1])).squeeze(2)
        logp = F.log_softmax(self.model.logits(chosen).double(), -1)
        return [(logp[i, :len(r) - 1].cpu(), torch.tensor(r[1:])) for i, r in enumerate(rows)]

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy?) of token-id pairs, the context cut from the left
        to fit max_length."""
        results = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            rows = [(ctx + cont)[-(self.max_length + 1):] for ctx, cont in chunk]
            for (ctx, cont), (logp, targets) in zip(chunk, self._log_probs(rows)):
                logp, targets = logp[-len(cont):], targets[-len(cont):]
                total = float(logp.gather(-1, targets[:, None]).sum())
                results.append((total, bool((logp.argmax(-1) == targets).all())))
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = []
        for request in requests:
            context, continuation = request.args
            cont = self._encode(continuation)
            if not cont:
                raise RunError(f"continuation {continuation!r} encodes to no tokens")
            pairs.append(([self.prefix] + self._encode(context), cont))
        return self._score(pairs)

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for request in requests:
            (text,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self._encode(text), self.prefix, self.max_length, context_len=1)]
            out.append(sum(score for score, _ in self._score(windows)))
        return out

    def generate_until(self, requests) -> list[str]:
        """Greedy (or sampled, with do_sample) continuations, batched over requests that share
        their generation arguments, cut at the first `until` string."""
        out = [None] * len(requests)
        groups = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted((request.args[1] or {}).items())), []).append(i)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            # lockstep: batches of batch_size; staggered: one queue over batch_size slots
            step = self.batch_size if self.schedule == "lockstep" else len(indices)
            for start in range(0, len(indices), step):
                chunk = indices[start:start + step]
                prompts = [([self.prefix] + self._encode(requests[i].args[0]))[-self.max_length:] for i in chunk]
                new = generate(self.model, prompts, int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                               exit_rule=self.rule, n_loops=self.n_loops, cache=self.cache,
                               temperature=temperature, eos=self.eos, schedule=self.schedule,
                               slots=self.batch_size).tokens
                for i, tokens in zip(chunk, new):
                    if self.eos is not None and tokens and tokens[-1] == self.eos:
                        tokens = tokens[:-1]
                    text = self.task.decode(tokens)
                    for stop in until:
                        if stop and stop in text:
                            text = text[:text.index(stop)]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


def main(argv=None) -> None:
    """lm_eval's command line with the looplm model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
