"""Power: every value comparison of the suite can fail.

A comparison within a bound is only as good as the wrong answers it
rejects.  Each comparison is split into its expected side (a
:class:`~dsv4shard.testing.tolerance.Expected`: the value a right
implementation returns and the bound) and the actual side (the MLX output).
Here the expected side of every comparison is fed canned wrong answers
built from the right one, in the reference and without running a kernel:

- ``zeros``; ``half`` and ``one_and_a_half`` (0.5x and 1.5x the right
  answer); ``negated``;
- ``routed_clip_removed``: the reference with the routed experts unclipped
  (activations scaled by 30, so the clip is active);
- ``shared_dropped``; ``expert_dropped`` (each token loses the expert in
  its first slot); ``route_scale_2.5`` (2.5 where the layer says 1.5, or
  1.5 where it says 2.5); ``expert_sets_swapped`` (tokens 0 and 1 computed
  with each other's experts and weights); for the fused concat order,
  ``gate_up_swapped`` (the [gate, up] order: gate's weights as up).

Each wrong answer is rounded to the comparison's dtype, as an MLX output in
it would be.  :func:`comparisons` lists, per comparison of the project's
properties and of the variant checks, the settings (dtype, quantization
mode) it runs in on this backend; ``tests/test_power.py`` insists every
wrong answer is rejected in each, and shows the meta-test itself can fail
(a bound widened 20 times lets some through).  Near-tied router choices are
discarded, never tolerated: a scene keeps the tokens a comparison keeps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

import reference as ref
from dsv4shard.testing import tolerance
from reference.moe_block import MoEConfig, MoEWeights, Revision
from reference.quantization import QuantFormat

WRONG_ANSWERS = ("zeros", "half", "one_and_a_half", "negated", "routed_clip_removed",
                 "shared_dropped", "expert_dropped", "route_scale_2.5", "expert_sets_swapped")

# The scale that drives gate and up deep past the clip (L = 10): a block
# that loses the clip is then off by ~30^2 / 10.
CLIP_SCALE = 30.0


@dataclass(frozen=True)
class Scene:
    """What a comparison compares, as the reference sees it: tokens [T, D]
    as MLX holds them, the weights the kernels hold, the layer's config,
    the dtype, and for a hash layer the token ids.  ``indices``: the experts
    a SwitchGLU comparison drives [T, k] (None: the whole block's)."""

    x: np.ndarray
    weights: MoEWeights
    config: MoEConfig
    dtype: str
    ids: np.ndarray | None = None
    indices: np.ndarray | None = None


# --- the wrong answers ---------------------------------------------------------------


def _routed(scene: Scene, limit: float, indices, w):
    return ref.routed_experts(scene.x, indices, w, scene.weights, limit)


def _shared(scene: Scene):
    return ref.shared_expert(scene.x, scene.weights, scene.config)


def _swap(a: np.ndarray) -> np.ndarray:
    b = a.copy()
    b[[0, 1]] = a[[1, 0]]
    return b


def _distinct_pair(indices) -> bool:
    return len(indices) >= 2 and set(indices[0].tolist()) != set(indices[1].tolist())


def block_answer(scene: Scene, name: str):
    """The whole block's wrong answer ``name`` [T, D] in float64, or None
    where it would equal the right one (no other pair of expert sets, say)."""
    c = scene.config
    indices, w = ref.route(scene.x, scene.weights, c, scene.ids)
    shared = _shared(scene)
    if name == "routed_clip_removed":
        if c.swiglu_limit <= 0:
            return None
        return _routed(scene, 0.0, indices, w) + shared
    if name == "shared_dropped":
        return _routed(scene, c.swiglu_limit, indices, w)
    if name == "shared_clip_removed":
        if ref.shared_expert_limit(c) <= 0:
            return None
        unclipped = replace(c, revision=Revision.FIRST_RELEASE)
        return _routed(scene, c.swiglu_limit, indices, w) + ref.shared_expert(
            scene.x, scene.weights, unclipped)
    if name == "expert_dropped":
        dropped = w.copy()
        dropped[:, 0] = 0.0
        return _routed(scene, c.swiglu_limit, indices, dropped) + shared
    if name == "route_scale_2.5":
        other = 1.5 if c.route_scale == 2.5 else 2.5
        return _routed(scene, c.swiglu_limit, indices, w * (other / c.route_scale)) + shared
    if name == "expert_sets_swapped":
        if not _distinct_pair(indices):
            return None
        return _routed(scene, c.swiglu_limit, _swap(indices), _swap(w)) + shared
    raise KeyError(name)


def experts_answer(scene: Scene, name: str):
    """SwitchGLU's wrong answer ``name`` [T, k, D], or None where it does not apply
    (SwitchGLU neither weights by the route nor adds the shared expert)."""
    c, indices = scene.config, scene.indices
    if name == "routed_clip_removed":
        return None if c.swiglu_limit <= 0 else ref.switch_glu(scene.x, indices,
                                                                scene.weights, 0.0)
    if name == "expert_dropped":
        y = ref.switch_glu(scene.x, indices, scene.weights, c.swiglu_limit)
        y[:, 0] = 0.0
        return y
    if name == "expert_sets_swapped":
        if not _distinct_pair(indices):
            return None
        return ref.switch_glu(scene.x, _swap(indices), scene.weights, c.swiglu_limit)
    if name == "gate_up_swapped":
        swapped = replace(scene.weights, w1=scene.weights.w3, w3=scene.weights.w1,
                          b1=scene.weights.b3, b3=scene.weights.b1)
        return ref.switch_glu(scene.x, indices, swapped, c.swiglu_limit)
    return None  # shared_dropped, shared_clip_removed, route_scale_2.5


SCALINGS = {"zeros": 0.0, "half": 0.5, "one_and_a_half": 1.5, "negated": -1.0}


def wrong_answer(scene: Scene | None, name: str, right: np.ndarray, dtype: str = "float32"):
    """Wrong answer ``name`` as an MLX output in the scene's dtype, or None
    where it does not apply; ``right`` is the expected side's value (a
    comparison of logits has no scene: only the scalings apply)."""
    if name in SCALINGS:
        value = SCALINGS[name] * np.asarray(right, np.float64)
        return tolerance.round_to(value, scene.dtype if scene else dtype)
    if scene is None:
        return None
    if scene.indices is None:
        value = block_answer(scene, name)
    else:
        value = experts_answer(scene, name)
    if value is None:
        return None
    return tolerance.round_to(np.asarray(value).reshape(np.shape(right)), scene.dtype)


@dataclass(frozen=True)
class Trial:
    """One wrong answer fed to one comparison's expected side."""

    comparison: str
    setting: str
    wrong: str
    accepted: bool
    detail: str  # the mismatch that rejected it, or the bound/signal that let it through


def trials(comparison: str, setting: str, expected: tolerance.Expected, scene,
           names=WRONG_ANSWERS) -> list[Trial]:
    """Every applicable wrong answer against ``expected``; ``scene`` is a
    :class:`Scene`, None (only the scalings apply), or a dict of the
    comparison's own named wrong answers (besides the scalings)."""
    out = []
    own = scene if isinstance(scene, dict) else {}
    if own:
        scene = None
    for name in tuple(names) + tuple(own):
        got = own.get(name)
        if got is None:
            got = wrong_answer(scene, name, expected.want, expected.arith.dtype)
        if got is None:
            continue
        bad = expected.check(got)
        out.append(Trial(comparison, setting, name, bad is None,
                         expected.note() if bad is None else str(bad)))
    return out


def accepted(found: list[Trial]) -> list[Trial]:
    return [t for t in found if t.accepted]


def diagnosis(scene: Scene, got, right) -> str:
    """Which wrong answer ``got`` resembles, as the start of a failure
    message ("" when none does): the right answer ``right`` scaled by a
    fitted factor, or one of the reference's look-alikes, whichever lies
    far closer to ``got`` than ``right`` does (the look-alikes are float64
    answers, so they stand a kernel's rounding apart from ``got``)."""
    got, right = np.asarray(got, np.float64), np.asarray(right, np.float64)

    def distance(candidate):
        return float(np.median(np.abs(got - candidate)) / max(np.median(np.abs(candidate)),
                                                               1e-30))

    norm = float((right * right).sum())
    factor = float((got * right).sum()) / norm if norm > 0 else 1.0
    named = [(f"the output is {factor:.3g} x the expected one", factor * right)]
    named += _lookalikes(scene, right.shape)
    off = distance(right)
    name, best = min(((n, distance(c)) for n, c in named), key=lambda pair: pair[1])
    if best < 0.25 * off and best < 0.05:
        return f"{name}: "
    return ""


def _lookalikes(scene: Scene, shape) -> list[tuple[str, np.ndarray]]:
    """(description, answer) of every look-alike that applies to ``scene``."""
    found = []
    for name, words in LOOKALIKE.items():
        answer = (block_answer(scene, name) if scene.indices is None
                  else experts_answer(scene, name))
        if answer is not None:
            found.append((words, answer.reshape(shape)))
    return found


LOOKALIKE = {
    "routed_clip_removed": "the output matches the reference with the routed experts' clip "
                           "removed",
    "shared_clip_removed": "the output matches the reference with the shared expert's clip "
                           "removed",
    "shared_dropped": "the output matches the reference without the shared expert",
    "expert_dropped": "the output matches the reference with one of each token's experts "
                      "dropped",
    "route_scale_2.5": "the output matches the reference with another route_scale",
    "expert_sets_swapped": "the output matches the reference with two tokens' experts swapped",
}


# --- the comparisons -------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """A dtype and format a comparison runs in; ``tf32``: float32 matmuls
    rounding their operands to TF32, as on MLX's CUDA build (emulated in
    the bound wherever the meta-test runs)."""

    dtype: str
    quant: QuantFormat | None
    tf32: bool = False

    def __str__(self):
        q = self.quant
        fmt = "dense" if q is None else f"{q.mode} {q.bits}-bit g{q.group_size}"
        return f"{self.dtype}{' (TF32)' if self.tf32 else ''} {fmt}"


@dataclass(frozen=True)
class Comparison:
    """A value comparison of a property, how to build its expected side
    (and the scene its wrong answers come from) for a setting, and the
    wrong answers that apply to what it compares."""

    name: str
    settings: Callable[[], list[Setting]]
    expect: Callable[[Setting], tuple[tolerance.Expected, Scene]]
    wrong: tuple[str, ...] = WRONG_ANSWERS


# The formats of the project's drawn cases (and of the variant checks' routed experts).
PROJECT_FORMATS = (None, QuantFormat("affine", 32, 4), QuantFormat("affine", 64, 8),
                   QuantFormat("mxfp4", 32, 4), QuantFormat("mxfp8", 32, 8),
                   QuantFormat("nvfp4", 16, 4))


def project_settings() -> list[Setting]:
    """Every (dtype, format) the unfused properties draw on this backend,
    and float32 under TF32."""
    from dsv4shard.backend import unsupported

    found = [Setting(d, q) for d in ("float32", "float16", "bfloat16") for q in PROJECT_FORMATS
             if unsupported(q, d) is None]
    return found + [Setting("float32", q, tf32=True) for q in PROJECT_FORMATS
                    if unsupported(q, "float32") is None]


def router_settings() -> list[Setting]:
    """The router runs in float32 whatever the block's dtype: one setting a
    dtype (x rounded to it), and float32 under TF32; no experts' format."""
    return [Setting(d, None) for d in ("float32", "float16", "bfloat16")] + [
        Setting("float32", None, tf32=True)]


