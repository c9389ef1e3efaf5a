"""Exact and statistical top-k against float64 numpy references, forward and gradients."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxsparse.ops.topk import statistical_threshold, statistical_topk, topk_mask
from jaxsparse.testing import assert_allclose, random_normal


def _ndtri(p: float) -> float:
    return statistics.NormalDist().inv_cdf(p)


# ----------------------------------------------------------------------------- topk_mask


def _numpy_topk_mask(x, k, fill):
    kth = -np.sort(-x, axis=-1)[..., k - 1 : k]
    return np.where(x >= kth, x, fill)


@pytest.mark.parametrize("k", [1, 7, 64])
@pytest.mark.parametrize("fill", [0.0, -np.inf])
def test_topk_mask_matches_sort(k, fill):
    x = np.asarray(random_normal(jax.random.key(k), (5, 64)))
    np.testing.assert_array_equal(np.asarray(jax.jit(topk_mask, static_argnums=1, static_argnames="fill")(x, k, fill=fill)),
                                  _numpy_topk_mask(x, k, fill))


def test_topk_mask_axis_and_approximate():
    x = random_normal(jax.random.key(0), (32, 3, 5))
    expected = np.moveaxis(_numpy_topk_mask(np.moveaxis(np.asarray(x), 0, -1), 4, 0.0), -1, 0)
    np.testing.assert_array_equal(np.asarray(topk_mask(x, 4, axis=0)), expected)
    # approx_max_k is exact on CPU; on TPU it may keep more than k, never fewer.
    approx = topk_mask(x, 4, axis=0, approximate=True)
    assert np.all(np.sum(np.asarray(approx) != 0, axis=0) >= 4)


def test_topk_mask_gradient_flows_to_kept_entries():
    x = random_normal(jax.random.key(1), (4, 16))
    weights = random_normal(jax.random.key(2), (4, 16))
    grad = jax.grad(lambda x: jnp.sum(weights * topk_mask(x, 5)))(x)
    kept = _numpy_topk_mask(np.asarray(x), 5, 0.0) != 0
    np.testing.assert_array_equal(np.asarray(grad), np.where(kept, np.asarray(weights), 0.0))


def test_topk_mask_everything_is_identity():
    x = random_normal(jax.random.key(3), (3, 10))
    np.testing.assert_array_equal(np.asarray(topk_mask(x, 10)), np.asarray(x))


@pytest.mark.parametrize("k", [0, -1, 17, 2.5, True])
def test_topk_mask_rejects_bad_k(k):
    with pytest.raises(ValueError, match="k must be"):
        topk_mask(jnp.ones((2, 16)), k)


# ----------------------------------------------------------------------- statistical top-k


def _numpy_statistical_topk(x, drop, mode):
    """float64 closed form: theta = mean + std * ndtri(drop) along the last axis."""
    x = np.asarray(x, np.float64)
    theta = x.mean(-1, keepdims=True) + x.std(-1, keepdims=True) * _ndtri(drop)
    if mode == "soft":
        return np.maximum(x - theta, 0.0)
    return np.where(x > theta, x, 0.0 if mode == "hard" else -np.inf)


def _numpy_soft_gradient(x, upstream, drop, stop_gradient):
    """d/dx of sum(upstream * max(x - theta, 0)), theta = mean + c * std (population), in float64.

    dtheta/dx_i = 1/d + c (x_i - mean) / (d std), so grad_i = g_i m_i - (sum_j g_j m_j) dtheta/dx_i
    with m the survivors.
    """
    x, upstream = np.asarray(x, np.float64), np.asarray(upstream, np.float64)
    d, c = x.shape[-1], _ndtri(drop)
    mean, std = x.mean(-1, keepdims=True), x.std(-1, keepdims=True)
    survivors = x > mean + c * std
    direct = upstream * survivors
    if stop_gradient:
        return direct
    through_theta = direct.sum(-1, keepdims=True) * (1.0 / d + c * (x - mean) / (d * std))
    return direct - through_theta


@pytest.mark.parametrize("mode", ["soft", "hard", "logits"])
@pytest.mark.parametrize("k, sparsity", [(26, None), (None, 0.95), (None, 0.5)])
def test_statistical_topk_matches_float64_closed_form(mode, k, sparsity):
    d = 256
    x = random_normal(jax.random.key(4), (6, d))
    drop = sparsity if sparsity is not None else 1 - k / d
    actual = jax.jit(lambda x: statistical_topk(x, k=k, sparsity=sparsity, mode=mode))(x)
    expected = _numpy_statistical_topk(x, drop, mode)
    np.testing.assert_array_equal(np.isneginf(np.asarray(actual)), np.isneginf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(np.asarray(actual)[finite], expected[finite], atol=2e-5, rtol=2e-5)


def test_statistical_threshold_values_and_axis():
    x = random_normal(jax.random.key(5), (40, 3))
    theta = statistical_threshold(x, sparsity=0.9, axis=0)
    assert theta.shape == (1, 3)
    expected = np.asarray(x).mean(0) + np.asarray(x).std(0) * 1.2815515655446004  # ndtri(0.9)
    np.testing.assert_allclose(np.asarray(theta)[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stop_gradient", [False, True])
def test_statistical_topk_soft_gradient_matches_closed_form(stop_gradient):
    x = random_normal(jax.random.key(6), (4, 128))
    upstream = random_normal(jax.random.key(7), (4, 128))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(upstream * statistical_topk(x, sparsity=0.9, stop_gradient=stop_gradient))))(x)
    expected = _numpy_soft_gradient(x, upstream, 0.9, stop_gradient)
    assert_allclose(grad, expected, dtype=jnp.float32, kind="gradient")


def test_statistical_topk_hard_gradient_flows_to_survivors():
    x = random_normal(jax.random.key(8), (4, 128))
    upstream = random_normal(jax.random.key(9), (4, 128))
    grad = jax.grad(lambda x: jnp.sum(upstream * statistical_topk(x, k=13, mode="hard")))(x)
    survivors = _numpy_statistical_topk(x, 1 - 13 / 128, "hard") != 0
    np.testing.assert_allclose(np.asarray(grad), np.where(survivors, np.asarray(upstream), 0.0))


def test_statistical_topk_keeps_everything_at_sparsity_zero():
    x = random_normal(jax.random.key(10), (3, 32))
    for mode in ("soft", "hard", "logits"):
        np.testing.assert_array_equal(np.asarray(statistical_topk(x, sparsity=0.0, mode=mode)), np.asarray(x))
        np.testing.assert_array_equal(np.asarray(statistical_topk(x, k=32, mode=mode)), np.asarray(x))


def test_statistical_topk_constant_rows_have_finite_gradients():
    x = jnp.full((2, 64), 3.0)
    out, grad = jax.value_and_grad(lambda x: jnp.sum(statistical_topk(x, sparsity=0.9)))(x)
    assert float(out) == 0.0 and np.all(np.isfinite(np.asarray(grad)))


def test_statistical_topk_bfloat16_keeps_dtype():
    x = random_normal(jax.random.key(11), (4, 512), jnp.bfloat16)
    y = statistical_topk(x, sparsity=0.9)
    assert y.dtype == jnp.bfloat16
    expected = _numpy_statistical_topk(np.asarray(x, np.float32), 0.9, "soft")
    np.testing.assert_allclose(np.asarray(y, np.float32), expected, atol=3e-2, rtol=1e-2)


# Survivors of a 10% target on rows of d = 16384: Gaussian rows keep 10% within sampling noise
# (binomial std of the share is 0.23% per row, averaged over 64 rows); heavy tails keep fewer
# (REFERENCES: 8% target kept 6.9% on Laplace and 4.7% on Student-t(3) rows).
SURVIVOR_TOLERANCE = 0.003


def test_statistical_topk_survivors_near_k_on_gaussian_rows():
    x = jax.random.normal(jax.random.key(12), (64, 16384))
    share = float(jnp.mean(statistical_topk(x, sparsity=0.9, mode="hard") != 0))
    assert abs(share - 0.10) < SURVIVOR_TOLERANCE, share


@pytest.mark.parametrize("sampler", ["laplace", "student_t3"])
def test_statistical_topk_keeps_fewer_on_heavy_tailed_rows(sampler):
    key = jax.random.key(13)
    x = jax.random.laplace(key, (64, 16384)) if sampler == "laplace" else jax.random.t(key, 3.0, (64, 16384))
    share = float(jnp.mean(statistical_topk(x, sparsity=0.92, mode="hard") != 0))
    assert share < 0.08 - SURVIVOR_TOLERANCE, share


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": 0}, "k must be"),
        ({"k": 65}, "k must be"),
        ({"sparsity": 1.0}, "sparsity must be"),
        ({"sparsity": -0.1}, "sparsity must be"),
        ({}, "exactly one of k and sparsity"),
        ({"k": 4, "sparsity": 0.5}, "exactly one of k and sparsity"),
        ({"k": 4, "mode": "sigmoid"}, "mode must be"),
        ({"k": 4, "axis": 2}, "axis=2 is out of range"),
    ],
)
def test_statistical_topk_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        statistical_topk(jnp.ones((2, 64)), **kwargs)
