"""Stage I gate against Stage II gate, per seed: the fewest mean loops each early-exit rule needs to
keep the exact match of running all T loops (within half a point), from the runs' summary.json.

    python sweeps/results/stage2/frontier.py STAGE1_RUN STAGE2_RUN [STAGE1_RUN STAGE2_RUN ...]
"""

import json
import sys
from pathlib import Path

TOLERANCE = 0.005


def cheapest(frontier: list[dict], rule: str, target: float):
    """(mean loops, exact match) of the cheapest setting of `rule` within TOLERANCE of `target`."""
    ok = [p for p in frontier if p["rule"] == rule and p["exact_match"] >= target - TOLERANCE]
    return min(((p["mean_loops"], p["exact_match"]) for p in ok), default=None)


def main(paths: list[str]) -> None:
    print("| Stage I run | exact match at T | static | state change | Q-exit, Stage I gate | Q-exit, Stage II gate |")
    print("|---|---|---|---|---|---|")
    for first, second in zip(paths[::2], paths[1::2]):
        one, two = (json.loads((Path(p) / "summary.json").read_text())["eval"] for p in (first, second))
        T = len(one["exit_p"])
        target = one["exact_match"][T - 1]
        cells = [cheapest(one["exit_frontier"], "static", target), cheapest(one["exit_frontier"], "state_change", target),
                 cheapest(one["exit_frontier"], "q_exit", target), cheapest(two["exit_frontier"], "q_exit", target)]
        text = [f"{c[0]:.2f} loops ({c[1]:.1%})" if c else "never" for c in cells]
        print(f"| {Path(first).name} | {target:.1%} | " + " | ".join(text) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
