"""SequenceLayout: the positions each shard holds, permute / unpermute, and the length checks."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxsparse.parallel.layouts import KINDS, SequenceLayout


def test_positions_of_each_kind():
    np.testing.assert_array_equal(
        SequenceLayout(kind="contiguous", num_shards=4).positions(8), [[0, 1], [2, 3], [4, 5], [6, 7]])
    np.testing.assert_array_equal(
        SequenceLayout(kind="zigzag", num_shards=4).positions(16),
        [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]])
    np.testing.assert_array_equal(
        SequenceLayout(kind="striped", num_shards=4).positions(8), [[0, 4], [1, 5], [2, 6], [3, 7]])


@pytest.mark.parametrize("kind", KINDS)
def test_chunks_and_runs(kind):
    layout = SequenceLayout(kind=kind, num_shards=4)
    assert layout.chunks_per_shard == {"contiguous": 1, "zigzag": 2, "striped": 1}[kind]
    assert layout.shard_len(32) == 8
    assert layout.run_len(32) == {"contiguous": 8, "zigzag": 4, "striped": 1}[kind]
    positions = layout.positions(32)
    # Every shard is made of runs of consecutive positions, each starting at a multiple of run_len.
    runs = positions.reshape(4, -1, layout.run_len(32))
    assert np.all(np.diff(runs, axis=-1) == 1)
    assert np.all(runs[..., 0] % layout.run_len(32) == 0)


@given(kind=st.sampled_from(KINDS), num_shards=st.integers(1, 8), per_shard=st.integers(1, 6), axis=st.sampled_from([0, 1, -1]))
def test_permute_round_trip_and_shard_order(kind, num_shards, per_shard, axis):
    layout = SequenceLayout(kind=kind, num_shards=num_shards)
    seq_len = num_shards * layout.chunks_per_shard * per_shard
    positions = layout.positions(seq_len)
    assert positions.shape == (num_shards, seq_len // num_shards)
    np.testing.assert_array_equal(np.sort(positions.reshape(-1)), np.arange(seq_len))  # a permutation
    shape = [3, 3]
    shape[axis] = seq_len
    x = np.arange(np.prod(shape)).reshape(shape)
    permuted = layout.permute(x, axis=axis)
    # Layout order is the shards concatenated, each in the order of its positions.
    np.testing.assert_array_equal(permuted, np.take(x, positions.reshape(-1), axis=axis))
    np.testing.assert_array_equal(layout.unpermute(permuted, axis=axis), x)


def test_permute_jax_arrays_on_the_token_axis():
    layout = SequenceLayout(kind="zigzag", num_shards=2)
    x = jnp.arange(2 * 8 * 3).reshape(2, 8, 3)
    permuted = layout.permute(x)
    assert isinstance(permuted, type(x))
    np.testing.assert_array_equal(permuted[0, :, 0], x[0, [0, 1, 6, 7, 2, 3, 4, 5], 0])
    np.testing.assert_array_equal(layout.unpermute(permuted), x)


@pytest.mark.parametrize(("kind", "seq_len", "divisor"), [("contiguous", 12, 8), ("zigzag", 24, 16), ("striped", 4, 8)])
def test_seq_len_must_fit(kind, seq_len, divisor):
    layout = SequenceLayout(kind=kind, num_shards=8)
    with pytest.raises(ValueError, match=rf"seq_len={seq_len} .* = {divisor}"):
        layout.positions(seq_len)
    with pytest.raises(ValueError, match=rf"seq_len={seq_len}"):
        layout.permute(np.zeros((1, seq_len)))


def test_bad_fields():
    with pytest.raises(ValueError, match="SequenceLayout.kind"):
        SequenceLayout(kind="ring", num_shards=2)
    with pytest.raises(ValueError, match="SequenceLayout.num_shards"):
        SequenceLayout(kind="zigzag", num_shards=0)
    with pytest.raises(ValueError, match="axis=2"):
        SequenceLayout(kind="zigzag", num_shards=2).permute(np.zeros((4, 4)), axis=2)
