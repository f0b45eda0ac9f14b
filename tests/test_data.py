"""Tests of looplm.data: the embedded tasks, the exact-match metric and the HF text pipeline."""

import re

import gin
import pytest
import torch

from looplm.data import (IGNORE_INDEX, AdditionTask, Batch, HubUnreachableError, ManoTask,
                         MultiHopTask, TextTask, exact_match)
from looplm.data.mano import evaluate_prefix


def assert_batches_equal(x: Batch, y: Batch):
    assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.targets, y.targets)
    assert (x.doc_ids is None) == (y.doc_ids is None)
    assert x.doc_ids is None or torch.equal(x.doc_ids, y.doc_ids)


# ---------------------------------------------------------------- Batch and exact_match


def test_batch_counts_targets_and_rejects_mismatched_shapes():
    targets = torch.tensor([[IGNORE_INDEX, 1, 2], [IGNORE_INDEX] * 3])
    batch = Batch(torch.zeros(2, 3, dtype=torch.long), targets)
    assert batch.n_targets == 2
    assert_batches_equal(batch.to("cpu"), batch)
    with pytest.raises(ValueError, match="shape"):
        Batch(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))


def test_exact_match_groups_by_row_and_document():
    I = IGNORE_INDEX
    targets = torch.tensor([[I, 5, I, 6, I],  # row 0: doc 0 and doc 1 supervised, doc 2 not
                            [I, I, I, I, I],  # row 1: no targets, no unit
                            [1, 2, I, I, 3]])  # row 2: doc 0 (two positions), doc 1
    doc_ids = torch.tensor([[0, 0, 1, 1, 2], [0, 0, 0, 0, 0], [0, 0, 0, 1, 1]])
    correct = torch.tensor([[False, True, False, False, True],
                            [False] * 5,
                            [True, False, True, True, True]])
    batch = Batch(torch.zeros_like(targets), targets, doc_ids)
    assert exact_match(correct, batch).tolist() == [1.0, 0.0, 0.0, 1.0]
    # Without doc_ids each row is one unit: row 0 has a wrong answer token, row 2 too.
    assert exact_match(correct, Batch(batch.input_ids, targets)).tolist() == [0.0, 0.0]
    correct[2, 1] = True
    assert exact_match(correct, Batch(batch.input_ids, targets)).tolist() == [0.0, 1.0]
    # Unsupervised positions never matter, however wrong.
    assert exact_match(torch.ones_like(correct), batch).tolist() == [1.0] * 4


def test_exact_match_same_doc_id_in_different_rows_are_different_units():
    targets = torch.tensor([[7], [7]])
    batch = Batch(torch.zeros_like(targets), targets, torch.zeros_like(targets))
    assert exact_match(torch.tensor([[True], [False]]), batch).tolist() == [1.0, 0.0]


def test_exact_match_with_no_targets_is_empty():
    targets = torch.full((2, 3), IGNORE_INDEX)
    correct = torch.ones(2, 3, dtype=torch.bool)
    assert exact_match(correct, Batch(targets.clone(), targets)).numel() == 0


# ---------------------------------------------------------------- addition


def addition_rows(task: AdditionTask, batch: Batch):
    """(a, b) of each row, parsed from the inputs."""
    pattern = re.compile(rf"^(\d{{{task.n_digits}}})\+(\d{{{task.n_digits}}})= ")
    return [tuple(map(int, pattern.match(task.decode(row)).groups())) for row in batch.input_ids]


def test_addition_vocab_and_decode_round_trip():
    task = AdditionTask()
    assert task.vocab_size == 15 and task.seq_len == 16
    text = "1750+4733= 3846<eos>"
    assert task.decode(task.encode(text)) == text
    assert task.decode(task.encode(text) + [task.pad_id] * 3) == text


