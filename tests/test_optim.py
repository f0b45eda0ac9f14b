"""looplm.optim: which parameters decay (by name, on a real model) and the warm-up + cosine and
warm-up/stable/decay schedules."""

import math

import gin
import pytest
import torch

from looplm.config import model_config
from looplm.model import LoopLM
from looplm.optim import DEFAULT_WARMUP, build_optimizer, lr_multiplier, warmup_length
from looplm.run import main


pytestmark = pytest.mark.usefixtures("clean_gin")  # tests/conftest.py


@pytest.fixture
def model():
    """Every kind of parameter the core has: prelude, coda and an input-injection adapter too."""
    torch.manual_seed(0)
    return LoopLM(model_config("tiny", input_injection="concat", n_prelude=1, n_coda=1))


def group_names(optimizer) -> dict[str, set[str]]:
    return {g["name"]: set(g["param_names"]) for g in optimizer.param_groups}


def loop_matrices(model) -> set[str]:
    """Found from the module types, not the names: the weights of the Linear layers that transform
    the state (attention, MLP, adapter), i.e. every nn.Linear but the exit gate and the LM head."""
    return {f"{name}.weight" for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not model.gate and m is not model.lm_head}


def test_default_groups_decay_only_the_loop_matrices(model):
    groups = group_names(build_optimizer(model.named_parameters(), weight_decay=0.1))
    everything = {n for n, _ in model.named_parameters()}
    assert groups["decay"] == loop_matrices(model)
    assert groups["no_decay"] == everything - loop_matrices(model)
    assert {"embed.weight", "lm_head.weight", "gate.weight", "gate.bias", "final_norm.weight",
            "layers.0.attn.norm_in.weight"} <= groups["no_decay"]
    assert "inject.adapter.weight" in groups["decay"] and "prelude.0.mlp.sublayer.down.weight" in groups["decay"]
    wd = {g["name"]: g["weight_decay"] for g in build_optimizer(model.named_parameters()).param_groups}
    assert wd == {"decay": 0.1, "no_decay": 0.0}


def test_decay_shrinks_exactly_the_decay_group(model):
    """With zero gradients AdamW's update is decay alone: p <- p (1 - lr wd) for the decay group,
    untouched for the rest."""
    lr, wd = 0.01, 0.5
    opt = build_optimizer(model.named_parameters(), lr=lr, weight_decay=wd)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    decayed = loop_matrices(model)
    for n, p in model.named_parameters():
        want = before[n] * (1 - lr * wd) if n in decayed else before[n]
        torch.testing.assert_close(p.detach(), want, msg=n)


def test_no_decay_patterns_come_from_gin(model):
    gin.parse_config("build_optimizer.no_decay = ('*norm*',)")
    groups = group_names(build_optimizer(model.named_parameters()))
    assert {"embed.weight", "lm_head.weight", "gate.weight"} <= groups["decay"]
    assert "gate.bias" in groups["no_decay"]  # vectors never decay, whatever the patterns
    gin.clear_config()
    gin.parse_config("build_optimizer.no_decay = ()")
    groups = group_names(build_optimizer(model.named_parameters()))
    assert groups["no_decay"] == {n for n, p in model.named_parameters() if p.dim() < 2}


def test_frozen_parameters_are_left_out(model):
    """Stage II trains the gate alone: one no-decay group of the gate's two tensors, and the
    patterns are still checked against the frozen names (embed.* matches a frozen tensor)."""
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("gate."))
    opt = build_optimizer(model.named_parameters())
    assert group_names(opt) == {"no_decay": {"gate.weight", "gate.bias"}}


@pytest.mark.parametrize("no_decay, match", [(("embd.*",), r"pattern 'embd\.\*' matches no parameter"),
                                             ("embed.*", "must be a tuple of name patterns"),
                                             ((3,), "must be a tuple of name patterns")])
def test_bad_no_decay(model, no_decay, match):
    with pytest.raises(ValueError, match=match):
        build_optimizer(model.named_parameters(), no_decay=no_decay)


