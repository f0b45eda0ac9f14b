"""`python -m looplm.generate RUN_DIR --prompt TEXT`: batched generation with per-token early exit
(looplm/infer/cli.py)."""

import sys

if __name__ == "__main__":
    from looplm.infer.cli import generate_main

    sys.exit(generate_main())