def moe_case(setting: Setting, seed: int = 0, **config):
    """A MoECase where every canned answer differs from the right one: the
    clip active (scale 30, L = 10), several experts per token."""
    from dsv4shard.testing.strategies import MoECase

    values = dict(hidden_size=64, intermediate_size=64, n_experts=8, top_k=3,
                  swiglu_limit=10.0, route_scale=1.5, score_func="sqrtsoftplus",
                  revision=Revision.SHARED_CLIPPED)
    values.update(config)
    return MoECase(MoEConfig(**values), setting.quant, setting.dtype, n_tokens=16,
                   pattern="router", activation_scale=CLIP_SCALE, seed=seed)


def clear_tokens(x, weights, config, tf32: bool | None = None) -> np.ndarray:
    """The tokens a comparison keeps: near-tied router choices are discarded
    (never tolerated), so they never reach a comparison."""
    return (tolerance.router_gap(x, weights, config)
            > tolerance.router_margin(x, weights, config, tf32))


def _enough(keep, x, weights, config) -> bool:
    """Two kept tokens at least, the first two with other expert sets."""
    if keep.sum() < 2:
        return False
    indices, _ = ref.route(x[keep], weights, config)
    return _distinct_pair(indices)


def clear_case(setting: Setting, **config):
    """(case, block, weights, kept tokens): the first seed whose clear tokens
    give every canned answer (a float32 router under TF32 has wide margins).
    Built once per setting and config: the comparisons read it, none changes it."""
    return _clear_case(setting, tuple(sorted(config.items())))


