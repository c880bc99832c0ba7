"""A variant's whole tiny Model, attention included, sharded by its own
shard() over real ranks against the same Model unsharded
(dsv4shard.variants.sharded_model; SPEC sections 5 and 7)."""

from pathlib import Path

import mlx_lm.models.deepseek_v41 as deepseek_v41
import pytest

from dsv4shard.engine.outcome import Departure, NotApplicable
from dsv4shard.ranks import shared
from dsv4shard.variants import sharded_model
from dsv4shard.variants.adapter import Variant

pytestmark = pytest.mark.distributed

VARIANTS = Path(__file__).parent / "variants"


def run(spec, ranks=2):
    return sharded_model.check(Variant(str(spec)), ranks, pool=shared.pool(ranks))


@pytest.mark.parametrize("ranks", [2, 4])
def test_released_deepseek_v41_gives_the_unsharded_logits(ranks):
    detail = run("mlx_lm.models.deepseek_v41", ranks)
    assert f"every rank of {ranks}" in detail


def test_unsliced_sinks_crash_is_named_by_layer_and_operation():
    with pytest.raises(Departure) as failure:
        run(VARIANTS / "sinks_unsliced.py")
    message = str(failure.value)
    assert "sharded forward failed in model.layers.0.self_attn" in message
    assert "(scaled_dot_product_attention)" in message
    assert "invalid shape for sinks" in message


def test_rank0_sinks_everywhere_is_a_wrong_answer_in_attention():
    with pytest.raises(Departure) as failure:
        run(VARIANTS / "sinks_rank0.py")
    message = str(failure.value)
    assert "first departs in model.layers.0.self_attn (attention" in message
    assert "logits differ" in message


def test_the_tiny_model_is_really_sharded():
    """The ranks' Model holds 1/N of the heads, so the comparison is not
    between two unsharded Models (and 4 ranks get 4 heads to divide)."""
    variant = Variant("mlx_lm.models.deepseek_v41")
    for ranks in (2, 4):
        args = sharded_model.tiny_args(variant, ranks)
        assert args.num_attention_heads % ranks == 0 and args.o_groups % ranks == 0
    assert sharded_model.tiny_args(variant, 4, {"o_groups": 8}).o_groups == 8


def test_in_memory_module_is_not_applicable():
    with pytest.raises(NotApplicable, match="in-memory module"):
        sharded_model.check(Variant(deepseek_v41))
    with pytest.raises(NotApplicable, match="in-memory module"):
        sharded_model.check(Variant(str(VARIANTS / "sinks_rank0.py"), fresh=True))


def test_a_model_without_shard_is_not_applicable():
    with pytest.raises(NotApplicable, match=r"has no shard\(\)"):
        sharded_model.check(Variant(str(VARIANTS / "experts_attr.py")))
