"""The conformance battery (looplm.tools.conformance) on every registered plugin, and on plugins built to
break it (so the battery is known to catch what it claims to catch), and its command line."""

import sys
import textwrap

import pytest
import torch

from looplm.hooks import (BACKPROP_WINDOWS, ESTIMATORS, EXIT_PRIORS, LOOP_COUNTS, NORMS, PLACEMENTS, REGULARIZERS,
                          ExitPrior, LoopCount, Regularizer, step_generator, sum_over_ranks)
from looplm.recipe import UniformPrior
from looplm.tools.conformance import ConformanceError, check_plugin
from looplm.tools.conformance.cli import buildability
from looplm.tools.conformance.cli import main as conformance_main
from looplm.tools.conformance.compose import clear_cache
from looplm.tools.conformance.plugins import import_variants, registered_plugins

import_variants()

REGISTERED = [pytest.param(cls, id=f"{fam}:{name}") for fam, name, cls in registered_plugins()]


@pytest.mark.parametrize("plugin", REGISTERED)
def test_registered_plugin_conforms(plugin):
    """Every plugin of every family, all of its examples, composed with every other plugin."""
    check_plugin(plugin)


def test_every_registered_plugin_can_be_built_by_name():
    unbuildable = [(fam, name, why) for fam, name, n, why in buildability() if n is None]
    assert not unbuildable, unbuildable


# -- the battery catches broken plugins ---------------------------------------------------------------
class ForgetfulLoops(LoopCount):
    """Keeps a counter it does not save: a resumed run draws differently."""

    def __init__(self):
        self.calls = 0

    def sample(self, step, n_loops, seed):
        self.calls += 1
        return 1 + self.calls % 3


class NaNPrior(ExitPrior):
    beta = 0.1

    def loop_terms(self, log_p, n_loops):
        return log_p * float("nan")


class NeedsArguments(LoopCount):
    def __init__(self, n):
        self.n = n

    def sample(self, step, n_loops, seed):
        return self.n


class Typo(LoopCount):
    properties = {"statless"}

    def sample(self, step, n_loops, seed):
        return 2


class SeedDependentLoops(LoopCount):
    """Draws with the *global* RNG, unseeded by step: breaks "the same seed gives the same losses"
    only if the RNG is not part of the state; the trainer checkpoints the RNG, so this conforms."""

    def sample(self, step, n_loops, seed):
        return int(torch.randint(1, 4, ()))


def failed_checks(report):
    return {r.check.split(": ")[0] for r in report.failures}


def test_battery_catches_state_missing_from_state_dict():
    report = check_plugin(ForgetfulLoops(), compose=False, raise_on_failure=False)
    assert failed_checks(report) == {"checkpoint"}, report  # and nothing else
    assert "state missing from state_dict" in str(report)


def test_battery_catches_non_finite_loss_and_bad_interface():
    report = check_plugin(NaNPrior(), compose=False, raise_on_failure=False)
    assert {"interface", "base"} <= failed_checks(report), report
    with pytest.raises(ConformanceError, match="non-finite loss"):
        check_plugin(NaNPrior(), compose=False)


def test_battery_reports_plugins_that_cannot_be_built_by_name():
    report = check_plugin(NeedsArguments, compose=False, raise_on_failure=False)
    assert failed_checks(report) == {"build"}
    assert "conformance_examples" in str(report)
    NeedsArguments.conformance_examples = classmethod(lambda cls: [cls(2), cls(1)])
    try:
        report = check_plugin(NeedsArguments, compose=False)
        assert len([r for r in report.results if r.check.endswith("determinism")]) == 2  # both examples
    finally:
        del NeedsArguments.conformance_examples


def test_battery_rejects_unknown_property_names():
    report = check_plugin(Typo(), compose=False, raise_on_failure=False)
    assert failed_checks(report) == {"property:statless"}
    assert "unknown property" in str(report)


def test_battery_checks_declared_unbiasedness():
    from variants.sampled_step import FixedScheduleProposal, SampledStep

    class OffByOne(SampledStep):
        """Claims unbiasedness but importance-weights with the wrong q."""

        def loss(self, ro, plan, prior):
            loss, metrics = super().loss(ro, plan, prior)
            return loss * (1 + 0.1 * plan.extra.get("t", 1)), metrics

    report = check_plugin(OffByOne(FixedScheduleProposal((0.2, 0.3, 0.5))), compose=False,
                          raise_on_failure=False)
    assert failed_checks(report) == {"property:unbiased_for_stage1"}, report
    # and the honest one passes, for every registered prior
    check_plugin(SampledStep(FixedScheduleProposal((0.2, 0.3, 0.5))), compose=False)


def test_battery_checks_declared_statelessness():
    class CountingPrior(UniformPrior):
        properties = {"stateless"}

        def __init__(self):
            super().__init__()
            self.seen = 0

        def loop_terms(self, log_p, n_loops):
            self.seen += 1
            return super().loop_terms(log_p, n_loops)

        def state_dict(self):
            return {"seen": self.seen}

        def load_state_dict(self, state):
            self.seen = state.get("seen", 0)

    report = check_plugin(CountingPrior(), compose=False, raise_on_failure=False)
    assert failed_checks(report) == {"property:stateless"}, report


