"""Input layout of the TPU block-sparse attention kernels: block lists and mask operands.

The kernels in ``block_sparse_attention`` receive two kinds of side inputs, laid out here:

* Block metadata (per query block, the list of kv blocks to visit, its count and its "full" flags;
  and the transposed per kv block lists) is checked and flattened to 1-D int32 arrays for scalar
  prefetch into SMEM (``flat_metadata``). ``ListLayout`` says where the list of one row of
  (batch, head) starts in those flat arrays, with size-1 batch or head axes broadcast, so that the
  ``BlockSpec`` index maps and the kernels read list entries by offset.
* Mask operands (row, column and per-sequence scalar arrays that ``element_mask`` reads) are
  validated and broadcast to shapes whose blocks satisfy Mosaic's block-shape rules, and
  ``MaskOperandLayout`` builds their ``BlockSpec``s (following the q block or the listed kv block)
  and loads the per-tile views handed to ``element_mask``.

``check_inputs`` validates the shapes, dtypes and tiling of q, k and v.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import compat


@dataclasses.dataclass(frozen=True)
class ListLayout:
    """Where the list of row ``row`` of (batch b, query head h) starts in flattened metadata.

    Metadata arrays are [Bm, Hm, rows, width] (lists) and [Bm, Hm, rows] (counts), flattened to 1-D
    for SMEM; a size-1 batch or head axis is broadcast.
    """

    broadcast_batch: bool
    broadcast_head: bool
    num_heads: int
    rows: int
    width: int

    @classmethod
    def from_counts(cls, counts: jax.Array, width: int) -> ListLayout:
        batches, heads, rows = counts.shape
        return cls(batches == 1, heads == 1, heads, rows, width)

    def count_offset(self, b, h, row):
        """Offset of the count of row ``row`` of (b, h) in the flattened counts."""
        b = 0 if self.broadcast_batch else b
        h = 0 if self.broadcast_head else h
        return (b * self.num_heads + h) * self.rows + row

    def entry_offset(self, b, h, row, step):
        """Offset of list entry ``step`` of row ``row`` of (b, h) in flattened lists or flags."""
        return self.count_offset(b, h, row) * self.width + step


# TPU vreg tile: mask operands are laid out so that their blocks satisfy Mosaic's block-shape rules
# (last block dim a multiple of 128 or the full dim, second-to-last a multiple of 8 or full), as
# splash attention does for segment ids.
NUM_LANES = 128
NUM_SUBLANES = 8

MaskOperands = tuple[Sequence[jax.Array], Sequence[jax.Array], Sequence[jax.Array]]


@dataclasses.dataclass(frozen=True)
class MaskOperandLayout:
    """How ``mask_operands`` enter a kernel and are handed, per tile, to ``element_mask``.

    Each field holds, per operand, whether its batch axis has size 1 (broadcast over batch).

    * Row operands [Bo, Tp] travel as [Bo, Tp, NUM_LANES] (broadcast along lanes) with block
      (None, block_q, NUM_LANES) following the q block; the kernel reads lane 0: [block_q, 1].
    * Column operands [Bo, Sp] travel as [Bo, NUM_SUBLANES, Sp] (broadcast along sublanes) with
      block (None, NUM_SUBLANES, block_kv) following the (listed) kv block; the kernel reads sublane
      0: [1, block_kv].
    * Scalar operands [Bo] stay whole in SMEM; the kernel reads entry b (or 0).
    """

    row_broadcast: tuple[bool, ...]
    column_broadcast: tuple[bool, ...]
    scalar_broadcast: tuple[bool, ...]

    @property
    def num_inputs(self) -> int:
        return len(self.row_broadcast) + len(self.column_broadcast) + len(self.scalar_broadcast)

    @classmethod
    def check(
        cls, mask_operands: MaskOperands, *, batch: int, q_len: int, kv_len: int
    ) -> tuple[MaskOperandLayout, list[jax.Array]]:
        """Validates ``mask_operands``; returns (layout, kernel inputs in kernel layout)."""
        try:
            rows, columns, scalars = mask_operands
        except (TypeError, ValueError):
            raise ValueError(
                "mask_operands must be (row_operands, column_operands, scalar_operands)"
            ) from None

        def checked(kind, operands, trailing):
            arrays = []
            for index, operand in enumerate(operands):
                operand = jnp.asarray(operand)
                if (
                    operand.ndim != 1 + len(trailing)
                    or operand.shape[0] not in (1, batch)
                    or operand.shape[1:] != trailing
                ):
                    dims = ", ".join(["Bo", *map(str, trailing)])
                    raise ValueError(
                        f"{kind} operand {index} must be [{dims}] with Bo in (1, {batch}), got "
                        f"shape {operand.shape}"
                    )
                if not (jnp.issubdtype(operand.dtype, jnp.integer) or operand.dtype == jnp.bool_):
                    raise TypeError(
                        f"{kind} operand {index} must be int32 (or another integer or bool dtype), "
                        f"got {operand.dtype}"
                    )
                arrays.append(operand.astype(jnp.int32))
            return arrays

        rows = checked("row", rows, (q_len,))
        columns = checked("column", columns, (kv_len,))
        scalars = checked("scalar", scalars, ())
        layout = cls(
            tuple(x.shape[0] == 1 for x in rows),
            tuple(x.shape[0] == 1 for x in columns),
            tuple(x.shape[0] == 1 for x in scalars),
        )
        inputs = [
            *(jnp.broadcast_to(x[:, :, None], (*x.shape, NUM_LANES)) for x in rows),
            *(jnp.broadcast_to(x[:, None, :], (x.shape[0], NUM_SUBLANES, kv_len)) for x in columns),
            *scalars,
        ]
        return layout, inputs

    def specs(self, q_block_index_map, kv_block_index_map, *, block_q, block_kv):
        """BlockSpecs of the kernel inputs.

        Args:
          q_block_index_map, kv_block_index_map: the grid's index maps of the q and k blocks, each
            returning (b, head, block, 0); the row (column) operands follow their batch and block.
        """

        def row_index_map(broadcast):
            def index_map(*args):
                b, _, q_block, _ = q_block_index_map(*args)
                return (0 if broadcast else b), q_block, 0

            return index_map

        def column_index_map(broadcast):
            def index_map(*args):
                b, _, kv_block, _ = kv_block_index_map(*args)
                return (0 if broadcast else b), 0, kv_block

            return index_map

        return [
            *(
                pl.BlockSpec((None, block_q, NUM_LANES), row_index_map(broadcast))
                for broadcast in self.row_broadcast
            ),
            *(
                pl.BlockSpec((None, NUM_SUBLANES, block_kv), column_index_map(broadcast))
                for broadcast in self.column_broadcast
            ),
            *(pl.BlockSpec(memory_space=compat.SMEM) for _ in self.scalar_broadcast),
        ]

    def load(self, refs, b):
        """(row tiles [block_q, 1], column tiles [1, block_kv], scalars) of the current tile."""
        num_rows, num_columns = len(self.row_broadcast), len(self.column_broadcast)
        row_refs = refs[:num_rows]
        column_refs = refs[num_rows : num_rows + num_columns]
        scalar_refs = refs[num_rows + num_columns :]
        row_tiles = tuple(ref[:, :1] for ref in row_refs)
        column_tiles = tuple(ref[:1, :] for ref in column_refs)
        scalars = tuple(
            ref[0 if broadcast else b] for ref, broadcast in zip(scalar_refs, self.scalar_broadcast)
        )
        return row_tiles, column_tiles, scalars


def check_inputs(q, k, v, block_q, block_kv):
    """Validates shapes and tiling; returns (B, H, K, Tp, Sp, D)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k, v must be rank 4 [B, H, Tp, D] / [B, K, Sp, D], got shapes "
            f"{q.shape}, {k.shape}, {v.shape}"
        )
    batch, num_heads, q_len, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"k and v must both be [B={batch}, K, Sp, D={head_dim}], got {k.shape} and {v.shape}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"H={num_heads} must be a multiple of K={num_kv_heads}")
    if q_len % block_q or kv_len % block_kv:
        raise ValueError(
            f"Tp={q_len} must be a multiple of block_q={block_q} and Sp={kv_len} a multiple of "
            f"block_kv={block_kv}"
        )
    return batch, num_heads, num_kv_heads, q_len, kv_len, head_dim


