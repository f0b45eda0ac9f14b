"""The README's "Writing a variant" example, taken from the README itself, works as written: a
plugin in a module outside the package, loaded by a gin `import` line, trains a few steps."""

import re
import sys
from pathlib import Path

import gin
import torch

from looplm import checkpoint
from looplm.objectives import log_exit_probs
from looplm.run import main

README = (Path(__file__).parent.parent / "README.md").read_text()


def _block_after(marker: str, lang: str) -> str:
    match = re.search(re.escape(marker) + r".*?```" + lang + r"\n(.*?)```", README, re.S)
    assert match, f"README has no ```{lang} block after {marker!r}"
    return match.group(1)


def test_readme_plugin_trains_from_a_gin_import(tmp_path, monkeypatch):
    (tmp_path / "my_prior.py").write_text(_block_after("`my_prior.py`", "python"))
    (tmp_path / "my_prior.gin").write_text(_block_after("`my_prior.gin`", ""))
    monkeypatch.syspath_prepend(str(tmp_path))
    gin.clear_config()
    try:
        code = main(["--gin", str(tmp_path / "my_prior.gin"), "--bind", "TRAIN_STEPS = 3",
                     "--bind", f'train.run_dir = "{tmp_path / "run"}"', "--bind", "Tracker.enabled = False",
                     "--bind", "train.progress = False", "--bind", "AdditionTask.n_eval = 16",
                     "--bind", "model_config.d_model = 32", "--bind", "model_config.n_layers = 1"])
        operative = (tmp_path / "run" / "config.gin").read_text()
    finally:
        gin.clear_config()
    assert code == 0
    assert checkpoint.load(tmp_path / "run" / "checkpoint.pt")["step"] == 3
    assert "LateBiasPrior" in operative

    # and its terms are the KL it claims: sum_t p_t (log p_t - log pi_t) with pi_t = t / sum(t)
    prior = sys.modules["my_prior"].LateBiasPrior(beta=0.05)
    gates = torch.randn(5, 4, dtype=torch.float64)
    p = log_exit_probs(gates).exp()
    pi = torch.arange(1, 5, dtype=torch.float64) / 10
    kl = (p * (p.log() - pi.log())).sum(-1)
    torch.testing.assert_close(prior.loop_terms(p.log(), 4).sum(-1), kl)