@functools.lru_cache(maxsize=None)
def _clear_case(setting: Setting, config: tuple):
    config = dict(config)
    from dsv4shard.testing.properties import unfused
    from dsv4shard.weights import build_block

    for seed in range(50):
        case = moe_case(setting, seed, **config)
        block, weights = unfused.built(case, build_block)
        if setting.tf32:
            block.float32_matmul = "tf32"
        _, x_ref, _, _ = unfused.inputs(case)
        keep = clear_tokens(x_ref, weights, case.config, unfused.router_in_tf32(block,
                                                                               case.dtype))
        if _enough(keep, x_ref, weights, case.config):
            return case, block, weights, keep
    raise RuntimeError(f"no seed gives clear router choices for {setting}")


def _unfused_moe(setting: Setting):
    from dsv4shard.testing.properties import unfused

    case, block, weights, keep = clear_case(setting)
    _, x_ref, _, _ = unfused.inputs(case)
    x = x_ref[keep]
    return (unfused.expect_moe(case, block, weights, x, None),
            Scene(x, weights, case.config, setting.dtype))


def _unfused_extremes(setting: Setting):
    from dsv4shard.testing.properties import unfused
    from dsv4shard.weights import build_block, read_weights

    case, _, _, _ = clear_case(setting)
    weights, x64 = unfused.extreme_probes(case)
    block = build_block(case.config, weights, case.quant, case.dtype)
    if setting.tf32:
        block.float32_matmul = "tf32"
    weights = read_weights(block)
    _, x_ref, _, _ = unfused.extreme_inputs(case, x64)
    x = x_ref[clear_tokens(x_ref, weights, case.config,
                           unfused.router_in_tf32(block, case.dtype))]
    return (unfused.expect_moe(case, block, weights, x, None),
            Scene(x, weights, case.config, setting.dtype))


