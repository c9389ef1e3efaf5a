"""GPU (Triton-backend) block-sparse attention kernels against a dense reference,
in interpret mode (compiled when run on a GPU: `make test-gpu`).

Everything the kernels need (dense masks, block metadata, element masks and their mask operands)
is built here, independently of ``jaxsparse``, so these tests pin the kernel contract on their own.
Mask operands are ``(row_operands [Bo, T], column_operands [Bo, S], scalar_operands [Bo])``; the
element mask sees per-tile values ([block_q, 1] rows, [1, block_kv] columns, scalars).
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.common import compat
from tests.backend import GPU_INTERPRET, float32_tolerance
from pallas_kernels.gpu.block_sparse_attention import (
    block_sparse_attention_backward,
    block_sparse_attention_forward,
)

TOLERANCES = {  # (forward, gradients)
    jnp.float32: (float32_tolerance(1e-5), float32_tolerance(1e-4)),
    # bf16 inputs: p is rounded to bf16 before the p @ v and ds @ k matmuls.
    jnp.bfloat16: (2e-2, 2e-2),
}

pytestmark = pytest.mark.usefixtures("fast_cpu_compilation")


def reference_attention(q, k, v, mask, *, scale, softcap=None):
    """Dense float32 attention.

    Args:
      q: [B, H, T, D]; k, v: [B, K, S, D] with query head h reading kv head h // (H // K).
      mask: bool [B or 1, H or 1, T, S], True where visible.

    Returns:
      (o [B, H, T, D] float32, lse [B, H, T] float32); o = 0 and lse = -inf on empty rows.
    """
    group = q.shape[1] // k.shape[1]
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
    s = jnp.einsum("bhtd,bhsd->bhts", q, k) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(mask, s, -jnp.inf)
    row_max = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isneginf(row_max), 0.0, row_max)
    p = jnp.exp(s - row_max)
    row_sum = jnp.sum(p, axis=-1, keepdims=True)
    is_empty = row_sum == 0.0
    safe_sum = jnp.where(is_empty, 1.0, row_sum)
    o = jnp.einsum("bhts,bhsd->bhtd", p, v) / safe_sum
    lse = jnp.where(is_empty, -jnp.inf, row_max + jnp.log(safe_sum))
    return o, lse[..., 0]


def _block_lists(tile_visible, tile_full):
    """Per-row lists of visible blocks along the last axis: (indices, counts, full), int32."""
    counts = tile_visible.sum(axis=-1)
    max_len = max(1, int(counts.max()))
    indices = np.zeros(counts.shape + (max_len,), np.int32)
    full = np.zeros(counts.shape + (max_len,), np.int32)
    for row in np.ndindex(counts.shape):
        ids = np.flatnonzero(tile_visible[row])
        if ids.size:
            indices[row][: ids.size] = ids
            indices[row][ids.size:] = ids[-1]
            full[row][: ids.size] = tile_full[row][ids]
    return jnp.asarray(indices), jnp.asarray(counts, jnp.int32), jnp.asarray(full)


def block_metadata(mask, block_q, block_kv):
    """Dense bool mask [Bm, Hm, T, S] -> (kv_indices, kv_counts, kv_full, q_indices, q_counts,
    q_full) with the kernel's conventions."""
    mask = np.asarray(mask)
    bm, hm, t, s = mask.shape
    tiles = mask.reshape(bm, hm, t // block_q, block_q, s // block_kv, block_kv)
    tile_visible, tile_full = tiles.any(axis=(3, 5)), tiles.all(axis=(3, 5))
    return (
        *_block_lists(tile_visible, tile_full),
        *_block_lists(tile_visible.swapaxes(2, 3), tile_full.swapaxes(2, 3)),
    )


NO_OPERANDS = ((), (), ())


def causal_mask(q_len, kv_len, valid_kv_len):
    """Causal with keys at or past ``valid_kv_len`` hidden; valid_kv_len is an int or an array [B]
    (one per sequence). Returns bool [1 or B, 1, T, S]."""
    q_pos, kv_pos = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
    valid = np.reshape(valid_kv_len, (-1, 1, 1))
    return ((q_pos >= kv_pos) & (kv_pos < valid))[:, None]


def causal_element_mask(valid_kv_len):
    def element_mask(row_tiles, column_tiles, scalars, b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (kv_idx < valid_kv_len)

    return element_mask


def hashed_bits(rng, batch, length):
    """Random int32 [batch, length] in [0, 256): one value per position, for hashed_elements."""
    return rng.integers(0, 256, size=(batch, length)).astype(np.int32)


def hashed_elements(row_bits, column_bits, heads):
    """Dense bool [B, H, T, S]: element (b, h, t, s) is bit h of row_bits[b, t] ^ column_bits[b, s].

    A random-looking, per-batch and per-head element pattern that ``hashed_element_mask`` rebuilds
    tile by tile from one row and one column operand (no dense leaf, no gather).
    """
    xor = row_bits[:, None, :, None] ^ column_bits[:, None, None, :]
    return (xor >> np.arange(heads)[None, :, None, None]) & 1 == 1


def hashed_element_mask(row_tiles, column_tiles, scalars, b, h, q_idx, kv_idx):
    """Element mask of ``hashed_elements``; an optional second row operand is a per-query flag
    (0 hides the whole row)."""
    bits = ((row_tiles[0] ^ column_tiles[0]) >> h) & 1 == 1
    return bits & (row_tiles[1] != 0) if len(row_tiles) > 1 else bits


def random_block_sparse_mask(rng, elements, block_q, block_kv):
    """Dense mask [Bm, Hm, T, S] whose tiles are, at random, empty, full or partial; partial tiles
    take their elements from ``elements`` (bool [Bm, Hm, T, S])."""
    bm, hm, t, s = elements.shape
    tile_kind = rng.integers(0, 3, size=(bm, hm, t // block_q, 1, s // block_kv, 1))
    tiles = elements.reshape(bm, hm, t // block_q, block_q, s // block_kv, block_kv)
    mask = (tile_kind == 1) | ((tile_kind == 2) & tiles)
    return mask.reshape(elements.shape)


def run_and_compare(
    mask, element_mask, mask_operands=NO_OPERANDS, *, batch=1, heads=2, kv_heads=2, head_dim=32,
    block_q=32, block_kv=32, dtype=jnp.float32, softcap=None, metadata_mask=None, seed=0,
):
    """Runs forward and backward on random inputs and checks them against the reference.

    ``mask`` is the dense truth used by the reference; ``metadata_mask`` (default ``mask``) is the
    one compiled into block metadata, e.g. with different broadcast axes.

    Returns:
      (o, lse, dq, dk, dv) from the kernels, as numpy float32.
    """
    mask = np.asarray(mask)
    q_len, kv_len = mask.shape[2:]
    rng = np.random.default_rng(seed)
    q, do = rng.standard_normal((2, batch, heads, q_len, head_dim), np.float32)
    k, v = rng.standard_normal((2, batch, kv_heads, kv_len, head_dim), np.float32)
    scale = head_dim**-0.5
    metadata = block_metadata(mask if metadata_mask is None else metadata_mask, block_q, block_kv)
    kwargs = dict(
        element_mask=element_mask, scale=scale, softcap=softcap, block_q=block_q,
        block_kv=block_kv, interpret=GPU_INTERPRET,
    )

    @jax.jit  # One compilation for kernels and reference: interpret-mode cost is compile time.
    def kernels_and_reference(q, k, v, do, metadata, mask_operands):
        q, k, v, do = (x.astype(dtype) for x in (q, k, v, do))
        o, lse = block_sparse_attention_forward(q, k, v, *metadata[:3], mask_operands, **kwargs)
        grads = block_sparse_attention_backward(
            q, k, v, o, lse, do, *metadata, mask_operands, **kwargs
        )
        (ref_o, ref_lse), reference_vjp = jax.vjp(
            lambda q, k, v: reference_attention(q, k, v, mask, scale=scale, softcap=softcap),
            q, k, v,
        )
        ref_grads = reference_vjp((do.astype(jnp.float32), jnp.zeros_like(ref_lse)))
        return (o, lse, *grads), (ref_o, ref_lse, *ref_grads)

    (o, lse, *grads), (ref_o, ref_lse, *ref_grads) = kernels_and_reference(
        q, k, v, do, metadata,
        tuple(tuple(jnp.asarray(x, jnp.int32) for x in group) for group in mask_operands),
    )
    forward_tol, grad_tol = TOLERANCES[dtype]
    assert o.dtype == dtype and lse.dtype == jnp.float32
    assert np.isfinite(np.float32(o)).all() and not np.isnan(lse).any()
    np.testing.assert_allclose(np.float32(o), ref_o, atol=forward_tol, rtol=forward_tol)
    np.testing.assert_allclose(lse, ref_lse, atol=forward_tol, rtol=forward_tol)
    for name, grad, ref_grad, like in zip("qkv", grads, ref_grads, (q, k, v)):
        assert grad.shape == like.shape and grad.dtype == dtype, name
        assert np.isfinite(np.float32(grad)).all(), name
        np.testing.assert_allclose(
            np.float32(grad), np.float32(ref_grad), atol=grad_tol, rtol=grad_tol, err_msg=f"d{name}"
        )
    return tuple(np.asarray(x, np.float32) for x in (o, lse, *grads))


@pytest.mark.parametrize("broadcast_metadata", [True, False])
def test_causal_with_per_sequence_padded_keys(broadcast_metadata):
    """Valid key lengths [120, 100] as a scalar operand [B]; block metadata broadcast or not."""
    batch, heads, valid_kv_lens = 2, 2, np.array([120, 100], np.int32)
    mask = causal_mask(128, 128, valid_kv_lens)  # [B, 1, T, S]
    per_cell = np.broadcast_to(mask, (batch, heads, 128, 128))
    # One pattern for every sequence: the union of their tiles (the same partial/full tiles).
    shared = causal_mask(128, 128, valid_kv_lens.max())

    def element_mask(row_tiles, column_tiles, scalars, b, h, q_idx, kv_idx):
        (valid_kv_len,) = scalars
        return (q_idx >= kv_idx) & (kv_idx < valid_kv_len)

    run_and_compare(
        per_cell, element_mask, ((), (), (valid_kv_lens,)), batch=batch, heads=heads,
        kv_heads=heads, metadata_mask=shared if broadcast_metadata else per_cell,
    )


def test_sliding_window_with_broadcast_scalar_operand():
    window = 24
    q_pos, kv_pos = np.arange(128)[:, None], np.arange(128)[None, :]
    mask = ((q_pos >= kv_pos) & (q_pos - kv_pos < window))[None, None]

    def element_mask(row_tiles, column_tiles, scalars, b, h, q_idx, kv_idx):
        (window_size,) = scalars
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window_size)

    run_and_compare(
        np.broadcast_to(mask, (2, 2, 128, 128)), element_mask, ((), (), (np.int32([window]),)),
        batch=2, head_dim=16, block_q=16, block_kv=32, metadata_mask=mask,
    )


def segment_element_mask(row_tiles, column_tiles, scalars, b, h, q_idx, kv_idx):
    return row_tiles[0] == column_tiles[0]


def test_segment_ids_per_batch_metadata():
    batch, length = 2, 128
    seg = np.stack([np.repeat([0, 1, 2], [40, 50, 38]), np.repeat([0, 1], [77, 51])])
    seg = seg.astype(np.int32)
    mask = (seg[:, :, None] == seg[:, None, :])[:, None]  # [B, 1, T, S]
    run_and_compare(
        np.broadcast_to(mask, (batch, 2, length, length)), segment_element_mask,
        ((seg,), (seg,), ()), batch=batch, metadata_mask=mask,
    )


def test_segment_ids_broadcast_over_batch_with_distinct_query_and_key_lengths():
    """Row and column operands of different lengths (T=64, S=128), both Bo=1 for B=2: rows must
    be the query tile and columns the key tile, in every kernel."""
    seg_q = np.repeat([0, 1, 2], [20, 30, 14]).astype(np.int32)[None]
    seg_kv = np.repeat([0, 1, 2, 3], [45, 40, 27, 16]).astype(np.int32)[None]
    mask = (seg_q[:, :, None] == seg_kv[:, None, :])[:, None]  # [1, 1, T, S]
    run_and_compare(
        np.broadcast_to(mask, (2, 2, 64, 128)), segment_element_mask, ((seg_q,), (seg_kv,), ()),
        batch=2, head_dim=16, block_q=16, block_kv=32, metadata_mask=mask,
    )


def test_prefix_lm_with_flags_and_mixed_broadcasting():
    """Per-sequence prefix length (scalar [B]), per-query flag (row [B, T]), per-key "global
    token" flag (column [1, S]): a query with flag 1 sees keys it may see causally, the prefix,
    and global keys."""
    batch, length = 2, 128
    prefix = np.array([40, 7], np.int32)
    query_flag = np.ones((batch, length), np.int32)
    query_flag[0, 50:60] = 0
    query_flag[1, 100:] = 0
    global_key = np.zeros((1, length), np.int32)
    global_key[0, [90, 91, 120]] = 1
    q_pos, kv_pos = np.arange(length)[:, None], np.arange(length)[None, :]
    mask = (
        (query_flag[:, :, None] != 0)
        & ((q_pos >= kv_pos) | (kv_pos < prefix[:, None, None]) | (global_key[:, None, :] != 0))
    )[:, None]  # [B, 1, T, S]

    def element_mask(row_tiles, column_tiles, scalars, b, h, q_idx, kv_idx):
        (flag,), (is_global,), (prefix_len,) = row_tiles, column_tiles, scalars
        return (flag != 0) & ((q_idx >= kv_idx) | (kv_idx < prefix_len) | (is_global != 0))

    run_and_compare(
        np.broadcast_to(mask, (batch, 2, length, length)), element_mask,
        ((query_flag,), (global_key,), (prefix,)), batch=batch, metadata_mask=mask,
    )


@pytest.mark.parametrize(
    "q_len, kv_len, head_dim, block_q, block_kv",
    [(128, 128, 64, 32, 32), (64, 128, 32, 16, 64)],
)
def test_random_block_sparse_per_cell(q_len, kv_len, head_dim, block_q, block_kv):
    rng = np.random.default_rng(1)
    row_bits, column_bits = hashed_bits(rng, 2, q_len), hashed_bits(rng, 2, kv_len)
    elements = hashed_elements(row_bits, column_bits, heads=2)
    mask = random_block_sparse_mask(rng, elements, block_q, block_kv)
    tiles = mask.reshape(2, 2, q_len // block_q, block_q, kv_len // block_kv, block_kv)
    assert tiles.all(axis=(3, 5)).any() and (tiles.any(axis=(3, 5)) & ~tiles.all(axis=(3, 5))).any()
    run_and_compare(
        mask, hashed_element_mask, ((row_bits,), (column_bits,), ()), batch=2, heads=2,
        kv_heads=2, head_dim=head_dim, block_q=block_q, block_kv=block_kv,
    )


def test_empty_rows_give_zero_output_and_gradients():
    rng = np.random.default_rng(2)
    row_bits, column_bits = hashed_bits(rng, 1, 128), hashed_bits(rng, 1, 128)
    empty_rows = [3, 70, 71, 127]  # Empty rows inside blocks that do visit tiles.
    query_flag = np.ones((1, 128), np.int32)  # A per-position flag hides the empty rows.
    query_flag[:, empty_rows] = 0
    elements = hashed_elements(row_bits, column_bits, 2) & (query_flag[:, None, :, None] != 0)
    mask = random_block_sparse_mask(rng, elements, 32, 32)
    mask[:, :, 32:64] = False  # A whole q block with nothing to visit.
    mask[:, :, empty_rows] = False
    # A full tile that lost an empty row is now partial: its elements are the element mask's.
    tiles = mask.reshape(1, 2, 4, 32, 4, 32)
    partial = tiles.any(axis=(3, 5), keepdims=True) & ~tiles.all(axis=(3, 5), keepdims=True)
    mask = np.where(partial, elements.reshape(tiles.shape), tiles).reshape(mask.shape)
    kv_counts = block_metadata(mask, 32, 32)[1]
    assert np.all(np.asarray(kv_counts)[:, :, [0, 2, 3]] > 0) and np.all(kv_counts[:, :, 1] == 0)
    o, lse, dq, _, _ = run_and_compare(
        mask, hashed_element_mask, ((row_bits, query_flag), (column_bits,), ())
    )
    empty = ~mask.any(axis=-1)  # [1, H, T]
    assert empty[:, :, 32:64].all() and empty[:, :, empty_rows].all()
    assert np.all(o[empty] == 0.0) and np.all(np.isneginf(lse[empty]))
    assert np.all(np.isfinite(lse[~empty])) and np.all(dq[empty] == 0.0)


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_grouped_query_heads_with_per_head_patterns(kv_heads):
    rng = np.random.default_rng(3)
    row_bits, column_bits = hashed_bits(rng, 1, 64), hashed_bits(rng, 1, 64)
    mask = random_block_sparse_mask(rng, hashed_elements(row_bits, column_bits, 4), 16, 16)
    run_and_compare(
        mask, hashed_element_mask, ((row_bits,), (column_bits,), ()), heads=4,
        kv_heads=kv_heads, head_dim=16, block_q=16, block_kv=16,
    )


def test_softcap():
    run_and_compare(
        causal_mask(64, 64, 64), causal_element_mask(64), softcap=2.0, block_q=16, block_kv=16
    )


def test_full_flag_skips_the_element_mask():
    """Tiles flagged full must not call element_mask (here it would hide everything)."""

    def hide_everything(row_tiles, column_tiles, scalars, b, h, q_idx, kv_idx):
        return jnp.zeros((q_idx.shape[0], kv_idx.shape[1]), bool)

    run_and_compare(np.ones((1, 1, 64, 64), bool), hide_everything, block_q=16, block_kv=32)


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_bfloat16(kv_heads):
    run_and_compare(
        np.broadcast_to(causal_mask(64, 64, 56), (1, 4, 64, 64)), causal_element_mask(56),
        heads=4, kv_heads=kv_heads, dtype=jnp.bfloat16, block_q=16, block_kv=32,
        metadata_mask=causal_mask(64, 64, 56),
    )


def test_rejects_heads_not_divisible_by_kv_heads():
    q = jnp.zeros((1, 3, 32, 16))
    k = jnp.zeros((1, 2, 32, 16))
    metadata = block_metadata(np.ones((1, 1, 32, 32), bool), 16, 16)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        block_sparse_attention_forward(
            q, k, k, *metadata[:3], NO_OPERANDS, element_mask=causal_element_mask(32),
            scale=1.0, softcap=None, block_q=16, block_kv=16, interpret=GPU_INTERPRET,
        )


@pytest.mark.parametrize(
    "operands, error, message",
    [
        (((np.zeros((2, 32), np.int32),), (), ()), ValueError, "row mask operand 0"),
        (((), (np.zeros((1, 16), np.int32),), ()), ValueError, "column mask operand 0"),
        (((), (), (np.zeros((1, 1), np.int32),)), ValueError, "scalar mask operand 0"),
        (((), (np.zeros((1, 32), np.float32),), ()), TypeError, "must be int32"),
        (((), ()), ValueError, "row_operands, column_operands, scalar_operands"),
    ],
)
def test_rejects_malformed_mask_operands(operands, error, message):
    q = jnp.zeros((3, 2, 32, 16))  # B = 3: a row operand with Bo = 2 is neither 1 nor B.
    metadata = block_metadata(np.ones((1, 1, 32, 32), bool), 16, 16)
    with pytest.raises(error, match=message):
        block_sparse_attention_forward(
            q, q, q, *metadata[:3], operands, element_mask=segment_element_mask, scale=1.0,
            softcap=None, block_q=16, block_kv=16, interpret=GPU_INTERPRET,
        )


@pytest.mark.parametrize(
    "dtype, softcap, operand_batch", [(jnp.float32, None, 3), (jnp.bfloat16, 2.0, 1)]
)
def test_lowers_to_triton_without_a_gpu(dtype, softcap, operand_batch):
    """Lowering for CUDA runs the Pallas Triton lowering on CPU: it rejects primitives Triton lacks
    (gather) and loads whose size is not a power of two. Nothing is compiled by Triton itself.

    Forward, dQ and dK/dV lower with a segment-id mask (row and column operands), a per-query flag
    and a per-sequence scalar (a window), per sequence (Bo = B = 3, not a power of two) or
    broadcast (Bo = 1); the sequence length 192 and the 3-long block lists are not powers of two.
    """
    batch, window, length, head_dim, block = 3, 40, 192, 64, 64
    metadata = block_metadata(np.ones((1, 1, length, length), bool), block, block)
    metadata = tuple(jnp.zeros_like(x) if i in (2, 5) else x for i, x in enumerate(metadata))
    q = jnp.zeros((batch, 4, length, head_dim), dtype)
    k = jnp.zeros((batch, 2, length, head_dim), dtype)
    lse = jnp.zeros((batch, 4, length), jnp.float32)
    segment_ids = jnp.zeros((operand_batch, length), jnp.int32)
    query_flag = jnp.ones((operand_batch, length), jnp.int32)
    windows = jnp.full((operand_batch,), window, jnp.int32)

    def element_mask(row_tiles, column_tiles, scalars, b, h, q_idx, kv_idx):
        (q_segment, flag), (kv_segment,), (window_size,) = row_tiles, column_tiles, scalars
        return (
            (q_segment == kv_segment) & (flag != 0) & (q_idx >= kv_idx)
            & (q_idx - kv_idx < window_size)
        )

    kwargs = dict(
        element_mask=element_mask, scale=0.125, softcap=softcap, block_q=block, block_kv=block
    )

    def forward_and_backward(q, k, v, lse, segment_ids, query_flag, windows, *metadata):
        operands = ((segment_ids, query_flag), (segment_ids,), (windows,))
        o, _ = block_sparse_attention_forward(q, k, v, *metadata[:3], operands, **kwargs)
        return block_sparse_attention_backward(q, k, v, o, lse, o, *metadata, operands, **kwargs)

    args = (q, k, k, lse, segment_ids, query_flag, windows, *metadata)
    lowered = jax.jit(forward_and_backward).trace(*args)
    with compat.triton_lowering_without_gpu():
        text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 3
