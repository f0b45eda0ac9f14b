"""`python -m looplm.sweep`: the sweep command (looplm/lab/sweep_cli.py)."""

if __name__ == "__main__":
    import sys

    from looplm.lab.sweep_cli import main

    sys.exit(main())