def _unfused_switch_glu(setting: Setting):
    from dsv4shard.testing import data
    from dsv4shard.testing.properties import unfused

    case, block, weights, _ = clear_case(setting)
    _, x_ref, _, _ = unfused.inputs(case)
    return (unfused.expect_switch_glu(case, block, weights),
            Scene(x_ref, weights, case.config, setting.dtype, indices=data.make_indices(case)))


def _unfused_sorted(setting: Setting):
    """sorted_matches_unsorted: the sorted whole and the unsorted chunks
    each against SwitchGLU's expected side."""
    from dsv4shard.testing import data
    from dsv4shard.testing.properties import unfused

    case, block, weights, _ = clear_case(setting)
    _, x_ref, _, _ = unfused.inputs(case)
    return (unfused.expect_sorted(case, block, weights),
            Scene(x_ref, weights, case.config, setting.dtype, indices=data.make_indices(case)))


# Sharded comparisons: 2 ranks, each holding whole groups of every format.
SHARDED = dict(intermediate_size=128)


def _sharded(reduce: str):
    """sharded_matches_unsharded and real_ranks_match_unsharded: 2 ranks,
    the partials summed in float32 or in the activation dtype."""
    def expect(setting: Setting):
        from dsv4shard.testing.properties import sharded, unfused
        from dsv4shard.testing.strategies import ShardCase

        case, block, weights, keep = clear_case(setting, **SHARDED)
        _, x_ref, _, _ = unfused.inputs(case)
        x = x_ref[keep]
        shard_case = ShardCase(case, 2, reduce)
        return (sharded.expect_sharded(shard_case, block, weights, x, None),
                Scene(x, weights, case.config, setting.dtype))
    return expect


