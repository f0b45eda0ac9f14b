"""Sweeps without Slurm: the grid and its task ids, the shipped declarations and .slurm files, the
CLI, tiny local tasks writing into one Aim repo at the same time, resume into the same Aim run,
the collected table and plots with missing tasks reported by name, and collect grouping by sweep
id and grid point: runs that are not seeds of one config are refused, never averaged."""

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from looplm.exits import default_rules
from looplm.lab import Bundle, Sweep
from looplm.lab.aim_runs import RunResult, run_config
from looplm.lab.declaration import load
from looplm.lab.groups import MixedRuns, group_runs
from looplm.lab.launch import run_argv
from looplm.tracking import ensure_repo
from looplm.lab.paths import paths

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.py"))
PRIOR = ROOT / "sweeps" / "prior_ablation.py"

STEPS, EVAL_EVERY = 6, 3
TINY = (f"TRAIN_STEPS = {STEPS}; AdditionTask.n_eval = 32; model_config.d_model = 32; "
        f"model_config.n_layers = 1; model_config.d_ff = 64; train.batch_size = 16; "
        f"train.eval_every = {EVAL_EVERY}")


def tiny_env(tmp: Path, **extra) -> dict:
    """The environment of a tiny sweep writing under tmp: 2 priors x 3 seeds of prior_ablation."""
    return {**os.environ, "LOOPLM_SWEEP_DIR": str(tmp / "sweep"), "LOOPLM_AIM_REPO": str(tmp / "aim"),
            "LOOPLM_SWEEP_GRID": "prior=uniform,geometric_0.5;beta=0.1", "LOOPLM_SWEEP_SEEDS": "0,1,2",
            "LOOPLM_SWEEP_BIND": TINY, "OMP_NUM_THREADS": "1", **extra}


