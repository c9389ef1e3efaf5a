"""Ulysses sequence parallelism: attention over a sequence sharded along a mesh axis, by re-sharding heads.

DeepSpeed-Ulysses (Jacobs et al. 2023, "DeepSpeed Ulysses: System Optimizations for Enabling
Training of Extreme Long Sequence Transformer Models"). Over a mesh axis of size ``n`` the activations
are sharded by sequence (each device holds ``T / n`` consecutive positions of every head). Inside
:func:`jax.shard_map`, on every device:

1. ``lax.all_to_all`` over the axis turns ``q [B, T/n, H, D]`` into ``[B, T, H/n, D]``: all
   positions of the device's ``H / n`` query heads (device ``i`` gets heads ``i*H/n .. (i+1)*H/n - 1``).
   Keys and values go the same way with their ``K / n`` kv heads; with fewer kv heads than devices
   (``K < n``, ``n % K == 0``) each kv head is first repeated ``n / K`` times, so that device ``i``
   receives kv head ``i // (n / K)``, the one its query heads read (query head ``h`` reads kv head
   ``h // (H / K)``).
2. The local :func:`jaxsparse.attention` runs on those heads over the whole sequence, with the block
   metadata of the full mask restricted to the device's heads (and batch shard).
3. The inverse ``all_to_all`` returns ``[B, T/n, H, D]``, sequence-sharded again.

Communication per device per layer (forward): each ``all_to_all`` moves a whole local array, of which
``(n - 1) / n`` leaves the device: ``B T H D / n`` elements for q and for the output and
``B S K' D / n`` for k and for v, ``K' = max(K, n)``; the backward pass sends as much again. Unlike
ring attention the volume per device does not grow with ``n`` at a fixed ``T / n``, but the
parallelism is limited to ``n <= H``.

Masks. The block metadata is compiled once for the global ``[B, H, T, S]`` problem (outside the
``shard_map``, concretely when the mask is static), then each device receives the rows of its batch
shard and heads. The element mask applied inside partial tiles is wrapped so that it sees global batch
and head indices: per-head masks (:func:`jaxsparse.masks.per_head`), ``from_fn`` masks of ``b`` or
``h`` and per-sequence masks (``document`` segment ids ``[B, T]``, ``prefix_lm`` lengths ``[B]``) are
all exact. The mask's own arrays (segment ids, prefix lengths) are replicated on every device; for
per-head or per-sequence masks the metadata is built for all ``B x H`` rows, ``O(B H nq nk)`` int32.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxsparse.masks.base import Mask, pytree_mask
from jaxsparse.masks.block_mask import BlockMask, make_block_mask
from jaxsparse.ops.attention import BlockSizes, attention
from jaxsparse.ops.attention.checks import check_qkv, default_block

__all__ = ["ulysses_attention"]

# BlockMask arrays with leading [Bm, Hm] axes: split by batch shard and by head shard.
_METADATA_FIELDS = ("kv_indices", "kv_counts", "kv_full", "q_indices", "q_counts", "q_full")


def ulysses_attention(q, k, v, mask: Mask | BlockMask | None = None, *, mesh: jax.sharding.Mesh, axis_name: str,
                      batch_axis_name: str | tuple[str, ...] | None = None, scale: float | None = None,
                      softcap: float | None = None, block_sizes: BlockSizes | None = None,
                      implementation: str | None = None):
    """Attention over a sequence sharded along ``axis_name``, computed head-parallel (Ulysses).

    Equals ``jaxsparse.attention(q, k, v, mask, ...)`` on the global arrays (forward and gradients, up
    to float reassociation): two ``all_to_all`` exchanges per direction move the sequence sharding to
    the heads and back (see the module docstring).

    Args:
      q: ``[B, T, H, D]``, sharded (or to be sharded) by sequence over ``axis_name`` in natural token
        order; ``H % n == 0`` and ``T % n == 0`` for the axis size ``n``.
      k: ``[B, S, K, D]``, ``S % n == 0``; ``K % n == 0`` or ``n % K == 0`` (then each kv head is
        repeated ``n / K`` times before the exchange).
      v: ``[B, S, K, D]``, like ``k``.
      mask: a :class:`~jaxsparse.masks.Mask` (any, including per-head, per-sequence and ``from_fn``
        masks), a :class:`~jaxsparse.masks.BlockMask` built for ``T x S`` with ``Bm`` in ``(1, B)``
        and ``Hm`` in ``(1, H)``, or None (full).
      mesh: a :class:`jax.sharding.Mesh` with ``axis_name`` among its axes.
      axis_name: the mesh axis that shards the sequence.
      batch_axis_name: mesh axis (or tuple of axes) that shards the batch, e.g. ``"data"``; None
        replicates the batch over the other axes (every device along them computes all of it).
      scale, softcap, block_sizes, implementation: as :func:`jaxsparse.attention` (the local op).

    Returns:
      ``out [B, T, H, D]`` in q's dtype, sharded by sequence over ``axis_name`` (and by batch over
      ``batch_axis_name``).

    Raises:
      ValueError: ``axis_name`` or ``batch_axis_name`` not in ``mesh.axis_names`` (or the same
        axis); wrong ranks or mismatched shapes; ``H``, ``T`` or ``S`` not divisible by the axis
        size; ``K`` and the axis size not dividing one another; ``B`` not divisible by the batch
        shards; a BlockMask for other lengths, batch or heads.
      TypeError, NotImplementedError: as :func:`jaxsparse.attention`.

    Example::

        mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "sequence"))
        out = ulysses_attention(q, k, v, masks.causal(), mesh=mesh, axis_name="sequence",
                                batch_axis_name="data")
    """
    batch_axes = _check_axes(mesh, axis_name, batch_axis_name)
    batch, q_len, heads, _ = check_qkv(q, k, v)
    kv_len, kv_heads = k.shape[1], k.shape[2]
    devices = mesh.shape[axis_name]
    batch_shards = math.prod(mesh.shape[name] for name in batch_axes)
    where = f"the size {devices} of mesh axis axis_name={axis_name!r}"
    if heads % devices:
        raise ValueError(f"the number of query heads H = {heads} (q.shape[2]) must be divisible by {where}")
    if kv_heads % devices and devices % kv_heads:
        raise ValueError(f"the number of kv heads K = {kv_heads} (k.shape[2]) must be divisible by {where}, "
                         f"or divide it (kv heads are then repeated)")
    if q_len % devices:
        raise ValueError(f"the query length T = {q_len} (q.shape[1]) must be divisible by {where}")
    if kv_len % devices:
        raise ValueError(f"the key length S = {kv_len} (k.shape[1]) must be divisible by {where}")
    if batch % batch_shards:
        raise ValueError(f"the batch B = {batch} (q.shape[0]) must be divisible by the {batch_shards} shards of "
                         f"batch_axis_name={batch_axis_name!r}")
    block_mask = _global_block_mask(mask, block_sizes, batch, heads, q_len, kv_len)

    batch_spec = batch_axes[0] if len(batch_axes) == 1 else batch_axes or None
    local_batch, local_heads = batch // batch_shards, heads // devices
    metadata = {name: getattr(block_mask, name) for name in _METADATA_FIELDS}
    metadata_specs = {
        name: P(batch_spec if array.shape[0] > 1 else None, axis_name if array.shape[1] > 1 else None)
        for name, array in metadata.items()
    }
    mask_leaves, mask_tree = jax.tree.flatten(block_mask.mask)
    repeats = max(devices // kv_heads, 1)

    def local(q, k, v, metadata, mask_leaves):
        # q [B/b, T/n, H, D], k and v [B/b, S/n, K, D] -> q [B/b, T, H/n, D], k and v [B/b, S, K'/n, D].
        q = lax.all_to_all(q, axis_name, split_axis=2, concat_axis=1, tiled=True)
        k, v = (lax.all_to_all(jnp.repeat(x, repeats, axis=2), axis_name, split_axis=2, concat_axis=1, tiled=True)
                for x in (k, v))
        batch_offset = jnp.zeros((), jnp.int32)
        for name in batch_axes:
            batch_offset = batch_offset * mesh.shape[name] + lax.axis_index(name)
        element_mask = _ShardedMask(
            inner=jax.tree.unflatten(mask_tree, mask_leaves),
            batch_offset=batch_offset * local_batch,
            head_offset=lax.axis_index(axis_name).astype(jnp.int32) * local_heads,
            batch=batch,
            local_batch=local_batch,
        )
        local_mask = dataclasses.replace(block_mask, **metadata, mask=element_mask)
        out = attention(q, k, v, local_mask, scale=scale, softcap=softcap, block_sizes=block_sizes,
                        implementation=implementation)
        return lax.all_to_all(out, axis_name, split_axis=1, concat_axis=2, tiled=True)  # [B/b, T/n, H, D]

    sequence_spec = P(batch_spec, axis_name)
    sharded = jax.shard_map(
        local, mesh=mesh,
        in_specs=(sequence_spec, sequence_spec, sequence_spec, metadata_specs, [P()] * len(mask_leaves)),
        out_specs=sequence_spec,
        # The local op's scans start from fresh (device-invariant) carries that the body makes varying,
        # which the varying-axes check rejects; every output here is varying anyway.
        check_vma=False,
    )
    return sharded(q, k, v, metadata, mask_leaves)


@pytree_mask(data=("inner", "batch_offset", "head_offset"))
class _ShardedMask(Mask):
    """``inner`` seen from one shard: local batch and head indices are shifted to global ones.

    Used only as the element mask of block metadata compiled for the global problem (the block
    classification is never asked of it). The kernels' tile operands are cut to the local batch
    entries, and the offsets travel as two extra per-sequence scalars (``[1]``: one for all entries).
    """

    inner: Mask
    batch_offset: jax.Array  # int32 []
    head_offset: jax.Array  # int32 []
    batch: int  # the global B
    local_batch: int  # B / batch shards

    def __call__(self, b, h, q_idx, kv_idx):
        return self.inner(b + self.batch_offset, h + self.head_offset, q_idx, kv_idx)

    def tile_operands(self, q_len, kv_len):
        def local(x):  # [B', ...] with B' in (1, B): this shard's entries
            if x.shape[0] != self.batch or self.local_batch == self.batch:
                return x
            return lax.dynamic_slice_in_dim(x, self.batch_offset, self.local_batch, axis=0)

        rows, columns, scalars = jax.tree.map(local, self.inner.tile_operands(q_len, kv_len))
        return rows, columns, (scalars, self.batch_offset.reshape(1), self.head_offset.reshape(1))

    def tile_visible(self, rows, columns, scalars, b, h, q_idx, kv_idx):
        scalars, batch_offset, head_offset = scalars
        return self.inner.tile_visible(rows, columns, scalars, b + batch_offset, h + head_offset, q_idx, kv_idx)


def _check_axes(mesh, axis_name, batch_axis_name) -> tuple[str, ...]:
    """The batch axes as a tuple, after checking both arguments against the mesh."""
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh; mesh.axis_names = {mesh.axis_names}")
    batch_axes = (batch_axis_name,) if isinstance(batch_axis_name, str) else tuple(batch_axis_name or ())
    for name in batch_axes:
        if name not in mesh.axis_names or name == axis_name:
            raise ValueError(f"batch_axis_name {batch_axis_name!r} must name mesh axes other than "
                             f"axis_name={axis_name!r}; mesh.axis_names = {mesh.axis_names}")
    if len(set(batch_axes)) != len(batch_axes):
        raise ValueError(f"batch_axis_name {batch_axis_name!r} names an axis twice")
    return batch_axes


def _global_block_mask(mask, block_sizes, batch, heads, q_len, kv_len) -> BlockMask:
    """Block metadata for the global ``[B, H, T, S]`` problem; default tiles as the local op picks them."""
    if isinstance(mask, BlockMask):
        if (mask.q_len, mask.kv_len) != (q_len, kv_len):
            raise ValueError(f"mask: BlockMask built for q_len={mask.q_len}, kv_len={mask.kv_len}, "
                             f"but T={q_len}, S={kv_len}")
    elif mask is None or isinstance(mask, Mask):
        if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
            raise TypeError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
        if block_sizes is None:
            block_sizes = BlockSizes(block_q=default_block(q_len), block_kv=default_block(kv_len))
        mask = make_block_mask(mask, q_len=q_len, kv_len=kv_len, block_q=block_sizes.block_q,
                               block_kv=block_sizes.block_kv, batch=batch, heads=heads)
    else:
        raise TypeError(f"mask must be a Mask, a BlockMask or None, got {type(mask).__name__}")
    if mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, heads):
        raise ValueError(f"mask has batch/head dims {mask.shape[:2]}, expected 1 or B={batch} and 1 or H={heads}")
    return mask
