"""Synthetic biographies (bioS of Allen-Zhu & Li, "Physics of Language Models: Part 3.3, Knowledge
Capacity Scaling Laws", arXiv:2404.05405; Ouro's Capo experiment, arXiv:2510.25741): N people with
uniformly random attributes to memorise, and the bits of that knowledge a model holds."""

import math
import random
from collections.abc import Iterator

import gin
import torch

from looplm.config import is_integer
from looplm.data.batch import IGNORE_INDEX, Batch, derive_seed
from looplm.data.packing import PackedAnswerTask, pack

GIVEN = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack", "Kira",
         "Leo", "Maya", "Noah", "Olga", "Paul", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Victor",
         "Wendy", "Yusuf"]
SURNAMES = ["Abbott", "Baker", "Chen", "Dunn", "Evans", "Fischer", "Garcia", "Hughes", "Ito",
            "Jensen", "Kowalski", "Lopez", "Moreau", "Nakamura", "Okafor", "Patel", "Quist", "Rossi",
            "Silva", "Tanaka", "Usman", "Vogel", "Walsh", "Young"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
ORDINALS = [f"{d}{'th' if 11 <= d <= 13 else {1: 'st', 2: 'nd', 3: 'rd'}.get(d % 10, 'th')}"
            for d in range(1, 29)]
DIGITS = [str(d) for d in range(10)]

# attribute -> (parts, templates): a value is one token of each part, drawn uniformly and
# independently, so |V| is the product of the part sizes; "{}" marks the value's tokens in a
# template, which follows the person's full name (the first sentence) or "They" (templates are
# in the past tense, which reads after both). Value tokens are never shared between attributes
# (the tokens tell the attribute of a target apart) nor with names or template words.
ATTRIBUTES = {
    "birth_date": ([MONTHS, ORDINALS, ["19", "20"], DIGITS, DIGITS],  # 12 x 28 x 200 years
                   ["entered life on {} {} , {} {} {} .", "came into the world on {} {} , {} {} {} .",
                    "first saw daylight on {} {} , {} {} {} ."]),
    "birth_city": ([["Ash", "Bright", "Cedar", "Elm", "Fair", "Glen", "Mill", "Stone"],
                    ["bridge", "burg", "field", "ford", "haven", "port", "ton", "ville"]],
                   ["grew up in {} {} .", "spent early years in {} {} .", "first lived in {} {} ."]),
    "university": ([["Alder", "Birch", "Crest", "Dale", "Harbor", "Lake", "Ridge", "Vale"],
                    ["University", "College", "Institute", "Academy"]],
                   ["studied at {} {} .", "graduated from {} {} .", "attended {} {} ."]),
    "major": ([["Biology", "Chemistry", "Physics", "Mathematics", "History", "Economics",
                "Philosophy", "Linguistics", "Medicine", "Law", "Music", "Architecture", "Geology",
                "Astronomy", "Psychology", "Sociology"]],
              ["majored in {} .", "completed a degree in {} .", "specialised in {} ."]),
    "employer": ([["Apex", "Beacon", "Cobalt", "Delta", "Ember", "Falcon", "Granite", "Summit"],
                  ["Labs", "Systems", "Group", "Industries"]],
                 ["worked for {} {} .", "took a job at {} {} .", "joined {} {} ."]),
}
MAX_TEMPLATES = 3


def value_set_size(attribute: str) -> int:
    return math.prod(len(part) for part in ATTRIBUTES[attribute][0])


def knowledge_bits(n_people: int, value_set_sizes: list[int], value_ce_bits: list[float]) -> float:
    """Allen-Zhu & Li's bit-complexity lower bound (arXiv:2404.05405; the capacity ratio R(F) is
    this over the parameter count), the attribute terms, in bits:

        sum_k N * log2(|V_k| / e^{p_k}) = sum_k N * (log2 |V_k| - p_k / ln 2)

    p_k: the model's cross-entropy (nats) on the value of attribute k, summed over the value's
    tokens and averaged over the people; value_ce_bits holds p_k / ln 2. A model that knows the
    value exactly (p = 0) holds log2 |V_k| bits of it per person, one that is uniform over V_k
    (p = ln |V_k|) none; worse than uniform (e.g. at initialisation, spread over the whole
    vocabulary) counts negative, as the formula has it. The paper's name term
    N log2(N_0 / e^{p_1}) is left out: names are inputs here, never targets (see BiographyTask)."""
    return sum(n_people * (math.log2(size) - ce) for size, ce in zip(value_set_sizes, value_ce_bits))


@gin.configurable
class BiographyTask(PackedAnswerTask):
    """n_people people, each a distinct full name (two given names and a surname, one token each)
    with one uniformly random value per attribute, drawn from people_seed. A biography is
    `<bos>` then one sentence per attribute, `<template words> <value tokens> .`, the first after
    the person's name and the others after "They" (bioS's pronoun; repeating the name would make
    biographies half as long again on a CPU budget),
    e.g. `<bos> Anna Leo Chen entered life on March 3rd , 19 8 7 . They grew up in Elm ford .`

    The loss is on the value tokens only. Template words are fixed by the template (nothing to
    memorise), and names are the keys the model is asked about, not knowledge: the paper trains on
    every token and adds a name term to its bit count, but with names unsupervised the only
    knowledge the loss asks for, and the bound counts (knowledge_bits), is the attributes'.

    Training draws people uniformly (with replacement) from all n_people: memorising them is the
    point, so nobody is held out. Each document renders every sentence with a template drawn
    from the first n_templates of the attribute's (1..3) and, with permute, the sentences in a
    random order (bioS's augmentations). Biographies are packed whole into rows of seq_len inputs
    with doc_ids. The evaluation is the first n_eval people (all when None), each rendered once
    from eval_seed the same way: a uniform sample of the population (the values are random),
    whose mean cross-entropy per attribute estimates the population's for the bound.

    Its evaluation adds (looplm.evaluate's task hook) per loop `knowledge_bits` (the bound, the
    paper's formula) and `bits_per_param` (over every parameter of the model, embeddings and head
    included), and, at the trained T, `value_ce_bits_<attribute>` (p_k in bits); the most the
    population holds is `max_bits` = n_people * sum_k log2 |V_k|.
    """

    name = "biographies"

    def __init__(self, n_people: int = 1000, attributes: tuple = tuple(ATTRIBUTES), n_templates: int = 1,
                 permute: bool = False, seq_len: int = 256, n_eval: int | None = None,
                 seed: int = 0, people_seed: int = 0, eval_seed: int = 1234):
        max_people = len(GIVEN) ** 2 * len(SURNAMES)
        if not is_integer(n_people) or not 1 <= n_people <= max_people:
            raise ValueError(f"BiographyTask.n_people={n_people!r}: allowed are integers 1..{max_people} "
                             f"(the distinct names of {len(GIVEN)}^2 given names x {len(SURNAMES)} surnames)")
        attributes = tuple(attributes) if isinstance(attributes, (list, tuple)) else attributes
        if (not isinstance(attributes, tuple) or not attributes or len(set(attributes)) != len(attributes)
                or not set(attributes) <= set(ATTRIBUTES)):
            raise ValueError(f"BiographyTask.attributes={attributes!r}: allowed is a non-empty tuple of "
                             f"distinct names from {', '.join(ATTRIBUTES)}")
        if not is_integer(n_templates) or not 1 <= n_templates <= MAX_TEMPLATES:
            raise ValueError(f"BiographyTask.n_templates={n_templates!r}: allowed are integers "
                             f"1..{MAX_TEMPLATES}")
        if not isinstance(permute, bool):
            raise ValueError(f"BiographyTask.permute={permute!r}: allowed are True, False")
        if n_eval is not None and not (is_integer(n_eval) and 1 <= n_eval <= n_people):
            raise ValueError(f"BiographyTask.n_eval={n_eval!r}: allowed are None (all people) or "
                             f"integers 1..{n_people} (n_people)")
        self.n_people, self.attributes = n_people, attributes
        self.n_templates, self.permute = n_templates, permute
        self.n_eval = n_people if n_eval is None else n_eval
        self.seed, self.people_seed, self.eval_seed = seed, people_seed, eval_seed

        words = sorted({w for a in attributes for t in ATTRIBUTES[a][1] for w in t.split() if w != "{}"})
        values = [tok for a in attributes for part in ATTRIBUTES[a][0] for tok in part]
        self.vocab = list(dict.fromkeys(["<pad>", "<bos>", "They", *GIVEN, *SURNAMES, *words, *values]))
        self.vocab_size = len(self.vocab)
        self._id = {token: i for i, token in enumerate(self.vocab)}
        self.pad_id = self._id["<pad>"]
        # the attribute (index into self.attributes) of each value token, -1 for every other token
        self.attribute_of_token = torch.full((self.vocab_size,), -1, dtype=torch.long)
        for k, a in enumerate(attributes):
            for part in ATTRIBUTES[a][0]:
                self.attribute_of_token[[self._id[tok] for tok in part]] = k
        self.value_set_sizes = [value_set_size(a) for a in attributes]
        self.tokens_per_value = [len(ATTRIBUTES[a][0]) for a in attributes]
        self.max_bits = knowledge_bits(n_people, self.value_set_sizes, [0.0] * len(attributes))

        rng = random.Random(derive_seed(people_seed))
        n_given, n_sur = len(GIVEN), len(SURNAMES)
        self.names = [[self._id[GIVEN[i // (n_given * n_sur)]], self._id[GIVEN[i // n_sur % n_given]],
                       self._id[SURNAMES[i % n_sur]]] for i in rng.sample(range(max_people), n_people)]
        self.values = [[rng.randrange(size) for size in self.value_set_sizes] for _ in range(n_people)]

        longest = [max(len(t.split()) for t in ATTRIBUTES[a][1][:n_templates]) for a in attributes]
        self.doc_len = 3 + sum(longest) + len(attributes) - 1  # <bos>, name, "They"s, not the last "."
        if not is_integer(seq_len) or seq_len < self.doc_len:
            raise ValueError(f"BiographyTask.seq_len={seq_len!r}: allowed are integers >= {self.doc_len} "
                             f"(the longest biography of these attributes and templates)")
        self.seq_len = seq_len
        eval_rng = random.Random(derive_seed(eval_seed))
        self.eval_docs = [self.document(p, eval_rng) for p in range(self.n_eval)]
        self._pack_eval()

    def value_tokens(self, person: int, k: int) -> list[int]:
        """The token ids of person's value of attribute k (mixed radix over its parts, last fastest)."""
        parts, value, out = ATTRIBUTES[self.attributes[k]][0], self.values[person][k], []
        for part in reversed(parts):
            value, digit = divmod(value, len(part))
            out.append(self._id[part[digit]])
        return out[::-1]

    def document(self, person: int, rng: random.Random) -> tuple[list[int], list[int]]:
        """(inputs, targets) of one biography: targets are the value tokens, IGNORE_INDEX elsewhere."""
        order = list(range(len(self.attributes)))
        if self.permute:
            rng.shuffle(order)
        tokens, supervised = [self._id["<bos>"]], [False]
        for k in order:
            template = ATTRIBUTES[self.attributes[k]][1][rng.randrange(self.n_templates)]
            value = iter(self.value_tokens(person, k))
            subject = [self._id["They"]] if len(tokens) > 1 else self.names[person]
            tokens += subject
            supervised += [False] * len(subject)
            for word in template.split():
                tokens.append(next(value) if word == "{}" else self._id[word])
                supervised.append(word == "{}")
        targets = [t if s else IGNORE_INDEX for t, s in zip(tokens[1:], supervised[1:])]
        return tokens[:-1], targets

    def eval_metric(self, model, max_loops: int) -> "KnowledgeBits":
        """looplm.evaluate's hook: the knowledge bits of `model` over the held-out batches."""
        return KnowledgeBits(self, model.num_params(), min(model.cfg.n_loops, max_loops), max_loops)

    def _train_docs(self, rng: random.Random) -> Iterator[tuple[list[int], list[int]]]:
        while True:
            yield self.document(rng.randrange(self.n_people), rng)

    def _pack(self, docs, n_rows: int | None) -> Batch:
        """Biographies carry their own targets (several values each), packed as they are."""
        return pack(docs, self.seq_len, self.pad_id, n_rows)


class KnowledgeBits:
    """Sums the cross-entropy of each attribute's value tokens per loop over the evaluation, then
    turns it into the bound (knowledge_bits): p_k = tokens_per_value_k x the mean CE of its tokens
    (each value has that many supervised tokens, so this is the mean CE summed over a value)."""

    def __init__(self, task: BiographyTask, n_params: int, trained_loops: int, max_loops: int):
        self.task, self.n_params, self.trained_loops = task, n_params, trained_loops
        n_attr = len(task.attributes)
        self.ce = torch.zeros(max_loops, n_attr, dtype=torch.float64)
        self.count = torch.zeros(max_loops, n_attr, dtype=torch.float64)

    def add(self, loop: int, ce: torch.Tensor, batch: Batch) -> None:
        """loop: 0-based; ce: (B, S) per-token cross-entropy in nats of that loop's read-out."""
        mask = batch.targets != IGNORE_INDEX
        attribute = self.task.attribute_of_token.to(ce.device)[batch.targets[mask]]
        self.ce[loop].index_add_(0, attribute.cpu(), ce[mask].double().cpu())
        self.count[loop].index_add_(0, attribute.cpu(), torch.ones(attribute.numel(), dtype=torch.float64))

    def value_ce_bits(self, loop: int) -> list[float]:
        """p_k / ln 2 of each attribute at `loop` (0-based)."""
        counts = self.count[loop].clamp(min=1)
        per_value = self.ce[loop] / counts * torch.tensor(self.task.tokens_per_value, dtype=torch.float64)
        return (per_value / math.log(2)).tolist()

    def result(self) -> dict:
        task = self.task
        bits = [knowledge_bits(task.n_people, task.value_set_sizes, self.value_ce_bits(t))
                for t in range(self.ce.shape[0])]
        at_T = self.value_ce_bits(self.trained_loops - 1)
        return {"knowledge_bits": bits, "bits_per_param": [b / self.n_params for b in bits],
                **{f"value_ce_bits_{a}": v for a, v in zip(task.attributes, at_T)}}
