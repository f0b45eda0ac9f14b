"""`python -m looplm.eval RUN_DIR`: held-out accuracy by exit rule, tokens/s and the mean loops
actually computed (looplm/infer/cli.py)."""

import sys

if __name__ == "__main__":
    from looplm.infer.cli import eval_main

    sys.exit(eval_main())
