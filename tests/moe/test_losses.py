"""MoE losses and metrics against their formulas on small cases."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxsparse.moe import (
    AdaptiveLossWeight,
    activation_locality_loss,
    chunk_sparsification_loss,
    expert_load,
    load_balance_loss,
    load_imbalance,
    router_z_loss,
    top_k_router,
)
from jaxsparse.testing import random_normal


def test_load_balance_loss_formula():
    logits = random_normal(jax.random.key(0), (32, 4))
    routing = top_k_router(logits, 2)
    p = np.asarray(routing.router_probs, np.float64)
    index = np.asarray(routing.expert_index)
    f = np.bincount(index.ravel(), minlength=4) / index.size
    np.testing.assert_allclose(float(load_balance_loss(routing)), 4 * np.sum(f * p.mean(0)), rtol=1e-5)


def test_load_balance_is_one_when_uniform():
    routing = top_k_router(jnp.zeros((8, 4)).at[jnp.arange(8), jnp.arange(8) % 4].set(1e-3), 1)
    np.testing.assert_allclose(float(load_balance_loss(routing)), 1.0, rtol=1e-3)


def test_router_z_loss_formula():
    z = np.asarray(random_normal(jax.random.key(1), (10, 6)), np.float64)
    lse = np.log(np.exp(z).sum(-1))
    np.testing.assert_allclose(float(router_z_loss(z)), np.mean(lse**2), rtol=1e-5)


def test_activation_locality_loss_formula():
    logits = np.asarray(random_normal(jax.random.key(2), (2, 5, 3), scale=0.02), np.float64)
    segments = np.asarray([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    total, pairs = 0.0, 0
    for b in range(2):
        for i in range(1, 5):
            if segments[b, i] != segments[b, i - 1]:
                continue
            q = 1 / (1 + np.exp(-100 * logits[b, i - 1]))
            t = 1 / (1 + np.exp(-100 * logits[b, i]))
            total += np.sum(-(t * np.log(q) + (1 - t) * np.log(1 - q)))
            pairs += 3
    np.testing.assert_allclose(float(activation_locality_loss(logits, segment_ids=segments)), total / pairs, rtol=1e-4)


def test_chunk_sparsification_loss_formula():
    probs = np.asarray(jax.nn.softmax(random_normal(jax.random.key(3), (2, 10, 4))), np.float64)
    values = []
    for b in range(2):
        for start in range(0, 10, 4):
            values.extend(1 - np.prod(1 - probs[b, start : start + 4], axis=0))
    np.testing.assert_allclose(float(chunk_sparsification_loss(probs, 4)), np.mean(values), rtol=1e-5)


def test_adaptive_weight_rises_only_when_loss_rises_and_is_capped():
    state = AdaptiveLossWeight.create(0.05, max_factor=4.0, growth=2.0)
    for loss, expected in [(1.0, 0.05), (0.5, 0.05), (0.6, 0.1), (0.7, 0.2), (0.8, 0.2), (0.9, 0.2)]:
        state = jax.jit(lambda s, l: s.update(l))(state, loss)
        np.testing.assert_allclose(float(state.weight), expected, rtol=1e-6)


def test_expert_load_and_imbalance():
    routing = top_k_router(jnp.asarray([[5.0, 0, 0], [5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]]), 1)
    load = expert_load(routing)
    np.testing.assert_array_equal(np.asarray(load), [2, 1, 1])
    cv, peak = load_imbalance(load)
    np.testing.assert_allclose([float(cv), float(peak)], [np.std([2, 1, 1]) / (4 / 3), 2 / (4 / 3)], rtol=1e-6)


def test_loss_input_errors():
    with pytest.raises(ValueError, match="chunk must be"):
        chunk_sparsification_loss(jnp.ones((1, 4, 2)), 0)
    with pytest.raises(ValueError, match=r"logits must be \[B, T, E\]"):
        activation_locality_loss(jnp.ones((4, 2)))
