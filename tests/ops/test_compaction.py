"""Bit packing, matmul prefix sums and compaction against numpy (packbits, cumsum, nonzero)."""

from __future__ import annotations

import numpy as np
import pytest

import jax

from jaxsparse.ops.compaction import METHODS, compact, pack_bits, prefix_sum


@pytest.mark.parametrize("n", [1, 31, 32, 33, 100, 1024])
def test_pack_bits_matches_numpy_packbits(n):
    mask = np.random.default_rng(n).random((3, n)) < 0.4
    words = np.packbits(mask, axis=-1, bitorder="little")  # bytes, entry 8 j + i at bit i of byte j
    padded = np.pad(words, ((0, 0), (0, -words.shape[-1] % 4)))
    expected = padded.view("<u4")
    np.testing.assert_array_equal(np.asarray(pack_bits(mask)), expected)


@pytest.mark.parametrize("n", [1, 32, 33, 1000, 1025, 40000])
def test_prefix_sum_matches_cumsum(n):
    counts = np.random.default_rng(n).integers(0, 33, size=(2, 3, n))
    np.testing.assert_array_equal(np.asarray(jax.jit(prefix_sum)(counts)), np.cumsum(counts, axis=-1))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 1.0])
@pytest.mark.parametrize("n, size", [(1, 1), (37, 5), (37, 37), (1000, 64), (4096, 300)])
def test_compact_matches_nonzero(density, n, size, method):
    rng = np.random.default_rng(n + size)
    mask = rng.random((2, 3, n)) < density
    positions, counts = jax.jit(compact, static_argnums=1, static_argnames="method")(mask, size, method=method)
    assert positions.shape == (2, 3, size) and counts.shape == (2, 3)
    for row, got, count in zip(mask.reshape(-1, n), np.asarray(positions).reshape(-1, size), np.asarray(counts).ravel()):
        expected = np.nonzero(row)[0][:size]
        assert count == row.sum()
        np.testing.assert_array_equal(got, np.pad(expected, (0, size - len(expected))))


@pytest.mark.parametrize("method", METHODS)
def test_compact_every_bit_of_a_word(method):
    # One set bit per row at every offset of a word, and the all-ones word: the popcount search.
    mask = np.eye(64, dtype=bool)
    positions, counts = compact(mask, 2, method=method)
    np.testing.assert_array_equal(np.asarray(positions[:, 0]), np.arange(64))
    np.testing.assert_array_equal(np.asarray(counts), np.ones(64))
    positions, _ = compact(np.ones((1, 64), bool), 64, method=method)
    np.testing.assert_array_equal(np.asarray(positions[0]), np.arange(64))


@pytest.mark.parametrize("size", [0, -1, 2.0, True])
def test_compact_rejects_bad_size(size):
    with pytest.raises(ValueError, match="size"):
        compact(np.ones((2, 8), bool), size)


def test_compact_rejects_scalar_mask():
    with pytest.raises(ValueError, match="mask"):
        compact(np.bool_(True), 1)


def test_compact_rejects_unknown_method():
    with pytest.raises(ValueError, match="method"):
        compact(np.ones((2, 8), bool), 1, method="sort")
