"""A throwaway single-node Slurm cluster for tests (see sweeps/local_slurm.sh).

tests/conftest.py imports it once, so every test module shares one cluster per session.
"""

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "sweeps" / "local_slurm.sh"


class SlurmCluster:
    def __init__(self, dir: Path):
        self.dir = dir
        self.env = {**os.environ, "SLURM_CONF": str(dir / "slurm.conf")}

    def _run(self, args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=self.env, capture_output=True, text=True)

    def check(self, args: list[str]) -> str:
        """Run a Slurm command against this cluster; its stdout, or RuntimeError if it fails."""
        proc = self._run(args)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def submit(self, args: list[str]) -> str:
        """sbatch ARGS; returns the job id (for an array, the array's job id)."""
        return self.check(["sbatch", "--parsable", *args]).strip().split(";")[0]

    def wait(self, job_id: str, timeout: float) -> None:
        """Wait until the job (every task of an array) has left squeue."""
        deadline = time.monotonic() + timeout
        while self._queued(job_id):
            if time.monotonic() > deadline:
                states = [record["JobState"] for record in self._records(job_id)]
                raise TimeoutError(f"job {job_id} still queued after {timeout}s: {states}")
            time.sleep(0.5)

    def _queued(self, job_id: str) -> bool:
        proc = self._run(["squeue", "-h", "-j", job_id])
        if proc.returncode != 0 and "Invalid job id" not in proc.stderr:  # purged after MinJobAge
            raise RuntimeError(f"squeue -j {job_id} failed ({proc.returncode}): {proc.stderr.strip()}")
        return bool(proc.stdout.strip())

    def _records(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job -o` as one dict per line (one per array task); [] if unknown."""
        out = self._run(["scontrol", "show", "job", "-o", job_id]).stdout
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]

    def job_state(self, job_id: str) -> str:
        """e.g. PENDING, RUNNING, COMPLETED, FAILED; from scontrol, else the jobcomp file."""
        for record in self._records(job_id):
            if record["JobId"] == job_id:
                return record["JobState"]
        jobcomp = self.dir / "log" / "jobcomp.txt"
        lines = jobcomp.read_text().splitlines() if jobcomp.exists() else []
        states = [m[1] for line in lines if (m := re.match(rf"JobId={job_id} .*JobState=(\S+)", line))]
        if not states:
            raise KeyError(f"job {job_id} unknown to scontrol and not in {jobcomp}")
        return states[-1]

    def array_states(self, job_id: str) -> dict[int, str]:
        """{task id: state} of an array job; pending tasks still grouped (e.g. "1-3%2") are expanded."""
        states = {}
        for record in self._records(job_id):
            if "ArrayTaskId" not in record:
                raise ValueError(f"job {job_id} is not an array job")
            for part in record["ArrayTaskId"].split("%")[0].split(","):
                first, _, last = part.partition("-")
                for task in range(int(first), int(last or first) + 1):
                    states[task] = record["JobState"]
        if not states:
            raise KeyError(f"array job {job_id} unknown to scontrol")
        return states


@pytest.fixture(scope="session")
def slurm_cluster():
    if not shutil.which("slurmctld", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
        message = "Slurm not installed: run sweeps/local_slurm.sh install"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    # Not under pytest's tmp_path: munged needs every folder above its socket searchable by all.
    cluster_dir = Path(tempfile.mkdtemp(prefix="looplm-slurm-"))
    start = subprocess.run([SCRIPT, "start", cluster_dir], capture_output=True, text=True)
    if start.returncode != 0:
        subprocess.run([SCRIPT, "stop", cluster_dir], capture_output=True)
        pytest.fail(f"local Slurm cluster did not start (files in {cluster_dir}):\n"
                    f"{start.stdout}{start.stderr}")
    try:
        yield SlurmCluster(cluster_dir)
    finally:
        stop = subprocess.run([SCRIPT, "stop", cluster_dir], capture_output=True, text=True)
        if stop.returncode != 0:
            pytest.fail(f"local Slurm cluster did not stop (files in {cluster_dir}):\n"
                        f"{stop.stdout}{stop.stderr}")
        shutil.rmtree(cluster_dir)


def poll(condition, timeout: float, what: str) -> None:
    """Wait for condition() to hold, checking every 0.2 s; TimeoutError naming `what` after timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout}s")
        time.sleep(0.2)
