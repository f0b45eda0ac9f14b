"""`python -m looplm.conformance`: the battery on named plugins, a module's plugins, or all of them."""

import argparse
import importlib
import sys

from looplm.tools.conformance.battery import check_plugin
from looplm.tools.conformance.plugins import BuildError, examples, import_variants, registered_plugins


def _resolve(target: str):
    if ":" in target and "." not in target.split(":", 1)[0]:
        return target
    module, _, attr = target.rpartition(".")
    if not module:
        raise ValueError(f"{target!r}: give module.Name, or family:name for a registered plugin")
    return getattr(importlib.import_module(module), attr)


def _plugins_of_module(module: str) -> list:
    importlib.import_module(module)
    return [cls for _, _, cls in registered_plugins()
            if cls.__module__ == module or cls.__module__.startswith(module + ".")]


def buildability() -> list[tuple[str, str, int | None, str]]:
    """(family, name, number of examples or None, reason) for every registered plugin."""
    out = []
    for fam, name, cls in registered_plugins():
        try:
            out.append((fam, name, len(examples(cls, fam)), ""))
        except BuildError as e:
            out.append((fam, name, None, str(e)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m looplm.conformance",
                                 description="Run the looplm plugin conformance battery.")
    ap.add_argument("targets", nargs="*", help="module.Class or module.instance, or family:name")
    ap.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                    help="import MODULE and check every plugin it registers")
    ap.add_argument("--all", action="store_true", help="check every registered plugin")
    ap.add_argument("--list", action="store_true", help="list registered plugins and whether they can be built")
    ap.add_argument("--no-compose", action="store_true", help="skip the (slow) composition check")
    ap.add_argument("--no-variants", action="store_true", help="do not import the in-tree variants package")
    args = ap.parse_args(argv)
    if not args.no_variants:
        import_variants()
    if "" not in sys.path:
        sys.path.insert(0, "")  # plugins in the current directory, as `python -m` users expect
    try:
        targets = [_resolve(t) for t in args.targets]
        for module in args.imports:
            found = _plugins_of_module(module)
            if not found:
                print(f"error: importing {module} registered no plugin", file=sys.stderr)
                return 2
            targets += found
    except (ImportError, AttributeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.all:
        targets += [cls for _, _, cls in registered_plugins()]
    if args.list:
        for fam, name, n, reason in buildability():
            print(f"{fam:15s} {name:20s} " + (f"{n} example(s)" if n is not None else f"CANNOT BE BUILT: {reason}"))
        if not targets:
            return 0
    if not targets:
        ap.print_usage(sys.stderr)
        print("error: name a plugin, --import a module, or --all", file=sys.stderr)
        return 2
    failed = 0
    for t in targets:
        try:
            report = check_plugin(t, compose=not args.no_compose, variants=False, raise_on_failure=False)
        except ValueError as e:
            print(f"FAIL {t}: {e}")
            failed += 1
            continue
        print(report, flush=True)
        failed += not report.ok
    print(f"{len(targets) - failed}/{len(targets)} plugins conform")
    return 1 if failed else 0
