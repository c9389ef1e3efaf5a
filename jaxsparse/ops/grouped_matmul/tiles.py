"""Which (group, row tile) pairs a grouped matmul visits: work proportional to the rows present."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GroupTiles:
    """The (group, row tile) pairs of rows sorted by group, in row order.

    A tile of ``block_rows`` rows may hold rows of several groups, so there are at most
    ``ceil(N / block_rows) + E`` pairs (the static length of the arrays); entries past
    ``num_pairs`` are padding.

    Attributes:
      group: int32 ``[P]``, the group of each pair.
      tile: int32 ``[P]``, the row tile of each pair.
      num_pairs: int32 scalar, how many entries are real.
      starts, ends: int32 ``[E]``, each group's first row and one past its last.
    """

    group: jax.Array
    tile: jax.Array
    num_pairs: jax.Array
    starts: jax.Array
    ends: jax.Array


def group_tiles(group_sizes, num_rows: int, block_rows: int) -> GroupTiles:
    """The pairs for ``group_sizes`` ``[E]`` over ``num_rows`` rows cut in tiles of ``block_rows``."""
    group_sizes = group_sizes.astype(jnp.int32)
    num_groups = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    first = starts // block_rows
    tiles_per_group = jnp.where(group_sizes > 0, (ends - 1) // block_rows - first + 1, 0)
    pair_ends = jnp.cumsum(tiles_per_group)
    length = -(-num_rows // block_rows) + num_groups
    pairs = jnp.arange(length, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(pair_ends, pairs, side="right"), num_groups - 1).astype(jnp.int32)
    tile = first[group] + pairs - (pair_ends[group] - tiles_per_group[group])
    num_pairs = pair_ends[-1]
    tile = jnp.where(pairs < num_pairs, tile, 0).astype(jnp.int32)
    return GroupTiles(group=group, tile=tile, num_pairs=num_pairs, starts=starts, ends=ends)
