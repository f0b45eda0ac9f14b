"""Multi-digit addition with the answer reversed (STARS): the default arithmetic probe."""

import re
from collections.abc import Iterator

import gin
import torch

from looplm.data.batch import IGNORE_INDEX, Batch, generator

VOCAB = [*"0123456789", "+", "=", " ", "<pad>", "<eos>"]
_TOKEN = re.compile(r"<pad>|<eos>|.", re.DOTALL)


@gin.configurable
class AdditionTask:
    """Rows `"1750+4733= 3846<eos>"`: two n-digit operands, a space, the sum least significant digit
    first (so each answer digit depends only on digits already seen and a carry), then <eos>.

    Loss covers only the reversed digits and <eos>. A fixed set of n_eval pairs (drawn from
    eval_seed) is held out and never trained on, in either operand order. Rows are padded to
    seq_len = 3 * n_digits + 4 inputs.

    reverse_operands=True writes the operands least significant digit first too
    (`"0571+3374= 3846<eos>"`): answer digit k then sits at a fixed distance from operand digits
    k, which rotary attention finds quickly. With the STARS format (False) the distance changes
    with k and a small model needs many more steps to align the digits.
    """

    name = "addition"

    def __init__(self, n_digits: int = 4, n_eval: int = 1000, seed: int = 0, eval_seed: int = 1234,
                 reverse_operands: bool = False):
        if not isinstance(n_digits, int) or not 1 <= n_digits <= 9:
            raise ValueError(f"AdditionTask.n_digits={n_digits!r}: allowed are integers 1..9")
        self.low, self.high = 10 ** (n_digits - 1), 10**n_digits  # operands in [low, high)
        n_operands = self.high - self.low
        max_eval = n_operands * (n_operands + 1) // 4  # at most half of the unordered pairs
        if not isinstance(n_eval, int) or not 1 <= n_eval <= max_eval:
            raise ValueError(f"AdditionTask.n_eval={n_eval!r}: allowed are integers 1..{max_eval} "
                             f"(half the unordered pairs of {n_digits}-digit operands)")
        if not isinstance(reverse_operands, bool):
            raise ValueError(f"AdditionTask.reverse_operands={reverse_operands!r}: allowed are True, False")
        self.n_digits, self.n_eval, self.seed, self.eval_seed = n_digits, n_eval, seed, eval_seed
        self.reverse_operands = reverse_operands
        self.vocab_size = len(VOCAB)
        self.pad_id, self.eos_id = VOCAB.index("<pad>"), VOCAB.index("<eos>")
        self.seq_len = 3 * n_digits + 4
        self.eval_pairs = self._draw_eval_pairs()  # (n_eval, 2)
        self._held_out = torch.sort(self._unordered_key(self.eval_pairs)).values

    def train_batch(self, step: int, batch_size: int) -> Batch:
        """Random pairs outside the held-out set; a fixed function of (seed, step)."""
        rng = generator(self.seed, step)
        pairs = torch.empty(0, 2, dtype=torch.long)
        while len(pairs) < batch_size:
            drawn = torch.randint(self.low, self.high, (batch_size, 2), generator=rng)
            fresh = ~torch.isin(self._unordered_key(drawn), self._held_out)
            pairs = torch.cat([pairs, drawn[fresh]])
        return self._rows(pairs[:batch_size])

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """The held-out pairs in a fixed order; the last batch may be smaller."""
        for start in range(0, self.n_eval, batch_size):
            yield self._rows(self.eval_pairs[start : start + batch_size])

    def encode(self, text: str) -> list[int]:
        return [VOCAB.index(token) for token in _TOKEN.findall(text)]

    def decode(self, ids) -> str:
        """Text of the ids with padding dropped (ids may be a list or a tensor)."""
        return "".join(VOCAB[i] for i in map(int, ids) if i != self.pad_id)

    def _draw_eval_pairs(self) -> torch.Tensor:
        rng = generator(self.eval_seed)
        pairs, seen = [], set()
        while len(pairs) < self.n_eval:
            drawn = torch.randint(self.low, self.high, (self.n_eval, 2), generator=rng)
            for a, b in drawn.tolist():
                key = (min(a, b), max(a, b))
                if key not in seen and len(pairs) < self.n_eval:
                    seen.add(key)
                    pairs.append((a, b))
        return torch.tensor(pairs)

    def _unordered_key(self, pairs: torch.Tensor) -> torch.Tensor:
        """One integer per pair, equal for (a, b) and (b, a): addition is commutative."""
        a, b = pairs.unbind(dim=1)
        return torch.minimum(a, b) * self.high + torch.maximum(a, b)

    def _rows(self, pairs: torch.Tensor) -> Batch:
        n = self.n_digits
        a, b = pairs[:, :1], pairs[:, 1:]
        total = a + b
        least_first = 10 ** torch.arange(n + 1)
        operand_order = least_first[:n] if self.reverse_operands else least_first[:n].flip(0)
        reversed_sum = total // least_first % 10  # (B, n + 1); the last digit may be a leading 0
        short = (total < 10**n).squeeze(1)  # n-digit sums end one slot early
        reversed_sum[short, n] = self.eos_id
        eos = torch.where(short, self.pad_id, self.eos_id)[:, None]
        plus, equals, space = (torch.full_like(a, VOCAB.index(t)) for t in "+= ")
        tokens = torch.cat([a // operand_order % 10, plus, b // operand_order % 10, equals, space,
                            reversed_sum, eos], dim=1)
        targets = tokens[:, 1:].clone()
        targets[:, : 2 * n + 2] = IGNORE_INDEX  # the prompt and the space
        targets[targets == self.pad_id] = IGNORE_INDEX
        return Batch(tokens[:, :-1].contiguous(), targets, None)
