"""The benchmark's own measurements, on tiny layers: the fused path issues one
gather matmul fewer, and the byte count follows the experts touched."""

from functools import partial

import mlx.core as mx

from dsv4shard.bench import FORMATS, expert_bytes, flash_layer, launches, nbytes, touched_experts
from dsv4shard.fuse import install_fused


def test_fusion_saves_one_gather_matmul():
    fmt = FORMATS["mxfp4-g32"]
    unfused = flash_layer(4, fmt, hidden=256, inter=128)
    fused = install_fused(flash_layer(4, fmt, hidden=256, inter=128))
    x = mx.random.normal((3, 256), key=mx.random.key(0))
    idx = mx.array([[0, 1], [1, 2], [3, 0]], dtype=mx.uint32)
    mx.eval(x, idx)
    (u_kernels, u_matmuls), (f_kernels, f_matmuls) = (
        launches(partial(unfused, x, idx)), launches(partial(fused, x, idx)))
    assert (u_matmuls, f_matmuls) == (3, 2)
    assert f_kernels < u_kernels


def test_bytes_read_follow_the_experts_touched():
    layer = flash_layer(4, FORMATS["affine-g64-b4"], hidden=256, inter=128)
    assert expert_bytes(layer, 4) * 4 == nbytes(layer)
    assert touched_experts(mx.array([[0, 1], [1, 3]])) == 3


def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys):
    from dsv4shard.cli import main

    for argv, problem in ((["--experts", "0"], "at least 1 expert"),
                          (["--repeats", "0"], "at least 1"),
                          (["--tokens", "1,x"], "whole numbers"),
                          (["--json", str(tmp_path / "missing" / "o.json")], "does not exist")):
        assert main(["bench", *argv]) == 2
        assert problem in capsys.readouterr().err


def test_quick_preset_fills_only_what_was_left_at_default():
    import argparse

    from dsv4shard.bench import add_arguments, validate

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--quick", "--repeats", "7"])
    assert validate(args) is None
    assert (args.experts, args.repeats, args.tokens, args.formats) == (8, 7, (1, 8),
                                                                       ["mxfp4-g32"])
