"""On a backend that compiles each kernel on first use (MLX's CUDA build),
the block's cases keep to ``strategies.KERNEL_SET``: one activation dtype
for each format, so a run compiles a small, fixed set of kernels once.
Elsewhere every (format, dtype) pair is drawn.  Shown with the backend
named each way; the draws are all that runs (no kernel)."""

import pytest
from hypothesis import HealthCheck, given, settings

from dsv4shard import backend
from dsv4shard.testing import strategies as s
from reference.quantization import AFFINE_BITS, AFFINE_GROUPS, QUANT_FORMATS

# Every strategy that hands the block a quantized case, by what it is.
CASE_STRATEGIES = {
    "moe_cases": lambda: s.moe_cases(quantized=True),
    "bfloat16_cases": lambda: s.bfloat16_cases(),
    "shard_cases": lambda: s.shard_cases(quantized=True, uneven=True),
    "extended_shard_cases": lambda: s.extended_shard_cases(),
    "v4_shard_cases": lambda: s.v4_shard_cases(),
    "global_scale_shard_cases": lambda: s.global_scale_shard_cases(),
    "fusion_cases": lambda: s.fusion_cases(quantized=True, global_scale=None),
    "v4_fusion_cases": lambda: s.v4_fusion_cases(),
    "extended_fusion_cases": lambda: s.extended_fusion_cases(),
    "sharded_fusion_cases": lambda: s.sharded_fusion_cases(quantized=True),
}


def pairs_drawn(strategy, examples: int = 60) -> set:
    seen = set()

    @settings(max_examples=examples, database=None, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def draws(case):
        moe = getattr(case, "moe", case)
        if moe.quant is not None:
            seen.add((moe.quant, moe.dtype))

    draws()
    return seen


@pytest.mark.parametrize("what", list(CASE_STRATEGIES))
def test_a_compiling_backend_draws_the_kernel_set_only(monkeypatch, what):
    monkeypatch.setattr(backend, "name", lambda: "cuda")
    outside = {p for p in pairs_drawn(CASE_STRATEGIES[what]()) if p not in s.KERNEL_SET.items()}
    assert not outside, f"{what} drew pairs outside KERNEL_SET on cuda: {sorted(map(str, outside))}"


def test_other_backends_draw_every_pair(monkeypatch):
    """The restriction is the compiling backend's alone: on the CPU build the
    same strategy draws pairs outside the set (so the check above can fail)."""
    monkeypatch.setattr(backend, "name", lambda: "cpu")
    assert not backend.compiles_kernels()
    drawn = pairs_drawn(CASE_STRATEGIES["moe_cases"](), examples=120)
    assert drawn - set(s.KERNEL_SET.items())
    assert len({d for _, d in drawn}) == 3


def test_the_kernel_set_covers_every_dtype_mode_bits_and_group():
    formats = list(s.KERNEL_SET)
    assert set(formats) <= set(QUANT_FORMATS)
    assert set(s.KERNEL_SET.values()) == set(s.DTYPE_NAMES)
    assert {f.mode for f in formats} == {f.mode for f in QUANT_FORMATS}
    assert {f.bits for f in formats if f.mode == "affine"} == set(AFFINE_BITS)
    assert {f.group_size for f in formats if f.mode == "affine"} == set(AFFINE_GROUPS)
    assert any(f.global_scale for f in formats)
    for dtype in s.DTYPE_NAMES:
        modes = {f.mode for f, d in s.KERNEL_SET.items() if d == dtype}
        assert "affine" in modes and modes & set(backend.FLOAT_FORMATS), dtype
    # DeepSeek-V4's checkpoint formats, and those the variants run in
    # bfloat16, are all in it.
    assert set(s.V4_FORMATS) <= set(formats)
    assert all(s.KERNEL_SET[f] == "bfloat16" for f in s.CHECKPOINT_FORMATS)