def cli(module: str, *args, env=None, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


# ------------------------------------------------------------------------------ grid and task ids

def example() -> Sweep:
    return Sweep(name="demo", base=["gin/full_unroll.gin"], bind=["import variants.priors"],
                 grid={"prior": {"uniform": "Recipe.prior = @UniformPrior()",
                                 "geometric": Bundle(gin=["gin/prior_geometric.gin"],
                                                     bind=["GeometricPrior.lambda_p = 0.3"])},
                       "UniformPrior.beta": [0.01, 0.1, 1]},
                 seeds=[5, 7])


def test_grid_expands_in_declaration_order_with_seeds_innermost():
    tasks = example().tasks()
    assert len(tasks) == 2 * 3 * 2
    assert [t.id for t in tasks] == list(range(12))
    # task i = point i // len(seeds), seed seeds[i % len(seeds)]; the last axis varies fastest
    assert [(t.point, t.seed) for t in tasks[:4]] == [
        ("prior=uniform,beta=0.01", 5), ("prior=uniform,beta=0.01", 7),
        ("prior=uniform,beta=0.1", 5), ("prior=uniform,beta=0.1", 7)]
    t = tasks[9]
    assert (t.name, t.point, t.seed) == ("prior=geometric,beta=0.1,seed=7", "prior=geometric,beta=0.1", 7)
    assert t.gin == ("gin/prior_geometric.gin",)
    assert t.bind == ("GeometricPrior.lambda_p = 0.3", "UniformPrior.beta = 0.1")
    assert t.grid == {"prior": "geometric", "UniformPrior.beta": 0.1}  # scalars stay numbers
    assert tasks[0].bind == ("Recipe.prior = @UniformPrior()", "UniformPrior.beta = 0.01")


def test_selection_keeps_names_and_renumbers_ids():
    full = {t.name: t for t in example().tasks()}
    small = example().select("prior=geometric; beta=1 0.01")  # short axis name, space-separated
    tasks = small.tasks()
    assert [t.name for t in tasks] == ["prior=geometric,beta=1,seed=5", "prior=geometric,beta=1,seed=7",
                                       "prior=geometric,beta=0.01,seed=5", "prior=geometric,beta=0.01,seed=7"]
    assert [t.id for t in tasks] == [0, 1, 2, 3]
    for t in tasks:  # same run directory and settings as in the full grid: a task resumes its own run
        assert (t.gin, t.bind, t.grid) == (full[t.name].gin, full[t.name].bind, full[t.name].grid)


@pytest.mark.parametrize("kwargs, message", [
    ({"grid": {"beta": [0.1, 0.2]}}, "must be a gin parameter"),
    ({"grid": {"prior": {"a b": "x.y = 1"}}}, "labels"),
    ({"grid": {"A.beta": [1], "B.beta": [2]}}, "short name"),
    ({"seeds": [1, 1]}, "each once"),
    ({"name": "bad name"}, "Sweep.name"),
    ({"grid": {}}, "is empty"),
    ({"grid": {"prior": {}}}, "has no values"),
])
def test_declaration_errors_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sweep(**{"name": "demo", "base": ["gin/base.gin"], "grid": {"prior": {"a": "x.y = 1"}}, **kwargs})


@pytest.mark.parametrize("spec, message", [("nope=1", "no axis 'nope'"), ("beta=3", "no value")])
def test_bad_selection_lists_the_choices(spec, message):
    with pytest.raises(ValueError, match=message):
        example().select(spec)


def test_environment_overrides(tmp_path):
    env = {"LOOPLM_SWEEP_GRID": "prior=uniform;beta=0.1", "LOOPLM_SWEEP_SEEDS": "3 4",
           "LOOPLM_SWEEP_BIND": "train.steps = 6;\ntrain.eval_every = 3",
           "LOOPLM_SWEEP_DIR": str(tmp_path / "out"), "LOOPLM_AIM_REPO": "aim://host:53800"}
    sweep = load(PRIOR, env)
    tasks = sweep.tasks()
    assert [t.name for t in tasks] == ["prior=uniform,beta=0.1,seed=3", "prior=uniform,beta=0.1,seed=4"]
    where = paths(sweep, env)
    assert where.run_dir(tasks[1]) == tmp_path / "out" / "prior=uniform,beta=0.1,seed=4"
    assert where.repo == "aim://host:53800" and where.remote
    argv = run_argv(sweep, tasks[1], where)
    binds = argv[1::2][argv[0::2].index("--bind"):]
    # the sweep's bindings, the grid point's, the overrides, then what the sweep sets itself
    assert binds[:6] == ["import variants.priors", "Recipe.prior = @UniformPrior()", "UniformPrior.beta = 0.1",
                         "GeometricPrior.beta = 0.1", "train.steps = 6", "train.eval_every = 3"]
    assert f'train.run_dir = "{tmp_path}/out/prior=uniform,beta=0.1,seed=4"' in binds
    assert 'Tracker.experiment = "prior_ablation"' in binds and "train.seed = 4" in binds
    assert argv[0] == "--gin" and (ROOT / argv[1]).resolve() == ROOT / "gin" / "full_unroll.gin"


def test_sweep_id_is_the_declaration_not_the_selection():
    """One sweep run from any grid selection, seeds or LOOPLM_SWEEP_BIND (a resume with a longer
    TRAIN_STEPS) keeps its id; another declaration under the same name gets another."""
    full = load(PRIOR, {})
    assert full.id.startswith("prior_ablation-")
    assert load(PRIOR, {"LOOPLM_SWEEP_GRID": "prior=uniform", "LOOPLM_SWEEP_SEEDS": "7",
                        "LOOPLM_SWEEP_BIND": "TRAIN_STEPS = 6"}).id == full.id
    assert Sweep(name="prior_ablation", base=full.base, grid=full.grid, bind=[*full.bind, "x.y = 1"]).id != full.id
    assert Sweep(name="prior_ablation", base=["gin/sampled_step.gin"], grid=full.grid).id != full.id
    where = paths(full, {})
    hparams = eval(run_argv(full, full.tasks()[0], where)[-1].split(" = ", 1)[1])  # the train.hparams literal
    assert hparams["sweep_id"] == full.id and hparams["grid_point"] == full.tasks()[0].point


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_task_of_the_shipped_sweeps_is_a_valid_gin_config(path):
    """Every task's gin files and bindings parse (files exist, configurables and parameters are
    known); the hparams literal comes back as the dict the sweep wrote."""
    code = f"""
import gin, sys
from looplm.lab.declaration import load
from looplm.lab.launch import run_argv
from looplm.lab.paths import paths
from looplm.run import parse_config
from looplm.train import train
s = load({str(path)!r}, {{}})
where = paths(s, {{}})
for task in s.tasks():
    argv = run_argv(s, task, where)
    gin.clear_config()
    parse_config(argv[1::2][:argv.count("--gin")], argv[1::2][argv.count("--gin"):])
    hparams = gin.query_parameter("train.hparams")
    assert hparams["task"] == task.name and hparams["grid"] == task.grid, hparams
    assert gin.query_parameter("train.seed") == task.seed
print(len(s.tasks()))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) == len(load(path, {}).tasks())


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_slurm_script_matches_its_declaration(path):
    script = path.with_suffix(".slurm").read_text()
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S*))?", script, re.MULTILINE))
    sweep = load(path, {})
    assert sbatch["array"] == f"0-{len(sweep.tasks()) - 1}", "the --array line must cover the grid"
    assert sbatch["job-name"] == sweep.name
    assert "%A_%a" in sbatch["output"] and sbatch["open-mode"] == "append"
    assert "requeue" in sbatch and re.fullmatch(r"B:USR1@\d+", sbatch["signal"])
    assert sbatch["time"] and sbatch["cpus-per-task"]
    assert re.search(rf'^exec bash .*/sweeps/task\.sh" sweeps/{path.name}$', script, re.MULTILINE)
    assert "srun" in script and "torchrun" in script  # the multi-GPU shape, commented
    assert (ROOT / Path(sbatch["output"]).parent).is_dir(), "Slurm does not create the log folder"


# ------------------------------------------------------------------------------------------- CLI

def test_cli_count_list_and_print():
    assert cli("looplm.sweep", "count", PRIOR).stdout.strip() == "54"
    env = {**os.environ, "LOOPLM_SWEEP_GRID": "prior=geometric_0.9", "LOOPLM_SWEEP_SEEDS": "0"}
    assert cli("looplm.sweep", "count", PRIOR, env=env).stdout.strip() == "3"
    listing = cli("looplm.sweep", "list", PRIOR, env=env).stdout
    assert "prior=geometric_0.9,beta=0.05,seed=0" in listing and "GeometricPrior.lambda_p = 0.9" in listing
    line = cli("looplm.sweep", "run", PRIOR, "--task", 1, "--print", env=env).stdout
    assert line.startswith("python -m looplm.run --gin ") and "beta=0.05,seed=0" in line
    bad = cli("looplm.sweep", "run", PRIOR, "--task", 3, env=env, check=False)
    assert bad.returncode == 2 and "tasks 0-2" in bad.stderr


# ------------------------------------------------------------------- tiny tasks, Aim and collect

@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """Tasks 0, 1, 3, 4 of a 6-task sweep (2 priors x seeds 0, 1, 2), all four at once into one
    Aim repo; tasks 2 and 5 (seed 2) never run."""
    tmp = tmp_path_factory.mktemp("sweep")
    env = tiny_env(tmp)
    procs = [subprocess.Popen([sys.executable, "-m", "looplm.sweep", "run", str(PRIOR), "--task", str(i)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in (0, 1, 3, 4)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    return tmp, env


def test_concurrent_tasks_lose_no_run_and_no_metric(local_sweep):
    from looplm.tracking import open_repo

    tmp, env = local_sweep
    tasks = {t.name: t for t in load(PRIOR, env).tasks()}
    sweep_id = load(PRIOR, env).id
    runs = [r for r in open_repo(str(tmp / "aim")).iter_runs() if r.experiment == "prior_ablation"]
    names = sorted(r["hparams"]["task"] for r in runs)
    assert names == sorted(tasks[n].name for n in tasks if not n.endswith("seed=2"))
    for run in runs:
        hp = run["hparams"]
        task = tasks[hp["task"]]
        assert (hp["grid_point"], hp["grid"], hp["seed"]) == (task.point, task.grid, task.seed)
        assert hp["sweep_id"] == sweep_id
        assert hp["gin"]["Recipe.prior"].startswith("@") and hp["gin"]["train.seed"] == str(task.seed)
        series = {}
        for m in run.metrics():
            if not m.name.startswith("__system__"):  # Aim's own resource sampling
                ctx = m.context.to_dict()
                key = (m.name, ctx["subset"], ctx.get("loop") or (ctx.get("exit_rule"), ctx.get("threshold")))
                series[key] = m.data.view("val").numpy()[0].tolist()
        T, train_steps, eval_steps = 4, list(range(STEPS)), list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
        expected = {(name, "train", (None, None)) for name in ("loss", "grad_norm", "lr", "tokens_per_s", "wall_time",
                                                               "n_loops", "exit_mean", "entropy")}
        expected |= {(name, "train", t) for name in ("ce", "acc", "exit_p") for t in range(1, T + 1)}
        expected |= {(name, "eval", t) for name in ("ce", "acc", "exact_match") for t in range(1, 2 * T + 1)}
        expected |= {("exit_p", "eval", t) for t in range(1, T + 1)}
        expected |= {("exit_mean", "eval", (None, None)), ("entropy", "eval", (None, None))}
        assert set(series) == expected
        frontier = run["exit_frontier"]  # one structured value for the last evaluation's frontier
        assert frontier["step"] == STEPS
        assert [(p["rule"], p["threshold"]) for p in frontier["points"]] == [rule.label for rule in default_rules(T)]
        for (name, subset, loop), steps in series.items():
            assert steps == (train_steps if subset == "train" else eval_steps), (name, subset, loop)


def test_collect_reports_missing_tasks_by_name_and_writes_the_rest(local_sweep):
    tmp, env = local_sweep
    proc = cli("looplm.sweep", "collect", PRIOR, env=env, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    for missing in ("prior=uniform,beta=0.1,seed=2", "prior=geometric_0.5,beta=0.1,seed=2"):
        assert f"{missing}: missing: no Aim run" in out
    results = tmp / "sweep" / "results"
    header, *rows = csv.reader((results / "table.csv").open())
    assert header[:6] == ["grid_point", "n_seeds", "n_expected", "n_loops", "train_loss_mean", "train_loss_std"]
    assert "eval_acc_loop8_mean" in header and "wall_s_std" in header and "gate_loops_mean" in header
    assert [row[:4] for row in rows] == [["prior=uniform,beta=0.1", "2", "3", "4"],
                                         ["prior=geometric_0.5,beta=0.1", "2", "3", "4"]]
    assert all(float(v) >= 0 for row in rows for v in row[4:])  # every number there, std with 2 seeds
    md = (results / "table.md").read_text()
    assert "| prior=uniform,beta=0.1 | 2/3 | 4 |" in md and "## Missing or failed tasks" in md
    assert "`prior=uniform,beta=0.1,seed=2`: missing" in md
    for png in ("loss_curves.png", "accuracy_vs_loops.png", "exit_distribution.png", "exit_frontier.png"):
        data = (results / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, png
    assert "grid point" in out and "± " in out  # the rich table, with mean ± std


def test_analyze_without_expectations_counts_every_finished_run(local_sweep, tmp_path):
    tmp, _ = local_sweep
    proc = cli("looplm.analyze", "--experiment", "prior_ablation", "--repo", tmp / "aim",
               "--out", tmp_path)
    _, *rows = csv.reader((tmp_path / "table.csv").open())
    assert proc.returncode == 0 and [row[:3] for row in rows] == [["prior=uniform,beta=0.1", "2", "2"],
                                                                  ["prior=geometric_0.5,beta=0.1", "2", "2"]]


def test_collected_exit_frontier_equals_each_runs_summary(local_sweep):
    """The early-exit points analyze reads back from Aim are the ones each run wrote to its
    summary.json; the table's Q-exit column is looplm.exits.loops_to_full_depth of them."""
    from looplm.exits import loops_to_full_depth, read_frontier
    from looplm.lab.aim_runs import read_experiment
    from looplm.lab.groups import group_runs
    from looplm.tracking import open_repo

    tmp, _ = local_sweep
    results = read_experiment(open_repo(str(tmp / "aim")), "prior_ablation")
    assert len(results) == 4
    for r in results:
        key = lambda p: (p["rule"], p["threshold"])  # noqa: E731
        want = sorted(read_frontier(r.run_dir), key=key)
        assert sorted(r.frontier, key=key) == want
    for g in group_runs(results, None):
        gate = [loops_to_full_depth(r.frontier)["q_exit"] for r in g.runs]
        assert g.scalar("gate_loops")[0] == pytest.approx(sum(gate) / len(gate))


def test_resume_continues_the_same_aim_run_after_a_hard_kill(tmp_path):
    """A task stopped at step 3 (its checkpoint says so) whose Aim run is still locked by a
    process of another machine (a killed incarnation on another node): started again by Slurm
    (SLURM_RESTART_COUNT=1), it releases the stale lock, resumes, and logs steps 3..5 into the
    same run, so the run holds 0..5 once each."""
    import aim
    from aim.sdk.lock_manager import LockManager

    from looplm.tracking import open_repo

    select = {"LOOPLM_SWEEP_GRID": "prior=uniform;beta=0.1", "LOOPLM_SWEEP_SEEDS": "0"}
    env = tiny_env(tmp_path, **select, LOOPLM_SWEEP_BIND=TINY.replace(f"TRAIN_STEPS = {STEPS}", "TRAIN_STEPS = 3"))
    cli("looplm.sweep", "run", PRIOR, "--task", 0, env=env)
    [run] = list(open_repo(str(tmp_path / "aim")).iter_runs())
    lock = Path(aim.Repo.from_path(str(tmp_path / "aim")).path) / "locks" / f"{run.hash}.softlock"
    lock.write_text(f"{LockManager.machine_id + 1}-1-0")  # held by "another machine"
    assert LockManager(lock.parent.parent).get_run_lock_info(run.hash).locked

    proc = cli("looplm.sweep", "run", PRIOR, "--task", 0, "--resume",  # a new TRAIN_STEPS: say so
               env={**tiny_env(tmp_path, **select), "SLURM_RESTART_COUNT": "1"})
    assert "releasing the stale Aim lock" in proc.stdout and "at step 3" in proc.stdout
    runs = list(open_repo(str(tmp_path / "aim")).iter_runs())
    assert [r.hash for r in runs] == [run.hash]
    [loss] = [m for m in runs[0].metrics() if m.name == "loss"]
    assert loss.data.view("val").numpy()[0].tolist() == list(range(STEPS))
    [wall] = [m for m in runs[0].metrics() if m.name == "wall_time"]
    assert wall.data.view("val").numpy()[0].tolist() == list(range(STEPS))  # summed over both starts


def test_a_task_with_several_runs_counts_once():
    """E.g. an empty run left by a task killed while starting, then its complete rerun, then a
    partial run of a re-submission: the complete one counts, whatever the order."""
    import numpy as np

    from looplm.lab.aim_runs import RunResult, dedupe

    def run(name, steps_done, created):
        r = RunResult(name, "task", 0, "point", 0, "/sweep/task", steps=6, n_loops=4, created=created)
        r.loss_steps, r.eval_step = np.arange(steps_done), 6 if steps_done == 6 else -1
        return r

    empty, complete, partial = run("empty", 0, 1.0), run("complete", 6, 2.0), run("partial", 3, 3.0)
    kept, superseded = dedupe([empty, complete, partial])
    assert kept == [complete] and superseded == [empty, partial]
    assert partial.problem == "stopped at step 3 of 6" and complete.problem is None


# --------------------------------------------------------------------- runs that must not be mixed

def fake_run(name: str, point: str, seed: int, config: dict, sweep_id: str | None = "demo-1") -> RunResult:
    return RunResult(name, f"{point},seed={seed}", 0, point, seed, f"/{sweep_id}/{point},seed={seed}", steps=6,
                     n_loops=4, created=0.0, sweep_id=sweep_id, config=config)


def test_run_config_leaves_out_only_what_seeds_differ_in():
    def hparams(seed, steps="6"):
        return {"seed": seed, "task": f"p=1,seed={seed}", "task_id": seed, "run_dir": f"/s/p=1,seed={seed}",
                "steps": int(steps), "recipe": {"estimator": "ExitWeighted"}, "model": {"d_model": 32},
                "gin": {"train.seed": str(seed), "train.run_dir": f"'/s/p=1,seed={seed}'", "TRAIN_STEPS": steps,
                        "train.hparams": f"{{'task': 'p=1,seed={seed}'}}", "Recipe.prior": "@UniformPrior()"}}

    assert run_config(hparams(0)) == run_config(hparams(1))
    assert run_config(hparams(0)) == {"steps": 6, "recipe: estimator": "ExitWeighted", "model: d_model": 32,
                                      "gin: TRAIN_STEPS": "6", "gin: Recipe.prior": "@UniformPrior()"}
    longer = run_config(hparams(1, steps="300"))
    assert {k for k in longer if longer[k] != run_config(hparams(0))[k]} == {"steps", "gin: TRAIN_STEPS"}


def test_a_group_whose_runs_differ_in_more_than_the_seed_is_refused():
    full = {"gin: Recipe.estimator": "@ExitWeighted()", "steps": 6}
    sampled = {"gin: Recipe.estimator": "@SampledStep()", "steps": 6}
    a, b = fake_run("aaa", "all", 0, full, None), fake_run("bbb", "all", 1, sampled, None)
    with pytest.raises(MixedRuns, match=r"runs aaa \(.*\) and bbb \(.*\) differ in more than the seed.*"
                                        r"gin: Recipe.estimator: '@ExitWeighted\(\)' vs '@SampledStep\(\)'"):
        group_runs([a, b], None)
    with pytest.raises(MixedRuns, match="runs aaa .* and ccc .* same config and the same seed 0"):
        group_runs([a, fake_run("ccc", "all", 0, full, None)], None)
    [group] = group_runs([a, fake_run("ddd", "all", 1, full, None)], None)  # seeds of one config: fine
    assert [r.run_hash for r in group.runs] == ["aaa", "ddd"] and group.point == "all"


def test_two_sweeps_of_one_name_are_grouped_apart():
    six, three = {"gin: TRAIN_STEPS": "6"}, {"gin: TRAIN_STEPS": "3"}
    runs = [fake_run("a", "p=1", 0, six), fake_run("b", "p=1", 1, six), fake_run("c", "p=1", 0, three, "demo-2")]
    groups = group_runs(runs, None)
    assert [(g.point, g.sweep_id, [r.run_hash for r in g.runs]) for g in groups] == [
        ("p=1 [demo-1]", "demo-1", ["a", "b"]), ("p=1 [demo-2]", "demo-2", ["c"])]


def test_collect_keeps_two_lengths_of_one_sweep_apart(local_sweep, tmp_path):
    """The same declaration run again with another TRAIN_STEPS into another folder but the same
    Aim repo: collect of the sweep counts only its own tasks' runs; the experiment's runs
    collected as a whole are refused, naming the length (before, the 3-step run was averaged into
    the 6-step runs' grid point as a third seed)."""
    tmp, env = local_sweep
    shutil.copytree(tmp / "aim", tmp_path / "aim")  # the module's repo stays as the other tests expect it
    env = {**env, "LOOPLM_AIM_REPO": str(tmp_path / "aim")}
    short = {**env, "LOOPLM_SWEEP_DIR": str(tmp_path / "short"), "LOOPLM_SWEEP_SEEDS": "2",
             "LOOPLM_SWEEP_GRID": "prior=uniform;beta=0.1",
             "LOOPLM_SWEEP_BIND": TINY.replace(f"TRAIN_STEPS = {STEPS}", "TRAIN_STEPS = 3")}
    cli("looplm.sweep", "run", PRIOR, "--task", 0, env=short)

    proc = cli("looplm.sweep", "collect", PRIOR, env=env, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # seed 2 still missing, as before
    assert "prior=uniform,beta=0.1,seed=2: missing: no Aim run" in proc.stdout
    assert f"{tmp_path / 'short'}/prior=uniform,beta=0.1,seed=2) is not a task of" in proc.stdout
    _, *rows = csv.reader((tmp / "sweep" / "results" / "table.csv").open())
    assert [row[:3] for row in rows] == [["prior=uniform,beta=0.1", "2", "3"],
                                         ["prior=geometric_0.5,beta=0.1", "2", "3"]]

    proc = cli("looplm.analyze", "--experiment", "prior_ablation", "--repo", tmp_path / "aim", "--out",
               tmp_path / "all", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert "grid point 'prior=uniform,beta=0.1'" in proc.stderr and "gin: TRAIN_STEPS: '6' vs '3'" in proc.stderr
    assert str(tmp_path / "short") in proc.stderr


def test_collect_refuses_unrelated_runs_of_one_experiment(tmp_path):
    """`python -m looplm.run` runs outside a sweep (experiment "default", grid point "all"):
    full unroll and sampled step are not two seeds of one config; collect says which keys differ."""
    repo = tmp_path / "aim"
    ensure_repo(str(repo))
    binds = [*(b.strip() for b in TINY.split(";")), "train.tracker = @Tracker()", f"Tracker.repo = '{repo}'",
             "Tracker.enabled = True"]
    argv = {name: [arg for b in [*binds, f"train.run_dir = '{tmp_path / name}'"] for arg in ("--bind", b)]
            for name in ("full_unroll", "sampled_step")}
    procs = [subprocess.Popen([sys.executable, "-m", "looplm.run", "--gin", f"gin/{name}.gin", *argv[name]],
                              cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for name in ("full_unroll", "sampled_step")]
    for p in procs:
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, out

    proc = cli("looplm.analyze", "--experiment", "default", "--repo", repo, "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    [message] = proc.stderr.strip().splitlines()
    assert message.startswith("collect error: grid point 'all': runs ") and "differ in more than the seed" in message
    assert str(tmp_path / "full_unroll") in message and str(tmp_path / "sampled_step") in message
    pair = {"'@ExitWeighted()' vs '@SampledStep()'", "'@SampledStep()' vs '@ExitWeighted()'"}  # in read order
    assert any(f"gin: Recipe.estimator: {p};" in message for p in pair), message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("seeds, band", [(2, False), (3, True)])
def test_a_plotted_group_shows_each_seed_its_mean_and_a_min_max_band_from_three_seeds(seeds, band):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from looplm.lab.plots import _spread

    curves = np.array([[1.0, 0.5, 0.2], [2.0, 0.4, 0.1], [4.0, 0.3, 0.05]])[:seeds]
    fig, ax = plt.subplots()
    ax.set_yscale("log")
    _spread(ax, np.arange(3), curves, "C0", "point")
    lines = ax.get_lines()
    assert len(lines) == seeds + 1  # one thin line per seed, then the mean
    np.testing.assert_allclose(lines[-1].get_ydata(), curves.mean(0))
    assert lines[-1].get_label() == f"point (n={seeds})"
    assert [line.get_linewidth() < lines[-1].get_linewidth() for line in lines[:-1]] == [True] * seeds
    bands = ax.collections
    assert len(bands) == int(band)
    if band:  # min-max: positive wherever the data are, so it draws on a log scale
        vertices = bands[0].get_paths()[0].vertices
        assert vertices[:, 1].min() == pytest.approx(curves.min()) and vertices[:, 1].max() == pytest.approx(curves.max())
    plt.close(fig)
