"""The batch every task yields, the exact-match metric over it, and the seeding the tasks share."""

import hashlib
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # target value for positions without loss (PyTorch's cross-entropy default)


@dataclass
class Batch:
    """Inputs and shifted targets of one step.

    doc_ids gives the document of each position in packed rows, so the model can stop attention
    from crossing documents; None means each row is a single document.
    """

    input_ids: torch.LongTensor  # (B, S)
    targets: torch.LongTensor  # (B, S), IGNORE_INDEX where no loss
    doc_ids: torch.LongTensor | None = None  # (B, S)

    def __post_init__(self):
        shapes = {"input_ids": self.input_ids.shape, "targets": self.targets.shape}
        if self.doc_ids is not None:
            shapes["doc_ids"] = self.doc_ids.shape
        if self.input_ids.dim() != 2 or len(set(shapes.values())) != 1:
            raise ValueError(f"Batch tensors must share one (B, S) shape, got {shapes}")

    def to(self, device) -> "Batch":
        return Batch(
            self.input_ids.to(device),
            self.targets.to(device),
            None if self.doc_ids is None else self.doc_ids.to(device),
        )

    def __getitem__(self, rows: slice) -> "Batch":
        """Some rows of the batch (a data-parallel rank's share)."""
        return Batch(self.input_ids[rows], self.targets[rows],
                     None if self.doc_ids is None else self.doc_ids[rows])

    @property
    def n_targets(self) -> int:
        """Number of supervised positions (the denominator of a token-mean loss)."""
        return int((self.targets != IGNORE_INDEX).sum())


def exact_match(correct: torch.BoolTensor, batch: Batch) -> torch.Tensor:
    """Per-unit exact match: one 0/1 entry per (row, document) with a supervised position.

    `correct` is (B, S): whether the argmax prediction equals the target at each position. A unit
    scores 1 iff all its supervised positions are correct. Under teacher forcing this equals
    greedy-decoding exact match: greedy decoding reproduces the reference up to its first wrong
    token, so it yields the whole answer iff every answer token is argmax-correct. No generation
    loop is needed. Units come in row-major order, documents by increasing id.
    """
    supervised = batch.targets != IGNORE_INDEX
    rows = torch.arange(correct.shape[0], device=correct.device)[:, None].expand_as(correct)
    docs = torch.zeros_like(rows) if batch.doc_ids is None else batch.doc_ids
    units = torch.stack([rows[supervised], docs[supervised]], dim=1)
    if units.shape[0] == 0:
        return torch.zeros(0, device=correct.device)
    _, unit_of_position = torch.unique(units, dim=0, return_inverse=True)
    n_units = int(unit_of_position.max()) + 1
    wrong = torch.zeros(n_units, device=correct.device)
    wrong.index_add_(0, unit_of_position, (~correct[supervised]).float())
    return (wrong == 0).float()


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a fixed function of its parts, e.g. (task seed, step).

    Hashing instead of adding keeps nearby (seed, step) pairs from sharing random streams, and
    makes batch k reproducible from k alone, which is what exact resume needs.
    """
    digest = hashlib.sha256(repr(tuple(int(p) for p in parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(*parts: int) -> torch.Generator:
    """A CPU torch.Generator seeded with derive_seed(*parts)."""
    return torch.Generator().manual_seed(derive_seed(*parts))
