"""Rerun one property on one printed case:

    python -m dsv4shard.testing.repro moe_matches_reference 'MoECase(...)' \
        [--build=dsv4shard.testing.mutants.router:build_no_renormalisation]
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil

from dsv4shard.impl import load as load_impl
from dsv4shard.testing import properties, strategies
from reference.moe_block import MoEConfig, Revision
from reference.quantization import QuantFormat


def find_property(name: str):
    for info in pkgutil.iter_modules(properties.__path__):
        module = importlib.import_module(f"{properties.__name__}.{info.name}")
        if hasattr(module, name):
            return getattr(module, name), module
    raise SystemExit(f"no property named {name!r} in dsv4shard.testing.properties")


def parse_case(text: str, module=None):
    """A case from its printed repr (a failure message prints it); names of
    ``module`` (a property's own case classes) resolve too."""
    namespace = {**vars(strategies), **(vars(module) if module else {}),
                 "MoEConfig": MoEConfig, "Revision": Revision, "QuantFormat": QuantFormat}
    return eval(text, namespace)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("property")
    parser.add_argument("case")
    args, rest = parser.parse_known_args(argv)
    prop, module = find_property(args.property)
    case = parse_case(args.case, module)
    impl = {}
    for item in rest:
        key, _, spec = item.removeprefix("--").partition("=")
        impl[key] = load_impl(spec)
    prop(case, **impl)
    print(f"{args.property}: passed")


if __name__ == "__main__":
    main()