@pytest.mark.parametrize("n_digits", [2, 4])
def test_addition_rows_are_exactly_the_reversed_sum_with_answer_only_loss(n_digits):
    task = AdditionTask(n_digits=n_digits, n_eval=100)
    batch = task.train_batch(step=3, batch_size=256)
    assert batch.input_ids.shape == (256, task.seq_len) and batch.doc_ids is None
    lengths = set()
    for row, (a, b) in enumerate(addition_rows(task, batch)):
        assert task.low <= a < task.high and task.low <= b < task.high
        answer = str(a + b)[::-1]
        lengths.add(len(answer))
        tokens = task.encode(f"{a}+{b}= {answer}<eos>")
        pad = task.seq_len + 1 - len(tokens)
        expected_inputs = (tokens + [task.pad_id] * pad)[:-1]
        expected_targets = ([IGNORE_INDEX] * (2 * n_digits + 2) + task.encode(answer + "<eos>")
                            + [IGNORE_INDEX] * pad)
        assert batch.input_ids[row].tolist() == expected_inputs
        assert batch.targets[row].tolist() == expected_targets
        supervised = batch.targets[row][batch.targets[row] != IGNORE_INDEX]
        assert int(task.decode(supervised).removesuffix("<eos>")[::-1]) == a + b
    assert lengths == {n_digits, n_digits + 1}  # both answer lengths occur, so padding is exercised


def test_addition_reverse_operands_writes_every_number_least_significant_first():
    plain, reversed_ = AdditionTask(n_eval=10), AdditionTask(n_eval=10, reverse_operands=True)
    a_rows, b_rows = plain.train_batch(7, 64), reversed_.train_batch(7, 64)
    assert torch.equal(a_rows.targets, b_rows.targets)  # same pairs, same answers
    for plain_row, reversed_row in zip(a_rows.input_ids, b_rows.input_ids):
        a, b, answer, tail = re.fullmatch(r"(\d+)\+(\d+)= (\d+)(.*)", plain.decode(plain_row)).groups()
        assert reversed_.decode(reversed_row) == f"{a[::-1]}+{b[::-1]}= {answer}{tail}"
        assert int(answer[::-1]) == int(a) + int(b)


@pytest.mark.parametrize("n_digits, n_eval, batches", [(4, 1000, 200), (2, 2047, 100)])
def test_addition_never_trains_on_held_out_pairs(n_digits, n_eval, batches):
    # With 2 digits half of all unordered pairs are held out, so a leak would show at once.
    task = AdditionTask(n_digits=n_digits, n_eval=n_eval)
    held_out = {tuple(sorted(p)) for p in task.eval_pairs.tolist()}
    assert len(held_out) == n_eval
    place = 10 ** torch.arange(n_digits - 1, -1, -1)
    for step in range(batches):
        ids = task.train_batch(step, 256).input_ids
        a, b = (ids[:, :n_digits] * place).sum(1), (ids[:, n_digits + 1 : 2 * n_digits + 1] * place).sum(1)
        if step == 0:  # the fast parse agrees with the text one
            assert list(zip(a.tolist(), b.tolist())) == addition_rows(task, task.train_batch(0, 256))
        pairs = set(zip(torch.minimum(a, b).tolist(), torch.maximum(a, b).tolist()))
        assert not pairs & held_out


def test_addition_eval_set_is_fixed_and_covers_the_held_out_pairs():
    task = AdditionTask(n_eval=300)
    first = list(task.eval_batches(128))
    assert [len(b.input_ids) for b in first] == [128, 128, 44]
    for x, y in zip(first, AdditionTask(n_eval=300, seed=7).eval_batches(128)):
        assert_batches_equal(x, y)  # the held-out set does not depend on the training seed
    parsed = [pair for batch in first for pair in addition_rows(task, batch)]
    assert parsed == list(map(tuple, task.eval_pairs.tolist()))


def test_addition_train_batches_are_a_function_of_seed_and_step():
    task = AdditionTask()
    assert_batches_equal(task.train_batch(5, 32), AdditionTask().train_batch(5, 32))
    assert not torch.equal(task.train_batch(5, 32).input_ids, task.train_batch(6, 32).input_ids)
    other_seed = AdditionTask(seed=1).train_batch(5, 32)
    assert not torch.equal(task.train_batch(5, 32).input_ids, other_seed.input_ids)


@pytest.mark.parametrize("kwargs, message", [({"n_digits": 0}, "n_digits=0"),
                                             ({"n_digits": 2, "n_eval": 5000}, "n_eval=5000")])
def test_addition_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdditionTask(**kwargs)


# ---------------------------------------------------------------- mano


