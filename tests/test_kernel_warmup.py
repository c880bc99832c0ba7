"""The kernel warm-up (dsv4shard.kernel_warmup): its calls obey MLX's CUDA
dispatch rules for the module each names, and run; its bookkeeping, on real
child processes and a real cache directory."""

import os
from pathlib import Path

import mlx.core as mx
import pytest

from dsv4shard import kernel_warmup as kw

LISTING = Path(__file__).parent.parent / "benchmarks" / "results" / "cuda-kernels-h200.txt"


def _row_tile(rows: int) -> int:
    return max(16, min(64, 1 << (rows - 1).bit_length()))


def _path(call: kw.KernelCall) -> str:
    """MLX 0.32's CUDA dispatch of ``call`` on a Hopper GPU, written from the
    rules of QuantizedMatmul/GatherQMM::eval_gpu (one case a line)."""
    half, wide = call.dtype in ("float16", "bfloat16"), call.bits in (4, 8)
    if (not call.experts and call.mode == "affine" and wide and call.k % 64 == 0
            and call.group >= call.k):
        return "sm90"
    if call.rows < 8:
        return "qmv"
    if half and wide and call.n % 128 == 0 and call.k % max(64, call.group) == 0:
        return "gather_rhs_sm80" if call.experts else "sm80"
    if call.k % max(64, call.group) == 0:
        return "naive"
    return "none"


@pytest.mark.parametrize("module", kw.SUITE_KERNELS)
def test_each_call_takes_the_path_and_tile_its_module_names(module):
    call = kw.call_for(module)
    assert call is not None and call.module == module
    assert module.split("_")[-1] == call.mode and f"_{call.dtype}_" in module
    assert f"_b{call.bits}_g{call.group}_" in module
    path = _path(call)
    expected = {"qmm_naive_tn_aligned": "naive", "qmm_sm80_tn": "sm80",
                "qmm_sm90_tn": "sm90", "gather_qmm_rhs_sm80_tn": "gather_rhs_sm80"}
    assert path == next(v for k, v in expected.items() if module.startswith(k + "_")), path
    tile = f"_n{call.n}_" if path == "sm90" else f"_m{_row_tile(call.rows)}_"
    assert tile in module, (tile, module)
    assert call.k % call.group == 0  # whole groups: mx.quantize accepts the weight


def test_every_call_runs_on_the_cpu():
    with mx.stream(mx.cpu):
        for module in kw.SUITE_KERNELS:
            kw.run_call(kw.call_for(module))


def test_the_list_is_the_h200_runs_matmul_modules():
    names = [line.strip() for line in LISTING.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert sorted(kw.SUITE_KERNELS) == sorted(n for n in names if kw.call_for(n))
    assert len(set(kw.SUITE_KERNELS)) == len(kw.SUITE_KERNELS)


def test_other_names_have_no_call():
    for name in ("gather_float32_int32_1", "slice_update_Add_float32",
                 "qmm_naive_tn_residue_float32_m16_b4_g32_affine", "qmm_sm80_tn_float16_m16_b4"):
        assert kw.call_for(name) is None, name


def _entry(directory, name):
    for ext in (".txt", ".ptx"):
        Path(directory, name + ext).write_bytes(b"x")


def test_what_the_cache_holds_is_not_compiled_again(tmp_path):
    have, lack = kw.SUITE_KERNELS[:2]
    _entry(tmp_path, have)
    Path(tmp_path, lack + ".ptx").write_bytes(b"x")  # torn: no names yet
    assert kw.missing([have, lack, "gather_float32_int32_1"], str(tmp_path)) == [lack]
    assert kw.warm([have], str(tmp_path)) == kw.Warmed((), (), 0.0)


# Names of the listed form whose row tile (4, 2) MLX never produces: their
# calls have fewer than 8 rows, so every backend runs them with a kernel it
# already holds (the CPU build's, CUDA's precompiled matrix-vector one) and
# no module of either name appears: both are "missed", on any backend,
# without the half a minute a real compile would cost on a GPU.
NEVER_PRODUCED = ("qmm_naive_tn_aligned_float32_m4_b4_g64_affine",
                  "qmm_sm80_tn_bfloat16_m2_b8_g32_affine")


def test_a_call_that_compiles_nothing_is_named_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DSV4SHARD_KERNEL_CACHE", str(tmp_path))
    names = list(NEVER_PRODUCED)
    assert all(kw.call_for(n).rows < 8 for n in names)
    done = kw.warm(names, str(tmp_path), jobs=2, timeout=120)
    assert done.compiled == () and [n for n, _ in done.missed] == names
    line = done.line()
    assert "\n" not in line and all(n in line for n in names) and "2 not produced" in line


def test_a_child_past_its_time_limit_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("DSV4SHARD_KERNEL_CACHE", str(tmp_path))
    module, why = kw._child(kw.SUITE_KERNELS[0], timeout=0.05)
    assert module == kw.SUITE_KERNELS[0] and why == "no answer in 0 s"


def test_a_child_given_a_wrong_name_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("DSV4SHARD_KERNEL_CACHE", str(tmp_path))
    module, why = kw._child("gather_float32_int32_1", timeout=120)
    assert why == "not a quantized matmul module name: gather_float32_int32_1"
    assert not os.listdir(tmp_path)
