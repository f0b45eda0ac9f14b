"""BiographyTask (looplm.data.biographies): the knowledge-bits bound checked against closed forms
and against evaluate()'s own cross-entropy, deterministic data, loss on the value tokens only,
clear errors, and a tiny model that memorises a small population."""

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from looplm.config import model_config
from looplm.data import IGNORE_INDEX, BiographyTask
from looplm.data.biographies import ATTRIBUTES, GIVEN, SURNAMES, knowledge_bits
from looplm.evaluate import evaluate
from looplm.model import LoopLM
from looplm.run import main


pytestmark = pytest.mark.usefixtures("clean_gin")  # tests/conftest.py


def scored(task: BiographyTask, known: set[str]) -> dict:
    """The hook's result for a made-up predictor: certain of the true value of every attribute in
    `known`, uniform over the tokens of the value's part for the others (logits 0 on the part,
    -inf elsewhere), its cross-entropy taken by F.cross_entropy from those logits."""
    part_of = {}  # token id -> the ids of its part (the digits of a year share one set)
    for a in task.attributes:
        for part in ATTRIBUTES[a][0]:
            ids = torch.tensor([task.vocab.index(tok) for tok in part])
            part_of |= {int(i): ids for i in ids}
    one_param = SimpleNamespace(num_params=lambda: 1, cfg=SimpleNamespace(n_loops=1))  # bits/param = bits
    metric = task.eval_metric(one_param, 1)
    for batch in task.eval_batches(64):
        ce = torch.zeros(batch.targets.shape, dtype=torch.float64)
        for (r, s) in (batch.targets != IGNORE_INDEX).nonzero().tolist():
            target = int(batch.targets[r, s])
            logits = torch.full((task.vocab_size,), -math.inf, dtype=torch.float64)
            if task.attributes[int(task.attribute_of_token[target])] in known:
                logits[target] = 0.0
            else:
                logits[part_of[target]] = 0.0
            ce[r, s] = F.cross_entropy(logits[None], torch.tensor([target]))
        metric.add(0, ce, batch)
    return metric.result()




@pytest.mark.parametrize("known", [set(), {"birth_date"}, {"major"}, {"birth_city", "employer"},
                                   set(ATTRIBUTES)])
def test_knowing_some_attributes_exactly_and_nothing_else_gives_n_log2_of_their_value_sets(known):
    task = BiographyTask(n_people=30, n_templates=3, permute=True)
    sizes = {"birth_date": 12 * 28 * 200, "birth_city": 64, "university": 32, "major": 16, "employer": 32}
    want = sum(30 * math.log2(sizes[a]) for a in known)  # uniform on the others: 0 bits each
    got = scored(task, known)
    assert got["knowledge_bits"][0] == pytest.approx(want, abs=1e-9)
    assert got["bits_per_param"][0] == pytest.approx(want, abs=1e-9)
    for a in ATTRIBUTES:
        assert got[f"value_ce_bits_{a}"] == pytest.approx(0.0 if a in known else math.log2(sizes[a]))
    if known == set(ATTRIBUTES):
        assert want == pytest.approx(task.max_bits)


def test_the_bound_is_the_formula_n_log2_v_over_e_to_the_loss():
    # log2(|V| / e^p) with p in nats, p / ln 2 passed in bits: 10 people, |V| = 8 and 4
    p = [math.log(2), 0.0]  # one bit short of knowing the first, the second known
    assert knowledge_bits(10, [8, 4], [x / math.log(2) for x in p]) == pytest.approx(
        10 * math.log2(8 / math.exp(p[0])) + 10 * math.log2(4 / math.exp(p[1])))
    assert knowledge_bits(10, [8], [5.0]) == pytest.approx(-20.0)  # worse than uniform is negative


def test_evaluate_reports_the_bits_of_a_real_model_consistently_with_its_own_cross_entropy():
    task = BiographyTask(n_people=40, n_eval=25)
    torch.manual_seed(0)
    model = LoopLM(model_config(preset="tiny", vocab_size=task.vocab_size, n_loops=2))
    scores = evaluate(model, task, max_loops=3, batch_size=4)
    assert len(scores["knowledge_bits"]) == len(scores["bits_per_param"]) == 3
    for bits, per_param in zip(scores["knowledge_bits"], scores["bits_per_param"]):
        assert per_param == pytest.approx(bits / model.num_params())
    # evaluate's mean CE over the supervised tokens at T = 2, rebuilt from the per-attribute bits
    ce_bits = [scores[f"value_ce_bits_{a}"] for a in task.attributes]
    assert math.log(2) * sum(ce_bits) / sum(task.tokens_per_value) == pytest.approx(scores["ce"][1], rel=1e-6)
    assert scores["knowledge_bits"][1] == pytest.approx(
        knowledge_bits(40, task.value_set_sizes, ce_bits))
    assert scores["knowledge_bits"][1] < 0  # an untrained model spreads mass over all 193 tokens