def infix(tokens: list[str], modulus: int, i: int = 0) -> tuple[str, int]:
    """Python source for the prefix expression at tokens[i], reduced mod `modulus` at every op."""
    if tokens[i] in "+-*":
        left, j = infix(tokens, modulus, i + 1)
        right, k = infix(tokens, modulus, j)
        return f"(({left} {tokens[i]} {right}) % {modulus})", k
    return tokens[i], i + 1


def mano_documents(task: ManoTask, batch: Batch):
    """(tokens, targets, doc id, row) of every document segment, pad tails included."""
    for row in range(len(batch.input_ids)):
        ids, targets, docs = batch.input_ids[row], batch.targets[row], batch.doc_ids[row]
        for doc in docs.unique().tolist():
            where = docs == doc
            yield [task.vocab[i] for i in ids[where].tolist()], targets[where].tolist(), doc, row


def check_mano_batch(task: ManoTask, batch: Batch) -> list[tuple[str, ...]]:
    """Assert packing and answers are right; return the expressions of the batch's documents."""
    assert batch.input_ids.shape[1] == task.seq_len
    steps = batch.doc_ids.diff(dim=1)
    assert (batch.doc_ids[:, 0] == 0).all() and ((steps == 0) | (steps == 1)).all()
    expressions = []
    for tokens, targets, doc, row in mano_documents(task, batch):
        if tokens[0] == "<pad>":  # the tail: all padding, no loss, the row's last doc id
            assert set(tokens) == {"<pad>"} and set(targets) == {IGNORE_INDEX}
            assert doc == int(batch.doc_ids[row, -1])
            continue
        n_ops = int(tokens[1].removeprefix("<len_").removesuffix(">"))
        assert tokens[0] == "<bos>" and tokens[-1] == "<ans>" and 1 <= n_ops <= task.max_ops
        source, end = infix(tokens[2:-1], task.modulus)
        assert end == len(tokens) - 3  # the whole expression is in this row: none is cut
        assert sum(t in "+-*" for t in tokens[2:-1]) == n_ops
        assert targets[:-1] == [IGNORE_INDEX] * (len(tokens) - 1)
        assert task.vocab[targets[-1]] == str(eval(source))
        expressions.append(tuple(tokens))
    return expressions


def test_mano_evaluator_on_hand_examples():
    assert evaluate_prefix(["-", "*", 3, 4, "+", 5, 6], 23) == 1
    assert evaluate_prefix(["-", 0, 1], 23) == 22
    assert evaluate_prefix(["*", "*", 22, 22, 22], 23) == (22 * 22 % 23) * 22 % 23
    with pytest.raises(ValueError, match="not one prefix expression"):
        evaluate_prefix(["+", 1, 2, 3], 23)


def test_mano_packing_and_answers_match_python_arithmetic():
    task = ManoTask()
    assert task.vocab_size == 3 + 23 + 2 + task.max_ops + 1
    lengths = set()
    for step in range(3):
        expressions = check_mano_batch(task, task.train_batch(step, 32))
        lengths |= {tokens[1] for tokens in expressions}
    assert lengths == {f"<len_{n}>" for n in range(1, task.max_ops + 1)}


def test_mano_eval_set_is_fixed_hardest_length_and_never_trained_on():
    # 1 op over F_5 has 75 expressions and 37 are held out: a leak would show in a few batches.
    for task in (ManoTask(), ManoTask(max_ops=1, modulus=5, seq_len=16, n_eval=37)):
        eval_docs = [check_mano_batch(task, batch) for batch in task.eval_batches(16)]
        held_out = {e for doc in eval_docs for e in doc}
        assert len(held_out) == task.n_eval
        assert {tokens[1] for tokens in held_out} == {f"<len_{task.max_ops}>"}
        again = [check_mano_batch(task, batch) for batch in task.eval_batches(16)]
        assert again == eval_docs
        trained = {e for step in range(20)
                   for e in check_mano_batch(task, task.train_batch(step, 16))}
        assert not trained & held_out
    assert len(trained) == 75 - 37  # ... and everything else is trained on


def test_mano_exact_match_counts_one_unit_per_eval_document():
    task = ManoTask(n_eval=50)
    batches = list(task.eval_batches(4))
    units = torch.cat([exact_match(b.targets != IGNORE_INDEX, b) for b in batches])
    assert units.tolist() == [1.0] * 50


