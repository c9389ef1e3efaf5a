"""Pure-JAX grouped matmul: a loop over the (group, row tile) pairs, one tile matmul each.

FLOPs are those of one dense matmul over the rows present plus at most one partial tile per group,
never E times a dense matmul (``lax.ragged_dot``'s cost on CPU). Each step reads one row tile and
its group's weight, and merges the product into the rows of that group only.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxsparse.ops.grouped_matmul.tiles import group_tiles


def _block_rows(num_rows: int) -> int:
    return min(128, max(8, 1 << (max(num_rows, 1) - 1).bit_length()))


def _padded(x, block_rows):
    pad = -x.shape[0] % block_rows
    return jnp.pad(x, ((0, pad), (0, 0))) if pad else x


def grouped_matmul(x, w, group_sizes, *, transpose_rhs: bool = False):
    """Same contract as :func:`~jaxsparse.ops.grouped_matmul.reference.grouped_matmul`."""
    num_rows, block_rows = x.shape[0], _block_rows(x.shape[0])
    tiles = group_tiles(group_sizes, num_rows, block_rows)
    xp = _padded(x, block_rows)
    out_dim = w.shape[1] if transpose_rhs else w.shape[2]
    row_offsets = jnp.arange(block_rows, dtype=jnp.int32)[:, None]

    def visit(pair, out):
        group, start = tiles.group[pair], tiles.tile[pair] * block_rows
        rows = lax.dynamic_slice_in_dim(xp, start, block_rows)
        weight = w[group]
        product = jnp.matmul(rows, weight.T if transpose_rhs else weight, preferred_element_type=jnp.float32)
        row_ids = start + row_offsets
        mine = (row_ids >= tiles.starts[group]) & (row_ids < tiles.ends[group])
        previous = lax.dynamic_slice_in_dim(out, start, block_rows)
        return lax.dynamic_update_slice_in_dim(out, jnp.where(mine, product, previous), start, 0)

    out = lax.fori_loop(0, tiles.num_pairs, visit, jnp.zeros((xp.shape[0], out_dim), jnp.float32))
    return out[:num_rows].astype(x.dtype)


def transposed_grouped_matmul(x, dy, group_sizes):
    """Same contract as :func:`~jaxsparse.ops.grouped_matmul.reference.transposed_grouped_matmul`."""
    num_rows, block_rows = x.shape[0], _block_rows(x.shape[0])
    tiles = group_tiles(group_sizes, num_rows, block_rows)
    xp, dyp = _padded(x, block_rows), _padded(dy, block_rows)
    row_offsets = jnp.arange(block_rows, dtype=jnp.int32)[:, None]

    def visit(pair, dw):
        group, start = tiles.group[pair], tiles.tile[pair] * block_rows
        row_ids = start + row_offsets
        mine = (row_ids >= tiles.starts[group]) & (row_ids < tiles.ends[group])
        rows = jnp.where(mine, lax.dynamic_slice_in_dim(xp, start, block_rows), 0)
        d_rows = jnp.where(mine, lax.dynamic_slice_in_dim(dyp, start, block_rows), 0)
        update = jnp.matmul(rows.T, d_rows, preferred_element_type=jnp.float32)
        return dw.at[group].add(update)

    shape = (group_sizes.shape[0], x.shape[1], dy.shape[1])
    return lax.fori_loop(0, tiles.num_pairs, visit, jnp.zeros(shape, jnp.float32)).astype(x.dtype)
