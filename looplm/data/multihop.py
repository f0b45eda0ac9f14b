"""Multi-hop QA (Ouro appendix B.3): facts of a layered random knowledge graph and k-hop
questions over it, packed like Mano."""

import random
from collections.abc import Iterator

import gin

from looplm.data.batch import derive_seed
from looplm.data.packing import PackedAnswerTask


@gin.configurable
class MultiHopTask(PackedAnswerTask):
    """Facts `<bos> A r <is> B` and questions `<bos> <q> r_k ... r_1 A <ans> B`, where B is
    f(r_k, ... f(r_1, A)); only B is supervised (the target at the <is>/<ans> position).

    The graph (from graph_seed) has n_layers layers of entities_per_layer entities; every entity A
    of layer l < n_layers - 1 has, for each of n_relations relations r, one object f(r, A) drawn
    uniformly from layer l + 1, so a k-hop question can only be answered by composing k facts.
    Training draws a fact (probability fact_fraction, uniform over all facts: every fact is
    learnable) or a question from a fixed pool of n_train_questions: Ouro's sample-efficiency knob.
    The pool is drawn from `seed` by rejection, so a smaller pool is a prefix of a larger one and
    a sweep over the knob varies only the count. The eval set is n_eval distinct questions from
    eval_seed, disjoint from the pool.
    """

    name = "multihop"

    def __init__(self, n_layers: int = 5, entities_per_layer: int = 100, n_relations: int = 20,
                 hops: int = 3, n_train_questions: int = 2000, n_eval: int = 1000,
                 fact_fraction: float = 0.5, seq_len: int = 64, seed: int = 0,
                 graph_seed: int = 0, eval_seed: int = 1234):
        for arg, value, low in [("n_layers", n_layers, 2),
                                ("entities_per_layer", entities_per_layer, 1),
                                ("n_relations", n_relations, 1), ("n_eval", n_eval, 1),
                                ("n_train_questions", n_train_questions, 0)]:
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"MultiHopTask.{arg}={value!r}: allowed are integers >= {low}")
        if not isinstance(hops, int) or not 1 <= hops <= n_layers - 1:
            raise ValueError(f"MultiHopTask.hops={hops!r}: allowed are integers 1..{n_layers - 1} "
                             f"(n_layers - 1, the longest path at n_layers={n_layers})")
        if not isinstance(fact_fraction, (int, float)) or not 0 <= fact_fraction <= 1:
            raise ValueError(f"MultiHopTask.fact_fraction={fact_fraction!r}: allowed are numbers "
                             f"in [0, 1]")
        if n_train_questions == 0 and fact_fraction < 1:
            raise ValueError(f"MultiHopTask.fact_fraction={fact_fraction!r} with "
                             f"n_train_questions=0: allowed is only 1 (there are no questions to "
                             f"train on)")
        self.doc_len = hops + 4  # inputs of a question, the longer document (a fact has 4)
        if not isinstance(seq_len, int) or seq_len < self.doc_len:
            raise ValueError(f"MultiHopTask.seq_len={seq_len!r}: allowed are integers >= "
                             f"{self.doc_len} (a {hops}-hop question without its answer)")
        self.n_starts = (n_layers - hops) * entities_per_layer  # entities a question can start at
        self.n_questions = n_relations ** hops * self.n_starts
        if n_train_questions + n_eval > self.n_questions:
            raise ValueError(
                f"MultiHopTask.n_train_questions={n_train_questions} + n_eval={n_eval}: allowed is "
                f"a sum of at most {self.n_questions}, the distinct {hops}-hop questions "
                f"({n_relations}^{hops} relation chains x {self.n_starts} start entities)")
        self.n_layers, self.entities_per_layer = n_layers, entities_per_layer
        self.n_relations = n_relations
        self.hops, self.n_train_questions, self.n_eval = hops, n_train_questions, n_eval
        self.fact_fraction, self.seq_len = fact_fraction, seq_len
        self.seed, self.graph_seed, self.eval_seed = seed, graph_seed, eval_seed

        # entity e = layer * entities_per_layer + index; its token id is e as well
        self.vocab = [f"<e{layer}_{i}>" for layer in range(n_layers)
                      for i in range(entities_per_layer)]
        self.vocab += [f"<r{r}>" for r in range(n_relations)]
        self.vocab += ["<bos>", "<q>", "<is>", "<ans>", "<pad>"]
        self.vocab_size = len(self.vocab)
        self._id = {token: i for i, token in enumerate(self.vocab)}
        self.pad_id = self._id["<pad>"]
        self.relation_ids = [self._id[f"<r{r}>"] for r in range(n_relations)]

        # graph[r][A] = f(r, A) for every entity A outside the last layer
        rng = random.Random(derive_seed(graph_seed))
        self.n_facts = n_relations * (n_layers - 1) * entities_per_layer
        size = entities_per_layer
        self.graph = [[(a // size + 1) * size + rng.randrange(size)
                       for a in range((n_layers - 1) * size)] for _ in range(n_relations)]

        self.eval_questions = self._draw_questions(random.Random(derive_seed(eval_seed)), n_eval,
                                                   set())
        self.train_questions = self._draw_questions(random.Random(derive_seed(seed, -1)),
                                                    n_train_questions, set(self.eval_questions))
        self.eval_docs = [self.question_doc(q) for q in self.eval_questions]
        self.train_question_docs = [self.question_doc(q) for q in self.train_questions]
        self._pack_eval()

    def question(self, index: int) -> tuple[tuple[int, ...], int]:
        """Question `index` (0..n_questions-1) as (relations r_1..r_k innermost first, start A)."""
        index, start = divmod(index, self.n_starts)
        chain = []
        for _ in range(self.hops):
            index, r = divmod(index, self.n_relations)
            chain.append(r)
        return tuple(chain), start

    def answer(self, chain: tuple[int, ...], start: int) -> int:
        """f(r_k, ... f(r_1, start)): the entity a question asks for."""
        entity = start
        for r in chain:
            entity = self.graph[r][entity]
        return entity

    def fact_doc(self, r: int, a: int) -> list[int]:
        """Token ids of the fact `<bos> A r <is> f(r, A)`, answer included."""
        return [self._id["<bos>"], a, self.relation_ids[r], self._id["<is>"], self.graph[r][a]]

    def question_doc(self, question: tuple[tuple[int, ...], int]) -> list[int]:
        """Token ids of `<bos> <q> r_k ... r_1 A <ans> B`, answer included (outermost r first,
        as "the r_k of ... the r_1 of A" reads)."""
        chain, start = question
        return [self._id["<bos>"], self._id["<q>"],
                *(self.relation_ids[r] for r in reversed(chain)),
                start, self._id["<ans>"], self.answer(chain, start)]

    def _draw_questions(self, rng: random.Random, n: int, excluded: set) -> list:
        """n distinct questions outside `excluded`, in the order drawn (so draws nest in n)."""
        questions, seen = [], set(excluded)
        while len(questions) < n:
            question = self.question(rng.randrange(self.n_questions))
            if question not in seen:
                seen.add(question)
                questions.append(question)
        return questions

    def _train_docs(self, rng: random.Random) -> Iterator[list[int]]:
        while True:
            if rng.random() < self.fact_fraction:
                r, a = divmod(rng.randrange(self.n_facts), len(self.graph[0]))
                yield self.fact_doc(r, a)
            else:
                yield self.train_question_docs[rng.randrange(self.n_train_questions)]