def test_mano_train_batches_are_a_function_of_seed_and_step():
    task = ManoTask()
    assert_batches_equal(task.train_batch(9, 8), ManoTask().train_batch(9, 8))
    assert not torch.equal(task.train_batch(9, 8).input_ids, task.train_batch(10, 8).input_ids)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_ops": 0}, "max_ops=0"),
    ({"seq_len": 10}, "seq_len=10"),
    ({"max_ops": 1, "modulus": 5, "n_eval": 38}, "n_eval=38"),
])
def test_mano_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ManoTask(**kwargs)


def test_tasks_are_gin_configurable():
    gin.parse_config("AdditionTask.n_digits = 3\nManoTask.max_ops = 4")
    try:
        assert AdditionTask().n_digits == 3 and ManoTask().max_ops == 4
    finally:
        gin.clear_config()


# ---------------------------------------------------------------- multi-hop QA

# 2 relations, 2-hop questions from layers 0 and 1 of 3 entities: 2^2 x 6 = 24 questions, 18 facts
TINY_GRAPH = dict(n_layers=4, entities_per_layer=3, n_relations=2, hops=2, n_train_questions=20,
                  n_eval=4, seq_len=16)


def entity_layer(token: str) -> int:
    match = re.fullmatch(r"<e(\d+)_(\d+)>", token)
    assert match, token
    return int(match[1])


def graph_by_name(task: MultiHopTask) -> dict:
    """The graph as {(A, r): B} over token names."""
    return {(task.vocab[a], f"<r{r}>"): task.vocab[b]
            for r, objects in enumerate(task.graph) for a, b in enumerate(objects)}


def check_multihop_batch(task: MultiHopTask, batch: Batch) -> tuple[list, list]:
    """Assert packing, supervision and answers (walking the graph by hand from the tokens);
    return the batch's facts (A, r, B) and questions (tokens with the answer) as token names."""
    assert batch.input_ids.shape[1] == task.seq_len
    steps = batch.doc_ids.diff(dim=1)
    assert (batch.doc_ids[:, 0] == 0).all() and ((steps == 0) | (steps == 1)).all()
    before_answer = torch.isin(batch.input_ids, torch.tensor([task.vocab.index("<is>"),
                                                              task.vocab.index("<ans>")]))
    assert torch.equal(batch.targets != IGNORE_INDEX, before_answer)  # there and only there
    graph = graph_by_name(task)
    facts, questions = [], []
    for tokens, targets, doc, row in mano_documents(task, batch):
        if tokens[0] == "<pad>":  # the tail: all padding, no loss, the row's last doc id
            assert set(tokens) == {"<pad>"} and set(targets) == {IGNORE_INDEX}
            assert doc == int(batch.doc_ids[row, -1])
            continue
        assert tokens[0] == "<bos>" and targets[:-1] == [IGNORE_INDEX] * (len(tokens) - 1)
        answer = task.vocab[targets[-1]]
        if tokens[1] == "<q>":  # <bos> <q> r_k ... r_1 A <ans>, whole: none is cut
            *relations, start, last = tokens[2:]
            assert last == "<ans>" and len(relations) == task.hops
            assert all(re.fullmatch(r"<r\d+>", r) for r in relations)
            assert entity_layer(start) <= task.n_layers - 1 - task.hops
            entity = start
            for relation in reversed(relations):  # r_1, next to A, applies first
                entity = graph[entity, relation]
            assert answer == entity
            questions.append((*tokens, answer))
        else:  # <bos> A r <is>
            assert len(tokens) == 4 and tokens[3] == "<is>" and re.fullmatch(r"<r\d+>", tokens[2])
            assert graph[tokens[1], tokens[2]] == answer
            assert entity_layer(answer) == entity_layer(tokens[1]) + 1
            facts.append((tokens[1], tokens[2], answer))
    return facts, questions


def multihop_training(task: MultiHopTask, steps: int, batch_size: int = 16) -> tuple[set, set]:
    facts, questions = set(), set()
    for step in range(steps):
        batch = task.train_batch(step, batch_size)
        batch_facts, batch_questions = check_multihop_batch(task, batch)
        facts, questions = facts | set(batch_facts), questions | set(batch_questions)
    return facts, questions