def _fused_concat_order(setting: Setting):
    """fused_concat_order_behaviour: the fused switch_mlp against the [up,
    gate] order's expected side (its wrong answers add the [gate, up] one)."""
    from dsv4shard.testing import data
    from dsv4shard.testing.properties import fused, unfused
    from dsv4shard.testing.strategies import FusionCase

    case, block, weights, _ = clear_case(setting)
    _, x_ref, _, _ = unfused.inputs(case)
    indices = data.make_indices(case)
    right, _ = fused.expect_concat_orders(FusionCase(case), block, weights, x_ref, indices)
    return right, Scene(x_ref, weights, case.config, setting.dtype, indices=indices)


def _variant_sharded(setting: Setting):
    """sharded_moe_2_ranks: a variant's own shard() over 2 ranks, float32."""
    from dsv4shard.testing.properties import unfused
    from dsv4shard.variants.sharded import expect_ranks

    case, _, weights, keep = clear_case(setting, **SHARDED)
    _, x_ref, _, _ = unfused.inputs(case)
    x = x_ref[keep]
    arith = tolerance.arithmetic("float32", "tf32" if setting.tf32 else None)
    return (expect_ranks(x, weights, case.config, arith),
            Scene(x, weights, case.config, setting.dtype))


def dense_float32() -> list[Setting]:
    return [Setting("float32", None), Setting("float32", None, tf32=True)]


def variant_settings(dtype: str) -> Callable[[], list[Setting]]:
    """moe_matches_reference runs dense float32; quantized_moe_matches_reference
    the checkpoint formats in bfloat16."""
    from dsv4shard.backend import unsupported
    from dsv4shard.testing.strategies import CHECKPOINT_FORMATS

    def settings():
        if dtype == "float32":
            return [Setting("float32", None)]
        return [Setting(dtype, f) for f in CHECKPOINT_FORMATS if unsupported(f, dtype) is None]
    return settings


def _variant_block(tier: str):
    """compare_block as the variant checks use it, on the project's own
    block as a variant: the tight expected side (``tight``) and the
    precision tier, past which a departure is a failure (``precision``)."""
    def expect(setting: Setting):
        from dsv4shard.testing.properties.variant import AFFINE8
        from dsv4shard.variants import OWN, Variant
        from dsv4shard.variants import data as vdata
        from dsv4shard.variants.probes import expect_block

        variant = Variant(OWN)
        built_setting = variant_setting()
        quant = setting.quant
        for seed in range(50):
            built = variant.build(built_setting, vdata.weights(built_setting, seed, CLIP_SCALE),
                                  quant=quant, shared_quant=AFFINE8 if quant else None,
                                  dtype=setting.dtype)
            config = built_setting.config()
            x_mx = vdata.tokens(16, seed, setting.dtype)
            found = expect_block(built, x_mx, config, setting.dtype)
            scene = found.scene
            if _enough(found.keep, scene.x, scene.weights, config):  # compare_block keeps these
                expected = found.tight if tier == "tight" else found.precision
                return expected.take(found.keep), replace(scene, x=scene.x[found.keep])
        raise RuntimeError(f"no seed gives clear router choices for {setting}")
    return expect


def variant_setting():
    from dsv4shard.variants.adapter import Setting as VariantSetting

    return VariantSetting(top_k=3)


def _sharded_model(setting: Setting):
    """end_to_end: a tiny deepseek_v41's logits, sharded against unsharded;
    the unsharded logits (one small run) are the right answer."""
    import mlx.core as mx

    from dsv4shard.backend import on_model_device
    from dsv4shard.testing.properties import end_to_end as e2e
    from dsv4shard.tiny_model import tiny_v41

    case = e2e.ModelCase(seed=0, layers=2, n_tokens=4)
    with on_model_device():  # where the property runs it
        want = np.array(tiny_v41(case.seed, case.layers)(mx.array([e2e.tokens(case)],
                                                                    dtype=mx.int32)))
        return e2e.expect_logits(case, want), None


