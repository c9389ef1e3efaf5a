"""Presets, their parameter counts (abstractly, never allocating the 2.6B models) and dense twins."""

import pytest
from flax import nnx

from models import PRESETS, Transformer, count_parameters, dense_twin, get_preset

TINY = ["dense-tiny", "spark-tiny", "blockffn-tiny", "moe-tiny"]


def _abstract(config):
    return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))


def _ffn_parameters(config) -> int:
    model = _abstract(config)
    return sum(count_parameters(block.ffn) for block in model.blocks)


def test_get_preset_lists_the_known_names():
    assert get_preset("spark-tiny") is PRESETS["spark-tiny"]
    with pytest.raises(ValueError, match="dense-tiny"):
        get_preset("dense-huge")


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_are_byte_level_and_small(name):
    config = get_preset(name)
    assert config.vocab_size == 256 and config.max_seq_len == 256 and config.num_layers == 4
    assert 1_000_000 <= count_parameters(_abstract(config)) <= 3_000_000


@pytest.mark.parametrize("name", ["dense-gemma2-2b", "spark-gemma2-2b"])
def test_gemma2_2b_shapes_have_about_2_6b_parameters(name):
    config = get_preset(name)
    assert (config.model_dim, config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (
        2304, 26, 8, 4, 256)
    # Gemma 2 2B has 2,614,341,888; its 2 post-sublayer norms per layer (2 * 26 * 2304) are not modelled.
    assert count_parameters(_abstract(config)) == 2_614_341_888 - 2 * 26 * 2304
    assert [layer.kind for layer in config.attention[:2]] == ["sliding_window", "full"]


@pytest.mark.parametrize("name", ["spark-tiny", "blockffn-tiny", "moe-tiny", "spark-gemma2-2b"])
def test_dense_twin_keeps_attention_and_matches_ffn_parameters(name):
    config = get_preset(name)
    twin = dense_twin(config)
    assert twin.ffn == "dense" and twin.attention == config.attention and twin.model_dim == config.model_dim
    assert twin.num_experts is None and twin.aux_loss_weights is None
    sparse, dense = _ffn_parameters(config), _ffn_parameters(twin)
    router = 0 if config.ffn == "spark" else config.num_layers * config.num_experts * config.model_dim
    gains = config.num_layers * config.num_experts if config.ffn == "blockffn" else 0
    assert sparse == dense + router + gains
    assert dense_twin(twin) is twin