def test_multihop_graph_links_each_layer_to_the_next_and_depends_on_graph_seed_only():
    task = MultiHopTask()
    assert task.vocab_size == 5 * 100 + 20 + 5
    assert len(graph_by_name(task)) == task.n_facts == 20 * 4 * 100
    for (subject, _), obj in graph_by_name(task).items():
        assert entity_layer(obj) == entity_layer(subject) + 1
    for layer in range(1, 5):  # 2000 uniform draws reach every entity of the next layer
        assert {obj for obj in graph_by_name(task).values() if entity_layer(obj) == layer} == \
            {f"<e{layer}_{i}>" for i in range(100)}
    assert MultiHopTask(seed=5, eval_seed=6).graph == task.graph
    assert MultiHopTask(graph_seed=1).graph != task.graph


def test_multihop_questions_read_the_outermost_relation_first():
    task = MultiHopTask(n_layers=3, entities_per_layer=2, n_relations=2, hops=2,
                        n_train_questions=1, n_eval=1, seq_len=8)
    # by hand: e0_0 -r0-> e1_1 -r1-> e2_0, while e0_0 -r1-> e1_0 -r0-> e2_1
    task.graph = [[3, 2, 5, 4], [2, 3, 5, 4]]  # graph[r][A], entities numbered layer-major
    assert task.decode(task.question_doc(((0, 1), 0))) == "<bos> <q> <r1> <r0> <e0_0> <ans> <e2_0>"
    assert task.decode(task.question_doc(((1, 0), 0))) == "<bos> <q> <r0> <r1> <e0_0> <ans> <e2_1>"
    assert task.decode(task.fact_doc(1, 3)) == "<bos> <e1_1> <r1> <is> <e2_0>"


def test_multihop_packing_supervision_and_answers_match_the_graph():
    for task in (MultiHopTask(), MultiHopTask(**TINY_GRAPH)):
        facts, questions = multihop_training(task, 20)
        assert facts and questions
    assert len(facts) == task.n_facts  # every fact is trained on


def test_multihop_eval_set_is_fixed_and_never_trained_on():
    for task in (MultiHopTask(), MultiHopTask(**TINY_GRAPH)):
        assert not set(task.eval_questions) & set(task.train_questions)
        in_order = [check_multihop_batch(task, b)[1] for b in task.eval_batches(16)]
        held_out = [q for batch in in_order for q in batch]
        assert held_out == [tuple(task.decode(doc).split()) for doc in task.eval_docs]
        assert len(set(held_out)) == task.n_eval
        again = [q for b in task.eval_batches(5) for q in check_multihop_batch(task, b)[1]]
        assert again == held_out  # the same order whatever the batch size
        trained = multihop_training(task, 20)[1]
        assert trained and not trained & set(held_out)
    assert len(trained) == 24 - 4  # ... and in the tiny graph every other question is trained on


def test_multihop_training_questions_come_from_a_fixed_nested_pool():
    task = MultiHopTask(n_train_questions=5)
    trained = multihop_training(task, 10)[1]
    assert trained == {tuple(task.decode(doc).split()) for doc in task.train_question_docs}
    assert len(trained) == 5
    assert MultiHopTask(n_train_questions=100).train_questions[:5] == task.train_questions
    assert MultiHopTask(seed=1, n_train_questions=5).train_questions != task.train_questions


def test_multihop_fact_fraction_sets_the_mix():
    counts = {}
    for fraction in (0.0, 0.5, 1.0):
        task = MultiHopTask(fact_fraction=fraction)
        facts = questions = 0
        for step in range(10):
            batch_facts, batch_questions = check_multihop_batch(task, task.train_batch(step, 16))
            facts, questions = facts + len(batch_facts), questions + len(batch_questions)
        counts[fraction] = facts / (facts + questions)
    assert counts[0.0] == 0 and counts[1.0] == 1 and 0.45 < counts[0.5] < 0.55
    assert len(multihop_training(MultiHopTask(n_train_questions=0, fact_fraction=1.0), 2)[1]) == 0


def test_multihop_exact_match_counts_one_unit_per_eval_question():
    task = MultiHopTask(n_eval=50)
    units = torch.cat([exact_match(b.targets != IGNORE_INDEX, b) for b in task.eval_batches(2)])
    assert units.tolist() == [1.0] * 50