def test_schedule_by_hand():
    """warm-up 10 of 100 steps: (s + 1) / 10, then min_ratio + (1 - min_ratio)(1 + cos(pi p)) / 2
    with p = (s - 10) / 90."""
    got = [lr_multiplier(s, 100, warmup_steps=10, min_ratio=0.1) for s in range(100)]
    assert got[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert got[10] == pytest.approx(1.0) and got[55] == pytest.approx(0.55)
    assert got[99] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(a >= b for a, b in zip(got[10:], got[11:]))


def test_a_float_warmup_is_that_share_of_the_run():
    for share, total in ((0.1, 100), (0.25, 40), (0.0, 7), (0.05, 2000)):
        steps = int(share * total)
        assert warmup_length(total, share) == steps
        assert ([lr_multiplier(s, total, warmup_steps=share) for s in range(total)]
                == [lr_multiplier(s, total, warmup_steps=steps) for s in range(total)])
    assert warmup_length(2000) == int(DEFAULT_WARMUP * 2000) == 100  # unset: the first 5% of the run
    assert lr_multiplier(0, 3) == pytest.approx(1.0)  # a 3-step run warms up for int(0.15) = 0 steps


@pytest.mark.parametrize("warmup, match", [
    (-1, r"warmup_steps=-1 must be a step count in \[0, 100\)"),
    (100, r"warmup_steps=100 must be a step count in \[0, 100\) \(the run has 100 steps\)"),
    (1.0, r"warmup_steps=1\.0 must be a step count \(an integer\) or a share of the run in \[0, 1\)"),
    (-0.1, r"warmup_steps=-0\.1 must be"),
    (True, r"warmup_steps=True must be"),
    ("10", r"warmup_steps='10' must be"),
])
def test_bad_warmup(warmup, match):
    with pytest.raises(ValueError, match=match):
        lr_multiplier(0, 100, warmup_steps=warmup)


def test_bad_warmup_is_a_config_error_on_the_command_line(tmp_path, capsys):
    args = ["--gin", "gin/full_unroll.gin"]
    for b in ("TRAIN_STEPS = 3", "lr_multiplier.warmup_steps = 3", "Tracker.enabled = False",
              "train.progress = False", f'train.run_dir = "{tmp_path}"'):
        args += ["--bind", b]
    assert main(args) == 2
    assert "lr_multiplier.warmup_steps=3 must be a step count in [0, 3)" in capsys.readouterr().err


@pytest.mark.parametrize("kw, match", [({"lr": 0.0}, r"lr=0\.0 must be a number > 0"),
                                       ({"lr": "1e-3"}, r"lr='1e-3' must be a number > 0"),
                                       ({"weight_decay": -0.1}, r"weight_decay=-0\.1 must be a number >= 0"),
                                       ({"eps": 0}, r"eps=0 must be a number > 0"),
                                       ({"betas": (0.9, 1.5)}, r"betas=\(0\.9, 1\.5\) must be two numbers"),
                                       ({"betas": (0.9,)}, r"betas=\(0\.9,\) must be two numbers")])
def test_bad_optimizer_settings(model, kw, match):
    with pytest.raises(ValueError, match=match):
        build_optimizer(model.named_parameters(), **kw)


def test_bad_min_ratio():
    with pytest.raises(ValueError, match=r"min_ratio=2\.0 must be a number in \[0, 1\]"):
        lr_multiplier(0, 10, min_ratio=2.0)


def test_warmup_stable_decay_by_hand():
    """warm-up 10 of 100 steps, the peak held to step 80, then linear decay over the last 20
    steps towards 0.1 at step 100: 1 - 0.9 (s - 80) / 20."""
    got = [lr_multiplier(s, 100, warmup_steps=10, min_ratio=0.1, schedule="wsd", decay_steps=20)
           for s in range(100)]
    assert got[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert got[10:81] == [1.0] * 71
    assert got[90] == pytest.approx(0.55) and got[99] == pytest.approx(1 - 0.9 * 19 / 20)
    assert got == [lr_multiplier(s, 100, warmup_steps=0.1, min_ratio=0.1, schedule="wsd", decay_steps=0.2)
                   for s in range(100)]  # shares of the run are those counts
    assert [lr_multiplier(s, 100, warmup_steps=10, min_ratio=0.1, schedule="wsd") for s in range(100)] == got
    assert [lr_multiplier(s, 10, warmup_steps=2, schedule="wsd", decay_steps=0) for s in range(2, 10)] == [1.0] * 8


@pytest.mark.parametrize("kw, match", [
    ({"schedule": "linear"}, r"schedule='linear': allowed are \('cosine', 'wsd'\)"),
    ({"decay_steps": 10}, r"decay_steps=10 applies only to schedule='wsd'"),
    ({"schedule": "wsd", "decay_steps": 95}, r"decay_steps=95 is 95 steps: allowed are 0\.\.90"),
    ({"schedule": "wsd", "decay_steps": 0.0}, r"decay_steps=0\.0 must be a step count"),
    ({"schedule": "wsd", "decay_steps": True}, r"decay_steps=True must be"),
])
def test_bad_schedule(kw, match):
    with pytest.raises(ValueError, match=match):
        lr_multiplier(0, 100, warmup_steps=10, **kw)
