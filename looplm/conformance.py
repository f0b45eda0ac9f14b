"""`python -m looplm.conformance`: the plugin conformance battery (looplm/tools/conformance/)."""

if __name__ == "__main__":
    import sys

    from looplm.tools.conformance.cli import main

    sys.exit(main())
