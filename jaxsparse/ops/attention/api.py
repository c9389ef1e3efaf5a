"""``jaxsparse.attention``: block-sparse flash attention from a mask, one call for every backend."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp

from jaxsparse.masks.base import Mask
from jaxsparse.masks.block_mask import BlockMask, make_block_mask
from jaxsparse.ops.attention.checks import check_positive, check_qkv, default_block
from jaxsparse.ops.attention.config import BlockSizes
from jaxsparse.ops.attention.reference import reference_attention

# implementation name -> module with ``attend`` (the differentiable internal-layout function) and
# ``check_support(block_mask, head_dim, dtype, bias)``; imported lazily so that CPU users never load Triton.
_BACKENDS = {
    "xla": "jaxsparse.ops.attention.xla",
    "pallas_tpu": "jaxsparse.ops.attention.pallas_tpu",
    "pallas_gpu": "jaxsparse.ops.attention.pallas_gpu",
}
IMPLEMENTATIONS = ("reference",) + tuple(_BACKENDS)


def attention(
    q,
    k,
    v,
    mask: Mask | BlockMask | None = None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    bias=None,
    return_lse: bool = False,
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
):
    """Block-sparse scaled dot-product attention with a composable mask.

    ``out[b, t, h] = sum_s softmax_s(cap(scale * q[b,t,h] . k[b,s,h//G]) + bias)[s] * v[b,s,h//G]``
    over the keys ``s`` that ``mask`` lets query ``t`` (head ``h``) see, where ``cap(x) = softcap *
    tanh(x / softcap)`` when ``softcap`` is set. Only the (q block, kv block) tiles that the mask
    touches are computed (FlashAttention's tiling with FlexAttention's block mask).

    Args:
      q: queries ``[B, T, H, D]``.
      k: keys ``[B, S, K, D]``; ``H % K == 0`` (grouped-query attention: head ``h`` reads kv head
        ``h // (H // K)``; ``K == 1`` is multi-query attention).
      v: values ``[B, S, K, D]``, same dtype as ``q`` and ``k``.
      mask: a :class:`~jaxsparse.masks.Mask` (compiled here for these shapes, with ``batch=B`` and
        ``heads=H``), a precompiled :class:`~jaxsparse.masks.BlockMask` (reuse it across layers, or
        build it from run-time block choices with ``BlockMask.from_indices``), or None (full).
      scale: multiplies ``q . k``; default ``D ** -0.5``.
      softcap: optional positive tanh soft-cap on the logits (Gemma 2).
      bias: optional additive logits broadcastable to ``[B, H, T, S]`` (each dim 1 or full);
        differentiable. Dense by nature: supported by ``reference`` and ``xla``.
      return_lse: also return the row logsumexp ``[B, H, T]`` (float32; differentiable).
      implementation: ``"reference"`` (dense float32, the spec), ``"xla"`` (pure JAX, gathers only
        the visited blocks), ``"pallas_tpu"`` (Mosaic kernel, scalar-prefetched block lists),
        ``"pallas_gpu"`` (Triton kernel looping over the block lists), or None: ``"xla"`` on every
        platform until the Pallas kernels have been validated on hardware (they are tested in
        interpret mode). On CPU the Pallas implementations run in interpret mode (slow; for tests).
      block_sizes: tile sizes (default 128, shrunk for short sequences); must match a BlockMask's.

    Returns:
      ``out [B, T, H, D]`` in q's dtype, or ``(out, lse)`` with ``lse [B, H, T]`` float32 when
      ``return_lse``. A query that sees no key gets output 0 and ``lse = -inf``, with zero gradients.

    Raises:
      ValueError: wrong ranks or shapes, ``H % K != 0``, non-positive scale or softcap, a BlockMask
        built for other lengths or block sizes, a bias shape that does not broadcast, block sizes
        the backend cannot tile, an unknown implementation.
      TypeError: mismatched or non-floating dtypes, a mask of the wrong type.
      NotImplementedError: a named implementation that cannot run here (e.g. ``pallas_tpu`` on a
        GPU, or ``bias`` with a Pallas kernel).

    Example::

        from jaxsparse import attention, masks
        out = attention(q, k, v, masks.causal() & masks.sliding_window(1024))
    """
    batch, q_len, heads, head_dim = check_qkv(q, k, v)
    kv_len = k.shape[1]
    implementation = _resolve_implementation(implementation)
    scale = check_positive("scale", scale, default=head_dim**-0.5)
    softcap = check_positive("softcap", softcap, default=None)
    if bias is not None:
        bias = _check_bias(bias, (batch, heads, q_len, kv_len))

    if implementation == "reference":
        if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
            raise TypeError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
        visible = _dense_visibility(mask, batch, heads, q_len, kv_len)
        out, lse = reference_attention(q, k, v, visible, scale=scale, softcap=softcap, bias=bias)
        return (out, lse) if return_lse else out

    block_mask = _block_mask(mask, block_sizes, batch, heads, q_len, kv_len)
    backend = importlib.import_module(_BACKENDS[implementation])
    backend.check_support(block_mask, head_dim, q.dtype, bias)
    q_padded = _pad_axis(q, 1, block_mask.num_q_blocks * block_mask.block_q).transpose(0, 2, 1, 3)
    kv_padded_len = block_mask.num_kv_blocks * block_mask.block_kv
    k_padded = _pad_axis(k, 1, kv_padded_len).transpose(0, 2, 1, 3)
    v_padded = _pad_axis(v, 1, kv_padded_len).transpose(0, 2, 1, 3)
    if bias is not None:
        bias = jnp.broadcast_to(bias, bias.shape[:2] + (q_len, kv_len))
        bias = _pad_axis(_pad_axis(bias, 2, q_padded.shape[2]), 3, kv_padded_len)
    out, lse = backend.attend(q_padded, k_padded, v_padded, bias, block_mask, scale, softcap)
    out = out[:, :, :q_len].transpose(0, 2, 1, 3)
    return (out, lse[:, :, :q_len]) if return_lse else out


def _resolve_implementation(implementation):
    if implementation is None:
        return "xla"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
    return implementation


def _check_bias(bias, full_shape):
    bias = jnp.asarray(bias)
    if bias.ndim != 4 or any(size not in (1, full) for size, full in zip(bias.shape, full_shape)):
        raise ValueError(f"bias must be broadcastable to [B, H, T, S] = {list(full_shape)} with each dim 1 or full, got {bias.shape}")
    return bias


def _block_mask(mask, block_sizes, batch, heads, q_len, kv_len) -> BlockMask:
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
    if isinstance(mask, BlockMask):
        if (mask.q_len, mask.kv_len) != (q_len, kv_len):
            raise ValueError(f"mask: BlockMask built for q_len={mask.q_len}, kv_len={mask.kv_len}, but T={q_len}, S={kv_len}")
        if block_sizes is not None and (block_sizes.block_q, block_sizes.block_kv) != (mask.block_q, mask.block_kv):
            raise ValueError(f"block_sizes {block_sizes} differ from the BlockMask's ({mask.block_q}, {mask.block_kv})")
        if mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, heads):
            raise ValueError(f"mask: BlockMask has batch/head dims {mask.shape[:2]}, expected 1 or ({batch}, {heads})")
        return mask
    if mask is not None and not isinstance(mask, Mask):
        raise TypeError(f"mask must be a Mask, a BlockMask or None, got {type(mask).__name__}")
    if block_sizes is None:
        block_sizes = BlockSizes(block_q=default_block(q_len), block_kv=default_block(kv_len))
    block_mask = make_block_mask(
        mask, q_len=q_len, kv_len=kv_len, block_q=block_sizes.block_q, block_kv=block_sizes.block_kv, batch=batch, heads=heads
    )
    if block_mask.shape[1] not in (1, heads):
        raise ValueError(f"mask is per head with {block_mask.shape[1]} heads, but q has H={heads}")
    if block_mask.shape[0] not in (1, batch):
        raise ValueError(f"mask has batch size {block_mask.shape[0]}, but q has B={batch}")
    return block_mask


def _dense_visibility(mask, batch, heads, q_len, kv_len):
    """bool ``[Bm, Hm, T, S]`` for the reference implementation (materialises T x S)."""
    if isinstance(mask, BlockMask):
        return mask.dense()
    if mask is None:
        return jnp.ones((1, 1, q_len, kv_len), bool)
    if not isinstance(mask, Mask):
        raise TypeError(f"mask must be a Mask, a BlockMask or None, got {type(mask).__name__}")
    b = jnp.arange(batch).reshape(-1, 1, 1, 1)
    h = jnp.arange(heads).reshape(1, -1, 1, 1)
    return mask(b, h, jnp.arange(q_len).reshape(1, 1, -1, 1), jnp.arange(kv_len).reshape(1, 1, 1, -1))


def _pad_axis(x, axis: int, size: int):
    if x.shape[axis] == size:
        return x
    padding = [(0, 0)] * x.ndim
    padding[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, padding)
