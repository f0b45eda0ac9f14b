"""Issue 13's benchmark for the two-stage configuration: the diffusion objective
(gin/sampled_step.gin, formerly sampled_step_diffusion.gin; no gate in the loss) stopped at a
step, then Ouro's Stage II (gin/stage2_gate.gin, LM frozen) trains the gate from that checkpoint. Against full unroll at the
same seed: final exact match at T, training FLOPs and wall time of both stages together, and the
exit entropy after Stage II.

    python sweeps/results/sampled_step/two_stage.py [--plot OUT_PREFIX] DIFF_RATIO STAGE2_RATIO FU0 D0 S0 [FU D S ...]

Each triple is experiment.py's output for full unroll, the diffusion run and its Stage II at one
seed. The ratios are each stage's time per training step over full unroll's (timing.py, measured
interleaved): the wall-time share is sum(ratio x steps) / full unroll's steps. --plot draws
plot.py's curves with each seed's Stage II appended to its diffusion run (OUT_PREFIX.png).
"""

import sys

from looplm.exits import loops_to_full_depth
from plot import load, plot

POINT = 0.01  # "within one point" of exact match


def seed_of(run: dict) -> str:
    return next((b.split("=")[1] for b in run["bind"] if b.startswith("train.seed")), "?")


def row(fu: dict, diff: dict, stage2: dict, ratios: tuple[float, float]) -> tuple[str, bool]:
    T = len(fu["eval"][-1]["exit_p"])
    final, mine, gate = fu["eval"][-1], diff["eval"][-1], stage2["eval"][-1]
    steps = final["step"]
    flops = (diff["flops"] + stage2["flops"]) / fu["flops"]
    wall = (ratios[0] * mine["step"] + ratios[1] * gate["step"]) / steps
    entropy = gate["entropy"] / final["entropy"] - 1
    em, ref = gate["exact_match"][T - 1], final["exact_match"][T - 1]
    saved = {name: loops_to_full_depth(run["frontier"]).get("q_exit") if run.get("frontier") else None for name, run in (("fu", fu), ("s2", stage2))}
    met = em >= ref - POINT and flops <= 0.6 and wall <= 0.6 and abs(entropy) <= 0.1
    seed = seed_of(fu)
    loops = " / ".join("-" if saved[k] is None else f"{saved[k]:.2f}" for k in ("fu", "s2"))
    return (f"| {seed} | {ref:.1%} | {final['entropy']:.3f} | {mine['step']} + {gate['step']} | "
            f"{mine['exact_match'][T - 1]:.1%} | {em:.1%} | {flops:.0%} | {wall:.0%} | {mine['entropy']:.3f} | "
            f"{gate['entropy']:.3f} | {entropy:+.0%} | {loops} |"), met


def joined(diff: dict, stage2: dict) -> dict:
    """The two stages as one run: Stage II's evaluations after the diffusion run's, its steps and
    FLOPs counted on from where the diffusion run stopped."""
    last = diff["eval"][-1]
    later = [{**r, "step": last["step"] + r["step"], "flops": last["flops"] + r["flops"]} for r in stage2["eval"]]
    return {**diff, "eval": diff["eval"] + later, "flops": diff["flops"] + stage2["flops"]}


def main(ratios: tuple[float, float], paths: list[str], out: str | None = None) -> None:
    print("| seed | full unroll at T (step 2000) | its exit entropy | steps: diffusion + Stage II | "
          "exact match at T after diffusion | after Stage II | FLOPs vs full unroll | wall time "
          "(steps x step-time ratios) | exit entropy before Stage II | after | entropy vs full | "
          "Q-exit mean loops at full-depth accuracy, full unroll / two-stage |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    met, curves = [], []
    for a, b, c in zip(paths[::3], paths[1::3], paths[2::3]):
        fu, diff, stage2 = load(f"fu={a}")[1], load(f"d={b}")[1], load(f"s2={c}")[1]
        line, ok = row(fu, diff, stage2, ratios)
        print(line)
        met.append(ok)
        curves += [(f"full unroll, seed {seed_of(fu)}", fu), (f"diffusion + Stage II, seed {seed_of(fu)}", joined(diff, stage2))]
    if out:
        plot(sorted(curves, key=lambda c: not c[0].startswith("full")), f"{out}.png")
    print(f"\nTargets (within 1 point of full unroll at T, FLOPs and wall time <= 60%, entropy within 10%) "
          f"met at {sum(met)} of {len(met)} seeds (step-time ratios {ratios[0]:.2f}, {ratios[1]:.2f}).")


if __name__ == "__main__":
    args = sys.argv[1:]
    out = args[1] if args[:1] == ["--plot"] else None
    args = args[2:] if out else args
    main((float(args[0]), float(args[1])), args[2:], out)
