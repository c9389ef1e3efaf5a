"""top_k_positions (threshold and partial-sort methods) against a numpy stable sort and lax.top_k."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax import lax

from jaxsparse.ops import top_k_positions as module
from jaxsparse.ops.top_k_positions import METHODS, sortable_keys, top_k_positions


def _numpy_top_k(x, k, valid):
    """Per row: the k largest valid entries (ties to the lower position), ascending; and the count."""
    rows = x.reshape(-1, x.shape[-1])
    masks = np.broadcast_to(valid, x.shape).reshape(rows.shape)
    positions, counts = [], []
    for row, mask in zip(rows, masks):
        candidates = np.nonzero(mask)[0]
        order = candidates[np.argsort(-row[candidates], kind="stable")][:k]
        positions.append(np.pad(np.sort(order), (0, k - len(order))))
        counts.append(len(order))
    return np.array(positions).reshape(*x.shape[:-1], k), np.array(counts).reshape(x.shape[:-1])


def _rows(kind, shape, rng):
    x = rng.normal(size=shape).astype(np.float32)
    if kind == "ties":
        x = np.round(x * 2) / 2
    if kind == "sorted":
        x = np.sort(x, axis=-1)
    if kind == "clustered":  # the largest entries share strided blocks: candidates overflow
        x[..., :: max(1, shape[-1] // 64)] += 10.0
    if kind == "heavy_tailed":
        x = rng.standard_cauchy(size=shape).astype(np.float32)
    return x


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["normal", "ties", "sorted", "clustered", "heavy_tailed"])
@pytest.mark.parametrize("n, k", [(1, 1), (50, 50), (300, 7), (2000, 64), (8192, 256)])
def test_matches_stable_sort(method, kind, n, k):
    rng = np.random.default_rng(n + k)
    x = _rows(kind, (2, 3, n), rng)
    valid = rng.random((2, 3, n)) < 0.8
    positions, counts = jax.jit(lambda x, v: top_k_positions(x, k, valid=v, method=method))(x, valid)
    expected_positions, expected_counts = _numpy_top_k(x, k, valid)
    np.testing.assert_array_equal(np.asarray(counts), expected_counts)
    np.testing.assert_array_equal(np.asarray(positions), expected_positions)


@pytest.mark.parametrize("method", METHODS)
def test_special_values_follow_lax_top_k(method):
    # lax.top_k's order: NaN above +inf, -0 below +0, ties to the lower position.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 4096)).astype(np.float32)
    x[0, [5, 900]] = np.nan
    x[1, :] = 0.0
    x[1, ::3] = -0.0
    x[2, [7, 8, 3000]] = [np.inf, -np.inf, np.inf]
    x[3, :4000] = -np.inf  # fewer finite entries than k
    k = 200
    positions, counts = top_k_positions(x, k, method=method)
    expected = np.sort(np.asarray(lax.top_k(x, k)[1]), axis=-1)
    np.testing.assert_array_equal(np.asarray(positions), expected)
    np.testing.assert_array_equal(np.asarray(counts), np.full(4, k))


def test_sortable_keys_order_like_floats():
    x = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, np.inf, np.nan], np.float32)
    keys = np.asarray(sortable_keys(x))
    assert np.all(np.diff(keys) > 0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("valid_shape", [(2, 1, 700), (700,), (2, 3, 1), ()])
def test_broadcast_valid_counts_like_the_full_mask(method, valid_shape):
    # A mask shared by the rows of a sequence ([B, 1, S], as KV selection passes it), a row mask
    # for every row, a per-row on/off switch, a scalar.
    rng = np.random.default_rng(len(valid_shape))
    x = rng.normal(size=(2, 3, 700)).astype(np.float32)
    valid = rng.random(valid_shape) < 0.3
    if valid_shape == (2, 3, 1):
        valid[0, 1, 0] = False
    positions, counts = jax.jit(lambda x, v: top_k_positions(x, 64, valid=v, method=method))(x, valid)
    expected_positions, expected_counts = _numpy_top_k(x, 64, valid)
    np.testing.assert_array_equal(np.asarray(counts), expected_counts)
    np.testing.assert_array_equal(np.asarray(positions), expected_positions)


def test_fewer_valid_than_k_lists_them_all():
    x = np.random.default_rng(1).normal(size=(3, 500)).astype(np.float32)
    valid = np.zeros((3, 500), bool)
    valid[0, [4, 99, 400]] = True
    valid[2, :] = True
    positions, counts = top_k_positions(x, 10, valid=valid)
    np.testing.assert_array_equal(np.asarray(counts), [3, 0, 10])
    np.testing.assert_array_equal(np.asarray(positions[0]), [4, 99, 400] + [0] * 7)
    np.testing.assert_array_equal(np.asarray(positions[1]), np.zeros(10))


def _threshold_path(x, k, candidates):
    """The threshold method with a fallback that returns -1, to see which path ran."""
    x = jnp.asarray(x, jnp.float32)
    return module._threshold_positions(lambda: (x, None), k, candidates,
                                       lambda: jnp.full((x.shape[0], k), -1, jnp.int32))


def test_threshold_method_takes_the_fast_path_on_iid_rows():
    x = np.random.default_rng(2).normal(size=(8, 32768)).astype(np.float32)
    got = np.asarray(jax.jit(_threshold_path, static_argnums=(1, 2))(x, 256, 512))
    np.testing.assert_array_equal(got, np.sort(np.asarray(lax.top_k(x, 256)[1]), axis=-1))


@pytest.mark.parametrize("case", ["clustered", "nan"])
def test_threshold_method_falls_back(case):
    x = np.random.default_rng(3).normal(size=(2, 4096)).astype(np.float32)
    if case == "clustered":
        x[1, ::128] += 10.0  # 32 winners in one strided block (of 128): 31 other blocks pass the bound too
    else:
        x[0, 17] = np.nan
    got = np.asarray(_threshold_path(x, 32, 32))
    np.testing.assert_array_equal(got, -1)


@pytest.mark.parametrize("k", [0, 11, 2.0, True])
def test_rejects_bad_k(k):
    with pytest.raises(ValueError, match="k must"):
        top_k_positions(np.zeros((2, 10)), k)


def test_rejects_bad_method_and_candidates():
    with pytest.raises(ValueError, match="method"):
        top_k_positions(np.zeros((2, 10)), 3, method="sort")
    with pytest.raises(ValueError, match="candidates"):
        top_k_positions(np.zeros((2, 10)), 3, candidates=2)
    with pytest.raises(ValueError, match="axis"):
        top_k_positions(np.float32(1.0), 1)