def test_multihop_train_batches_are_a_function_of_seed_and_step():
    task = MultiHopTask()
    assert_batches_equal(task.train_batch(9, 8), MultiHopTask().train_batch(9, 8))
    assert not torch.equal(task.train_batch(9, 8).input_ids, task.train_batch(10, 8).input_ids)
    assert not torch.equal(task.train_batch(9, 8).input_ids,
                           MultiHopTask(seed=1).train_batch(9, 8).input_ids)


@pytest.mark.parametrize("kwargs, message", [
    ({"n_layers": 1}, "n_layers=1"),
    ({"entities_per_layer": 0}, "entities_per_layer=0"),
    ({"n_relations": 0}, "n_relations=0"),
    ({"hops": 0}, "hops=0"),
    ({"hops": 5}, r"hops=5: allowed are integers 1\.\.4"),
    ({"n_eval": 0}, "n_eval=0"),
    ({"n_train_questions": -1}, "n_train_questions=-1"),
    ({"n_train_questions": 0}, "fact_fraction=0.5"),
    ({"fact_fraction": 1.5}, "fact_fraction=1.5"),
    ({"seq_len": 6}, "seq_len=6"),
    ({**TINY_GRAPH, "n_train_questions": 21}, r"n_train_questions=21 \+ n_eval=4.* at most 24"),
])
def test_multihop_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiHopTask(**kwargs)


def test_multihop_is_gin_configurable():
    gin.parse_config("MultiHopTask.hops = 2\nMultiHopTask.n_train_questions = 7")
    try:
        assert MultiHopTask().hops == 2 and len(MultiHopTask().train_questions) == 7
    finally:
        gin.clear_config()


# ---------------------------------------------------------------- text

# Every line holds its own number, so no two 8-token blocks are equal; some lines are blank.
TRAIN_LINES = ["" if i % 7 == 3 else "   " if i % 7 == 5 else
               " ".join(["the", "cat", "sat", "on", "mat"][: i % 5 + 1] + [str(i)])
               for i in range(30)]
EVAL_LINES = ["the dog sat on the red mat", "a bird ran"]


@pytest.fixture
def text_setup(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"])
    core.train_from_iterator(TRAIN_LINES + EVAL_LINES, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]",
                                        pad_token="[PAD]", eos_token="[EOS]")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text("\n".join(TRAIN_LINES) + "\n")
    (data / "validation.txt").write_text("\n".join(EVAL_LINES) + "\n")

    def make(**kwargs):
        args = dict(dataset=str(data), tokenizer=str(tmp_path / "tokenizer"), seq_len=8,
                    cache_dir=str(tmp_path / "cache"), hf_cache_dir=str(tmp_path / "hf"))
        return TextTask(**{**args, **kwargs})

    return make, tokenizer, tmp_path


def stream(tokenizer, lines):
    """Expected token stream, built independently: non-empty lines, each followed by eos."""
    ids = []
    for line in lines:
        if line.strip():
            ids += tokenizer(line, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids)


