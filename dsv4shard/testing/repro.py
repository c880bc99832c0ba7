"""Rerun one property on one printed case:

    python -m dsv4shard.testing.repro moe_matches_reference 'MoECase(...)' \
        [--build=dsv4shard.testing.mutants.router:build_no_renormalisation]
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil

from dsv4shard.testing import properties, strategies
from reference.moe_block import MoEConfig, Revision
from reference.quantization import QuantFormat


def find_property(name: str):
    for info in pkgutil.iter_modules(properties.__path__):
        module = importlib.import_module(f"{properties.__name__}.{info.name}")
        if hasattr(module, name):
            return getattr(module, name), module
    raise SystemExit(f"no property named {name!r} in dsv4shard.testing.properties")


def load(spec: str):
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def parse_case(text: str):
    """A case from its printed repr (a failure message prints it)."""
    from dsv4shard.testing import strategies as s

    namespace = {**vars(s), "MoEConfig": MoEConfig, "Revision": Revision,
                 "QuantFormat": QuantFormat}
    return eval(text, namespace)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("property")
    parser.add_argument("case")
    args, rest = parser.parse_known_args(argv)
    prop, module = find_property(args.property)
    namespace = {**vars(strategies), **vars(module), "MoEConfig": MoEConfig,
                 "Revision": Revision, "QuantFormat": QuantFormat}
    case = eval(args.case, namespace)  # the case's own repr, printed by a failure
    impl = {}
    for item in rest:
        key, _, spec = item.removeprefix("--").partition("=")
        impl[key] = load(spec)
    prop(case, **impl)
    print(f"{args.property}: passed")


if __name__ == "__main__":
    main()