def flat_metadata(indices, counts, full, *, batch, num_heads, rows, name):
    """Checks one metadata triple and flattens it to 1-D int32 for SMEM.

    A list width of 0 (nothing visible anywhere) is widened to 1 so that the grid is not empty and
    the outputs are still written.

    Returns:
      (flat indices, flat counts, flat full flags, layout).
    """
    if counts.ndim != 3 or counts.shape[2] != rows:
        raise ValueError(f"{name} counts must be [Bm, Hm, {rows}], got {counts.shape}")
    batches, heads = counts.shape[:2]
    if batches not in (1, batch) or heads not in (1, num_heads):
        raise ValueError(
            f"{name} metadata batch/head axes must be 1 or ({batch}, {num_heads}), got "
            f"({batches}, {heads})"
        )
    if indices.shape != full.shape or indices.shape[:3] != counts.shape:
        raise ValueError(
            f"{name} indices {indices.shape} and full flags {full.shape} must be "
            f"[{batches}, {heads}, {rows}, width]"
        )
    if indices.shape[3] == 0:
        widened = (*indices.shape[:3], 1)
        indices, full = jnp.zeros(widened, jnp.int32), jnp.zeros(widened, jnp.int32)
    layout = ListLayout.from_counts(counts, width=indices.shape[3])
    flat = [jnp.ravel(x).astype(jnp.int32) for x in (indices, counts, full)]
    return (*flat, layout)