def test_text_packs_documents_into_blocks_with_doc_ids(text_setup):
    make, tokenizer, _ = text_setup
    task = make()
    tokens = stream(tokenizer, TRAIN_LINES)
    assert torch.equal(task.train_tokens.long(), tokens)
    assert task.n_train_blocks == (len(tokens) - 1) // 8 and task.vocab_size == len(tokenizer)
    seen = []
    for step in range(task.n_train_blocks // 4):  # one epoch
        batch = task.train_batch(step, 4)
        assert batch.input_ids.shape == (4, 8)
        for inputs, targets, docs in zip(batch.input_ids, batch.targets, batch.doc_ids):
            start = [b * 8 for b in range(task.n_train_blocks)
                     if torch.equal(tokens[b * 8 : b * 8 + 8], inputs)]
            assert start and torch.equal(targets, tokens[start[0] + 1 : start[0] + 9])
            seen.append(start[0] // 8)
            after_eos = (inputs[:-1] == tokenizer.eos_token_id).long()
            assert docs[0] == 0 and torch.equal(docs.diff(), after_eos)  # new id after each eos
            for doc in docs.unique():  # eos, if any, only ends a document
                assert (inputs[docs == doc][:-1] != tokenizer.eos_token_id).all()
    assert len(set(seen)) == len(seen)  # an epoch visits blocks without repetition


def test_text_batches_are_deterministic_across_instances_and_epochs(text_setup):
    make, _, _ = text_setup
    task, resumed = make(), make(seed=0)
    n = task.n_train_blocks
    assert_batches_equal(task.train_batch(3, 2), resumed.train_batch(3, 2))
    other_seed = make(seed=1).train_batch(3, 2)
    assert not torch.equal(task.train_batch(3, 2).input_ids, other_seed.input_ids)
    epoch0 = torch.cat([task.train_batch(s, 1).input_ids for s in range(n)])
    epoch1 = torch.cat([task.train_batch(s, 1).input_ids for s in range(n, 2 * n)])
    assert sorted(map(tuple, epoch0.tolist())) == sorted(map(tuple, epoch1.tolist()))  # same blocks
    assert not torch.equal(epoch0, epoch1)  # in a new order
    # A batch straddling the epoch boundary takes its tail from the next epoch.
    assert torch.equal(task.train_batch(0, n + 1).input_ids[n], epoch1[0])


def test_text_eval_blocks_are_fixed_and_capped(text_setup):
    make, tokenizer, _ = text_setup
    task = make()
    tokens = stream(tokenizer, EVAL_LINES)
    assert task.n_eval_blocks == (len(tokens) - 1) // 8 >= 1
    rows = torch.cat([b.input_ids for b in task.eval_batches(1)])
    assert torch.equal(rows.flatten(), tokens[: task.n_eval_blocks * 8])
    capped = make(seq_len=2, max_eval_blocks=3)
    assert capped.n_eval_blocks == 3 and sum(len(b.input_ids) for b in capped.eval_batches(2)) == 3


def test_text_reuses_its_token_cache_and_notices_changed_files(text_setup, monkeypatch):
    import datasets

    make, _, tmp_path = text_setup
    first = make()
    cached = sorted((tmp_path / "cache").glob("tokens-*.pt"))
    assert len(cached) == 2  # train and validation

    def no_loading(*args, **kwargs):
        raise AssertionError("the cached token stream should have been used")

    monkeypatch.setattr(datasets, "load_dataset", no_loading)
    second = make(seq_len=4)  # seq_len is not part of the cache key
    assert torch.equal(second.train_tokens, first.train_tokens)
    with open(tmp_path / "data" / "train.txt", "a") as f:
        f.write("one more line\n")
    with pytest.raises(AssertionError, match="cached token stream"):
        make()  # a changed file is a new key: it must be tokenized again


def test_text_single_file_with_sliced_splits(text_setup):
    make, tokenizer, tmp_path = text_setup
    task = make(dataset=str(tmp_path / "data" / "train.txt"), split="train[:50%]",
                eval_split="train[50%:]")
    half = len(TRAIN_LINES) // 2
    assert torch.equal(task.train_tokens.long(), stream(tokenizer, TRAIN_LINES[:half]))
    assert torch.equal(task.eval_tokens.long(), stream(tokenizer, TRAIN_LINES[half:]))


def test_text_offline_hub_names_give_a_clear_error(text_setup, monkeypatch):
    import datasets
    import huggingface_hub

    make, _, tmp_path = text_setup
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the libraries read it at import, so patch them too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnreachableError, match="hub is unreachable.*local files") as error:
        make(dataset="no-such-org/no-such-dataset")
    assert "no-such-org/no-such-dataset" in str(error.value)
    message = "tokenizer 'no-such-org/no-such-tokenizer'.*unreachable"
    with pytest.raises(HubUnreachableError, match=message):
        make(tokenizer="no-such-org/no-such-tokenizer")


@pytest.mark.parametrize("kwargs, message", [
    ({"seq_len": 0}, "seq_len=0"),
    ({"dataset_config": "x"}, "dataset_config='x'"),
    ({"text_field": "body"}, "text_field='body'"),
])
def test_text_rejects_bad_arguments(text_setup, kwargs, message):
    make, _, _ = text_setup
    with pytest.raises(ValueError, match=message):
        make(**kwargs)
