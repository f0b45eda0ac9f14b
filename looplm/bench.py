"""`python -m looplm.bench`: the benchmark command (looplm/tools/bench/cli.py)."""

if __name__ == "__main__":
    from looplm.tools.bench.cli import main

    main()
