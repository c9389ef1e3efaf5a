"""The Transformer forward: shapes and metrics of the presets, degenerate cases equal to dense, attention
patterns, packed documents, auxiliary losses and their gradients, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsparse import nn
from models import LayerAttention, ModelConfig, Transformer, attention_pattern, get_preset
from models.ffn import decode_ffn

SMALL = dict(vocab_size=64, model_dim=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, max_seq_len=32)
WINDOW = LayerAttention(kind="sliding_window", window=3)


def _tokens(batch=2, length=16, seed=0, vocab=64):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab)


@nnx.jit
def _forward(model, tokens, segment_ids=None):
    return model(tokens, segment_ids=segment_ids)


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _load(model, params):
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)


@pytest.mark.parametrize("name", ["dense-tiny", "spark-tiny", "blockffn-tiny", "moe-tiny"])
def test_forward_of_tiny_presets(name):
    config = get_preset(name)
    out = _forward(Transformer(config, rngs=nnx.Rngs(0)), _tokens(length=24, vocab=256))
    assert out.logits.shape == (2, 24, 256) and out.logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(out.logits)).all()
    assert out.aux_loss.shape == () and out.aux_loss.dtype == jnp.float32
    metrics = {key: float(value) for key, value in out.metrics.items()}
    for key in ("ffn_tls", "ffn_cls", "attention_density"):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics)
    assert all(value.dtype == jnp.float32 and value.shape == () for value in out.metrics.values())
    if config.ffn in ("moe", "blockffn"):
        assert float(out.aux_loss) > 0
        assert {"expert_load_imbalance"} | {f"aux_{name}" for name in config.aux_weights} <= set(metrics)
        expected = sum(weight * metrics[f"aux_{name}"] for name, weight in config.aux_weights.items())
        np.testing.assert_allclose(float(out.aux_loss), expected, rtol=1e-5)
    else:
        assert float(out.aux_loss) == 0.0
    if config.ffn == "spark":  # about 92% of the neurons are zero
        assert 0.85 < metrics["ffn_tls"] < 0.97
    if config.ffn == "dense":  # GeGLU has no exact zeros
        assert metrics["ffn_tls"] == 0.0


def test_spark_without_sparsity_equals_dense_with_copied_weights():
    """SparkFFN at sparsity 0 is V^T(gelu(x[:r] K1) * (x[r:] K2)): a gated FFN with w_gate = [K1^T, 0],
    w_up = [0, K2^T], w_down = V."""
    r = 8
    spark = Transformer(ModelConfig(**SMALL, ffn="spark", ffn_dim=48, ffn_sparsity=0.0, predictor_dim=r),
                        rngs=nnx.Rngs(0))
    dense = Transformer(ModelConfig(**SMALL, ffn="dense", ffn_dim=48), rngs=nnx.Rngs(1))
    params = _params(spark)
    for block in params["blocks"].values():
        w_in, w_out = block["ffn"].pop("w_in"), block["ffn"].pop("w_out")
        block["ffn"] = {"w_gate": w_in.at[:, r:].set(0), "w_up": w_in.at[:, :r].set(0), "w_down": w_out}
    _load(dense, params)
    tokens = _tokens()
    np.testing.assert_allclose(np.asarray(_forward(spark, tokens).logits), np.asarray(_forward(dense, tokens).logits),
                               rtol=1e-5, atol=1e-5)
    assert float(_forward(spark, tokens).metrics["ffn_tls"]) < 0.01


def test_spark_decode_ffn_reads_only_the_active_rows_and_equals_the_forward():
    """The decode FFN of a sparse Spark layer: with the rows of every neuron that no token activates
    poisoned with NaN (their K2 part of w_in and their w_out row; K1 scores every neuron), the
    output stays finite and equals the clean forward. A masked-dense decode would return NaN. Row 0
    stays clean: the `xla` gathers pad each active list with it (multiplied by zero)."""
    r, width = 8, 96
    layer = nn.SparkFFN(32, width, predictor_dim=r, sparsity=0.9, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (2, 1, 32))
    expected = np.asarray(layer(x))
    active = np.asarray(layer.gate_activations(x) != 0).reshape(2, width)
    assert active.sum(-1).max() <= int(np.ceil(1.2 * 0.1 * width)) < width  # no overflow to the dense fallback
    unused = ~active.any(0) & (np.arange(width) > 0)
    layer.w_in[...] = jnp.asarray(np.where(unused[:, None] & (np.arange(32) >= r), np.nan, np.asarray(layer.w_in[...])))
    layer.w_out[...] = jnp.asarray(np.where(unused[:, None], np.nan, np.asarray(layer.w_out[...])))
    y = np.asarray(decode_ffn(layer, x))
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_moe_with_one_expert_equals_dense_with_copied_weights():
    moe = Transformer(ModelConfig(**SMALL, ffn="moe", num_experts=1, experts_per_token=1, expert_dim=48),
                      rngs=nnx.Rngs(0))
    dense = Transformer(ModelConfig(**SMALL, ffn="dense", ffn_dim=48), rngs=nnx.Rngs(1))
    params = _params(moe)
    for block in params["blocks"].values():
        experts = block.pop("ffn")
        block["ffn"] = {"w_gate": experts["w_gate"][0].T, "w_up": experts["w_up"][0].T, "w_down": experts["w_down"][0]}
    _load(dense, params)
    tokens = _tokens()
    np.testing.assert_allclose(np.asarray(_forward(moe, tokens).logits), np.asarray(_forward(dense, tokens).logits),
                               rtol=1e-5, atol=1e-5)


def test_a_window_covering_the_sequence_equals_full_causal_attention():
    full = Transformer(ModelConfig(**SMALL, ffn_dim=48), rngs=nnx.Rngs(0))
    wide = Transformer(ModelConfig(**SMALL, ffn_dim=48, attention=LayerAttention(kind="sliding_window", window=16,
                                                                               sinks=2)), rngs=nnx.Rngs(0))
    tokens = _tokens()
    full_out, wide_out = _forward(full, tokens), _forward(wide, tokens)
    np.testing.assert_allclose(np.asarray(wide_out.logits), np.asarray(full_out.logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(full_out.metrics["attention_density"]), (16 + 1) / (2 * 16), rtol=1e-6)


def test_without_rotary_logits_depend_on_order_only_through_causality():
    model = Transformer(ModelConfig(**{**SMALL, "num_layers": 1}, ffn_dim=48, rope_theta=None), rngs=nnx.Rngs(0))
    tokens = _tokens()
    logits = np.asarray(_forward(model, tokens).logits)
    # One layer, no positions: the last query attends to a set of embedded tokens, so permuting the
    # earlier tokens leaves its logits alone (with rotary, or a second layer, it would not).
    shuffled = tokens.at[:, :-1].set(tokens[:, :-1][:, ::-1])
    np.testing.assert_allclose(np.asarray(_forward(model, shuffled).logits)[:, -1], logits[:, -1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits[:, 0], logits[:, -1])


@pytest.mark.parametrize(
    "attention, reach",
    [
        ((WINDOW, WINDOW), 4),  # each windowed layer reaches window - 1 = 2 tokens further back
        ((WINDOW, LayerAttention()), 16),  # a full layer reaches everything
        ((dataclasses.replace(WINDOW, sinks=1),) * 2, 16),  # so does a sink
    ],
)
def test_a_far_token_changes_logits_only_within_the_layers_reach(attention, reach):
    model = Transformer(ModelConfig(**SMALL, ffn_dim=48, attention=attention), rngs=nnx.Rngs(0))
    tokens = _tokens()
    changed = tokens.at[:, 0].set((tokens[:, 0] + 1) % 64)
    difference = jnp.abs(_forward(model, tokens).logits - _forward(model, changed).logits).max(axis=(0, 2))
    moved = np.flatnonzero(np.asarray(difference) > 0)
    np.testing.assert_array_equal(moved, np.arange(min(reach + 1, 16)))


def test_packed_documents_equal_separate_sequences():
    config = ModelConfig(**SMALL, ffn_dim=48, attention=(WINDOW, LayerAttention()))
    model = Transformer(config, rngs=nnx.Rngs(0))
    first, second = _tokens(1, 5, seed=1)[0], _tokens(1, 9, seed=2)[0]
    # Row 0 packs both documents; rows 1 and 2 hold one each, followed by a padding document that
    # causal attention keeps out of their logits. One call, one compilation.
    tokens = jnp.stack([jnp.concatenate([first, second]), jnp.pad(first, (0, 9)), jnp.pad(second, (0, 5))])
    segment_ids = jnp.asarray([[3] * 5 + [4] * 9, [0] * 5 + [1] * 9, [0] * 9 + [1] * 5])
    out = _forward(model, tokens, segment_ids)
    np.testing.assert_allclose(np.asarray(out.logits[0, :5]), np.asarray(out.logits[1, :5]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.logits[0, 5:]), np.asarray(out.logits[2, :9]), rtol=1e-5, atol=1e-5)
    # Every row holds documents of 5 and 9 tokens: a full layer sees 5 * 6 / 2 + 9 * 10 / 2 pairs,
    # the window of 3 keys 3 + 2 + 1 + 3 * (n - 3) per document.
    full, window = (15 + 45) / 14**2, (12 + 24) / 14**2
    np.testing.assert_allclose(float(out.metrics["attention_density"]), (full + window) / 2, rtol=1e-6)


@pytest.mark.parametrize("kind", [dict(ffn="moe", num_experts=4, experts_per_token=2, expert_dim=8),
                                  dict(ffn="blockffn", num_experts=4, expert_dim=8)], ids=["moe", "blockffn"])
def test_aux_loss_gradients_reach_the_router(kind):
    model = Transformer(ModelConfig(**SMALL, **kind), rngs=nnx.Rngs(0))
    tokens = _tokens()
    grads = nnx.jit(nnx.grad(lambda model: model(tokens).aux_loss))(model)
    router = np.asarray(grads["blocks"][0]["ffn"]["router"][...])
    assert np.isfinite(router).all() and np.abs(router).max() > 0


def test_remat_gives_the_same_loss_and_gradients():
    tokens = _tokens()
    outputs = []
    for remat in (False, True):
        model = Transformer(ModelConfig(**SMALL, ffn="spark", ffn_dim=48, remat=remat), rngs=nnx.Rngs(0))
        loss, grads = nnx.jit(nnx.value_and_grad(lambda model: jnp.mean(model(tokens).logits ** 2)))(model)
        outputs.append((loss, grads["embed"]["embedding"][...]))
    for plain, rematerialised in zip(*outputs):
        np.testing.assert_allclose(np.asarray(rematerialised), np.asarray(plain), rtol=1e-5, atol=1e-6)


def test_parameters_carry_logical_axes():
    model = Transformer(ModelConfig(**SMALL, ffn_dim=48, tie_embeddings=False), rngs=nnx.Rngs(0))
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    assert tuple(specs["embed"]["embedding"].get_value()) == ("vocab", "embed")
    assert tuple(specs["unembed"]["embedding"].get_value()) == ("vocab", "embed")
    assert tuple(specs["final_norm"]["scale"].get_value()) == ("norm",)
    assert tuple(specs["blocks"][0]["ffn"]["w_gate"].get_value()) == ("mlp", "embed")
    assert Transformer(ModelConfig(**SMALL, ffn_dim=48), rngs=nnx.Rngs(0)).unembed is None


def test_untied_bfloat16_softcapped_forward():
    config = ModelConfig(**SMALL, ffn_dim=48, tie_embeddings=False, dtype="bfloat16", softcap=2.0,
                         attention_softcap=5.0, attention=attention_pattern(2, full_every=2, window=4, sinks=1))
    out = _forward(Transformer(config, rngs=nnx.Rngs(0)), _tokens())
    assert out.logits.dtype == jnp.float32 and float(jnp.abs(out.logits).max()) <= 2.0


def test_errors():
    model = Transformer(ModelConfig(**SMALL, ffn_dim=48), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tokens must be int"):
        model(jnp.zeros((2, 3, 1), jnp.int32))
    with pytest.raises(TypeError, match="tokens must hold integers"):
        model(jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(jnp.zeros((1, 33), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids"):
        model(jnp.zeros((1, 4), jnp.int32), segment_ids=jnp.zeros((1, 5), jnp.int32))
    with pytest.raises(TypeError, match="config"):
        Transformer(SMALL, rngs=nnx.Rngs(0))