def test_global_rng_plugin_conforms_because_the_rng_is_checkpointed():
    check_plugin(SeedDependentLoops(), compose=False)


class RowNoise(Regularizer):
    """A penalty through noise shaped like the rows at hand: per rank, the rank's rows."""

    def apply(self, loss, model, traj, batch, step, seed):
        x = traj.final_state
        noise = torch.randn(x.shape, generator=step_generator(seed, step, "row_noise"))
        return loss + (x * noise).mean() ** 2, {}


class DeclaredRowNoise(RowNoise):
    rank_local = True  # a term per rank, declared: checked rank by rank


class LocalScale(Regularizer):
    """Scales the loss by an EMA of the final state's mean square, learned from its own rows;
    `summed` learns it from all ranks' rows (looplm.hooks.sum_over_ranks), as one process does."""

    def __init__(self, summed=False):
        self.summed, self.scale, self._tally = summed, 1.0, [0.0, 0.0]

    def apply(self, loss, model, traj, batch, step, seed):
        x = traj.final_state.detach()
        self._tally = [self._tally[0] + float(x.pow(2).sum()), self._tally[1] + x.numel()]
        return loss * self.scale, {}

    def end_step(self):
        total, count = sum_over_ranks(self._tally) if self.summed else self._tally
        self.scale, self._tally = 0.5 * self.scale + 0.5 * total / count, [0.0, 0.0]

    def state_dict(self):
        return {"scale": self.scale}

    def load_state_dict(self, state):
        self.scale = state["scale"]


def test_battery_catches_a_plugin_that_does_not_agree_across_ranks():
    """2 forked gloo ranks against one process: a draw shaped like the rank's rows, and state
    learned from them alone, both fail `data_parallel`; declared or summed over ranks they pass."""
    report = check_plugin(RowNoise(), compose=False, raise_on_failure=False)
    assert failed_checks(report) == {"data_parallel"} and "a draw or a statistic per rank" in str(report), report
    check_plugin(DeclaredRowNoise(), compose=False)
    report = check_plugin(LocalScale(), compose=False, raise_on_failure=False)
    assert failed_checks(report) == {"data_parallel"} and "state.regularizer0.scale" in str(report), report
    check_plugin(LocalScale(summed=True), compose=False)


# -- command line --------------------------------------------------------------------------------------
OUT_OF_TREE = '''
from looplm.hooks import LOOP_COUNTS, LoopCount, step_generator
import torch

@LOOP_COUNTS.register("{name}_good")
class GoodLoops(LoopCount):
    """One or two loops, drawn from (seed, step)."""
    properties = {{"stateless"}}

    def sample(self, step, n_loops, seed):
        return 1 + int(torch.randint(0, 2, (), generator=step_generator(seed, step, "{name}")))

@LOOP_COUNTS.register("{name}_zero")
class ZeroLoops(LoopCount):
    def sample(self, step, n_loops, seed):
        return 0
'''


@pytest.fixture
def out_of_tree(tmp_path, monkeypatch, request):
    """A researcher's module on sys.path, registering plugins; the registries are restored after."""
    name = f"my_plugins_{request.node.name.replace('[', '_').replace(']', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(OUT_OF_TREE.format(name=name)))
    monkeypatch.syspath_prepend(str(tmp_path))
    registries = (LOOP_COUNTS, BACKPROP_WINDOWS, ESTIMATORS, EXIT_PRIORS, REGULARIZERS, NORMS, PLACEMENTS)
    saved = [dict(r._entries) for r in registries]
    yield name
    for r, entries in zip(registries, saved):
        r._entries = entries
    sys.modules.pop(name, None)
    clear_cache()


def test_cli_checks_one_plugin_by_dotted_name(out_of_tree, capsys):
    assert conformance_main([f"{out_of_tree}.GoodLoops", "--no-compose"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_cli_import_checks_every_plugin_a_module_registers(out_of_tree, capsys):
    assert conformance_main(["--import", out_of_tree, "--no-compose"]) == 1
    out = capsys.readouterr().out
    assert "PASS loop_count:" in out and "FAIL loop_count:" in out and "must be an int >= 1" in out
    assert "1/2 plugins conform" in out


def test_cli_usage_errors(capsys):
    assert conformance_main([]) == 2
    assert conformance_main(["no_such_module_xyz.Plugin"]) == 2
    assert conformance_main(["--list"]) == 0
    assert "sampled_step" in capsys.readouterr().out


def test_one_line_pytest_entry_for_an_out_of_tree_plugin():
    class Mine(LoopCount):
        def sample(self, step, n_loops, seed):
            return 1 + int(torch.randint(0, 3, (), generator=step_generator(seed, step, "mine")))

    check_plugin(Mine(), compose=False)
