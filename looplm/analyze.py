"""`python -m looplm.analyze`: collect a sweep's runs into tables and plots (looplm/lab/collect.py)."""

if __name__ == "__main__":
    import sys

    from looplm.lab.collect import main

    sys.exit(main())
