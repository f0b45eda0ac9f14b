"""The lm-evaluation-harness adapter: its three request types against direct computations, and
`lm_eval --model looplm` (through python -m looplm.infer.harness) on local task files."""

import json

import gin
import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")
from lm_eval.api.instance import Instance  # noqa: E402

from looplm.config import model_config  # noqa: E402
from looplm.data.addition import AdditionTask  # noqa: E402
from looplm.exits import QExit  # noqa: E402
from looplm.infer.generate import generate  # noqa: E402
from looplm.infer.harness import LoopLMHarness, main  # noqa: E402
from looplm.infer.load import RunError  # noqa: E402
from looplm.model import LoopLM  # noqa: E402
from looplm.run import main as run_main  # noqa: E402

pytestmark = pytest.mark.usefixtures("clean_gin")  # loading a run parses its config.gin (tests/conftest.py)

DOCS = [{"question": "12+34= ", "answer": "64<eos>", "choices": ["64<eos>", "46<eos>", "11<eos>"], "label": 0},
        {"question": "50+25= ", "answer": "57<eos>", "choices": ["75<eos>", "57<eos>"], "label": 1},
        {"question": "7+8= ", "answer": "51<eos>", "choices": ["51<eos>", "15<eos>", "99<eos>"], "label": 0}]


def tiny():
    torch.manual_seed(0)
    task = AdditionTask(n_digits=2, n_eval=8)
    model = LoopLM(model_config("tiny", vocab_size=task.vocab_size, init_std=0.3)).double().eval()
    return model, task


@torch.no_grad()
def direct_logprob(model, ids: list[int], n_context: int, n_loops: int) -> float:
    """log p(ids[n_context:] | ids[:n_context]) read at the last of n_loops loops, token by token."""
    traj = model(torch.tensor([ids]), n_loops=n_loops)
    logp = F.log_softmax(model.logits(traj.states[-1][0]).double(), -1)
    return float(sum(logp[j - 1, ids[j]] for j in range(n_context, len(ids))))


