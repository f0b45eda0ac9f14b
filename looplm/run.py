"""Command line: `python -m looplm.run --gin gin/sampled_step.gin [--gin more.gin] [--bind 'x.y = z']`.

gin files compose with `include` (each file is read once); a later file may replace a value an
earlier one set only if it includes that file, or marks the line `# override`; `--bind` always wins
and is reported (looplm.compose). A plugin outside the repository is registered by an
`import my_plugin` line in a gin file. Everything is built, and so validated, before training.
The run length is the TRAIN_STEPS macro: `--bind 'TRAIN_STEPS = 500'`.

A run folder (train.run_dir) that holds a checkpoint is resumed only with the same config; a
finished one is left as it is. `--resume` continues it with a new TRAIN_STEPS, `--overwrite`
starts over. `--dry-run` prints the resolved recipe and bindings and trains nothing.
`--init-from PATH` starts from a checkpoint's weights and model config: a looplm run folder or
checkpoint file, an Ouro-layout Huggingface folder, or a hub id already in the local Huggingface
cache (looplm.io.source.weight_source; the gin files' model_config is then not used).

Exit codes: 0 done, 2 bad config or input, 3 pre-empted (checkpointed: start again to resume),
4 stopped on a non-finite value (last good checkpoint kept), 130 Ctrl-C (checkpointed).
"""

import argparse
import signal
import sys
import tokenize
from pathlib import Path

import gin
import torch.distributed as dist

from looplm import compose
from looplm.nonfinite import NonFiniteError
from looplm.registry import gin_name_hint
from looplm.train import (INTERRUPTED_EXIT_CODE, NONFINITE_EXIT_CODE, PREEMPTED_EXIT_CODE, RunControl,
                          train)

GIN_DIR = Path(__file__).resolve().parent.parent / "gin"


def parse_config(gin_files: list[str], bindings: list[str]) -> compose.Composition:
    """Read gin files and bindings; includes resolve against each file's folder and gin/."""
    return compose.read(gin_files, bindings, [GIN_DIR])


def error_text(err: BaseException) -> str:
    """The error's text without gin's "In call to configurable" trailer (the file and line of a
    binding that failed stay: they say where to look), with close names for an unknown one."""
    lines = [line for line in str(err).splitlines() if not line.strip().startswith("In call to configurable")]
    hint = gin_name_hint(lines[0]) if lines else ""
    if hint:
        lines[0] += f" ({hint})"
    return "\n".join(lines)


NOISE = ("train.run_dir", "train.progress", "train.log_every", "train.seed", "train.hparams",
         "train.tracker", "Tracker.")


def run_name(gin_files: list[str], bindings: list[str]) -> str:
    """What Aim's run list shows: the gin files and the --bind lines that change the recipe or
    the model (`sampled_step SampledStep.readout='run' TRAIN_STEPS=600`); the trainer adds the seed."""
    keys = [b.replace(" ", "") for b in bindings if not b.strip().startswith(NOISE)]
    return " ".join([*(Path(f).stem for f in gin_files), *keys])


def describe(built: dict, comp: compose.Composition) -> str:
    """What --dry-run prints: the recipe one line per family, the model, the operative bindings."""
    recipe, cfg = built["recipe"], built["model"]
    lines = ["recipe:"]
    lines += [f"  {family:<13} {part}" for family, part in recipe.describe().items()]
    if not recipe.regularizers:
        lines.append(f"  {'regularizers':<13} none")
    lines.append(f"  {'model':<13} {cfg.n_layers} layer{'s' * (cfg.n_layers != 1)} x {cfg.n_loops} loops, d_model {cfg.d_model}, "
                 f"{cfg.n_heads} heads, norm {cfg.norm_placement}/{cfg.norm_type}, injection "
                 f"{cfg.input_injection}, prelude {cfg.n_prelude}, coda {cfg.n_coda}")
    lines.append(f"  {'task':<13} {type(built['task']).__name__}, vocab {cfg.vocab_size}")
    lines.append(f"  {'train':<13} " + ", ".join(f"{k}={built['settings'][k]}" for k in (
        "steps", "batch_size", "grad_accum", "seed", "run_dir")))
    lines += compose.report(comp)
    unused = compose.unused_bindings()
    if unused:
        lines.append(f"warning: set but unused (no effect on this run): {', '.join(unused)}")
    lines += ["", "bindings:", *(f"  {k} = {v}" for k, v in compose.bindings_in_force().items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m looplm.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin", action="append", default=[], metavar="FILE",
                        help="gin config file (repeatable; they compose, see above)")
    parser.add_argument("--bind", action="append", default=[], metavar="BINDING",
                        help="a gin binding such as 'TRAIN_STEPS = 100' (repeatable, applied last, wins)")
    parser.add_argument("--init-from", metavar="PATH",
                        help="start from PATH's weights and model config (a looplm run or checkpoint, an "
                             "Ouro-layout folder, or a hub id in the local Huggingface cache)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved recipe and bindings, train nothing")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--resume", dest="existing", action="store_const", const="extend",
                          default="resume", help="continue the run in train.run_dir with a new TRAIN_STEPS")
    existing.add_argument("--overwrite", dest="existing", action="store_const", const="overwrite",
                          help="start over in train.run_dir, removing the run there")
    args = parser.parse_args(argv)
    if not args.gin:
        args.gin = [str(GIN_DIR / "base.gin")]
    control = RunControl()
    try:
        if args.init_from is not None:  # before the --bind lines, which may refine it
            from looplm.io.source import init_from_bindings
            args.bind = [*init_from_bindings(args.init_from), *args.bind]
        comp = parse_config(args.gin, args.bind)
        if args.dry_run:
            print(describe(train(dry_run=True), comp))
            return 0
        for line in compose.report(comp)[1:]:
            print(line, flush=True)
        summary = train(control=control, existing=args.existing, run_name=run_name(args.gin, args.bind))
    except NonFiniteError as err:
        print(f"non-finite: {error_text(err)}", file=sys.stderr)
        return NONFINITE_EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C twice, or during start-up): no checkpoint written this time",
              file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except (ValueError, TypeError, OSError, ImportError, SyntaxError, tokenize.TokenError) as err:
        if control.started:
            raise
        print(f"config error: {error_text(err)}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # a torchrun/srun rank leaves its process group cleanly
    if summary["preempted"] == signal.SIGINT.name:
        print(f"interrupted: checkpoint saved at step {summary['step']} in {summary['run_dir']}; "
              "run the same command again to resume", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    return PREEMPTED_EXIT_CODE if summary["preempted"] else 0


if __name__ == "__main__":
    sys.exit(main())
