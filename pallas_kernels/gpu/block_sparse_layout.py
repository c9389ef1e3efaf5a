"""Input validation and operand layout of the GPU block-sparse attention kernels.

Holds the checks that :mod:`pallas_kernels.gpu.block_sparse_attention` runs on its inputs (q, k,
v shapes and dtypes, the block-list metadata, the mask operands) and the BlockSpecs that lay the
metadata and mask operands out on the kernels' (batch, query head, block) grid. Shapes follow the
layout described in that module's docstring.
"""

import jax.numpy as jnp
from jax.experimental import pallas as pl


def check_inputs(q, k, v, block_q, block_kv):
    """Validates shapes and dtypes; returns (B, H, K, Tp, Sp, D)."""
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(
            f"expected q [B, H, Tp, D] and k, v [B, K, Sp, D], got {q.shape}, {k.shape}, {v.shape}."
        )
    batch, heads, q_len, head_dim = q.shape
    _, kv_heads, kv_len, _ = k.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k must have shape [{batch}, K, Sp, {head_dim}], got {k.shape}.")
    if heads % kv_heads:
        raise ValueError(f"query heads H={heads} must be a multiple of kv heads K={kv_heads}.")
    if q.dtype != k.dtype or q.dtype != v.dtype or q.dtype not in (jnp.float32, jnp.bfloat16):
        raise TypeError(
            f"q, k, v must share dtype float32 or bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}."
        )
    if q_len % block_q or kv_len % block_kv:
        raise ValueError(
            f"Tp={q_len} must be a multiple of block_q={block_q} and Sp={kv_len} of "
            f"block_kv={block_kv}."
        )
    return batch, heads, kv_heads, q_len, kv_len, head_dim


def check_metadata(name, indices, counts, full, batch, heads, num_blocks):
    """Validates one set of block lists ``{name}_indices``, ``{name}_counts``, ``{name}_full``."""
    for suffix, arr in (("indices", indices), ("counts", counts), ("full", full)):
        if arr.dtype != jnp.int32:
            raise TypeError(f"{name}_{suffix} must be int32, got {arr.dtype}.")
    if (
        indices.ndim != 4
        or indices.shape[0] not in (1, batch)
        or indices.shape[1] not in (1, heads)
        or indices.shape[2] != num_blocks
    ):
        raise ValueError(
            f"{name}_indices must have shape [1 or {batch}, 1 or {heads}, {num_blocks}, max_len], "
            f"got {indices.shape}."
        )
    if full.shape != indices.shape or counts.shape != indices.shape[:3]:
        raise ValueError(
            f"{name}_full must have shape {indices.shape} and {name}_counts {indices.shape[:3]}, "
            f"got {full.shape} and {counts.shape}."
        )


def check_mask_operands(mask_operands, batch, q_len, kv_len):
    """Validates ``(row_operands, column_operands, scalar_operands)``; returns them as tuples."""
    try:
        rows, columns, scalars = mask_operands
    except (TypeError, ValueError):
        raise ValueError(
            "mask_operands must be (row_operands, column_operands, scalar_operands), got "
            f"{mask_operands!r}."
        ) from None
    groups = tuple(tuple(jnp.asarray(x) for x in group) for group in (rows, columns, scalars))
    for kind, group, length in zip(("row", "column", "scalar"), groups, (q_len, kv_len, None)):
        for position, x in enumerate(group):
            if x.dtype != jnp.int32:
                raise TypeError(f"{kind} mask operand {position} must be int32, got {x.dtype}.")
            want = "[1 or B]" if length is None else f"[1 or B, {length}]"
            ok = x.ndim == (1 if length is None else 2) and x.shape[0] in (1, batch)
            if not ok or (length is not None and x.shape[1] != length):
                raise ValueError(
                    f"{kind} mask operand {position} must have shape {want} with B={batch}, "
                    f"got {x.shape}."
                )
    return groups


def metadata_specs(indices):
    """BlockSpecs for one cell's (indices, count, full) rows, broadcasting size-1 metadata axes.

    The grid is (batch, query head, block); ``indices`` is [Bm, Hm, n_blocks, max_len] and the
    counts and flags share its leading axes.
    """
    broadcast_batch, broadcast_head = indices.shape[0] == 1, indices.shape[1] == 1

    def row(b, h, i):
        return (0 if broadcast_batch else b, 0 if broadcast_head else h, i)

    list_spec = pl.BlockSpec(
        (None, None, None, indices.shape[3]), lambda b, h, i: (*row(b, h, i), 0)
    )
    count_spec = pl.BlockSpec((None, None, None), row)
    return [list_spec, count_spec, list_spec]


def _batch_block(x, b):
    """Block index along an operand's batch axis: b, or 0 when the operand broadcasts (Bo == 1)."""
    return 0 if x.shape[0] == 1 else b


def mask_specs(mask_groups, *, block_q, block_kv, tile_rows):
    """BlockSpecs of the mask operands on a (batch, head, block) grid.

    With ``tile_rows`` (forward and dQ kernels: the grid's block is a q block) rows arrive as the
    program's [block_q] tile and columns whole ([Sp], sliced per listed kv block); without (dK/dV
    kernel: the grid's block is a kv block) columns arrive as the [block_kv] tile and rows whole.
    Scalars arrive as the 0-d block of entry b (or 0).
    """
    rows, columns, scalars = mask_groups

    def tiled(x, size):
        return pl.BlockSpec((None, size), lambda b, h, i: (_batch_block(x, b), i))

    def whole(x):
        return pl.BlockSpec((None, x.shape[1]), lambda b, h, i: (_batch_block(x, b), 0))

    def scalar(x):
        return pl.BlockSpec((None,), lambda b, h, i: (_batch_block(x, b),))

    row_specs = [tiled(x, block_q) if tile_rows else whole(x) for x in rows]
    column_specs = [whole(x) if tile_rows else tiled(x, block_kv) for x in columns]
    return [*row_specs, *column_specs, *(scalar(x) for x in scalars)]
