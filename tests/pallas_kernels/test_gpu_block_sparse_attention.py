"""GPU (Triton-backend) block-sparse attention kernels against a dense reference, in interpret mode.

Everything the kernels need (dense masks, block metadata, element masks) is built here,
independently of ``jaxsparse``, so these tests pin the kernel contract on their own.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.gpu.block_sparse_attention import (
    block_sparse_attention_backward,
    block_sparse_attention_forward,
)

TOLERANCES = {  # (forward, gradients)
    jnp.float32: (1e-5, 1e-4),
    # bf16 inputs: p is rounded to bf16 before the p @ v and ds @ k matmuls.
    jnp.bfloat16: (2e-2, 2e-2),
}


@pytest.fixture(autouse=True, scope="module")
def fast_cpu_compilation():
    """At these sizes interpret-mode kernels cost XLA compile time, not run time; skipping most
    XLA optimisations makes this file about 1.5x faster."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


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


def causal_mask(q_len, kv_len, valid_kv_len):
    q_pos, kv_pos = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
    return ((q_pos >= kv_pos) & (kv_pos < valid_kv_len))[None, None]


def causal_element_mask(valid_kv_len):
    def element_mask(leaves, b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (kv_idx < valid_kv_len)

    return element_mask


def dense_leaf_element_mask(leaves, b, h, q_idx, kv_idx):
    """Reads the element mask from a dense int32 leaf [Bm, Hm, T, S] (size-1 axes broadcast).

    A gather: fine in interpret mode, but the Triton lowering has no gather rule.
    """
    (dense,) = leaves
    b = b if dense.shape[0] > 1 else 0
    h = h if dense.shape[1] > 1 else 0
    return dense[b, h][q_idx, kv_idx] != 0


def random_block_sparse_mask(rng, shape, block_q, block_kv):
    """Dense mask [Bm, Hm, T, S] whose tiles are, at random, empty, full or partial."""
    bm, hm, t, s = shape
    tile_kind = rng.integers(0, 3, size=(bm, hm, t // block_q, 1, s // block_kv, 1))
    elements = rng.random((bm, hm, t // block_q, block_q, s // block_kv, block_kv)) < 0.5
    mask = (tile_kind == 1) | ((tile_kind == 2) & elements)
    return mask.reshape(shape)


def run_and_compare(
    mask, element_mask, mask_leaves=(), *, batch=1, heads=2, kv_heads=2, head_dim=32,
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
        block_kv=block_kv, interpret=True,
    )

    @jax.jit  # One compilation for kernels and reference: interpret-mode cost is compile time.
    def kernels_and_reference(q, k, v, do, metadata, mask_leaves):
        q, k, v, do = (x.astype(dtype) for x in (q, k, v, do))
        o, lse = block_sparse_attention_forward(q, k, v, *metadata[:3], mask_leaves, **kwargs)
        grads = block_sparse_attention_backward(
            q, k, v, o, lse, do, *metadata, mask_leaves, **kwargs
        )
        (ref_o, ref_lse), reference_vjp = jax.vjp(
            lambda q, k, v: reference_attention(q, k, v, mask, scale=scale, softcap=softcap),
            q, k, v,
        )
        ref_grads = reference_vjp((do.astype(jnp.float32), jnp.zeros_like(ref_lse)))
        return (o, lse, *grads), (ref_o, ref_lse, *ref_grads)

    (o, lse, *grads), (ref_o, ref_lse, *ref_grads) = kernels_and_reference(
        q, k, v, do, metadata, tuple(mask_leaves)
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
def test_causal_with_padded_keys(broadcast_metadata):
    batch, heads, valid_kv_len = 2, 2, 120
    mask = causal_mask(128, 128, valid_kv_len)
    per_cell = np.broadcast_to(mask, (batch, heads, 128, 128))
    run_and_compare(
        per_cell, causal_element_mask(valid_kv_len), batch=batch, heads=heads, kv_heads=heads,
        metadata_mask=mask if broadcast_metadata else per_cell,
    )


def test_sliding_window_with_scalar_leaf():
    window = 24
    q_pos, kv_pos = np.arange(128)[:, None], np.arange(128)[None, :]
    mask = ((q_pos >= kv_pos) & (q_pos - kv_pos < window))[None, None]

    def element_mask(leaves, b, h, q_idx, kv_idx):
        (window_size,) = leaves
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window_size)

    run_and_compare(
        mask, element_mask, (jnp.int32(window),), head_dim=16, block_q=16, block_kv=32
    )


def test_segment_ids_per_batch_metadata():
    batch, length = 2, 128
    seg = np.stack([np.repeat([0, 1, 2], [40, 50, 38]), np.repeat([0, 1], [77, 51])])
    seg = seg.astype(np.int32)
    mask = (seg[:, :, None] == seg[:, None, :])[:, None]  # [B, 1, T, S]

    def element_mask(leaves, b, h, q_idx, kv_idx):
        (segment_ids,) = leaves
        return segment_ids[b, q_idx] == segment_ids[b, kv_idx]

    run_and_compare(
        np.broadcast_to(mask, (batch, 2, length, length)), element_mask, (jnp.asarray(seg),),
        batch=batch, metadata_mask=mask,
    )


@pytest.mark.parametrize(
    "q_len, kv_len, head_dim, block_q, block_kv",
    [(128, 128, 64, 32, 32), (64, 128, 32, 16, 64)],
)
def test_random_block_sparse_per_cell(q_len, kv_len, head_dim, block_q, block_kv):
    rng = np.random.default_rng(1)
    mask = random_block_sparse_mask(rng, (2, 2, q_len, kv_len), block_q, block_kv)
    tiles = mask.reshape(2, 2, q_len // block_q, block_q, kv_len // block_kv, block_kv)
    assert tiles.all(axis=(3, 5)).any() and (tiles.any(axis=(3, 5)) & ~tiles.all(axis=(3, 5))).any()
    run_and_compare(
        mask, dense_leaf_element_mask, (jnp.asarray(mask, jnp.int32),), batch=2, heads=2,
        kv_heads=2, head_dim=head_dim, block_q=block_q, block_kv=block_kv,
    )


def test_empty_rows_give_zero_output_and_gradients():
    rng = np.random.default_rng(2)
    mask = random_block_sparse_mask(rng, (1, 2, 128, 128), 32, 32)
    mask[:, :, 32:64] = False  # A whole q block with nothing to visit.
    empty_rows = [3, 70, 71, 127]  # Empty rows inside blocks that do visit tiles.
    mask[:, :, empty_rows] = False
    kv_counts = block_metadata(mask, 32, 32)[1]
    assert np.all(np.asarray(kv_counts)[:, :, [0, 2, 3]] > 0) and np.all(kv_counts[:, :, 1] == 0)
    o, lse, dq, _, _ = run_and_compare(
        mask, dense_leaf_element_mask, (jnp.asarray(mask, jnp.int32),)
    )
    empty = ~mask.any(axis=-1)  # [1, H, T]
    assert empty[:, :, 32:64].all() and empty[:, :, empty_rows].all()
    assert np.all(o[empty] == 0.0) and np.all(np.isneginf(lse[empty]))
    assert np.all(np.isfinite(lse[~empty])) and np.all(dq[empty] == 0.0)


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_grouped_query_heads_with_per_head_patterns(kv_heads):
    rng = np.random.default_rng(3)
    mask = random_block_sparse_mask(rng, (1, 4, 64, 64), 16, 16)
    run_and_compare(
        mask, dense_leaf_element_mask, (jnp.asarray(mask, jnp.int32),), heads=4,
        kv_heads=kv_heads, head_dim=16, block_q=16, block_kv=16,
    )


def test_softcap():
    run_and_compare(
        causal_mask(64, 64, 64), causal_element_mask(64), softcap=2.0, block_q=16, block_kv=16
    )


def test_full_flag_skips_the_element_mask():
    """Tiles flagged full must not call element_mask (here it would hide everything)."""

    def hide_everything(leaves, b, h, q_idx, kv_idx):
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
            q, k, k, *metadata[:3], (), element_mask=causal_element_mask(32), scale=1.0,
            softcap=None, block_q=16, block_kv=16, interpret=True,
        )


@pytest.mark.parametrize("dtype, softcap", [(jnp.float32, None), (jnp.bfloat16, 2.0)])
def test_lowers_to_triton_without_a_gpu(dtype, softcap):
    """Lowering for CUDA runs the Pallas Triton lowering on CPU: it rejects primitives Triton lacks
    and loads whose size is not a power of two. Nothing is compiled by Triton itself."""
    window, length, head_dim, block = 40, 192, 64, 64  # nq = 3: lists of non-power-of-two length.
    metadata = block_metadata(np.ones((1, 1, length, length), bool), block, block)
    q = jnp.zeros((2, 4, length, head_dim), dtype)
    k = jnp.zeros((2, 2, length, head_dim), dtype)
    lse = jnp.zeros((2, 4, length), jnp.float32)

    def element_mask(leaves, b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < leaves[0])

    kwargs = dict(
        element_mask=element_mask, scale=0.125, softcap=softcap, block_q=block, block_kv=block
    )

    def forward_and_backward(q, k, v, lse, window_size, *metadata):
        leaves = (window_size,)
        o, _ = block_sparse_attention_forward(q, k, v, *metadata[:3], leaves, **kwargs)
        return block_sparse_attention_backward(q, k, v, o, lse, o, *metadata, leaves, **kwargs)

    lowered = jax.jit(forward_and_backward).trace(q, k, k, lse, jnp.int32(window), *metadata)
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 3
