"""Early exit at inference: per token, the loop whose prediction is used (REFERENCE 2).

Ouro compares these rules at matched mean exit loop (its Figure 5):

    static(n)            every token stops at loop n
    q_exit(q)            the learned gate: the first loop whose exit CDF reaches q
    state_change(tau)    the first loop t >= 2 with ||h_t - h_{t-1}|| / ||h_{t-1}|| < tau
                         (per token, over the model dimension; T if it never falls below tau)

A rule sees the gate logits and the read-out states of loops 1..T and returns the exit loop of
every token. Like Ouro's public code, the frontier runs all T loops and then selects per token, so
it measures accuracy against the mean exit loop, not saved compute; looplm.infer skips the loops
after each exit, asking the rule loop by loop (ExitRule.loop_by_loop). A new rule is one class
registered with `@EXIT_RULES.register("name")`; its loop-by-loop form comes for free (a cheaper
running one is optional).

Every evaluation during training records the frontier of `default_rules(T)` (the Aim run value
exit_frontier, and summary.json); `python -m looplm.exits RUN_DIR ...`
tabulates and plots finished runs side by side.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from looplm.objectives import at_least_float32, q_exit_loop
from looplm.registry import Registry

EXIT_RULES = Registry("exit rule")


class ExitRule:
    knob = ""  # the attribute that sets the rule (a loop, q, tau): frontier points are labelled by it

    def exit_loops(self, gate_logits: torch.Tensor, states: list) -> torch.Tensor:
        """(B, S) exit loop (1-based) from gate logits (B, S, T) and the T states (B, S, d)."""
        raise NotImplementedError

    def loop_by_loop(self, n_loops: int) -> "LoopByLoop":
        """The rule asked after every loop, for inference that skips the loops after each exit;
        a rule may return a cheaper running form (it must agree with exit_loops: tests)."""
        return LoopByLoop(self, n_loops)

    @property
    def label(self) -> tuple[str, float]:
        """(registered name, knob value): how a frontier point is reported."""
        return self.registry_name, float(getattr(self, self.knob))


class LoopByLoop:
    """Which tokens exit by loop t, asked at t = 1, 2, ... with what loops 1..t gave. A rule is
    causal (its exit at t reads loops 1..t), so with loops t+1..T filled by placeholders it exits
    by t exactly when it would given all T: this generic form keeps every gate and state so far."""

    needs_gate = True  # fired() reads the gate logit (else it may be given None)

    def __init__(self, rule: ExitRule, n_loops: int):
        self.rule, self.n_loops, self.gates, self.states = rule, n_loops, [], []

    def fired(self, t: int, state: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """(rows, S) bool from loop t's read-out state (rows, S, d) and gate logit (rows, S): for
        each token that did not exit before t, whether it exits at t (what it says for the others
        does not matter); everything exits at the last loop."""
        if t == self.n_loops:
            return torch.ones(state.shape[:-1], dtype=torch.bool, device=state.device)
        return self.exits_at(t, state, gate)

    def exits_at(self, t: int, state: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """fired() before the last loop: what a running form overrides."""
        self.gates.append(gate)
        self.states.append(state)
        later = self.n_loops - t
        gates = torch.stack(self.gates + [torch.zeros_like(gate)] * later, dim=-1)
        return self.rule.exit_loops(gates, self.states + [state] * later) <= t

    def keep(self, rows: torch.Tensor) -> None:
        """Only `rows` (a boolean mask over the current rows) are asked from now on."""
        self.gates = [g[rows] for g in self.gates]
        self.states = [h[rows] for h in self.states]


@EXIT_RULES.register("static")
class StaticExit(ExitRule):
    knob = "loop"

    def __init__(self, loop: int):
        if isinstance(loop, bool) or not isinstance(loop, int) or loop < 1:
            raise ValueError(f"StaticExit.loop={loop!r} must be an integer >= 1")
        self.loop = loop

    def exit_loops(self, gate_logits, states):
        if self.loop > len(states):
            raise ValueError(f"StaticExit.loop={self.loop} but the model ran {len(states)} loops")
        return torch.full(gate_logits.shape[:-1], self.loop, dtype=torch.long, device=gate_logits.device)

    def loop_by_loop(self, n_loops):
        if self.loop > n_loops:
            raise ValueError(f"StaticExit.loop={self.loop} but the model runs {n_loops} loops")
        return StaticLoopByLoop(self.loop, n_loops)


class StaticLoopByLoop(LoopByLoop):
    needs_gate = False

    def __init__(self, loop: int, n_loops: int):
        self.loop, self.n_loops = loop, n_loops

    def exits_at(self, t, state, gate):
        return torch.full(state.shape[:-1], t >= self.loop, dtype=torch.bool, device=state.device)

    def keep(self, rows):
        pass


@EXIT_RULES.register("q_exit")
class QExit(ExitRule):
    knob = "q"

    def __init__(self, q: float):
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"QExit.q={q} must be in [0, 1]")
        self.q = q

    def exit_loops(self, gate_logits, states):
        return q_exit_loop(gate_logits, self.q)

    def loop_by_loop(self, n_loops):
        return QExitLoopByLoop(self.q, n_loops)


class QExitLoopByLoop(LoopByLoop):
    """CDF(t) from gates 1..t only, the same operations as exit_cdf on them (so the same bits)."""

    def __init__(self, q: float, n_loops: int):
        self.q, self.n_loops, self.gates = q, n_loops, None

    def exits_at(self, t, state, gate):
        gate = at_least_float32(gate)[..., None]
        self.gates = gate if self.gates is None else torch.cat([self.gates, gate], dim=-1)
        return -torch.expm1(torch.cumsum(F.logsigmoid(-self.gates), dim=-1)[..., -1]) >= self.q

    def keep(self, rows):
        self.gates = self.gates[rows]


@EXIT_RULES.register("state_change")
class StateChangeExit(ExitRule):
    knob = "threshold"

    def __init__(self, threshold: float):
        if not threshold >= 0:
            raise ValueError(f"StateChangeExit.threshold={threshold} must be >= 0")
        self.threshold = threshold

    def exit_loops(self, gate_logits, states):
        T = len(states)
        exits = torch.full(gate_logits.shape[:-1], T, dtype=torch.long, device=gate_logits.device)
        for t in range(T - 1, 1, -1):  # from late to early: the earliest loop below tau wins
            exits = torch.where(relative_change(states[t - 2], states[t - 1]) < self.threshold, t, exits)
        return exits

    def loop_by_loop(self, n_loops):
        return StateChangeLoopByLoop(self.threshold, n_loops)


def relative_change(prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """||cur - prev|| / ||prev|| per token, over the model dimension (in float32 at least)."""
    prev, cur = at_least_float32(prev), at_least_float32(cur)
    return (cur - prev).norm(dim=-1) / prev.norm(dim=-1).clamp_min(1e-12)


class StateChangeLoopByLoop(LoopByLoop):
    needs_gate = False

    def __init__(self, threshold: float, n_loops: int):
        self.threshold, self.n_loops, self.prev = threshold, n_loops, None

    def exits_at(self, t, state, gate):
        prev, self.prev = self.prev, state
        if prev is None:
            return torch.zeros(state.shape[:-1], dtype=torch.bool, device=state.device)
        return relative_change(prev, state) < self.threshold

    def keep(self, rows):
        self.prev = self.prev[rows]


STATE_CHANGE_GRID = (1.0, 0.7, 0.5, 0.35, 0.25, 0.18, 0.12, 0.08, 0.05)


def default_rules(n_loops: int) -> list[ExitRule]:
    """Every static exit, Q-exit from eager to never early, and a log grid of state changes.

    With the normed state carried (Ouro), consecutive states of the small trained models here
    differ by 15-75% (loop 2) down to 15-22% (loop 4), so the grid spans 1.0 to 0.05."""
    return ([StaticExit(n) for n in range(1, n_loops + 1)]
            + [QExit(q) for q in (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)]
            + [StateChangeExit(tau) for tau in STATE_CHANGE_GRID])


# -- comparing runs: `python -m looplm.exits RUN_DIR [RUN_DIR ...]` ------------------------------
def read_frontier(run_dir) -> list[dict]:
    """The exit frontier of a finished run's last evaluation (its summary.json)."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give the run_dir of a run that has finished")
    frontier = json.loads(path.read_text()).get("eval", {}).get("exit_frontier")
    if not frontier:
        raise ValueError(f"{path} holds no exit frontier: the run has not evaluated yet")
    return frontier