def test_loglikelihood_rolling_and_generation_equal_direct_computations():
    model, task = tiny()
    lm = LoopLMHarness(model=model, task=task, batch_size=2, max_length=64)
    pairs = [(d["question"], c) for d in DOCS for c in d["choices"]]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    for (context, continuation), (score, greedy) in zip(pairs, got):
        ids = [task.eos_id] + task.encode(context)
        full = ids + task.encode(continuation)
        assert score == pytest.approx(direct_logprob(model, full, len(ids), model.cfg.n_loops), abs=1e-9)
    text = "1234+5678= 2196<eos>"
    (rolled,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [task.eos_id] + task.encode(text)
    assert rolled == pytest.approx(direct_logprob(model, ids, 1, model.cfg.n_loops), abs=1e-9)
    short = LoopLMHarness(model=model, task=task, max_length=8)  # windows of 8: still every token once
    (windowed,) = short.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert windowed < 0 and len(ids) > 8
    gen = lm.generate_until([Instance("generate_until", {}, (d["question"], {"until": ["9"], "max_gen_toks": 5}), i)
                             for i, d in enumerate(DOCS)])
    ref = generate(model, [[task.eos_id] + task.encode(d["question"]) for d in DOCS], 5, eos=task.eos_id).tokens
    for text_out, tokens in zip(gen, ref):
        expected = task.decode([t for t in tokens if t != task.eos_id]).split("9")[0]
        assert text_out == expected


def test_exit_rule_and_loop_count_are_model_arguments():
    model, task = tiny()
    ctx, cont = "12+34= ", "64<eos>"
    at2 = LoopLMHarness(model=model, task=task, n_loops=2).loglikelihood([Instance("loglikelihood", {}, (ctx, cont), 0)])
    ids = [task.eos_id] + task.encode(ctx)
    assert at2[0][0] == pytest.approx(direct_logprob(model, ids + task.encode(cont), len(ids), 2), abs=1e-9)
    q1 = LoopLMHarness(model=model, task=task, exit_rule="q_exit=1.0")
    full = LoopLMHarness(model=model, task=task)
    request = [Instance("loglikelihood", {}, (ctx, cont), 0)]
    assert q1.loglikelihood(request) == full.loglikelihood(request)
    assert isinstance(q1.rule, QExit) and q1.rule.q == 1.0


TASKS = {
    "looplm_gen": {"output_type": "generate_until", "doc_to_target": "{{answer}}",
                   "generation_kwargs": {"until": ["<eos>"], "max_gen_toks": 4},
                   "metric_list": [{"metric": "exact_match"}]},
    "looplm_choice": {"output_type": "multiple_choice", "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
                      "target_delimiter": "", "metric_list": [{"metric": "acc"}]},
}


@pytest.fixture
def task_dir(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    for name, fields in TASKS.items():
        config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                  "test_split": "test", "doc_to_text": "{{question}}", **fields}
        (tmp_path / f"{name}.yaml").write_text(json.dumps(config))  # JSON is YAML
    return tmp_path


@pytest.fixture
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    gin.clear_config()
    code = run_main(["--bind", f'train.run_dir = "{path}"', "--bind", "train.steps = 2",
                     "--bind", "Tracker.enabled = False", "--bind", "train.progress = False",
                     "--bind", "AdditionTask.n_eval = 8", "--bind", "model_config.d_model = 32",
                     "--bind", "model_config.d_ff = 64", "--bind", "lr_multiplier.warmup_steps = 1"])
    gin.clear_config()
    assert code == 0
    return path


def test_lm_eval_runs_the_registered_looplm_model_on_local_task_files(run_dir, task_dir):
    """What `lm_eval --model looplm --include_path DIR` does, minus indexing lm-eval's thousands of
    built-in task files (include_defaults=False keeps the test fast)."""
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model="looplm", model_args=f"run_dir={run_dir},n_loops=3,exit_rule=q_exit=0.5",
                                  tasks=["looplm_gen", "looplm_choice"], batch_size=2,
                                  task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    scores = out["results"]
    lm = LoopLMHarness(run_dir=str(run_dir), n_loops=3, exit_rule="q_exit=0.5")
    picks = []
    for d in DOCS:
        got = lm.loglikelihood([Instance("loglikelihood", {}, (d["question"], c), i) for i, c in enumerate(d["choices"])])
        picks.append(max(range(len(got)), key=lambda i: got[i][0]) == d["label"])
    assert scores["looplm_choice"]["acc,none"] == pytest.approx(sum(picks) / len(DOCS))
    answers = lm.generate_until([Instance("generate_until", {}, (d["question"], {"until": ["<eos>"], "max_gen_toks": 4}), i)
                                 for i, d in enumerate(DOCS)])
    expected = sum(a == d["answer"] for a, d in zip(answers, DOCS)) / len(DOCS)
    assert scores["looplm_gen"]["exact_match,none"] == pytest.approx(expected)
    assert "exit_rule=q_exit=0.5" in out["config"]["model_args"]
    queue = LoopLMHarness(run_dir=str(run_dir), n_loops=3, exit_rule="q_exit=0.5", schedule="staggered", batch_size=2)
    assert queue.generate_until([Instance("generate_until", {}, (d["question"], {"until": ["<eos>"], "max_gen_toks": 4}), i)
                                 for i, d in enumerate(DOCS)]) == answers  # a queue over 2 slots, the same answers
    with pytest.raises(RunError, match="schedule='async': allowed are"):
        LoopLMHarness(run_dir=str(run_dir), schedule="async")


def test_harness_command_line_names_the_looplm_model(capsys):
    """python -m looplm.infer.harness is lm_eval's own command line with looplm registered."""
    from lm_eval.api.registry import get_model

    assert get_model("looplm") is LoopLMHarness
    with pytest.raises(SystemExit) as stop:
        main(["run", "--help"])
    assert stop.value.code == 0 and "--model" in capsys.readouterr().out
