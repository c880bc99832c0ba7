"""Rerun one property on one printed case:

    python -m dsv4shard.testing.repro unfused.moe_matches_reference 'MoECase(...)' \
        [--build=dsv4shard.testing.mutants.router:build_no_renormalisation]
    python -m dsv4shard.testing.repro variant.bias_chooses_only 'VariantCase(...)' \
        --variant=path/to/deepseek_v4.py
"""

from __future__ import annotations

import argparse

from dsv4shard.impl import load as load_impl
from dsv4shard.testing import strategies
from reference.moe_block import MoEConfig, Revision
from reference.quantization import QuantFormat


def find_property(name: str):
    """The table's record named ``name`` (``module.name``, or a bare name,
    the project's properties before the variants')."""
    from dsv4shard.engine.records import project_properties, table

    for pool in (table(), project_properties()):
        found = [p for p in pool if name in (p.qualified, p.name)]
        if len(found) == 1:
            return found[0]
    raise SystemExit(f"no single property named {name!r} in the property table")


def parse_case(text: str, module=None):
    """A case from its printed repr (a failure message prints it); names of
    ``module`` (a property's own case classes) resolve too."""
    import importlib

    namespace = {**vars(strategies), **(vars(module) if module else {}),
                 "MoEConfig": MoEConfig, "Revision": Revision, "QuantFormat": QuantFormat}
    for extra in ("reference_edges", "end_to_end"):
        props = importlib.import_module(f"dsv4shard.testing.properties.{extra}")
        namespace.update({k: v for k, v in vars(props).items() if k.endswith("Case")})
    return eval(text, namespace)


def option_key(option: str) -> str:
    """``--fuse-impl`` (as pytest spells it) to the keyword ``fuse_impl``."""
    return option.removeprefix("--").replace("-", "_")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("property")
    parser.add_argument("case")
    args, rest = parser.parse_known_args(argv)
    record = find_property(args.property)
    case = parse_case(args.case)
    impl = {}
    for item in rest:
        key, _, spec = item.partition("=")
        key = option_key(key)
        if key == "variant":
            from dsv4shard.variants.adapter import Variant

            impl[key] = Variant(spec)
        else:
            impl[key] = load_impl(spec)
    detail = record.fn(case, **impl)
    print(f"{record.qualified}: passed" + (f" ({detail})" if isinstance(detail, str) else ""))


if __name__ == "__main__":
    main()