def frontier_table(frontiers: dict[str, list[dict]]):
    """A rich table of each run's frontier points, each rule's points by mean exit loop."""
    from rich.table import Table

    several = len(frontiers) > 1  # the run column only when there is a choice of run
    table = Table(title="early exit: accuracy against mean exit loop (loops 1..T)")
    for col in ("run",) * several + ("rule", "setting", "mean loops", "token acc", "exact match"):
        table.add_column(col, justify="left" if col in ("run", "rule") else "right")
    for run, points in frontiers.items():
        for rule in dict.fromkeys(p["rule"] for p in points):
            for p in sorted((p for p in points if p["rule"] == rule), key=lambda p: p["mean_loops"]):
                table.add_row(*(run,) * several, rule, f"{p['threshold']:g}", f"{p['mean_loops']:.3f}",
                              f"{p['acc']:.2%}", f"{p['exact_match']:.2%}")
            table.add_section()
    return table


def loops_to_full_depth(points: list[dict], tolerance: float = 0.005) -> dict:
    """Per rule, the fewest mean exit loops among its points whose token accuracy is within
    `tolerance` of exiting every token at the last loop (static T); None if no point is.
    One number per rule for "how much depth can this rule save at no loss"."""
    static = [p for p in points if p["rule"] == "static"]
    full = max(static, key=lambda p: p["threshold"])["acc"]
    best = {}
    for rule in dict.fromkeys(p["rule"] for p in points):
        ok = [p["mean_loops"] for p in points if p["rule"] == rule and p["acc"] >= full - tolerance]
        best[rule] = min(ok) if ok else None
    return best