def _variant_route(setting: Setting):
    """The variant checks' route weights (renormalisation, bias_chooses_only,
    k_equals_experts): float32 weights against the reference's, within the
    float32 router's error; the wrong answers, besides the scalings: the
    weights not renormalised, and renormalised to 1 instead of route_scale."""
    from dsv4shard.testing.properties import unfused
    from dsv4shard.variants.probes import expect_route

    case, _, weights, keep = clear_case(setting)
    _, x_ref, _, _ = unfused.inputs(case)
    x = x_ref[keep]
    expected = expect_route(x, weights, case.config, tf32=setting.tf32 or None)
    indices = np.sort(ref.route(x, weights, case.config)[0], axis=-1)
    scores = ref.scores(ref.router_logits(x, weights.gate), case.config.score_func)
    chosen = np.take_along_axis(scores, indices, -1)
    own = {"not_renormalised": tolerance.round_to(chosen * case.config.route_scale, "float32"),
           "renormalised_to_1": tolerance.round_to(expected.want / case.config.route_scale,
                                                   "float32")}
    return expected, own


def _unfused_exact_route(setting: Setting):
    """router_matches_reference_on_exact_inputs: route weights on logits
    exact in float32 and TF32; the wrong answers, besides the scalings: a
    bfloat16 router's (the tokens and the logits rounded to bfloat16, the
    reference's experts kept)."""
    from dsv4shard.testing.properties import unfused

    case = moe_case(setting)
    c = case.config
    weights, x64 = unfused.exact_router_inputs(case)
    x = tolerance.round_to(x64, setting.dtype)
    x = x[tolerance.router_gap(x, weights, c) > tolerance.exact_router_margin(x, weights, c)]
    expected = unfused.expect_exact_route(case, x, weights)
    indices = np.sort(ref.route(x, weights, c)[0], axis=-1)
    logits = tolerance.round_to(ref.router_logits(tolerance.round_to(x, "bfloat16"),
                                                  weights.gate), "bfloat16")
    bf16 = ref.route_weights(ref.scores(logits, c.score_func), indices, c)
    return expected, {"bfloat16_router": tolerance.round_to(bf16, "float32")}


def _variant_clip_probe(setting: Setting):
    """routed_clip / spec_revision / limit_disables_clip: the probe's
    activations through one-hot experts against DeepSeek's clip; the wrong
    answers, besides the scalings, are the clip's look-alikes (no clip, gate
    clipped on both sides, the clip after silu, ...) that the probe grid
    tells apart on this backend."""
    from dsv4shard import backend
    from dsv4shard.variants import probes
    from dsv4shard.variants.adapter import Setting as VariantSetting

    limit = 10.0
    x = probes.probe_tokens(limit)
    one_hot = probes.probe_weights(VariantSetting(limit=limit))
    w1, w3, w2 = one_hot.shared_w1, one_hot.shared_w3, one_hot.shared_w2
    want = probes.mlp_with(lambda g, u, L: ref.clipped_swiglu(g, u, L), x, w1, w3, w2, limit)
    own = {}
    for name, act in probes.LOOKALIKES:
        answer = probes.mlp_with(act, x, w1, w3, w2, limit)
        if np.allclose(answer, want, rtol=1e-12, atol=0):
            continue  # the same clip at this L (a fixed L = 10, say): probed at other limits
        # A look-alike within TF32's rounding of DeepSeek's clip (a clip after
        # silu at L = 10) is what routed_clip reports WEAK for, not a rejection.
        if not (backend.tf32_matmuls() and np.allclose(answer, want, rtol=1e-3, atol=1e-6)):
            own[name] = tolerance.round_to(answer, "float32")
    bound = probes.probe_bound(want)
    return tolerance.Expected(want, bound, tolerance.arithmetic("float32")), own


def _variant_sharded_model(setting: Setting):
    """sharded_model: a variant's whole tiny Model sharded by its own
    shard(); its logits (here the end-to-end model's, of the same family)
    against the bound for that Model's reductions."""
    from dsv4shard.backend import on_model_device
    from dsv4shard.variants import Variant
    from dsv4shard.variants import sharded_model as whole

    expected, _ = _sharded_model(setting)
    variant = Variant("mlx_lm.models.deepseek_v41")
    with on_model_device():  # where the check runs it
        model = whole.build(variant, whole.tiny_args(variant, 2), whole.SEEDS[0])
        return whole.expect_output(expected.want, whole.reduction_length(model)), None


