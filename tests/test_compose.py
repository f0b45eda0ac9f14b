"""Gin composition that cannot silently override: every file resolves to the recipe its header
names, an include or a later file that replaces a choice fails naming both files, --bind and
`# override` win and are reported, and --dry-run prints the recipe without training."""

import json
import re
from pathlib import Path

import gin
import pytest

from looplm import compose
from looplm.config import model_config
from looplm.model import LoopLM
from looplm.run import GIN_DIR, main, parse_config
from looplm.train import train
import variants.truncated  # noqa: F401  LastLoops, bound below as a setting the recipe leaves unused

GIN_FILES = sorted(GIN_DIR.glob("*.gin"))


pytestmark = pytest.mark.usefixtures("clean_gin")  # tests/conftest.py


def expected(path: Path) -> dict:
    lines = [l for l in path.read_text().splitlines() if l.startswith("# expects: ")]
    assert len(lines) == 1, f"{path.name} needs one '# expects: family=Class ...' header line"
    return dict(item.split("=", 1) for item in lines[0].removeprefix("# expects: ").split())


def resolved(path: Path, bindings=()) -> dict:
    parse_config([str(path)], list(bindings))
    built = train(dry_run=True)
    parts = {k: v.split("(")[0] for k, v in built["recipe"].describe().items()}
    regs = [v for k, v in parts.items() if k.startswith("regularizer")]
    out = {k: v for k, v in parts.items() if not k.startswith("regularizer")}
    out["regularizers"] = ",".join(regs) or "none"
    out |= {f"model.{k}": str(v) for k, v in vars(built["model"]).items()}
    out["task"] = type(built["task"]).__name__
    return out


@pytest.mark.parametrize("path", GIN_FILES, ids=[p.name for p in GIN_FILES])
def test_every_gin_file_resolves_to_the_recipe_its_header_names(path, tmp_path):
    want = expected(path)
    assert {"loop_count", "window", "estimator", "prior", "regularizers"} <= set(want), want
    bindings = []
    if path.name == "stars_finetune.gin":  # its released checkpoint is not here: a fresh model's export
        from looplm.io.export import export_model
        cfg = model_config(preset="tiny")
        export_model(cfg, LoopLM(cfg).state_dict(), tmp_path / "hf")
        bindings = [f'OURO_CHECKPOINT = "{tmp_path / "hf"}"', "train.task = @AdditionTask()"]
    if path.name.startswith("ouro_"):  # the pipeline's text and chats are on the hub (tests/test_pipeline.py: local)
        bindings = ["train.task = @AdditionTask()"]
    got = resolved(path, bindings)
    assert {k: got[k] for k in want} == want


def test_stars_is_random_loops_plus_the_jacobian_penalty():
    got = resolved(GIN_DIR / "stars.gin")
    assert got["loop_count"] == "LogNormalLoops" and got["regularizers"] == "PowerIterationJacobian"
    assert gin.query_parameter("LogNormalLoops.mu") == 1.7


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_later_include_that_replaces_a_family_choice_fails_naming_both_files(tmp_path):
    both = write(tmp_path, "both.gin", "include 'random_loops.gin'\ninclude 'huginn.gin'\n")
    with pytest.raises(compose.CompositionError) as err:
        parse_config([both], [])
    message = str(err.value)
    assert re.search(r"huginn\.gin sets Recipe\.loop_count = @PoissonLogNormalLoops\(\), replacing "
                     r"@LogNormalLoops\(\) set by .*random_loops\.gin", message), message


def test_a_second_command_line_file_may_not_silently_replace_the_first(tmp_path):
    mine = write(tmp_path, "mine.gin", "UniformPrior.beta = 0.5\n")
    with pytest.raises(compose.CompositionError, match=r"mine\.gin sets UniformPrior\.beta = 0\.5"):
        parse_config([str(GIN_DIR / "full_unroll.gin"), mine], [])


def test_override_marker_and_command_line_win_and_are_reported(tmp_path):
    mine = write(tmp_path, "mine.gin", "UniformPrior.beta = 0.5  # override: a stronger prior\n")
    comp = parse_config([str(GIN_DIR / "full_unroll.gin"), mine], ["LastLoops.k = 3", "TRAIN_STEPS = 7"])
    assert gin.query_parameter("UniformPrior.beta") == 0.5
    lines = compose.report(comp)
    assert "override: UniformPrior.beta = 0.5 (was 0.1 from gin/full_unroll.gin)" in lines, lines
    assert "command line: TRAIN_STEPS = 7 (was 2000 from gin/base.gin)" in lines, lines


def test_a_diamond_of_includes_reads_the_shared_base_once(tmp_path):
    comp = parse_config([str(GIN_DIR / "stars.gin")], [])
    names = [Path(f).name for f in comp.files]
    assert names.count("full_unroll.gin") == 1 and names.count("base.gin") == 1
    assert any(Path(inner).name == "full_unroll.gin" for _, inner in comp.skipped)


def test_a_file_that_includes_another_may_refine_it():
    parse_config([str(GIN_DIR / "random_loops.gin")], [])  # replaces full_unroll's FixedLoops
    assert repr(gin.query_parameter("Recipe.loop_count")) == "@LogNormalLoops()"


def test_binding_train_steps_while_a_schedule_follows_TRAIN_STEPS_fails():
    with pytest.raises(compose.CompositionError, match=r"TRAIN_STEPS = 2000 still drives CLTSProposal"):
        parse_config([str(GIN_DIR / "sampled_step_clts.gin")], ["train.steps = 3"])


def test_dry_run_prints_the_recipe_one_line_per_family_and_trains_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["--gin", "gin/stars.gin", "--dry-run", "--bind", f"train.run_dir = '{run_dir}'",
                 "--bind", "LastLoops.k = 2"])
    out = capsys.readouterr().out
    assert code == 0 and not run_dir.exists()
    for line in (r"loop_count\s+LogNormalLoops\(mu=1.7", r"window\s+FullBackprop", r"estimator\s+ExitWeighted",
                 r"prior\s+UniformPrior", r"regularizer0\s+PowerIterationJacobian", r"model\s+1 layer x 4 loops"):
        assert re.search(line, out), (line, out)
    assert "Recipe.loop_count = @LogNormalLoops()" in out
    assert re.search(r"set but unused.*LastLoops\.k", out), out  # the recipe has no LastLoops


def test_config_gin_is_the_runs_config_and_runs_again(tmp_path, capsys):
    run_dir = tmp_path / "run"
    common = ["--bind", "Tracker.enabled = False", "--bind", "train.progress = False",
              "--bind", "AdditionTask.n_eval = 16", "--bind", "TRAIN_STEPS = 2", "--bind", "LastLoops.k = 2"]
    assert main(["--gin", "gin/stars.gin", "--bind", f"train.run_dir = '{run_dir}'", *common]) == 0
    text = (run_dir / "config.gin").read_text()
    assert "Recipe.loop_count = @LogNormalLoops()" in text and "TRAIN_STEPS = 2" in text
    assert re.search(r"# Set but unused by this run \(no effect\): LastLoops\.k", text)
    assert "Recipe.seed" not in text  # a class default nobody set is not a binding of this run
    first = compose.bindings_in_force()
    gin.clear_config()
    parse_config([str(run_dir / "config.gin")], [])
    assert compose.bindings_in_force() == first
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["step"] == 2


def test_missing_included_file_names_the_including_file(tmp_path):
    bad = write(tmp_path, "bad.gin", "include 'no_such.gin'\n")
    with pytest.raises(FileNotFoundError, match=r"'no_such.gin' not found \(included from .*bad\.gin\)"):
        parse_config([bad], [])
