"""Conformance battery: check that a plugin honours its family's contract and composes with the rest.

    from looplm.tools.conformance import check_plugin
    def test_mine():
        check_plugin(MyEstimator())            # an instance, a class, or "estimator:sampled_step"

    python -m looplm.conformance my_module.MyEstimator     # one plugin (class or instance)
    python -m looplm.conformance --import my_module        # every plugin my_module registers
    python -m looplm.conformance --all                     # every registered plugin
    python -m looplm.conformance --list                    # what is registered, and buildable

A plugin is run on a tiny LoopLM (`BATTERY_CONFIG`: d_model 16, one layer, T = 3) with a fixed
batch per step (two rows of 6 tokens, the second packing two documents, one ignored target), in
the slot of its family, the other families at Ouro's defaults. The checks, each reported by name:

    build         example instances can be made (see "Examples" below)
    interface     the family's contract, without a model: a loop count returns an int >= 1;
                  a window's first grad loop is in [1, T + 1]; an estimator's plan runs >= 1
                  loop and reads out loops among those it runs; a prior's beta is >= 0 and its
                  loop terms are finite, shaped like log p and loop-local (terms of a prefix of
                  the loops equal the first terms of the whole: the sampled-step estimator
                  relies on it)
    base          a few training steps (forward, backward, SGD): the loss is a finite scalar, every
                  trainable gradient is finite, and some step gives some parameter a non-zero one
    bf16          one step under CPU bfloat16 autocast: finite loss and gradients
    determinism   two fresh runs from the same seed give bit-identical losses and metrics
    checkpoint    run some steps; torch.save the recipe state (and the model, and the RNG, as the
                  trainer does), torch.load it into *fresh* instances (deep copies of the pristine
                  example) through load_state_dict; both continue for more steps: bit-identical
                  losses and metrics, and equal state_dicts at the end
    data_parallel the recipe at 2 gloo ranks (forked processes, one row of the batch each, DDP
                  around the trainer's own step, token-weighted) computes what one process computes
                  on the whole batch: every step's loss (rel. 1e-5), the all-reduced gradient
                  (rel. 1e-4) and the recipe's state. It fails a plugin whose draws depend on the
                  rank's rows (shaped like them, or the global RNG), that learns state from its
                  own rows without summing over the ranks (looplm.hooks.sum_over_ranks), or that
                  makes one rank wait in a collective the other skips (a 60 s timeout). A plugin
                  whose term is by design per rank (random probes over the rank's rows: the
                  Jacobian regularizers; a mean over all the rank's positions, not its supervised
                  tokens: l2_limit) declares `rank_local = True`; one process then takes each
                  rank's rows in turn, and only the rows may differ between ranks.
    compose       with every example of every registered plugin of every other family (and, for a
                  regularizer, stacked with every other regularizer): either `Recipe(...)` rejects
                  the combination with a ValueError whose message says why, or two steps run with
                  finite loss and gradients. Steps are picked where the loop count draws its
                  smallest T (often T = 1) and its smallest T >= 2 among the first 200 steps, so
                  a combination that only breaks at an edge of the loop-count range is caught
                  without running 100-loop steps. A failure at run time of a combination the
                  recipe accepted is a conformance failure (DESIGN: "a combination that cannot
                  work fails when the config is read").
    property:*    each property the plugin declares (below)

Model structure (ModelConfig.norm_type / norm_placement / input_injection, registries NORMS,
PLACEMENTS and INJECTIONS) is checked the same way, the "plugin" being a model built with it; its
checkpoint check round-trips the model's state_dict.

Examples (how the battery builds a plugin). For a class it calls the optional classmethod
`conformance_examples()`, which returns a list of instances (for norm types and placements: a
list of dicts of extra ModelConfig overrides, e.g. `[{"deepnorm_alpha": 1.5}]`); without it the
battery calls `cls()`. A class that needs arguments and offers no examples is reported as "cannot
be built by name" (a failed `build` check). Examples should be cheap: the battery runs each one
many times on a 3-loop model, so e.g. a curriculum should get a short `total_steps`.

Declared properties: a plugin may declare claims about itself as a set of names in an attribute
`properties` (a class attribute, or a property when the claim depends on the instance's
arguments). A plugin without the attribute declares nothing and only the family contract is
checked. An unknown name is an error (typos do not pass silently). Known names:

    unbiased_for_stage1  (loss estimators) the expectation over the estimator's random draws of its
                         loss and of its gradient equals the full-unroll Stage I loss with the same
                         prior (`ExitWeighted`), checked by exact enumeration in float64 (relative
                         error <= 1e-9, so a plugin must keep float64 inputs in float64) for every
                         registered prior example. The estimator enumerates its draws with a method
                         `plan_outcomes(n_loops, step, seed, batch_size)` yielding
                         `(probability, (run_loops, readout, extra))`, one per possible draw, where
                         the triple is what `plan` would return for that draw (extra may pin the
                         draw, e.g. {"t": 2}); an estimator whose plan does not depend on the seed
                         may omit it (one outcome, probability 1).
    stateless            (any hook plugin) state_dict() stays empty during training
    bounded_state        (norm placements) without the between-loop final norm
                         (carry_normed=False), the carried state's RMS over 64 loops at random
                         initialisation stays within 2x its RMS after loop 1 (pre_norm, whose
                         residual stream grows every loop, cannot declare it)

The battery never edits a plugin; it deep-copies the example it was given before every use.
`check_plugin` returns a `Report` and, by default, raises `ConformanceError` (an AssertionError,
so pytest shows the report) when a check fails. Partners for the composition check are every
plugin registered when it runs; by default it first imports every module of the in-tree
`variants` package (if importable), so an out-of-tree plugin is checked against all of them.

Modules: plugins.py (families, registered plugins, examples), harness.py (the tiny model, the
batch, `Run`), checks.py (interface, determinism, checkpoint), ranks.py (data_parallel),
compose.py, properties.py, battery.py (`check_plugin`), report.py, cli.py (`python -m
looplm.conformance`).
"""

from looplm.tools.conformance.battery import check_plugin
from looplm.tools.conformance.report import ConformanceError, Report

__all__ = ["ConformanceError", "Report", "check_plugin"]
