"""Run by torchrun in the data-parallel tests: trains every case of dist_cases in every mode
given, each into <out>/<case>-<mode>, and exits (rank 0 writes the checkpoints the test reads)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dist_cases  # noqa: E402

out, stage1, modes, cases = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(","), sys.argv[4].split(",")
for case in cases:
    for mode in modes:
        dist_cases.run(case, out / f"{case}-{mode}", parallel=mode, stage1=stage1)
