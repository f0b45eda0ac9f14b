"""Sweep-side bad inputs: a declaration with an empty grid or that does not even run, a .slurm
--array line or a Slurm array that does not fit the sweep, and collect with no runs to collect.
Each stops with exit code 2 and one `... error: ...` line naming the input, never a traceback.
The commands run in-process (their `main`), so the battery takes seconds; tests/test_sweep.py runs
`python -m looplm.sweep` itself."""

import os
from pathlib import Path

import pytest

from looplm.lab import collect, sweep_cli

MAINS = {"looplm.sweep": sweep_cli.main, "looplm.analyze": collect.main}

GRID = '{"prior": {"uniform": "Recipe.prior = @UniformPrior()", "none": "Recipe.prior = None"}}'
SWEEP = 'from looplm.lab import Sweep\nSWEEP = Sweep(name="demo", base=["gin/full_unroll.gin"], {args})\n'
FOUR_TASKS = SWEEP.format(args=f"grid={GRID}, seeds=[0, 1]")  # 2 grid points x 2 seeds


def slurm_array(low: int, high: int) -> dict:
    """What Slurm sets in a task of `sbatch --array=low-high`."""
    return {"SLURM_ARRAY_JOB_ID": "41", "SLURM_ARRAY_TASK_ID": str(low), "SLURM_ARRAY_TASK_MIN": str(low),
            "SLURM_ARRAY_TASK_MAX": str(high), "SLURM_ARRAY_TASK_COUNT": str(high - low + 1)}


@pytest.fixture(scope="module")
def aim_repo(tmp_path_factory) -> Path:
    """An Aim repo whose one run, of experiment "demo", belongs to another sweep of that name (no
    metrics: collect refuses before reading them)."""
    import aim

    repo = tmp_path_factory.mktemp("bad_inputs") / "aim"
    aim.Repo.from_path(str(repo), init=True)
    run = aim.Run(repo=str(repo), experiment="demo")
    run["hparams"] = {"sweep": "demo", "sweep_id": "demo-0ther", "task": "prior=none,seed=0"}
    run.close()
    return repo


# (id, declaration source or None, .slurm --array line or None, command after `python -m`, extra
#  environment, what the message must name); {tmp} is the test's folder, {aim} the repo above
CASES = [
    ("empty grid", SWEEP.format(args="grid={}"), None, ["looplm.sweep", "count"], {},
     ["demo.py", "grid={} is empty"]),
    ("axis without values", SWEEP.format(args='grid={"prior": {}}'), None, ["looplm.sweep", "list"], {},
     ["demo.py", "'prior' has no values"]),
    ("no grid at all", SWEEP.format(args="seeds=[0]"), None, ["looplm.sweep", "count"], {},
     ["demo.py, line 2", "missing 1 required positional argument: 'grid'"]),
    ("declaration does not parse", "SWEEP = Sweep(\n", None, ["looplm.sweep", "count"], {},
     ["demo.py, line 1", "SyntaxError"]),
    ("declaration raises", "from looplm.lab import Sweep\nSWEEP = Sweep(name=NAME)\n", None,
     ["looplm.sweep", "run"], {}, ["demo.py, line 2", "NameError", "NAME"]),
    ("--array line behind the grid", FOUR_TASKS, "0-1", ["looplm.sweep", "check"], {},
     ["demo.slurm", "--array=0-1", "4 tasks", "--array=0-3"]),
    ("Slurm array beyond the tasks", FOUR_TASKS, "0-3", ["looplm.sweep", "run"], slurm_array(0, 53),
     ["array 0-53", "4 tasks (0-3)", "--array=0-3"]),
    ("the .slurm's own --array line run after the grid grew", FOUR_TASKS, "0-1", ["looplm.sweep", "run"],
     slurm_array(0, 1), ["demo.slurm", "'#SBATCH --array=0-1'", "4 tasks"]),
    ("collect: no Aim repo", FOUR_TASKS, None, ["looplm.sweep", "collect"], {"LOOPLM_AIM_REPO": "{tmp}/none"},
     ["no Aim repo at", "none"]),
    ("collect: only another sweep's runs", FOUR_TASKS, None, ["looplm.sweep", "collect"], {"LOOPLM_AIM_REPO": "{aim}"},
     ["no runs of sweep 'demo' (id demo-", "demo-0ther"]),
    ("analyze: an Aim repo without runs of the experiment", None, None,
     ["looplm.analyze", "--experiment", "nothing", "--repo", "{aim}", "--out", "{tmp}/out"], {},
     ["no runs of experiment 'nothing'", "its experiments: demo"]),
    ("analyze: a folder that is no Aim repo", None, None,
     ["looplm.analyze", "--experiment", "demo", "--repo", "{tmp}", "--out", "{tmp}/out"], {}, ["no Aim repo at"]),
    ("analyze: a sweep file that does not exist", None, None, ["looplm.analyze", "--expect-tasks", "{tmp}/nope.py"],
     {}, ["nope.py", "not found"]),
]


@pytest.fixture
def clean_env(monkeypatch):
    """No SLURM_* or LOOPLM_* variables but those a case sets."""
    for name in os.environ:
        if name.startswith(("SLURM_", "LOOPLM_")):
            monkeypatch.delenv(name)
    return monkeypatch


def run(command: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python -m command...`, run in this process."""
    code = MAINS[command[0]](command[1:])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("declaration, array, command, env, named", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_sweep_input_is_one_clear_error(tmp_path, aim_repo, clean_env, capsys, declaration, array, command, env,
                                            named):
    if declaration is not None:
        (tmp_path / "demo.py").write_text(declaration)
        command = [*command, str(tmp_path / "demo.py")]
    if array is not None:
        (tmp_path / "demo.slurm").write_text(f"#!/bin/bash\n#SBATCH --job-name=demo\n#SBATCH --array={array}\n")
    for name, value in {"LOOPLM_SWEEP_DIR": "{tmp}/sweep", **env}.items():
        clean_env.setenv(name, value.format(tmp=tmp_path, aim=aim_repo))
    code, out, err = run([c.format(tmp=tmp_path, aim=aim_repo) for c in command], capsys)  # a raise fails the test
    assert code == 2 and out == "", out + err
    [message] = err.strip().splitlines()
    assert message.startswith(("sweep error: ", "collect error: ")), message
    for part in named:
        assert part in message, (part, message)
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "out").exists(), "nothing is written"


def test_a_smaller_array_given_on_the_command_line_is_fine(tmp_path, clean_env, capsys):
    """Rerunning some tasks (`sbatch --array=1`) is not a mismatch: only an array beyond the tasks,
    or the .slurm file's own stale line, is."""
    (tmp_path / "demo.py").write_text(FOUR_TASKS)
    (tmp_path / "demo.slurm").write_text("#SBATCH --array=0-3\n")
    for low, high in [(0, 1), (1, 1), (0, 3)]:
        for name, value in slurm_array(low, high).items():
            clean_env.setenv(name, value)
        code, out, err = run(["looplm.sweep", "run", str(tmp_path / "demo.py"), "--print"], capsys)
        assert code == 0, err
        assert out.startswith("python -m looplm.run ") and f"seed={low % 2}" in out
    code, out, err = run(["looplm.sweep", "check", str(tmp_path / "demo.py")], capsys)
    assert code == 0 and "4 tasks" in out, err
