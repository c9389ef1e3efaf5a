"""ModelConfig and LayerAttention: checks that name the field, normalisation, and the dict round trip."""

import dataclasses
import json

import jax.numpy as jnp
import pytest

from models import PRESETS, LayerAttention, ModelConfig, attention_pattern

BASE = dict(vocab_size=64, model_dim=32, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=16, max_seq_len=32)


def test_defaults_are_normalised_and_hashable():
    config = ModelConfig(**BASE, ffn_dim=64, dtype=jnp.bfloat16)
    assert config.attention == (LayerAttention(),) * 3
    assert config.dtype == "bfloat16" and config.param_dtype == "float32"
    assert config.aux_weights == {}
    hash(config)
    one = LayerAttention(kind="sliding_window", window=8, sinks=2)
    assert ModelConfig(**BASE, ffn_dim=64, attention=one).attention == (one,) * 3
    assert ModelConfig(**BASE, ffn_dim=64, attention=[one, one, one]).attention == (one,) * 3


def test_attention_pattern_makes_every_third_layer_full():
    pattern = attention_pattern(7, full_every=3, window=16, sinks=4)
    assert [layer.kind for layer in pattern] == ["sliding_window", "sliding_window", "full"] * 2 + ["sliding_window"]
    assert pattern[0] == LayerAttention(kind="sliding_window", window=16, sinks=4)
    assert all(layer.kind == "full" for layer in attention_pattern(3, full_every=1, window=4))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_dict_round_trip_through_json(name):
    config = PRESETS[name]
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_aux_loss_weights_defaults_and_overrides():
    moe = dict(BASE, ffn="moe", num_experts=4, experts_per_token=2, expert_dim=8)
    assert ModelConfig(**moe).aux_weights == {"load_balance": 1e-2, "z_loss": 1e-3}
    config = ModelConfig(**moe, aux_loss_weights={"load_balance": 0.5})
    assert config.aux_loss_weights == (("load_balance", 0.5),)
    assert config.aux_weights == {"load_balance": 0.5, "z_loss": 0.0}
    assert ModelConfig(**moe, aux_loss_weights=(("z_loss", 1),)).aux_weights["z_loss"] == 1.0
    assert ModelConfig.from_dict(config.to_dict()) == config
    blockffn = ModelConfig(**BASE, ffn="blockffn", num_experts=4, expert_dim=8)
    assert blockffn.aux_weights == {"locality": 2e-3, "chunk_sparsity": 5e-2}


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(vocab_size=0), "vocab_size"),
        (dict(model_dim=32.0), "model_dim"),
        (dict(num_layers=True), "num_layers"),
        (dict(num_heads=3, num_kv_heads=2), "num_heads"),
        (dict(head_dim=15), "head_dim"),
        (dict(max_seq_len=-1), "max_seq_len"),
        (dict(ffn="sparse"), "ffn"),
        (dict(activation="tanh"), "activation"),
        (dict(ffn_dim=None), "ffn_dim"),
        (dict(ffn_sparsity=0.5), "ffn_sparsity"),
        (dict(num_experts=4), "num_experts"),
        (dict(decode_keys=0), "decode_keys"),
        (dict(score_dims=17), "score_dims"),
        (dict(tie_embeddings=1), "tie_embeddings"),
        (dict(rope_theta=-1.0), "rope_theta"),
        (dict(softcap=0.0), "softcap"),
        (dict(attention_softcap=float("inf")), "attention_softcap"),
        (dict(dtype="int32"), "dtype"),
        (dict(param_dtype="no-such-dtype"), "param_dtype"),
        (dict(attention_implementation="cuda"), "attention_implementation"),
        (dict(attention=(LayerAttention(),) * 2), "attention"),
        (dict(aux_loss_weights={"load_balance": 1.0}), "aux_loss_weights"),
    ],
)
def test_bad_values_name_the_field(change, field):
    values = dict(BASE, ffn_dim=64) | change
    with pytest.raises(ValueError, match=field):
        ModelConfig(**values)


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(ffn="spark", ffn_sparsity=1.0), "ffn_sparsity"),
        (dict(ffn="spark", predictor_dim=32), "predictor_dim"),
        (dict(ffn="moe", ffn_dim=None, num_experts=4, expert_dim=8), "experts_per_token"),
        (dict(ffn="moe", ffn_dim=None, num_experts=4, experts_per_token=5, expert_dim=8), "experts_per_token"),
        (dict(ffn="moe", num_experts=4, experts_per_token=1, expert_dim=8), "ffn_dim"),
        (dict(ffn="blockffn", ffn_dim=None, num_experts=4, experts_per_token=1, expert_dim=8), "experts_per_token"),
        (dict(ffn="blockffn", ffn_dim=None, num_experts=4, expert_dim=8, aux_loss_weights={"locality": -1}),
         "aux_loss_weights"),
    ],
)
def test_fields_of_other_ffn_kinds_are_checked(change, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**(dict(BASE, ffn_dim=64) | change))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="local"), "kind"),
        (dict(kind="full", window=4), "window"),
        (dict(kind="sliding_window"), "window"),
        (dict(kind="sliding_window", window=4, sinks=-1), "sinks"),
    ],
)
def test_layer_attention_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayerAttention(**kwargs)


def test_from_dict_names_unknown_keys():
    values = PRESETS["dense-tiny"].to_dict() | {"hidden_size": 3, "dropout": 0.1}
    with pytest.raises(ValueError, match=r"unknown keys \['dropout', 'hidden_size'\]"):
        ModelConfig.from_dict(values)


def test_replace_rechecks():
    with pytest.raises(ValueError, match="num_kv_heads"):
        dataclasses.replace(PRESETS["dense-tiny"], num_kv_heads=3)
