"""Known-bad implementations, and which property must catch each.

A property that a broken implementation passes is itself broken, so every
entry of ``CATALOGUE`` is run through the very property functions the suite
uses, and must fail.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Mutant:
    name: str
    prop: Callable  # the property that must catch it
    strategy: Callable  # () -> the strategy the property is tested with
    impl: dict[str, Any] = field(default_factory=dict)  # keyword -> broken part

    @property
    def bug(self) -> str:
        """The docstring of the broken part: the bug class it stands for."""
        (part,) = self.impl.values()
        return (part.__doc__ or "").strip().splitlines()[0]


def catalogue() -> list[Mutant]:
    from dsv4shard.testing import strategies as s
    from dsv4shard.testing.mutants import activation as act
    from dsv4shard.testing.mutants import router, switch
    from dsv4shard.testing.properties import reference_edges as edges
    from dsv4shard.testing.properties import unfused

    def moe():
        return s.moe_cases()

    def dense():
        return s.moe_cases(quantized=False)

    entries = [
        Mutant("clip_after_silu", unfused.moe_matches_reference, moe,
               {"build": act.build_clip_after_silu}),
        Mutant("two_sided_gate_clip", unfused.moe_matches_reference, moe,
               {"build": act.build_two_sided_gate_clip}),
        Mutant("activation_arguments_swapped", unfused.switch_glu_matches_reference, moe,
               {"build": act.build_swapped_arguments}),
        Mutant("bias_in_weights", unfused.moe_matches_reference, moe,
               {"build": router.build_bias_in_weights}),
        Mutant("no_renormalisation", unfused.moe_matches_reference, moe,
               {"build": router.build_no_renormalisation}),
        Mutant("no_unsort", unfused.sorted_matches_unsorted, moe,
               {"build": switch.build_no_unsort}),
        Mutant("no_unsort_vs_reference", unfused.switch_glu_matches_reference, moe,
               {"build": switch.build_no_unsort}),
        Mutant("np_clip_after_silu", edges.clip_probes, s.clip_cases,
               {"clipped_swiglu": act.clipped_swiglu_after_silu}),
        Mutant("np_two_sided_gate_clip", edges.clip_probes, s.clip_cases,
               {"clipped_swiglu": act.clipped_swiglu_two_sided_gate}),
        Mutant("np_no_up_clip", edges.clip_probes, s.clip_cases,
               {"clipped_swiglu": act.clipped_swiglu_no_up_clip}),
        Mutant("np_limit_not_honoured", edges.clip_probes, s.clip_cases,
               {"clipped_swiglu": act.clipped_swiglu_limit_always}),
        Mutant("np_arguments_swapped", edges.clip_probes, s.clip_cases,
               {"clipped_swiglu": act.clipped_swiglu_swapped}),
        Mutant("np_bias_in_weights", edges.bias_chooses_never_weights, dense,
               {"route": router.route_bias_in_weights}),
        Mutant("np_no_renormalisation", edges.renormalisation_rule, dense,
               {"route": router.route_no_renormalisation}),
        Mutant("np_epsilon", edges.all_zero_scores_give_nan, dense,
               {"route_weights": router.route_weights_with_epsilon}),
        Mutant("np_naive_softplus", edges.large_logits_stay_finite, dense,
               {"route": router.route_naive_softplus}),
        Mutant("np_hash_table_ignored", edges.hash_ignores_bias, dense,
               {"route": router.route_hash_ignored}),
        Mutant("np_hash_with_bias", edges.hash_ignores_bias, dense,
               {"route": router.route_hash_with_bias}),
    ]
    return entries + _quantization_entries() + _module_entries()


def _module_entries() -> list[Mutant]:
    """Entries that mutant modules declare themselves, as ``entries()``."""
    import importlib
    import pkgutil

    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "entries"):
            found.extend(module.entries())
    return found


def _quantization_entries() -> list[Mutant]:
    try:
        from dsv4shard.testing.mutants import quantization as q
        from dsv4shard.testing.properties import quantization as qp
    except ImportError:  # written alongside; absent only mid-change
        return []
    from dsv4shard.testing import strategies as s

    return [
        Mutant(name.removeprefix("dequantize_"), qp.dequantize_matches_mlx, s.quant_cases,
               {"dequantize": getattr(q, name)})
        for name in sorted(vars(q)) if name.startswith("dequantize_")
    ]