RULE_STYLES = {"static": ":s", "q_exit": "-o", "state_change": "--^"}


def draw_frontier(ax, points: list[dict], metric: str = "exact_match", label: str = "", **style) -> None:
    """One line per rule of `points` on a matplotlib axis: `metric` against mean exit loop."""
    for rule in dict.fromkeys(p["rule"] for p in points):
        line = sorted((p["mean_loops"], p[metric]) for p in points if p["rule"] == rule)
        ax.plot(*zip(*line), RULE_STYLES.get(rule, "-x"), ms=4, label=f"{label}: {rule}" if label else rule,
                **style)


def plot_frontier(frontiers: dict[str, list[dict]], metric: str, path) -> None:
    """Accuracy against mean exit loop: one line per (run, rule), Ouro's Figure 5 layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for run, points in frontiers.items():
        draw_frontier(ax, points, metric, label=run, alpha=0.85)
    ax.set_xlabel("mean exit loop")
    ax.set_ylabel(metric.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m looplm.exits",
        description="Compare finished runs' early-exit frontiers (static, Q-exit, state change), e.g. a "
                    "Stage I run and the Stage II run trained from it.")
    parser.add_argument("run_dirs", nargs="+", help="run directories (train.run_dir) with a summary.json")
    parser.add_argument("--plot", help="write the frontier plot to this PNG file")
    parser.add_argument("--metric", default="exact_match", choices=("exact_match", "acc"),
                        help="the plot's y axis (default: exact_match)")
    parser.add_argument("--tolerance", type=float, default=0.005,
                        help="token-accuracy gap to the last loop counted as no loss (default 0.005)")
    args = parser.parse_args(argv)
    from rich.console import Console

    try:
        frontiers = {str(d): read_frontier(d) for d in args.run_dirs}
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    console = Console()
    console.print(frontier_table(frontiers))
    for run, points in frontiers.items():
        best = loops_to_full_depth(points, args.tolerance)
        console.print(f"{run}: mean loops to reach the last loop's token accuracy (within {args.tolerance:g}): "
                      + ", ".join(f"{rule} {'-' if v is None else f'{v:.2f}'}" for rule, v in best.items()))
    if args.plot:
        plot_frontier(frontiers, args.metric, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
