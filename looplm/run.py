"""Command line: `python -m looplm.run --gin gin/sampled_step.gin [--gin more.gin] [--bind 'x.y = z']`.

gin files compose with `include`; a plugin outside the repository is registered by an
`import my_plugin` line in a gin file. Everything is built, and so validated, before training.
"""

import argparse
import logging
import sys
from pathlib import Path

import gin

from looplm.train import PREEMPTED_EXIT_CODE, RunControl, train

GIN_DIR = Path(__file__).resolve().parent.parent / "gin"


class _HideSearchMisses(logging.Filter):
    """gin logs an error for every search-path miss of an `include`, even when a later path hits."""

    def filter(self, record):
        return not record.getMessage().startswith("Path not found:")


def parse_config(gin_files: list[str], bindings: list[str]) -> None:
    """Read gin files and bindings; includes resolve against each file's folder and gin/."""
    logging.getLogger().addFilter(_HideSearchMisses())
    for path in [GIN_DIR, *(Path(f).resolve().parent for f in gin_files)]:
        gin.add_config_file_search_path(str(path))
    for f in gin_files:
        if not Path(f).exists():
            raise FileNotFoundError(f"gin file {f!r} not found (files in {GIN_DIR}: "
                                    f"{sorted(p.name for p in GIN_DIR.glob('*.gin'))})")
    gin.parse_config_files_and_bindings(gin_files, bindings)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m looplm.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin", action="append", default=[], metavar="FILE",
                        help="gin config file (repeatable; later files override earlier ones)")
    parser.add_argument("--bind", action="append", default=[], metavar="BINDING",
                        help="a gin binding such as 'train.steps = 100' (repeatable, applied last)")
    args = parser.parse_args(argv)
    if not args.gin:
        args.gin = [str(GIN_DIR / "base.gin")]
    control = RunControl()
    try:
        parse_config(args.gin, args.bind)
        summary = train(control=control)
    except (ValueError, TypeError, FileNotFoundError) as err:
        if control.started:
            raise
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return PREEMPTED_EXIT_CODE if summary["preempted"] else 0


if __name__ == "__main__":
    sys.exit(main())
