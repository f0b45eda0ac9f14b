"""Mano (Ouro appendix B.2): modular arithmetic expression trees in prefix notation, packed."""

import random
from collections.abc import Iterator
from math import comb

import gin

from looplm.data.batch import derive_seed
from looplm.data.packing import PackedAnswerTask

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def random_prefix(rng: random.Random, n_ops: int, modulus: int) -> list:
    """A random expression with n_ops binary operations in prefix order (ops str, numbers int).

    The left subtree's share of the operations is uniform in [0, n_ops - 1], so trees range from
    chains to balanced ones.
    """
    if n_ops == 0:
        return [rng.randrange(modulus)]
    n_left = rng.randrange(n_ops)
    return [rng.choice(list(OPS)), *random_prefix(rng, n_left, modulus),
            *random_prefix(rng, n_ops - 1 - n_left, modulus)]


def evaluate_prefix(symbols: list, modulus: int) -> int:
    """Value of a prefix expression, reduced mod `modulus` after every operation."""

    def walk(i: int) -> tuple[int, int]:
        if isinstance(symbols[i], int):
            return symbols[i] % modulus, i + 1
        left, j = walk(i + 1)
        right, end = walk(j)
        return OPS[symbols[i]](left, right) % modulus, end

    value, end = walk(0)
    if end != len(symbols):
        raise ValueError(f"{symbols!r} is not one prefix expression: it ends at symbol {end}")
    return value


def n_expressions(n_ops: int, modulus: int) -> int:
    """Distinct prefix expressions with n_ops operations: tree shapes x operators x leaves."""
    return comb(2 * n_ops, n_ops) // (n_ops + 1) * len(OPS) ** n_ops * modulus ** (n_ops + 1)


@gin.configurable
class ManoTask(PackedAnswerTask):
    """Documents `<bos> <len_l> - * a b + c d <ans> v` with l uniform in [1, max_ops]; only v is
    supervised (it is the target at the <ans> position).

    Ouro uses L = 16 operations; the default max_ops = 8 keeps documents (2 L + 4 = 20 inputs) and
    training CPU-sized. Training rows pack whole documents into seq_len positions with doc_ids (the
    tail padding gets its own doc id and no targets). The eval set is n_eval distinct expressions
    of the hardest length l = max_ops drawn from eval_seed; training never yields one of them.
    """

    name = "mano"

    def __init__(self, max_ops: int = 8, modulus: int = 23, seq_len: int = 128, n_eval: int = 1000,
                 seed: int = 0, eval_seed: int = 1234):
        if not isinstance(max_ops, int) or max_ops < 1:
            raise ValueError(f"ManoTask.max_ops={max_ops!r}: allowed are integers >= 1")
        if not isinstance(modulus, int) or modulus < 2:
            raise ValueError(f"ManoTask.modulus={modulus!r}: allowed are integers >= 2")
        self.doc_len = 2 * max_ops + 4  # inputs of the longest document
        if not isinstance(seq_len, int) or seq_len < self.doc_len:
            raise ValueError(f"ManoTask.seq_len={seq_len!r}: allowed are integers >= "
                             f"{self.doc_len} (the longest document at max_ops={max_ops})")
        max_eval = n_expressions(max_ops, modulus) // 2
        if not isinstance(n_eval, int) or not 1 <= n_eval <= max_eval:
            raise ValueError(f"ManoTask.n_eval={n_eval!r}: allowed are integers 1..{max_eval} "
                             f"(half the expressions with {max_ops} operations)")
        self.max_ops, self.modulus, self.seq_len = max_ops, modulus, seq_len
        self.n_eval, self.seed, self.eval_seed = n_eval, seed, eval_seed
        self.vocab = [*OPS, *map(str, range(modulus)), "<bos>", "<ans>",
                      *(f"<len_{n}>" for n in range(1, max_ops + 1)), "<pad>"]
        self.vocab_size = len(self.vocab)
        self._id = {token: i for i, token in enumerate(self.vocab)}
        self.pad_id = self._id["<pad>"]
        self.eval_docs = self._draw_eval_docs()
        self._held_out = set(map(tuple, self.eval_docs))
        self._pack_eval()

    def encode_doc(self, symbols: list) -> list[int]:
        """Token ids of a whole document, answer included, for a prefix expression."""
        n_ops = sum(isinstance(s, str) for s in symbols)
        answer = evaluate_prefix(symbols, self.modulus)
        tokens = ["<bos>", f"<len_{n_ops}>", *map(str, symbols), "<ans>", str(answer)]
        return [self._id[t] for t in tokens]

    def _draw_eval_docs(self) -> list[list[int]]:
        rng = random.Random(derive_seed(self.eval_seed))
        docs, seen = [], set()
        while len(docs) < self.n_eval:
            doc = self.encode_doc(random_prefix(rng, self.max_ops, self.modulus))
            if tuple(doc) not in seen:
                seen.add(tuple(doc))
                docs.append(doc)
        return docs

    def _train_docs(self, rng: random.Random) -> Iterator[list[int]]:
        while True:
            doc = self.encode_doc(random_prefix(rng, rng.randint(1, self.max_ops), self.modulus))
            if tuple(doc) not in self._held_out:
                yield doc
