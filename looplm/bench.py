"""`python -m looplm.bench`: the benchmark command.

    python -m looplm.bench [options]           training steps against Llama peers (looplm/tools/bench/cli.py)
    python -m looplm.bench decode [options]    generation: cache, early exit, HF generate (looplm/infer/bench.py)
"""

import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["decode"]:
        from looplm.infer.bench import main as decode

        return decode(argv[1:])
    from looplm.tools.bench.cli import main as train_steps

    train_steps(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
