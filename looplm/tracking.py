"""Experiment tracking: every run is an Aim run (or nothing, when switched off).

Per-loop metrics are one Aim metric with a `{"loop": t}` context, so Aim's explorer can group
and compare loops; evaluation metrics carry `{"subset": "eval"}`. The early-exit frontier of the
latest evaluation is one structured run value, `run["exit_frontier"]` (a curve, not a time
series: as metrics it was 57 of a run's 111 series).
"""

import fcntl
from pathlib import Path

import gin


FRONTIER_KEYS = ("rule", "threshold", "acc", "exact_match", "mean_loops")


@gin.configurable
class Tracker:
    def __init__(self, repo: str | None = "runs/aim", experiment: str = "default", enabled: bool = True):
        self.repo, self.experiment, self.enabled = repo, experiment, enabled
        self.run = None

    def open(self, hparams: dict, run_hash: str | None = None, name: str | None = None,
             config_text: str | None = None) -> str | None:
        """Start a new Aim run, or reopen `run_hash` when a resumed job continues its run. `name`
        is what Aim's run list shows; `config_text` the run's config.gin, one binding a line."""
        if not self.enabled:
            return None
        import aim

        ensure_repo(self.repo)
        if run_hash:
            self.run = aim.Run(run_hash=run_hash, repo=self.repo)
        else:
            self.run = aim.Run(repo=self.repo, experiment=self.experiment)
            self.run["hparams"] = hparams
            if config_text is not None:
                self.run["config"] = config_text
            if name:
                self.run.name = name
        return self.run.hash

    def log(self, metrics: dict, step: int, context: dict | None = None) -> None:
        """Track scalar metrics; a list value is per loop and gets `{"loop": t}` (1-based), a dict
        {loop: value} the loops it names (a sampled step reads out only some loops)."""
        if self.run is None:
            return
        context = context or {}
        for name, value in metrics.items():
            if isinstance(value, (list, tuple, dict)):
                for t, v in (value.items() if isinstance(value, dict) else enumerate(value, start=1)):
                    self.run.track(float(v), name=name, step=step, context={**context, "loop": t})
            else:
                self.run.track(float(value), name=name, step=step, context=context)

    def log_frontier(self, points: list[dict], step: int) -> None:
        """The early-exit frontier of the evaluation at `step` (looplm.evaluate's points: rule,
        threshold, acc, exact_match, mean_loops), replacing the previous one."""
        if self.run is not None:
            self.run["exit_frontier"] = {"step": step, "points": [
                {k: p[k] for k in FRONTIER_KEYS} for p in points]}

    def close(self) -> None:
        if self.run is not None:
            self.run.close()
            self.run = None


def source_commit() -> str | None:
    """The git commit looplm runs from (with "+dirty" when the tree has changes), or None outside
    a git checkout: recorded with every run, so a result can be traced to its code."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def ensure_repo(repo: str) -> None:
    """Create the Aim repo once, under a file lock: runs that start together into a new repo
    would otherwise race in Aim's own initialisation and all but one fail ("out of date")."""
    from aim.sdk.repo import Repo, RepoStatus

    # a repo being created exists before its version file does, and reads as "out of date"
    unready = (RepoStatus.MISSING, RepoStatus.UPDATE_REQUIRED)
    if Repo.check_repo_status(repo) not in unready:
        return
    Path(repo).mkdir(parents=True, exist_ok=True)
    with open(Path(repo) / ".looplm-init.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if Repo.check_repo_status(repo) == RepoStatus.MISSING:
            Repo.from_path(repo, init=True)


def open_repo(path: str):
    """An Aim repo whose queries see every run, including ones that just finished.

    Aim indexes runs lazily in a background thread of the UI server; a collect step that runs
    right after the jobs would miss them, so index the runs whose index is out of date here."""
    import aim
    from aim.sdk.index_manager import RepoIndexManager

    repo = aim.Repo.from_path(str(path))
    manager = RepoIndexManager.get_index_manager(repo)
    index = repo._get_index_tree("meta", 0).view(())
    for run_hash in repo.list_all_runs():
        if manager._is_run_index_outdated(run_hash, index):
            manager.index(run_hash)
    return repo
