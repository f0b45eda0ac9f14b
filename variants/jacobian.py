"""Jacobian regularisers of the loop map (REGULARIZERS), after STARS (REFERENCE 4).

g(x) = `model.recurrence(x, traj.context)[0]`: one application of the shared stack plus the
final norm, i.e. the map x_{t-1} -> x_t. Every regulariser here evaluates its Jacobian J at the
detached final state x = `traj.final_state` (x_T, or x_t for a sampled-step estimator that
stopped at loop t) with x a fresh leaf: gradients reach the parameters only, never the
trajectory. Three estimators, each named for what it computes:

    stars_jacobian       PowerIterationJacobian: STARS' term. v ~ N(0, I) over the whole (B, S, d)
                         tensor, normalised; u = J^T v (a VJP); reg = ||u||^2. ONE iteration (the
                         default, what STARS does) is a one-probe Hutchinson estimate of
                         ||J||_F^2 / n, n = B*S*d (E[||J^T v||^2] = tr(J J^T) / n for v uniform
                         on the sphere): a per-entry mean, NOT the Frobenius norm. With k > 1
                         iterations the u's are power iteration on J^T J (v <- J u / ||J u||, then
                         u = J^T v: one JVP and one VJP a round), so reg tends to sigma_max(J)^2,
                         the squared spectral norm. (Iterating u = J^T v on its own output, as
                         REFERENCE 4 once read, is power iteration on J^T: it oscillates when J's
                         dominant eigenvalues are a complex pair and converges to |lambda_max|^2
                         <= sigma_max^2 otherwise.) mode="jvp" reads the same probe forwards,
                         reg = ||J v||^2: for a square J the same mean tr(J^T J) / n and the same
                         variance (J^T J and J J^T share their eigenvalues), but its gradient is
                         reverse over forward mode, no double backward, so FSDP2 can train it.
    hutchinson_jacobian  HutchinsonJacobian: the unscaled estimate of ||J||_F^2 = E||J eps||^2
                         (mode="jvp", forward mode) or E||J^T eps||^2 (mode="vjp"), eps ~ N(0, I),
                         averaged over `probes`. Its size grows with n = B*S*d: a weight that
                         suits stars_jacobian is about n times too large here.
    spectral_jacobian    SpectralJacobian: sigma_max(J)^2 by power iteration on J^T J (each
                         iteration one JVP and one VJP, without graph), then reg = ||J v||^2 at
                         the final unit vector v, with graph (the envelope theorem makes that the
                         gradient of sigma_max^2 once v has converged).

Mixing, after `warmup_steps` (before that the term is neither computed nor added):
mix=True (STARS, the default of stars_jacobian): loss <- (1 - weight) * loss + weight * reg;
mix=False: loss <- loss + weight * reg. Mixing scales everything added before it in
Recipe.regularizers too. Probes are drawn from `step_generator(recipe seed, step, name)`.

Implementation notes: a VJP inside the loss (mode="vjp", power iteration) runs a backward pass
in the forward, which FSDP2's hooks cannot run (they reshard the parameters it used): such an
instance declares `backward_in_loss`, and train.parallel='fsdp' refuses it; the forward-mode
estimators (PowerIterationJacobian(mode="jvp", iterations=1), HutchinsonJacobian(mode="jvp")) run
under FSDP. The double backward that the VJP penalties' gradient needs is not implemented
for PyTorch's fused attention kernels (e.g. `_scaled_dot_product_flash_attention_for_cpu_backward`),
so g runs under `sdpa_kernel(SDPBackend.MATH)`; for the same reason these regularisers cannot
run through `torch.compile`d layers (train.compile=True). Each costs extra stack applications
per step: stars_jacobian 1 forward + `iterations` VJPs + `iterations - 1` JVPs, hutchinson
`probes` JVPs or VJPs, spectral `iterations` JVP+VJP pairs plus one JVP.
"""


import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from looplm.config import is_integer
from looplm.hooks import REGULARIZERS, Regularizer, step_generator


def loop_map(model, ctx):
    """x -> g(x): one application of the shared stack and the final norm (the carried state)."""

    def g(x):
        with sdpa_kernel(SDPBackend.MATH):  # the fused kernels have no double backward
            return model.recurrence(x, ctx)[0]

    return g


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm().clamp_min(torch.finfo(t.dtype).tiny)


