"""Trajectory regularisers (REGULARIZERS): STARS' l2_limit.

    L2Limit(weight=1.0)   loss + weight * mean over positions of ||x_T - x_{T-1}||_2

x_t is the state carried out of loop t and T the last loop run this step (for a sampled-step
estimator, its sampled loop t). The norm is over the hidden dimension; the mean is over every
position of the batch (B * S), supervised or not, since every position carries a state.

Where the two states come from (the choice, and why): they are read from `traj.states`, the
states the model already kept for the estimator, rather than recomputed. Recomputing x_T from
x_{T-1} with one extra `model.recurrence` would cost a whole extra loop and still need x_{T-1},
which the trajectory only has if it was kept; and starting from `traj.final_state` (detached x_T)
would give x_{T+1} - x_T, a different quantity with no gradient into loop T. Reading the kept
states costs nothing and keeps the gradient of the loops that have one. Hence two requirements:
- the estimator's plan must keep the last two loops it runs: `validate` asks the estimator for a
  plan and rejects it otherwise (ExitWeighted keeps every loop; SampledStep keeps loops 1..t);
- the kept states must be the carried states: `traj.states[t-1]` is x_t exactly when the model
  carries the normed state (`carry_normed=True`) and has no coda (Ouro's architecture). Other
  models raise at the first step, with the reason, instead of penalising a different quantity.
With one loop there is no previous loop state in the trajectory (x_0, the embedding, is not kept)
and the term is 0. Under a truncated window x_{T-1} may be detached (LastLoops(1)): the penalty
then trains loop T only.
"""

from looplm.config import is_number
from looplm.hooks import REGULARIZERS, Regularizer


@REGULARIZERS.register("l2_limit")
class L2Limit(Regularizer):
    """STARS l2_limit: `loss + weight * mean_positions ||x_T - x_{T-1}||_2` at the last loop."""

    # a mean over every position of the rank's rows, which the trainer weights by supervised
    # tokens: N ranks' term differs from one process's when the ranks' rows mask different numbers
    # of targets (the conformance battery: 5.317 vs 5.334), so it is checked rank by rank
    rank_local = True

    def __init__(self, weight: float = 1.0):
        if not (is_number(weight) and weight >= 0):
            raise ValueError(f"L2Limit.weight={weight!r} must be a finite number >= 0")
        self.weight = float(weight)

    def validate(self, recipe):
        est = recipe.estimator
        if est.trains == "gate":
            raise ValueError(f"L2Limit penalises the trajectory, but {est.describe()} trains only the exit "
                             "gate, so nothing would learn from it; remove the regularizer")
        for n_loops in (2, 3, 4):
            try:
                run, readout, _ = est.plan(n_loops, 0, recipe.seed, batch_size=1)
            except ValueError:  # the estimator does not support this T; it says so itself when used
                continue
            if run >= 2 and not {run, run - 1} <= set(readout):
                raise ValueError(f"L2Limit needs the states of the last two loops run, but "
                                 f"{est.describe()} keeps only loops {tuple(readout)} of {run} (T={n_loops}); "
                                 "use an estimator that keeps them (exit_weighted, sampled_step)")

    def apply(self, loss, model, traj, batch, step, seed):
        if model.cfg.n_coda or not model.cfg.carry_normed:
            raise ValueError("L2Limit reads x_T and x_{T-1} from traj.states, which are the carried states "
                             f"only with carry_normed=True and no coda (got carry_normed="
                             f"{model.cfg.carry_normed}, n_coda={model.cfg.n_coda})")
        T = traj.n_loops
        if T < 2:
            return loss, {"l2_limit": 0.0}
        last, prev = traj.states[T - 1], traj.states[T - 2]
        if last is None or prev is None:
            raise RuntimeError(f"L2Limit needs the states of loops {T - 1} and {T}, but the plan did not keep "
                               "them (see L2Limit.validate)")
        term = (last.float() - prev.float()).norm(dim=-1).mean()
        return loss + self.weight * term.to(loss.dtype), {"l2_limit": float(term.detach())}

    def describe(self):
        return f"L2Limit(weight={self.weight})"
