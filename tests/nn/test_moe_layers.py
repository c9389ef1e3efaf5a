"""nn.MoE and nn.BlockFFN: equal to explicit per-token formulas; decode union equals training;
router bias is state, not a parameter; aux losses and errors."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse.metrics import chunk_level_sparsity, token_level_sparsity
from jaxsparse.nn import BlockFFN, MoE, RouterBias
from jaxsparse.testing import assert_allclose, random_normal


def _np(a):
    return np.asarray(a, np.float64)


def _silu(z):
    return z / (1 + np.exp(-z))


def _expert(layer, e, v):
    gate = _silu(v @ _np(layer.w_gate[...])[e]) if layer.w_gate is not None else 1.0
    up = v @ _np(layer.w_up[...])[e]
    hidden = gate * up if layer.w_gate is not None else _silu(up)
    return hidden @ _np(layer.w_down[...])[e]


@pytest.mark.parametrize("capacity_factor", [0.0, 50.0])
@pytest.mark.parametrize("shared", [0, 1])
def test_top_k_moe_matches_per_token_formula(capacity_factor, shared):
    layer = MoE(16, 24, 4, k=2, capacity_factor=capacity_factor, num_shared_experts=shared, rngs=nnx.Rngs(0))
    x = random_normal(jax.random.key(1), (2, 6, 16))
    y = nnx.jit(lambda m, x: m(x))(layer, x)
    tokens = _np(x).reshape(-1, 16)
    logits = tokens @ _np(layer.router[...])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = np.zeros_like(tokens)
    for n, v in enumerate(tokens):
        chosen = np.argsort(-p[n])[:2]
        for e in chosen:
            expected[n] += p[n, e] / p[n, chosen].sum() * _expert(layer, e, v)
    if shared:
        s = layer.shared
        expected += (_silu(tokens @ _np(s.w_gate[...]).T) * (tokens @ _np(s.w_up[...]).T)) @ _np(s.w_down[...])
    assert_allclose(y, expected.reshape(x.shape), dtype=jnp.float32)


def test_moe_gradients_reach_router_and_experts():
    layer = MoE(16, 24, 4, k=2, rngs=nnx.Rngs(2))
    x = random_normal(jax.random.key(3), (12, 16))

    def loss(layer, x):
        y, aux = layer(x, return_aux=True)
        return jnp.sum(y**2) + 1e-2 * aux["load_balance"] + 1e-3 * aux["z_loss"]

    grads = nnx.grad(loss)(layer, x)
    for name in ("router", "w_gate", "w_up", "w_down"):
        g = np.asarray(getattr(grads, name)[...])
        assert np.all(np.isfinite(g)) and np.any(g != 0), name


def test_expert_choice_and_sigmoid_bias_layers():
    x = random_normal(jax.random.key(4), (16, 16))
    choice = MoE(16, 24, 4, router="expert_choice", capacity_factor=1.0, rngs=nnx.Rngs(5))
    y, aux = choice(x, return_aux=True)
    np.testing.assert_array_equal(np.asarray(aux["stats"].expert_load), [4, 4, 4, 4])  # C = 16 / 4 each
    biased = MoE(16, 24, 4, router="sigmoid_bias", k=1, rngs=nnx.Rngs(6))
    _, aux = biased(x, return_aux=True)
    assert isinstance(biased.router_bias, RouterBias)
    assert "router_bias" not in nnx.to_pure_dict(nnx.state(biased, nnx.Param))
    load = np.asarray(aux["stats"].expert_load)
    biased.update_router_bias(aux["stats"].expert_load, rate=0.1)
    np.testing.assert_allclose(np.asarray(biased.router_bias[...]), -0.1 * np.sign(load - load.mean()))


@pytest.mark.parametrize("gated", [True, False])
def test_blockffn_matches_formula_and_decode_union(gated):
    layer = BlockFFN(16, 8, 6, gated=gated, chunk=4, rngs=nnx.Rngs(7))
    x = random_normal(jax.random.key(8), (2, 8, 16))
    y, aux = nnx.jit(lambda m, x: m(x, return_aux=True))(layer, x)
    tokens = _np(x).reshape(-1, 16)
    a = np.maximum(tokens @ _np(layer.router[...]), 0)
    r = a / np.sqrt((a**2).mean(-1, keepdims=True) + 1e-6) * _np(layer.router_gain[...])
    expected = np.stack([sum(r[n, e] * _expert(layer, e, v) for e in range(6) if r[n, e] > 0) + 0 * v
                         for n, v in enumerate(tokens)])
    assert_allclose(y, expected.reshape(x.shape), dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(aux["activity"]).reshape(-1, 6), r > 0)
    # Token- and chunk-level sparsity over experts read straight from the activity.
    used = (r > 0).reshape(2, 2, 4, 6).any(2)
    np.testing.assert_allclose(float(chunk_level_sparsity(aux["activity"], 4)), 1 - used.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(token_level_sparsity(aux["activity"])), 1 - (r > 0).mean(), rtol=1e-6)
    assert np.isfinite(float(aux["locality"])) and 0 < float(aux["chunk_sparsity"]) <= 1
    y_decode, union = nnx.jit(lambda m, x: m.decode(x, max_experts=6, chunk=4))(layer, x.reshape(-1, 16))
    assert_allclose(y_decode, y.reshape(-1, 16))
    np.testing.assert_array_equal(np.asarray(union.counts), (r > 0).reshape(4, 4, 6).any(1).sum(-1))
    _, capped = layer.decode(x.reshape(-1, 16), max_experts=1, chunk=4)
    np.testing.assert_array_equal(np.asarray(capped.dropped), np.asarray(union.counts) - 1)


def test_blockffn_losses_have_gradients():
    layer = BlockFFN(16, 8, 6, rngs=nnx.Rngs(9))
    x = random_normal(jax.random.key(10), (2, 8, 16))

    def loss(layer):
        _, aux = layer(x, return_aux=True)
        return 2e-3 * aux["locality"] + 5e-2 * aux["chunk_sparsity"]

    grad = np.asarray(nnx.grad(loss)(layer).router[...])
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: MoE(16, 24, 4, k=5, rngs=nnx.Rngs(0)), "k must be"),
        (lambda: MoE(16, 24, 4, k=0, rngs=nnx.Rngs(0)), "k must be"),
        (lambda: MoE(16, 24, 4, router="hash", rngs=nnx.Rngs(0)), "router must be"),
        (lambda: MoE(16, 24, 4, router="expert_choice", rngs=nnx.Rngs(0)), "needs capacity_factor"),
        (lambda: MoE(16, 24, 0, rngs=nnx.Rngs(0)), "num_experts must be"),
        (lambda: MoE(16, 24, 4, rngs=nnx.Rngs(0)).update_router_bias(jnp.ones(4)), "is for router='sigmoid_bias'"),
        (lambda: BlockFFN(16, 8, 4, rngs=nnx.Rngs(0))(jnp.ones((4, 16))), r"x must be \[B, T, M\]"),
    ],
)
def test_bad_settings(build, message):
    with pytest.raises(ValueError, match=message):
        build()