def test_data_is_a_fixed_function_of_the_seeds():
    a, b = (BiographyTask(n_people=50, permute=True, n_templates=2) for _ in range(2))
    for x, y in [(a.train_batch(3, 8), b.train_batch(3, 8)),
                 (next(a.eval_batches(8)), next(b.eval_batches(8)))]:
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.targets, y.targets)
        assert torch.equal(x.doc_ids, y.doc_ids)
    assert not torch.equal(a.train_batch(3, 8).input_ids, a.train_batch(4, 8).input_ids)
    other_stream = BiographyTask(n_people=50, permute=True, n_templates=2, seed=1)
    assert other_stream.values == a.values and other_stream.names == a.names  # the same people
    assert not torch.equal(other_stream.train_batch(3, 8).input_ids, a.train_batch(3, 8).input_ids)
    other_people = BiographyTask(n_people=50, people_seed=1)
    assert other_people.names != a.names and other_people.values != a.values
    assert len(set(map(tuple, a.names))) == 50  # distinct full names


def test_loss_is_on_the_value_tokens_only_in_sentence_order():
    task = BiographyTask(n_people=20, n_templates=3, permute=True)
    name_ids = {task.vocab.index(t) for t in GIVEN + SURNAMES}
    for person in range(20):
        inputs, targets = task.document(person, random.Random(person))
        supervised = [t for t in targets if t != IGNORE_INDEX]
        assert len(inputs) == len(targets) <= task.doc_len
        assert inputs[1:4] == task.names[person] and not name_ids & set(supervised)
        # the values, each whole, in the order the sentences came (the first part of each)
        starts = [i for i, t in enumerate(supervised) if i == 0 or
                  task.attribute_of_token[t] != task.attribute_of_token[supervised[i - 1]]]
        order = [int(task.attribute_of_token[supervised[i]]) for i in starts]
        assert sorted(order) == list(range(len(task.attributes)))
        assert supervised == [tok for k in order for tok in task.value_tokens(person, k)]
        # a target is the next input: the position before each value token predicts it
        assert all(t == IGNORE_INDEX or t == inputs[i + 1] for i, t in enumerate(targets[:-1]))
    batch = task.train_batch(0, 4)
    per_doc = sum(task.tokens_per_value)
    n_docs = sum(int(row.max()) for row in batch.doc_ids)  # the padding is the last id of each row
    assert batch.n_targets == per_doc * n_docs


def test_value_tokens_name_words_and_attributes_never_share_a_token():
    groups = {"names": set(GIVEN + SURNAMES), "words": {w for _, ts in ATTRIBUTES.values() for t in ts
                                                       for w in t.split() if w != "{}"} | {"They"}}
    groups |= {a: {tok for part in parts for tok in part} for a, (parts, _) in ATTRIBUTES.items()}
    for x in groups:
        for y in groups:
            assert x == y or not groups[x] & groups[y], (x, y, groups[x] & groups[y])


def test_fewer_attributes_shrink_the_vocabulary_and_the_bound():
    task = BiographyTask(n_people=10, attributes=("major", "employer"))
    assert task.value_set_sizes == [16, 32] and task.tokens_per_value == [1, 2]
    assert task.max_bits == pytest.approx(10 * (4 + 5))
    assert "March" not in task.vocab


@pytest.mark.parametrize("kwargs, message", [
    ({"n_people": 0}, r"n_people=0: allowed are integers 1\.\.13824"),
    ({"n_people": True}, r"n_people=True: allowed are integers"),
    ({"attributes": ("major", "shoe_size")}, r"attributes=\('major', 'shoe_size'\): allowed is a non-empty "
                                             r"tuple of distinct names from birth_date, birth_city"),
    ({"attributes": ("major", "major")}, r"attributes=\('major', 'major'\)"),
    ({"attributes": ()}, r"attributes=\(\)"),
    ({"n_templates": 4}, r"n_templates=4: allowed are integers 1\.\.3"),
    ({"permute": "yes"}, r"permute='yes': allowed are True, False"),
    ({"n_people": 5, "n_eval": 6}, r"n_eval=6: allowed are None \(all people\) or integers 1\.\.5"),
    ({"seq_len": 20}, r"seq_len=20: allowed are integers >= 37"),
])
def test_bad_values_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BiographyTask(**kwargs)