def _variant_combine(setting: Setting):
    """combine_precision: the block's combine of its own parts (here the
    reference's routed outputs, route weights and shared output) within one
    bfloat16 rounding; the wrong answers, besides the scalings: the shared
    expert dropped, the route weights dropped, one expert dropped."""
    from dsv4shard.testing.properties import unfused
    from dsv4shard.testing.properties.variant import expect_combine

    case, _, weights, keep = clear_case(setting)
    _, x_ref, _, _ = unfused.inputs(case)
    x = x_ref[keep]
    indices, w = ref.route(x, weights, case.config)
    ys = ref.switch_glu(x, indices, weights, case.config.swiglu_limit)
    sh = ref.shared_expert(x, weights, case.config)
    expected = expect_combine(w, ys, sh)
    one_dropped = w.copy()
    one_dropped[:, 0] = 0.0
    own = {name: tolerance.round_to(value, "bfloat16") for name, value in {
        "shared_dropped": expected.want - sh,
        "route_weights_dropped": ys.sum(1) + sh,
        "expert_dropped": (one_dropped[..., None] * ys).sum(1) + sh}.items()}
    return expected, own


def comparisons() -> list[Comparison]:
    """Every value comparison within a bound of the project's properties
    and of ``dsv4shard check``'s variant checks, with its settings."""
    return [
        Comparison("unfused.moe_matches_reference", project_settings, _unfused_moe),
        Comparison("unfused.moe_matches_reference_at_extremes", project_settings,
                   _unfused_extremes),
        Comparison("unfused.switch_glu_matches_reference", project_settings,
                   _unfused_switch_glu),
        Comparison("unfused.sorted_matches_unsorted", project_settings, _unfused_sorted),
        Comparison("unfused.router_matches_reference_on_exact_inputs", router_settings,
                   _unfused_exact_route, WRONG_ANSWERS[:4]),
        Comparison("sharded.sharded_matches_unsharded (float32 sum)", project_settings,
                   _sharded("float32")),
        Comparison("sharded.sharded_matches_unsharded (activation-dtype sum)",
                   project_settings, _sharded("activation")),
        Comparison("fused.fused_concat_order_behaviour", project_settings,
                   _fused_concat_order, WRONG_ANSWERS + ("gate_up_swapped",)),
        Comparison("variant.sharded_moe_2_ranks", dense_float32, _variant_sharded),
        Comparison("variant.sharded_model", lambda: [Setting("float32", None)],
                   _variant_sharded_model, WRONG_ANSWERS[:4]),
        Comparison("variant.route_weights", dense_float32, _variant_route, WRONG_ANSWERS[:4]),
        Comparison("variant.clip_probe", lambda: [Setting("float32", None)],
                   _variant_clip_probe, WRONG_ANSWERS[:4]),
        Comparison("variant.combine_precision", lambda: [Setting("bfloat16", None)],
                   _variant_combine, WRONG_ANSWERS[:4]),
        Comparison("variant.moe_matches_reference", variant_settings("float32"),
                   _variant_block("tight")),
        Comparison("variant.quantized_moe_matches_reference", variant_settings("bfloat16"),
                   _variant_block("tight")),
        Comparison("variant.quantized_moe_matches_reference (precision tier)",
                   variant_settings("bfloat16"), _variant_block("precision")),
        # Logits: what a wrong MoE does to them takes a model run, so only
        # the scalings of the right answer apply.
        Comparison("end_to_end.sharded_model_matches_unsharded",
                   lambda: [Setting("float32", None)], _sharded_model, WRONG_ANSWERS[:4]),
    ]


def run_all(widen: float = 1.0) -> list[Trial]:
    """Every wrong answer against every comparison in every setting
    (``widen``: the bounds multiplied, to show the meta-test has power)."""
    found = []
    for comparison in comparisons():
        for setting in comparison.settings():
            expected, scene = comparison.expect(setting)
            found += trials(comparison.name, str(setting), expected.widened(widen), scene,
                            comparison.wrong)
    return found

