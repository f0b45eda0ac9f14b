"""The inference entry points on a run folder: python -m looplm.generate / looplm.eval, their bad
inputs (exit 2, the value named), and the lm-evaluation-harness adapter on local task files."""

import json

import gin
import pytest
import torch

from looplm.infer.cli import eval_main, generate_main
from looplm.infer.generate import generate
from looplm.infer.held_out import held_out_units
from looplm.infer.load import load_run
from looplm.run import main as run_main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A briefly trained default-job run (tiny width), its folder as training leaves it."""
    path = tmp_path_factory.mktemp("run")
    gin.clear_config()
    code = run_main(["--bind", f'train.run_dir = "{path}"', "--bind", "train.steps = 30",
                     "--bind", "Tracker.enabled = False", "--bind", "train.progress = False",
                     "--bind", "AdditionTask.n_eval = 32", "--bind", "model_config.d_model = 32",
                     "--bind", "model_config.d_ff = 64", "--bind", "lr_multiplier.warmup_steps = 5"])
    gin.clear_config()
    assert code == 0
    return path


@pytest.fixture(autouse=True)
def clean_gin():
    yield
    gin.clear_config()


def test_load_run_gives_the_trained_model_and_task(run_dir):
    model, task = load_run(run_dir)
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert type(task).__name__ == "AdditionTask" and task.n_eval == 32


def test_generate_command_prints_each_prompt_and_its_cost(run_dir, capsys):
    code = generate_main([str(run_dir), "--prompt", "1234+5678=", "--prompt", "12+34=",
                          "--max-new-tokens", "5", "--rule", "q_exit=0.5", "--cache", "last"])
    out = capsys.readouterr().out
    assert code == 0
    assert "'1234+5678=' ->" in out and "'12+34=' ->" in out and "mean loops computed" in out


@pytest.mark.parametrize("args, message", [
    (["--prompt", "12+x="], "outside AdditionTask's vocabulary"),
    (["--rule", "q_exit=2"], "QExit.q=2"),
    (["--rule", "sometimes=1"], "sometimes"),
    (["--ids", "3 99"], "token 99"),
    (["--max-new-tokens", "0", "--prompt", "1+1="], "max_new_tokens=0"),
    ([], "at least one --prompt")])
def test_generate_command_bad_inputs_exit_2_naming_the_value(run_dir, capsys, args, message):
    assert generate_main([str(run_dir), *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_run_folder_exits_2(tmp_path, capsys):
    assert eval_main([str(tmp_path / "nowhere")]) == 2
    assert "config.gin does not exist" in capsys.readouterr().err


def test_eval_command_scores_each_rule_and_agrees_with_generate(run_dir, tmp_path, capsys):
    out_json = tmp_path / "eval.json"
    code = eval_main([str(run_dir), "--rule", "all", "--rule", "static=1", "--rule", "q_exit=0.5",
                      "--max-examples", "12", "--select-only", "--json", str(out_json)])
    assert code == 0
    rows = json.loads(out_json.read_text())
    assert [r["rule"] for r in rows] == ["all", "static", "q_exit"]
    assert rows[0]["mean_loops"] == 4 and rows[1]["mean_loops"] < 2
    model, task = load_run(run_dir)
    units = held_out_units(task, 12)
    new = generate(model, [u.prompt for u in units], max(len(u.answer) for u in units)).tokens
    exact = sum(n[:len(u.answer)] == u.answer for n, u in zip(new, units)) / len(units)
    assert rows[0]["exact_match"] == exact
    assert 0 <= rows[2]["exact_match_select_only"] <= 1
    assert "q_exit" in capsys.readouterr().out
    assert eval_main([str(run_dir), "--task", "mano"]) == 2
    assert "trained on 'addition'" in capsys.readouterr().err


def test_teacher_forced_eval_scores_next_token_accuracy_of_full_passes(run_dir, tmp_path):
    out_json = tmp_path / "forced.json"
    assert eval_main([str(run_dir), "--rule", "all", "--rule", "q_exit=0.5", "--max-examples", "12",
                      "--teacher-forced", "--select-only", "--json", str(out_json)]) == 0
    rows = json.loads(out_json.read_text())
    model, task = load_run(run_dir)
    correct = total = 0
    with torch.no_grad():
        for unit in held_out_units(task, 12):
            seq = unit.prompt + unit.answer[:-1]
            traj = model(torch.tensor([seq]), n_loops=model.cfg.n_loops)
            pred = model.logits(traj.states[-1][0]).argmax(-1)[len(unit.prompt) - 1:].tolist()
            correct += sum(p == a for p, a in zip(pred, unit.answer))
            total += len(unit.answer)
    assert rows[0]["token_acc"] == pytest.approx(correct / total)
    assert rows[1]["mean_loops"] < 4 and 0 <= rows[1]["token_acc_select_only"] <= 1
    assert eval_main([str(run_dir), "--teacher-forced", "--schedule", "staggered"]) == 2


def test_staggered_schedule_on_the_command_line_scores_and_generates_as_lockstep(run_dir, tmp_path, capsys):
    rows = {}
    for schedule in ("lockstep", "staggered"):
        out_json = tmp_path / f"{schedule}.json"
        assert eval_main([str(run_dir), "--rule", "q_exit=0.5", "--rule", "all", "--max-examples", "12",
                          "--batch-size", "5", "--schedule", schedule, "--json", str(out_json)]) == 0
        rows[schedule] = [{k: r[k] for k in ("rule", "exact_match", "token_acc", "mean_loops")}
                          for r in json.loads(out_json.read_text())]
    assert rows["staggered"] == rows["lockstep"]
    printed = []
    for schedule in ("lockstep", "staggered"):
        assert generate_main([str(run_dir), "--prompt", "1234+5678=", "--prompt", "12+34=", "--prompt", "9+9=",
                              "--rule", "q_exit=0.5", "--schedule", schedule, "--slots", "2"]) == 0
        printed.append([line for line in capsys.readouterr().out.splitlines() if "->" in line])
    assert printed[0] == printed[1] and len(printed[0]) == 3
    assert generate_main([str(run_dir), "--prompt", "1+1=", "--slots", "0"]) == 2
    assert "slots=0" in capsys.readouterr().err


def test_held_out_units_are_the_prompts_and_answers_of_the_task(run_dir):
    _, task = load_run(run_dir)
    units = held_out_units(task)
    assert len(units) == 32
    a, b = task.eval_pairs[0].tolist()
    text = task.decode(units[0].prompt + units[0].answer)
    assert text.startswith(task.decode(units[0].prompt)) and text.endswith("<eos>")
    assert str(a + b)[::-1] in text and task.decode(units[0].prompt).endswith("= ")
