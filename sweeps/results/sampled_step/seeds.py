"""Issue 13's benchmark over seeds: does the sampled step reach full unroll's final exact match at
T (within one point) with <= 60% of its training FLOPs and wall time, at an exit entropy within
10% of full unroll's?

    python sweeps/results/sampled_step/seeds.py STEP_MS_RATIO FU_SEED0.json SS_SEED0.json [FU SS ...]

Each pair is experiment.py's output for full unroll and the sampled step at one seed (the same
seed, run side by side). STEP_MS_RATIO is the sampled step's time per training step over full
unroll's, measured interleaved by timing.py: whole-run wall times on a shared CPU measure the
neighbours too, so the wall-time share is that ratio times the share of steps. Prints a Markdown
table, one line per seed and the mean.
"""

import sys

from plot import load

POINT = 0.01  # "within one point" of exact match


def first_match(run: dict, target: float, T: int):
    """The first evaluation whose exact match at T is within a point of `target`."""
    return next((row for row in run["eval"] if row["exact_match"][T - 1] >= target - POINT), None)


def main(ratio: float, paths: list[str]) -> None:
    pairs = [(load(f"fu={a}")[1], load(f"ss={b}")[1]) for a, b in zip(paths[::2], paths[1::2])]
    print("| seed | full unroll at T (step 2000) | its exit entropy | sampled step first within 1 point: step | exact match at T | FLOPs vs full unroll's 2000 steps | wall time (steps x step-time ratio) | exit entropy there | entropy vs full | whole-run wall s, full / sampled (side by side) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    met = []
    for (fu, ss), fu_path in zip(pairs, paths[::2]):
        T = len(fu["eval"][-1]["exit_p"])
        final = fu["eval"][-1]
        steps = final["step"]
        hit = first_match(ss, final["exact_match"][T - 1], T)
        seed = next((b.split("=")[1] for b in fu["bind"] if b.startswith("train.seed")), "?")
        if hit is None:
            print(f"| {seed} | {final['exact_match'][T - 1]:.1%} | {final['entropy']:.3f} | never | "
                  f"{ss['eval'][-1]['exact_match'][T - 1]:.1%} | - | - | - | - | {fu['wall_time']:.0f} / {ss['wall_time']:.0f} |")
            met.append(False)
            continue
        flops = hit["flops"] / fu["flops"]
        wall = ratio * hit["step"] / steps
        entropy = hit["entropy"] / final["entropy"] - 1
        met.append(flops <= 0.6 and wall <= 0.6 and abs(entropy) <= 0.1)
        print(f"| {seed} | {final['exact_match'][T - 1]:.1%} | {final['entropy']:.3f} | {hit['step']} | "
              f"{hit['exact_match'][T - 1]:.1%} | {flops:.0%} | {wall:.0%} | {hit['entropy']:.3f} | {entropy:+.0%} | "
              f"{fu['wall_time']:.0f} / {ss['wall_time']:.0f} |")
    print(f"\nTargets (FLOPs and wall time <= 60%, entropy within 10%) met at {sum(met)} of {len(met)} seeds "
          f"(step-time ratio {ratio:.2f}).")


if __name__ == "__main__":
    main(float(sys.argv[1]), sys.argv[2:])
