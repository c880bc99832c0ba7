"""A variant's whole tiny Model, attention included, sharded by its own
shard() over real ranks against the same Model unsharded
(dsv4shard.variants.sharded_model; SPEC sections 5 and 7)."""

import re
from pathlib import Path

import mlx_lm.models.deepseek_v41 as deepseek_v41
import pytest

from dsv4shard.engine.outcome import Departure, NotApplicable
from dsv4shard.variants import sharded_model
from dsv4shard.variants.adapter import Variant

pytestmark = pytest.mark.distributed

VARIANTS = Path(__file__).parent / "variants"


def run(spec, ranks=2, overrides=None):
    """The check on the session's shared pool of ``ranks`` ranks (started
    afresh by the check if an earlier job's import changed its processes)."""
    return sharded_model.check(Variant(str(spec)), ranks, overrides=overrides)


# The released model at 2 and 4 ranks with the adapter's head counts is in
# the variant report (tests/test_variants.py::test_deepseek_v41_is_reported_as_it_is).
@pytest.mark.parametrize("ranks, overrides", [
    (2, {"num_attention_heads": 8, "o_groups": 4}),  # several heads and groups a rank
])
def test_released_deepseek_v41_gives_the_unsharded_logits(ranks, overrides):
    detail = run("mlx_lm.models.deepseek_v41", ranks, overrides)
    assert f"every rank of {ranks}" in detail
    held = int(re.search(r"holding (\d+)% of the parameter bytes", detail).group(1))
    assert held < 100  # really sharded: not two unsharded Models compared


def test_unsliced_sinks_crash_is_named_by_layer_and_operation():
    with pytest.raises(Departure) as failure:
        run(VARIANTS / "sinks_unsliced.py")
    message = str(failure.value)
    assert "sharded forward failed in model.layers.0.self_attn" in message
    assert "(scaled_dot_product_attention)" in message
    assert "invalid shape for sinks" in message
    assert "attention" in message.split("]", 1)[-1]  # the module is named attention


def test_rank0_sinks_everywhere_is_a_wrong_answer_in_attention():
    with pytest.raises(Departure) as failure:
        run(VARIANTS / "sinks_rank0.py")
    message = str(failure.value)
    assert "first departs in model.layers.0.self_attn (attention" in message
    assert "logits differ at the prefill" in message


def test_head_counts_divide_by_the_ranks():
    variant = Variant("mlx_lm.models.deepseek_v41")
    for ranks in (2, 3, 4, 8):
        args = sharded_model.tiny_args(variant, ranks)
        assert args.num_attention_heads % ranks == 0 and args.o_groups % ranks == 0
    with pytest.raises(ValueError, match="no field of ModelArgs: num_kv_heads"):
        sharded_model.check(variant, 2, overrides={"num_kv_heads": 4})


def test_in_memory_module_is_not_applicable():
    with pytest.raises(NotApplicable, match="in-memory module"):
        sharded_model.check(Variant(deepseek_v41))
    with pytest.raises(NotApplicable, match="in-memory module"):
        sharded_model.check(Variant(str(VARIANTS / "sinks_rank0.py"), fresh=True))


def test_a_model_without_shard_is_not_applicable():
    with pytest.raises(NotApplicable, match=r"has no shard\(\)"):
        sharded_model.check(Variant(str(VARIANTS / "experts_attr.py")))
