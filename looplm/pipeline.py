"""Ouro's training pipeline: Stage I pre-training, SFT, Stage II gate training, each stage
starting from the checkpoint the stage before it ended with.

    python -m looplm.pipeline [--runs runs/ouro_pipeline] [--init-from PATH] [--bind B ...]

Stage k is `python -m looplm.run --gin gin/ouro_<stage>.gin` in the run folder RUNS/<stage>,
stages after the first with `--init-from RUNS/<previous stage>` (weights and model config).
`--bind B` applies to every stage, `--bind 'sft: B'` to one (stages: stage1, sft, stage2).
`--init-from PATH` starts stage 1 from a released Ouro checkpoint or a looplm run; to upcycle
one (its layers repeated, as Ouro grew its 2.6B from its 1.4B):

    --bind 'stage1: train.init_from = @upcycled_checkpoint()' \\
    --bind 'stage1: upcycled_checkpoint.path = "ByteDance/Ouro-1.4B"' \\
    --bind 'stage1: train.model_config = None'

A finished stage is left as it is, so the same command run again after a stop (pre-emption,
Ctrl-C) resumes the stage that stopped. Exit code: the first failing stage's (looplm.run's).
`--dry-run` prints the commands and runs nothing. The three files also chain on their own with
their default run folders: `python -m looplm.run --gin gin/ouro_stage1.gin`, then ouro_sft.gin,
then ouro_stage2.gin.
"""

import argparse
import re
import shlex
import sys
from pathlib import Path

import gin

from looplm import run

STAGES = ("stage1", "sft", "stage2")
SCOPED = re.compile(r"^\s*(\w+)\s*:\s*(.*)$", re.DOTALL)  # 'sft: TRAIN_STEPS = 5'; no gin binding reads so


def stage_commands(runs: str, binds: list[str], init_from: str | None) -> list[list[str]]:
    """looplm.run's arguments for each stage, in order."""
    shared, scoped = [], {stage: [] for stage in STAGES}
    for bind in binds:
        match = SCOPED.match(bind)
        if match is None:
            shared.append(bind)
        elif match.group(1) in scoped:
            scoped[match.group(1)].append(match.group(2))
        else:
            raise ValueError(f"--bind {bind!r}: no stage {match.group(1)!r}; the stages are {', '.join(STAGES)}")
    commands, previous = [], init_from
    for stage in STAGES:
        argv = ["--gin", str(run.GIN_DIR / f"ouro_{stage}.gin")]
        argv += [] if previous is None else ["--init-from", previous]
        for bind in [*shared, *scoped[stage], f"train.run_dir = {str(Path(runs) / stage)!r}"]:
            argv += ["--bind", bind]
        commands.append(argv)
        previous = str(Path(runs) / stage)
    return commands


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m looplm.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/ouro_pipeline", metavar="DIR",
                        help="the stages' run folders are DIR/stage1, DIR/sft, DIR/stage2")
    parser.add_argument("--init-from", metavar="PATH", help="stage 1's start (see looplm.run --init-from)")
    parser.add_argument("--bind", action="append", default=[], metavar="BINDING",
                        help="a gin binding for every stage, or 'STAGE: binding' for one (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the stages' commands, run nothing")
    args = parser.parse_args(argv)
    try:
        commands = stage_commands(args.runs, args.bind, args.init_from)
    except ValueError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    for stage, command in zip(STAGES, commands):
        print(f"== {stage}: python -m looplm.run {shlex.join(command)}", flush=True)
        if args.dry_run:
            continue
        gin.clear_config()  # each stage reads its own files
        code = run.main(command)
        if code != 0:
            print(f"pipeline stopped at {stage} (exit code {code}); run the same command again to resume",
                  file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