def _gram_power(g, x: torch.Tensor, w: torch.Tensor, rounds: int) -> torch.Tensor:
    """`rounds` steps of power iteration on J^T J from the unit vector w (one JVP and one VJP each,
    no graph: the parameters need none while w converges to the top right singular vector)."""
    if rounds == 0:
        return w
    with torch.no_grad():
        _, vjp_fn = torch.func.vjp(g, x.detach())
        for _ in range(rounds):
            _, jw = torch.func.jvp(g, (x.detach(),), (w,))
            (u,) = vjp_fn(jw)
            w = _unit(u)
    return w.detach()


def _jvp_norm2(g, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """||J w||^2 by forward mode, differentiable w.r.t. the parameters (reverse over forward)."""
    return torch.func.jvp(g, (x.detach(),), (w,))[1].pow(2).sum()


class JacobianRegularizer(Regularizer):
    """Shared arguments, warm-up, mixing and probe seeding; subclasses implement `estimate`."""

    default_mix = False
    # under data parallelism each rank draws its probes over its own rows: an unbiased estimate of
    # the one-process penalty, not the same number (the conformance battery checks it rank by rank)
    rank_local = True

    def __init__(self, weight: float = 0.1, warmup_steps: int = 0, mix: bool | None = None):
        name = type(self).__name__
        if not weight >= 0:
            raise ValueError(f"{name}.weight={weight} must be >= 0")
        self._count("warmup_steps", warmup_steps, least=0)
        mix = self.default_mix if mix is None else mix
        if not isinstance(mix, bool):
            raise ValueError(f"{name}.mix={mix!r} must be True ((1-w) loss + w reg) or False (loss + w reg)")
        if mix and weight > 1:
            raise ValueError(f"{name}.weight={weight} must be <= 1 with mix=True (it is a mixing weight)")
        self.weight, self.warmup_steps, self.mix = float(weight), warmup_steps, mix

    @property
    def backward_in_loss(self) -> bool:
        """Whether the estimate takes a VJP (a backward pass inside the loss)."""
        return True

    def _count(self, name: str, value, least: int = 1) -> int:
        """`value` if it is an integer >= `least`, else a ValueError naming Class.name."""
        if not is_integer(value) or value < least:
            raise ValueError(f"{type(self).__name__}.{name}={value!r} must be an integer >= {least}")
        return value

    def _mode(self, mode: str) -> str:
        """`mode` if it is one of the class's MODES, else a ValueError saying what each computes."""
        if mode not in self.MODES:
            choices = " or ".join(f"{m!r} ({what})" for m, what in self.MODE_HELP.items())
            raise ValueError(f"{type(self).__name__}.mode={mode!r}; choose {choices}")
        return mode

    def validate(self, recipe):
        if recipe.estimator.trains == "gate":
            raise ValueError(f"{type(self).__name__} penalises the loop map's Jacobian, but the estimator "
                             f"{recipe.estimator.describe()} trains only the exit gate, so no parameter of "
                             "the loop map would learn from it; remove the regularizer")

    @staticmethod
    def normal_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """N(0, I) of x's shape, drawn on the CPU (same values on any device), in x's dtype."""
        return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)

    def estimate(self, g, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The scalar penalty at x (a detached leaf), differentiable w.r.t. the parameters."""
        raise NotImplementedError

    def apply(self, loss, model, traj, batch, step, seed):
        if step < self.warmup_steps or self.weight == 0:
            return loss, {}
        if traj.final_state is None or traj.context is None:
            raise RuntimeError(f"{type(self).__name__} needs traj.final_state and traj.context")
        x = traj.final_state.detach().requires_grad_()
        reg = self.estimate(loop_map(model, traj.context), x,
                            step_generator(seed, step, self.registry_name))
        reg = reg.to(loss.dtype)
        loss = (1 - self.weight) * loss + self.weight * reg if self.mix else loss + self.weight * reg
        return loss, {self.registry_name: float(reg.detach())}

    def describe(self):
        return f"{type(self).__name__}(weight={self.weight}, warmup_steps={self.warmup_steps}, mix={self.mix})"


@REGULARIZERS.register("stars_jacobian")
class PowerIterationJacobian(JacobianRegularizer):
    """STARS: reg = ||J^T v||^2 at a random unit v (one iteration: a one-probe Hutchinson estimate
    of ||J||_F^2 / n). `iterations` = k > 1 first refines v by k - 1 rounds of power iteration on
    J^T J (without graph), so that reg -> sigma_max^2; only the last VJP keeps a graph
    (create_graph=True), and once v has converged the envelope theorem makes its gradient that of
    sigma_max^2. mode="jvp" reads the last probe forwards instead, reg = ||J w||^2 (w = v at k = 1,
    else the refined right singular vector): the same mean, variance and limit, without a double
    backward."""

    default_mix = True
    MODE_HELP = {"vjp": "STARS' ||J^T v||^2",
                 "jvp": "||J v||^2, forward mode: the same mean and variance, no double backward"}
    MODES = tuple(MODE_HELP)

    def __init__(self, weight: float = 0.1, warmup_steps: int = 0, iterations: int = 1, mix: bool = True,
                 mode: str = "vjp"):
        super().__init__(weight, warmup_steps, mix)
        self.iterations, self.mode = self._count("iterations", iterations), self._mode(mode)

    @property
    def backward_in_loss(self) -> bool:
        return self.mode == "vjp" or self.iterations > 1

    def estimate(self, g, x, generator):
        v = _unit(self.normal_like(x, generator))
        if self.mode == "jvp":
            return _jvp_norm2(g, x, _gram_power(g, x, v, self.iterations - 1))
        y = g(x)
        if self.iterations > 1:
            with torch.no_grad():
                (u,) = torch.autograd.grad(y, x, v, retain_graph=True)
                w = _gram_power(g, x, _unit(u), self.iterations - 2)  # u_{k-1} / ||u_{k-1}||
                v = _unit(torch.func.jvp(g, (x.detach(),), (w,))[1])
        (u,) = torch.autograd.grad(y, x, v, create_graph=True)
        return u.pow(2).sum()

    def describe(self):
        return (f"PowerIterationJacobian(weight={self.weight}, warmup_steps={self.warmup_steps}, "
                f"mix={self.mix}, iterations={self.iterations}, mode={self.mode!r})")


@REGULARIZERS.register("hutchinson_jacobian")
class HutchinsonJacobian(JacobianRegularizer):
    """Unscaled Hutchinson estimate of ||J||_F^2: mean over `probes` eps ~ N(0, I) of ||J eps||^2
    (mode="jvp", torch.func.jvp) or ||J^T eps||^2 (mode="vjp", torch.func.vjp); both are unbiased,
    with variance 2 ||J^T J||_F^2 / probes (resp. 2 ||J J^T||_F^2 / probes)."""

    MODE_HELP = {"jvp": "||J eps||^2, forward mode", "vjp": "||J^T eps||^2, reverse mode"}
    MODES = tuple(MODE_HELP)

    def __init__(self, weight: float = 0.1, probes: int = 1, mode: str = "jvp", warmup_steps: int = 0,
                 mix: bool = False):
        super().__init__(weight, warmup_steps, mix)
        self.probes, self.mode = self._count("probes", probes), self._mode(mode)

    @property
    def backward_in_loss(self) -> bool:
        return self.mode == "vjp"

    def probe_values(self, g, x, generator, probes: int | None = None) -> torch.Tensor:
        """||J eps_i||^2 (or ||J^T eps_i||^2) for each probe: (probes,), differentiable. The probes
        run as one batch through torch.func.vmap (memory grows with their number)."""
        x = x.detach()
        eps = torch.stack([self.normal_like(x, generator) for _ in range(probes or self.probes)])
        if self.mode == "jvp":
            out = torch.func.vmap(lambda e: torch.func.jvp(g, (x,), (e,))[1])(eps)
        else:
            _, vjp_fn = torch.func.vjp(g, x)
            out = torch.func.vmap(lambda e: vjp_fn(e)[0])(eps)
        return out.pow(2).flatten(1).sum(1)

    def estimate(self, g, x, generator):
        return self.probe_values(g, x, generator).mean()

    def describe(self):
        return f"HutchinsonJacobian(weight={self.weight}, probes={self.probes}, mode={self.mode!r})"


@REGULARIZERS.register("spectral_jacobian")
class SpectralJacobian(JacobianRegularizer):
    """sigma_max(J)^2 by `iterations` rounds of power iteration on J^T J (v <- J^T J v / ||.||,
    no graph), then reg = ||J v||^2 with graph. The start v is a random unit vector (at which
    ||J v||^2 would be a one-probe ||J||_F^2 / n estimate); the Rayleigh quotient then converges
    to sigma_max^2 like (sigma_2 / sigma_1)^(4k) after k iterations."""

    def __init__(self, weight: float = 0.1, iterations: int = 5, warmup_steps: int = 0, mix: bool = False):
        super().__init__(weight, warmup_steps, mix)
        self.iterations = self._count("iterations", iterations)

    def estimate(self, g, x, generator):
        return _jvp_norm2(g, x, _gram_power(g, x, _unit(self.normal_like(x, generator)), self.iterations))

    def describe(self):
        return f"SpectralJacobian(weight={self.weight}, iterations={self.iterations})"
