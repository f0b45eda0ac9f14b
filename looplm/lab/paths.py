"""Where a sweep writes: its folder (one run folder per task, logs/, results/) and its Aim repo,
from LOOPLM_SWEEP_DIR (default runs/sweeps/<name>) and LOOPLM_AIM_REPO (default runs/aim, or
`aim://host:53800` for an Aim server)."""

import os
from dataclasses import dataclass
from pathlib import Path

from looplm.lab.declaration import Sweep, Task

DEFAULT_AIM_REPO = "runs/aim"


def is_remote(repo: str) -> bool:
    """Whether an Aim repo is a tracking server (`aim://host:port`) rather than a folder."""
    return str(repo).startswith("aim://")


@dataclass(frozen=True)
class Paths:
    """Where a sweep writes: <dir>/<task name>/ per task, <dir>/logs/, <dir>/results/."""

    dir: Path
    repo: str  # an Aim repo folder, or aim://host:port

    def run_dir(self, task: Task) -> Path:
        return self.dir / task.name

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def results(self) -> Path:
        return self.dir / "results"

    @property
    def remote(self) -> bool:
        return is_remote(self.repo)


def paths(sweep: Sweep, env=None) -> Paths:
    env = os.environ if env is None else env
    repo = env.get("LOOPLM_AIM_REPO") or DEFAULT_AIM_REPO
    return Paths(dir=Path(env.get("LOOPLM_SWEEP_DIR") or f"runs/sweeps/{sweep.name}").absolute(),
                 repo=repo if is_remote(repo) else str(Path(repo).absolute()))
