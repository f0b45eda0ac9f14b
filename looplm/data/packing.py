"""Documents of tokens with one supervised answer at the end, packed whole into rows: the shared
batching of Mano and multi-hop QA, and `pack` for any documents with their own targets (chat)."""

import random
from collections.abc import Iterator

import torch

from looplm.data.batch import IGNORE_INDEX, Batch, derive_seed


class PackedAnswerTask:
    """A subclass sets vocab, pad_id, seq_len, seed and eval_docs (token-id lists, answer last),
    implements `_train_docs(rng)` (an endless document stream) and calls `_pack_eval()`."""

    def train_batch(self, step: int, batch_size: int) -> Batch:
        """batch_size packed rows; a fixed function of (seed, step)."""
        return self._pack(self._train_docs(random.Random(derive_seed(self.seed, step))), batch_size)

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """The held-out documents packed in a fixed order; the last batch may be smaller."""
        for start in range(0, self._eval_rows.input_ids.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            yield Batch(self._eval_rows.input_ids[rows], self._eval_rows.targets[rows],
                        self._eval_rows.doc_ids[rows])

    def decode(self, ids) -> str:
        """Space-separated tokens with padding dropped (ids may be a list or a tensor)."""
        return " ".join(self.vocab[i] for i in map(int, ids) if i != self.pad_id)

    def _train_docs(self, rng: random.Random) -> Iterator[list[int]]:
        raise NotImplementedError

    def _pack_eval(self) -> None:
        self._eval_rows = self._pack(iter(self.eval_docs), n_rows=None)

    def _pack(self, docs: Iterator[list[int]], n_rows: int | None) -> Batch:
        """Each document contributes its tokens but the last as inputs and, at the position
        before the answer, the answer as the one target."""
        return pack(((doc[:-1], [IGNORE_INDEX] * (len(doc) - 2) + [doc[-1]]) for doc in docs),
                    self.seq_len, self.pad_id, n_rows)


def pack(docs: Iterator[tuple[list[int], list[int]]], seq_len: int, pad_id: int, n_rows: int | None) -> Batch:
    """Greedy packing of (inputs, targets) documents of at most seq_len positions each: whole
    documents fill a row while they fit, one doc id each; the rest is padding (its own doc id, no
    targets). n_rows=None packs until `docs` runs out."""
    inputs, targets, doc_ids = [], [], []
    doc = next(docs, None)
    while doc is not None and (n_rows is None or len(inputs) < n_rows):
        if len(doc[0]) > seq_len:
            raise ValueError(f"a document of {len(doc[0])} positions does not fit a row of seq_len={seq_len}")
        row, row_targets, row_docs = [], [], []
        while doc is not None and len(row) + len(doc[0]) <= seq_len:
            row += doc[0]
            row_targets += doc[1]
            row_docs += [row_docs[-1] + 1 if row_docs else 0] * len(doc[0])
            doc = next(docs, None)
        fill = seq_len - len(row)
        inputs.append(row + [pad_id] * fill)
        targets.append(row_targets + [IGNORE_INDEX] * fill)
        doc_ids.append(row_docs + [row_docs[-1] + 1] * fill)
    return Batch(torch.tensor(inputs), torch.tensor(targets), torch.tensor(doc_ids))
