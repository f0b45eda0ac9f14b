"""The battery's test bench: a tiny LoopLM, a fixed batch per step, a setup (one candidate per
family) made into a recipe, and `Run`, which trains it with finite checks and plain SGD."""

import contextlib
import traceback
from dataclasses import replace

import torch

from looplm.config import model_config
from looplm.data.batch import IGNORE_INDEX, Batch
from looplm.model import LoopLM
from looplm.recipe import Recipe
from looplm.tools.conformance.plugins import FAMILIES, HOOK_FAMILIES, STRUCTURE_FAMILIES, Candidate, default_candidate

BATTERY_CONFIG = model_config("tiny", d_model=16, n_layers=1, n_heads=2, d_ff=32, vocab_size=32, n_loops=3)
BATCH_SHAPE = (2, 6)
SEED = 7  # Recipe.seed of every run
MODEL_SEED = 0
LR = 0.05  # plain SGD between the battery's steps, so stateful plugins see a changing model
SCAN_STEPS = 200  # steps scanned for the loop count's smallest draws


def setup_key(setup: dict):
    labels = []
    for fam, c in setup.items():
        for cand in (c if fam == "regularizer" else (c,)):
            if not cand.cacheable:
                return None
            cls = type(cand.proto) if fam in HOOK_FAMILIES else None
            labels.append((cand.label, id(cls)))
    return tuple(sorted(labels))


def describe_setup(setup: dict) -> str:
    parts = []
    for fam, c in setup.items():
        if fam == "regularizer":
            if c:
                parts.append(f"regularizers=[{', '.join(r.describe() for r in c)}]")
        elif c.label != default_candidate(fam).label:
            parts.append(c.describe() if fam in STRUCTURE_FAMILIES else f"{fam}={c.describe()}")
    return "; ".join(parts) or "defaults"


def default_setup() -> dict:
    setup = {fam: default_candidate(fam) for fam in FAMILIES if fam != "regularizer"}
    setup["regularizer"] = ()
    return setup


def with_candidate(setup: dict, cand: Candidate) -> dict:
    out = dict(setup)
    if cand.family == "regularizer":
        out["regularizer"] = (*setup["regularizer"], cand)
    else:
        out[cand.family] = cand
    return out


def build_recipe(setup: dict, instances: dict | None = None) -> Recipe:
    """Recipe of a setup (fresh instances unless given); raises what Recipe raises."""
    inst = instances or _instantiate(setup)
    return Recipe(loop_count=inst["loop_count"], window=inst["window"], estimator=inst["estimator"],
                  prior=inst["prior"], regularizers=inst["regularizer"], seed=SEED)


def _instantiate(setup: dict) -> dict:
    inst = {fam: setup[fam].fresh() for fam in HOOK_FAMILIES if fam != "regularizer"}
    inst["regularizer"] = [c.fresh() for c in setup["regularizer"]]
    return inst


def model_cfg(setup: dict, **extra):
    overrides = {}
    for fam in STRUCTURE_FAMILIES:
        overrides.update(setup[fam].proto)
    return replace(BATTERY_CONFIG, **overrides, **extra)


def build_model(cfg, seed: int = MODEL_SEED, dtype=torch.float32) -> LoopLM:
    torch.manual_seed(seed)
    return LoopLM(cfg).to(dtype)


def battery_batch(step: int, vocab_size: int = BATTERY_CONFIG.vocab_size) -> Batch:
    """The batch of a step: a function of the step alone; row 1 packs two documents."""
    B, S = BATCH_SHAPE
    g = torch.Generator().manual_seed(10_000 + step)
    ids = torch.randint(0, vocab_size, (B, S), generator=g)
    targets = torch.randint(0, vocab_size, (B, S), generator=g)
    targets[0, 0] = IGNORE_INDEX
    doc_ids = torch.zeros(B, S, dtype=torch.long)
    doc_ids[1, S // 2:] = 1
    return Batch(ids, targets, doc_ids)


class StepFailure(Exception):
    pass


class Run:
    """A model and a recipe trained by the battery: forward, backward, finite checks, SGD."""

    def __init__(self, setup: dict, recipe: Recipe | None = None, model: LoopLM | None = None):
        self.setup = setup
        self.recipe = recipe if recipe is not None else build_recipe(setup)
        self.model = model if model is not None else build_model(model_cfg(setup))
        self.model.train()
        trainable = self.recipe.trainable_parameters(self.model)
        ids = {id(p) for p in trainable}
        self.named = [(n, p) for n, p in self.model.named_parameters() if id(p) in ids]
        for p in self.model.parameters():
            p.requires_grad_(id(p) in ids)
        self.learned = False  # whether some step gave some trainable parameter a non-zero gradient

    def step(self, step: int, precision: str = "fp32"):
        """(loss, metrics) of one step; raises StepFailure on an exception or a non-finite value."""
        for _, p in self.named:
            p.grad = None
        batch = battery_batch(step, self.model.cfg.vocab_size)
        cast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
        try:
            with cast:
                loss, metrics = self.recipe.loss(self.model, batch, step)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise StepFailure(f"the loss must be a scalar tensor, got {loss!r}")
            if not torch.isfinite(loss):
                raise StepFailure(f"non-finite loss {float(loss)}")
            loss.backward()
        except StepFailure:
            raise
        except Exception as e:  # noqa: BLE001
            raise StepFailure(f"{type(e).__name__}: {e}  [{failure_site(e)}]") from e
        bad = [n for n, p in self.named if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            raise StepFailure(f"non-finite gradient in {bad}")
        self.learned = self.learned or any(p.grad is not None and p.grad.any() for _, p in self.named)
        with torch.no_grad():
            for _, p in self.named:
                if p.grad is not None:
                    p.sub_(LR * p.grad)
        return loss.detach().item(), metrics

    def steps(self, steps, precision="fp32"):
        return [self.step(s, precision) for s in steps]


def failure_site(e: BaseException) -> str:
    """file:line of the innermost frame of an exception (where a step failed)."""
    tb = traceback.extract_tb(e.__traceback__)
    if not tb:
        return "?"
    f = tb[-1]
    return f"{'/'.join(f.filename.split('/')[-2:])}:{f.lineno}"


def probe_steps(setup: dict, k: int = 2) -> list[int]:
    """k steps (ascending) where the setup's loop count draws its smallest T among the first
    SCAN_STEPS steps; the smallest T >= 2 is always among them when k >= 2 and it exists."""
    lc = setup["loop_count"].fresh()
    draws = [(lc.sample(s, BATTERY_CONFIG.n_loops, SEED), s) for s in range(SCAN_STEPS)]
    if len({T for T, _ in draws}) == 1:
        return list(range(k))
    ranked = sorted(draws)
    chosen = [ranked[0][1]]
    at_least_2 = [s for T, s in ranked if T >= 2]
    if k >= 2 and at_least_2 and ranked[0][0] < 2:
        chosen.append(at_least_2[0])
    for _, s in ranked:
        if len(chosen) >= k:
            break
        if s not in chosen:
            chosen.append(s)
    return sorted(chosen)