def test_a_bad_value_on_the_command_line_is_exit_2_naming_it(capsys, tmp_path):
    code = main(["--gin", "gin/capacity.gin", "--bind", "BiographyTask.n_templates = 0",
                 "--bind", f'train.run_dir = "{tmp_path}"', "--bind", "Tracker.enabled = False"])
    assert code == 2
    assert "BiographyTask.n_templates=0: allowed are integers 1..3" in capsys.readouterr().err


def test_a_tiny_model_memorises_a_small_population(tmp_path):
    """End to end through the command line: the bits reach the summary and grow with training."""
    binds = ["TRAIN_STEPS = 300", "BiographyTask.n_people = 40", "BiographyTask.n_eval = None",
             "BiographyTask.seq_len = 128", "train.batch_size = 8", "train.eval_every = 150",
             "model_config.d_model = 32", "model_config.d_ff = 64", "model_config.n_loops = 2",
             "build_optimizer.lr = 1e-2", "train.progress = False", "Tracker.enabled = False",
             f'train.run_dir = "{tmp_path}"']
    args = ["--gin", "gin/capacity.gin"]
    for b in binds:
        args += ["--bind", b]
    assert main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    bits = summary["eval"]["knowledge_bits"][1]  # at T = 2
    max_bits = BiographyTask(n_people=40).max_bits
    assert bits >= 0.5 * max_bits, f"{bits:.0f} of {max_bits:.0f} bits after 300 steps"


def test_the_capacity_sweep_collects_each_runs_bits_and_parameters(tmp_path):
    """Two tasks of sweeps/capacity.py (looped, iso-parameter), tiny, through `looplm.sweep run`
    and `collect`: the table's bits per parameter, knowledge bits and parameter counts are each
    run's own (its summary.json), and the knowledge-capacity plot is drawn."""
    import csv
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "LOOPLM_SWEEP_DIR": str(tmp_path / "sweep"), "LOOPLM_AIM_REPO": str(tmp_path / "aim"),
           "LOOPLM_SWEEP_GRID": "width=d32;model=looped,iso_param", "LOOPLM_SWEEP_SEEDS": "0",
           "LOOPLM_SWEEP_BIND": "TRAIN_STEPS = 12; BiographyTask.n_people = 20; BiographyTask.n_eval = None; "
                                "BiographyTask.seq_len = 128; train.eval_every = 6",
           "OMP_NUM_THREADS": "1"}

    def sweep(*args):
        proc = subprocess.run([sys.executable, "-m", "looplm.sweep", *args, "sweeps/capacity.py"], cwd=root,
                              env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    for task in ("0", "1"):
        sweep("run", "--task", task)
    sweep("collect")
    out = tmp_path / "sweep" / "results"
    header, *rows = list(csv.reader((out / "table.csv").open()))
    col = {name: i for i, name in enumerate(header)}
    assert [row[0] for row in rows] == ["width=d32,model=looped", "width=d32,model=iso_param"]
    for row, point in zip(rows, ["width=d32,model=looped", "width=d32,model=iso_param"]):
        summary = json.loads((tmp_path / "sweep" / f"{point},seed=0" / "summary.json").read_text())
        T = summary["model"]["n_loops"] if "model" in summary else int(row[col["n_loops"]])
        assert float(row[col[f"eval_bits_per_param_loop{T}_mean"]]) == pytest.approx(
            summary["eval"]["bits_per_param"][T - 1], rel=1e-6)
        assert float(row[col[f"eval_knowledge_bits_loop{T}_mean"]]) == pytest.approx(
            summary["eval"]["knowledge_bits"][T - 1], rel=1e-6)
        bits, per_param = summary["eval"]["knowledge_bits"][T - 1], summary["eval"]["bits_per_param"][T - 1]
        assert float(row[col["n_params_mean"]]) == pytest.approx(bits / per_param, rel=1e-6)
    assert [row[col["n_loops"]] for row in rows] == ["4", "1"]
    table = (out / "table.md").read_text()
    assert "Bits of knowledge per parameter (BiographyTask) per loop count" in table
    assert (out / "knowledge_capacity.png").stat().st_size > 10_000
