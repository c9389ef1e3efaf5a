"""The schedule of a ring attention: which (q shard, kv shard) pairs each device computes at each step.

A ring of ``n`` devices pairs every query shard with every kv shard once. At ring step ``s`` device
``i`` holds

* ring attention (keys and values travel, ``rotate="kv"``): q shard ``i`` and kv shard ``(i - s) mod n``;
* token ring (queries travel, ``rotate="q"``): q shard ``(i - s) mod n`` and kv shard ``i``.

The mask is defined on natural positions; the pair ``(q shard a, kv shard b)`` sees it through
:class:`ShardPairMask`, ``mask(b, h, positions[a][t], positions[b][s])`` for local indices ``t, s``,
compiled by :func:`~jaxsparse.masks.make_block_mask` into one :class:`~jaxsparse.masks.BlockMask` per
pair. When the mask has no traced data the tables are concrete at trace time and the schedule is
planned statically: a device skips (``lax.cond``) each pair without a visible block, and the ring
stops after the last step any device needs (no rotation past it). A mask carrying traced data
(``document(segment_ids)`` with ids computed inside ``jit``) cannot be planned: all ``n`` steps run,
and each device skips its empty pairs at run time from the block counts.

The steps run in a ``lax.scan`` (the program size does not grow with ``n``), so the block lists of
all steps are stacked with one width and one ``max_pairs`` (the widest pair's).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.masks.base import BlockGrid, Mask, pytree_mask
from jaxsparse.masks.block_mask import BlockMask, make_block_mask
from jaxsparse.masks.from_fn import from_fn
from jaxsparse.masks.structured import full
from jaxsparse.ops.attention.checks import default_block
from jaxsparse.ops.attention.config import BlockSizes
from jaxsparse.parallel.layouts import SequenceLayout

ROTATIONS = ("kv", "q")


@pytree_mask(data=("inner", "q_positions", "kv_positions"))
class ShardPairMask(Mask):
    """``inner`` (on natural positions) seen by one (q shard, kv shard) pair in local indices.

    ``mask(b, h, t, s) = inner(b, h, q_positions[t], kv_positions[s])`` for ``t, s < c``; local
    indices past the shard (block padding) are never visible.

    Blocks are classified on the natural grid and gathered when every local block is one natural
    block (the shard's runs of consecutive positions are whole blocks: contiguous and zigzag layouts
    with block sizes dividing the run); otherwise (striped layouts, blocks straddling two zigzag
    chunks) element by element, one q-block row at a time (exact; ``c x c`` work per pair).

    Attributes:
      inner: the mask on natural positions.
      q_positions, kv_positions: int32 ``[c]`` (numpy or jax): the natural position of each local
        index.
      seq_len: the natural sequence length ``T``.
      run_len: the layout's run length (:meth:`SequenceLayout.run_len`).
    """

    inner: Mask
    q_positions: jax.Array
    kv_positions: jax.Array
    seq_len: int
    run_len: int

    def __call__(self, b, h, q_idx, kv_idx):
        length = self.q_positions.shape[0]
        q_idx, kv_idx = jnp.asarray(q_idx), jnp.asarray(kv_idx)
        q_pos = jnp.asarray(self.q_positions)[jnp.clip(q_idx, 0, length - 1)]
        kv_pos = jnp.asarray(self.kv_positions)[jnp.clip(kv_idx, 0, length - 1)]
        return self.inner(b, h, q_pos, kv_pos) & (q_idx < length) & (kv_idx < length)

    def block_visibility(self, grid: BlockGrid):
        if self.run_len % grid.block_q or self.run_len % grid.block_kv:
            return from_fn(lambda b, h, q_idx, kv_idx: self(b, h, q_idx, kv_idx)).block_visibility(grid)
        natural = BlockGrid.create(q_len=self.seq_len, kv_len=self.seq_len, block_q=grid.block_q,
                                   block_kv=grid.block_kv, batch=grid.batch_index.shape[0],
                                   heads=grid.head_index.shape[1])
        q_blocks = jnp.asarray(self.q_positions)[grid.q_start] // grid.block_q  # [nq, 1]
        kv_blocks = jnp.asarray(self.kv_positions)[grid.kv_start] // grid.block_kv  # [1, nk]
        tables = self.inner.block_visibility(natural)
        shape = (1, 1, natural.num_q_blocks, natural.num_kv_blocks)
        return tuple(jnp.broadcast_to(t, jnp.broadcast_shapes(jnp.shape(t), shape))[:, :, q_blocks, kv_blocks]
                     for t in tables)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RingMetadata:
    """The block lists of every device at every ring step that runs, stacked ``[steps, n, ...]``.

    Attributes:
      kv_indices, kv_counts, kv_full, q_indices, q_counts, q_full: the :class:`BlockMask` arrays of
        the pair each device holds at each step, ``[steps, n, Bm, Hm, ...]``, lists padded to the
        widest.
      computed: bool ``[steps, n]``: the device computes its pair at that step (from the static plan,
        or from the block counts when the mask is traced).
      max_pairs: the largest ``max_pairs`` of all the pairs' block masks (static).
      every_pair: True when every device computes at every step (static; no ``lax.cond`` then).
    """

    kv_indices: jax.Array
    kv_counts: jax.Array
    kv_full: jax.Array
    q_indices: jax.Array
    q_counts: jax.Array
    q_full: jax.Array
    computed: jax.Array
    max_pairs: int = dataclasses.field(metadata=dict(static=True))
    every_pair: bool = dataclasses.field(metadata=dict(static=True))


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class RingPlan:
    """Static facts about a ring schedule: the work and communication of every device and step.

    Attributes:
      layout: the sequence layout (its ``num_shards`` is the ring size ``n``).
      seq_len: the global sequence length ``T``.
      block_q, block_kv: the tile sizes of the per-pair block masks.
      rotate: ``"kv"`` (ring attention: keys and values travel) or ``"q"`` (token ring).
      planned: whether the mask was concrete; False for masks with traced data.
      steps: how many ring steps run (steps ``0 .. steps - 1``): planned, one past the last step at
        which some device has a visible block; unplanned, ``n``.
      computed: bool ``[n, n]``, ``[device, step]``: the device computes its pair at that step (a
        step ``>= steps`` never computes); None when not planned.
      visible_blocks: int64 ``[n, n]``, ``[device, step]``: tiles (batch x head x q block x kv block)
        the device visits at that step; None when not planned.
    """

    layout: SequenceLayout
    seq_len: int
    block_q: int
    block_kv: int
    rotate: str
    planned: bool
    steps: int
    computed: np.ndarray | None
    visible_blocks: np.ndarray | None

    @property
    def num_shards(self) -> int:
        return self.layout.num_shards

    @property
    def shard_len(self) -> int:
        """Tokens per shard, ``c = T / n``."""
        return self.seq_len // self.num_shards

    @property
    def rotations(self) -> int:
        """Collective permutes of the travelling shard in the forward pass, ``steps - 1``."""
        return max(self.steps - 1, 0)

    def shards(self, device: int, step: int) -> tuple[int, int]:
        """``(q shard, kv shard)`` that ``device`` holds at ring ``step``."""
        other = (device - step) % self.num_shards
        return (device, other) if self.rotate == "kv" else (other, device)

    @property
    def device_blocks(self) -> np.ndarray:
        """int64 ``[n]``: tiles each device visits over the whole ring.

        Raises:
          ValueError: the plan of a mask with traced arrays (not planned) has no counts.
        """
        if not self.planned:
            raise ValueError("this RingPlan is not planned (the mask holds traced arrays): no per-device counts")
        return self.visible_blocks.sum(axis=1)

    @property
    def imbalance(self) -> float:
        """``max / mean`` of :attr:`device_blocks` (1.0 is perfectly balanced)."""
        blocks = self.device_blocks
        return float(blocks.max() / blocks.mean()) if blocks.sum() else 1.0

    def bytes_sent_per_device(self, *, batch: int, heads: int, kv_heads: int, head_dim: int, dtype,
                              backward: bool = False) -> int:
        """Bytes each device sends in one forward (or backward) pass.

        With ``c = T / n``, ``e`` the itemsize of ``dtype`` and ``r`` = :attr:`rotations`:

        * ``rotate="kv"`` forward: ``r * 2 * B * c * K * D * e`` (k and v each rotation). Backward:
          the same, plus ``(r + [r > 0]) * 2 * B * c * K * D * 4``: the float32 dK/dV accumulators
          travel with k and v and are sent home once at the end.
        * ``rotate="q"`` forward (token ring): per step after 0, the queries ``B * c * H * D * e``
          one way and the partial output ``B * c * H * D * e`` plus its float32 lse ``B * H * c * 4``
          the other way. Backward (autodiff): the transposed sends, the same volume.
        """
        itemsize = jnp.dtype(dtype).itemsize
        tokens = batch * self.shard_len
        if self.rotate == "q":
            per_step = tokens * heads * (2 * head_dim * itemsize + 4)
            return self.rotations * per_step
        kv = 2 * tokens * kv_heads * head_dim * itemsize
        if not backward:
            return self.rotations * kv
        gradients = 2 * tokens * kv_heads * head_dim * 4
        return self.rotations * kv + (self.rotations + (self.rotations > 0)) * gradients


def _pair_block_masks(mask: Mask, layout: SequenceLayout, seq_len: int, block_sizes: BlockSizes, batch: int,
                      heads: int) -> list[list[BlockMask]]:
    """``[q shard][kv shard]``: the BlockMask of every ordered pair of shards."""
    positions = layout.positions(seq_len)
    shard_len = layout.shard_len(seq_len)
    run_len = layout.run_len(seq_len)
    meta_batch, meta_heads = _metadata_batch_heads(mask, seq_len, block_sizes, batch, heads)
    # Under jit, arrays made from constants are tracers unless evaluated at trace time: a static mask
    # then still gives concrete tables (a mask with traced arrays gives traced ones).
    with jax.ensure_compile_time_eval():
        return [[make_block_mask(ShardPairMask(mask, positions[a], positions[b], seq_len, run_len),
                                 q_len=shard_len, kv_len=shard_len, block_q=block_sizes.block_q,
                                 block_kv=block_sizes.block_kv, batch=meta_batch, heads=meta_heads)
                 for b in range(layout.num_shards)] for a in range(layout.num_shards)]


def _metadata_batch_heads(mask: Mask, seq_len: int, block_sizes: BlockSizes, batch: int, heads: int):
    """``(Bm, Hm)``: the batch and head dims of ``mask``'s block metadata (1 where it does not vary).

    Raises:
      ValueError: a mask whose batch or head dims are neither 1 nor ``batch`` / ``heads``.
    """

    def classify(mask):
        grid = BlockGrid.create(q_len=seq_len, kv_len=seq_len, block_q=block_sizes.block_q,
                                block_kv=block_sizes.block_kv, batch=batch, heads=heads)
        return mask.block_visibility(grid)

    tables = jax.eval_shape(classify, mask)
    shape = jnp.broadcast_shapes(*(t.shape for t in tables), (1, 1, 1, 1))
    if shape[0] not in (1, batch):
        raise ValueError(f"mask has batch size {shape[0]}, but q has B={batch}")
    if shape[1] not in (1, heads):
        raise ValueError(f"mask is per head with {shape[1]} heads, but q has H={heads}")
    return shape[0], shape[1]


def _is_concrete(block_mask: BlockMask) -> bool:
    return not isinstance(block_mask.kv_counts, jax.core.Tracer)


def build_schedule(mask: Mask | None, *, layout: SequenceLayout, seq_len: int, block_sizes: BlockSizes,
                   batch: int, heads: int, rotate: str) -> tuple[RingPlan, RingMetadata]:
    """The plan and the stacked block lists of a ring (see :func:`ring_plan` for the arguments)."""
    if rotate not in ROTATIONS:
        raise ValueError(f"rotate must be one of {ROTATIONS}, got {rotate!r}")
    mask = full() if mask is None else mask
    if not isinstance(mask, Mask):
        raise TypeError(f"mask must be a jaxsparse Mask on natural positions (or None), got {type(mask).__name__}")
    pairs = _pair_block_masks(mask, layout, seq_len, block_sizes, batch, heads)
    n = layout.num_shards
    plan = RingPlan(layout=layout, seq_len=seq_len, block_q=block_sizes.block_q, block_kv=block_sizes.block_kv,
                    rotate=rotate, planned=False, steps=n, computed=None, visible_blocks=None)
    if all(_is_concrete(bm) for row in pairs for bm in row):
        visible = np.zeros((n, n), np.int64)
        for device in range(n):
            for step in range(n):
                q_shard, kv_shard = plan.shards(device, step)
                counts = np.asarray(pairs[q_shard][kv_shard].kv_counts, np.int64)
                visible[device, step] = counts.sum() * (batch // counts.shape[0]) * (heads // counts.shape[1])
        computed = visible > 0
        needed = np.flatnonzero(computed.any(axis=0))
        steps = int(needed[-1]) + 1 if needed.size else 0
        plan = dataclasses.replace(plan, planned=True, steps=steps, computed=computed, visible_blocks=visible)
    return plan, _stack(pairs, plan, xp=np if plan.planned else jnp)


def _stack(pairs: list[list[BlockMask]], plan: RingPlan, xp) -> RingMetadata:
    """Stacks the block masks of every (step, device) that runs, padding the lists to the widest."""
    held = [[pairs[a][b] for a, b in (plan.shards(device, step) for device in range(plan.num_shards))]
            for step in range(plan.steps)]
    block_masks = [bm for row in held for bm in row]

    def lists(indices_name, counts_name, full_name):
        width = max((getattr(bm, indices_name).shape[-1] for bm in block_masks), default=1)

        def padded(bm, name):
            values = xp.asarray(getattr(bm, name))
            pad = [(0, 0)] * (values.ndim - 1) + [(0, width - values.shape[-1])]
            # Past the count, lists repeat their last id; the full flags are 0.
            return xp.pad(values, pad, mode="edge") if name == indices_name else xp.pad(values, pad)

        stacked = [[[padded(bm, indices_name) for bm in row] for row in held],
                   [[xp.asarray(getattr(bm, counts_name)) for bm in row] for row in held],
                   [[padded(bm, full_name) for bm in row] for row in held]]
        return tuple(xp.stack([xp.stack(row) for row in table]) if held else xp.zeros((0,), np.int32)
                     for table in stacked)

    kv_lists = lists("kv_indices", "kv_counts", "kv_full")
    q_lists = lists("q_indices", "q_counts", "q_full")
    if plan.planned:
        computed = plan.computed[:, : plan.steps].T
    else:
        computed = kv_lists[1].reshape(plan.steps, plan.num_shards, -1).sum(-1) > 0
    return RingMetadata(*kv_lists, *q_lists, computed=computed,
                        max_pairs=max((bm.max_pairs for bm in block_masks), default=1),
                        every_pair=bool(plan.planned and computed.all()))


def pair_block_mask(metadata: RingMetadata, step, device, mask: Mask, plan: RingPlan) -> BlockMask:
    """Inside the ring: the BlockMask of the pair ``device`` holds at ring ``step``.

    Args:
      metadata: the ring's stacked lists.
      step: int32 scalar (or int), the ring step.
      device: int32 scalar, the device's index along the ring axis (``lax.axis_index``).
      mask: the mask on natural positions.
      plan: the ring's plan.
    """
    positions = jnp.asarray(plan.layout.positions(plan.seq_len))
    other = (device - step) % plan.num_shards
    q_shard, kv_shard = (device, other) if plan.rotate == "kv" else (other, device)
    pair_mask = ShardPairMask(mask, positions[q_shard], positions[kv_shard], plan.seq_len,
                              plan.layout.run_len(plan.seq_len))
    take = lambda x: jnp.asarray(x)[step, device]  # noqa: E731
    return BlockMask(
        kv_indices=take(metadata.kv_indices), kv_counts=take(metadata.kv_counts), kv_full=take(metadata.kv_full),
        q_indices=take(metadata.q_indices), q_counts=take(metadata.q_counts), q_full=take(metadata.q_full),
        mask=pair_mask, q_len=plan.shard_len, kv_len=plan.shard_len, block_q=plan.block_q,
        block_kv=plan.block_kv, max_pairs=metadata.max_pairs,
    )


def pair_is_computed(metadata: RingMetadata, step, device):
    """Whether ``device`` computes at ring ``step``: python True when every pair is computed, else a
    traced bool."""
    if metadata.every_pair:
        return True
    return jnp.asarray(metadata.computed)[step, device]


def ring_plan(mask: Mask | None, seq_len: int, layout: SequenceLayout, block_sizes: BlockSizes | None = None, *,
              batch: int = 1, heads: int = 1, rotate: str = "kv") -> RingPlan:
    """The static schedule of a ring attention over ``layout`` for ``mask`` (on natural positions).

    Example (a causal window under the contiguous layout needs ring steps 0 and 1 only)::

        plan = ring_plan(masks.causal() & masks.sliding_window(1024), 16384,
                         SequenceLayout(kind="contiguous", num_shards=8), BlockSizes(block_q=128, block_kv=128))
        plan.steps, plan.rotations  # 2, 1

    Args:
      mask: a :class:`~jaxsparse.masks.Mask` on natural positions, or None (full attention).
      seq_len: the global sequence length ``T`` (a multiple of ``num_shards x chunks_per_shard``).
      layout: the :class:`SequenceLayout`.
      block_sizes: tile sizes of the per-pair block masks (default: those ring attention picks).
      batch, heads: ``B`` and ``H`` (the tile counts include them; masks varying by batch or head
        need them).
      rotate: ``"kv"`` (ring attention) or ``"q"`` (token ring).

    Returns:
      A :class:`RingPlan`; ``planned`` is False (and the per-device tables None) when the mask holds
      traced arrays.

    Raises:
      ValueError: ``seq_len`` not divisible by the layout; a mask batch/head dim that is neither 1
        nor ``batch`` / ``heads``; an unknown ``rotate``.
      TypeError: ``mask`` is not a Mask, ``block_sizes`` not a BlockSizes.
    """
    if not isinstance(layout, SequenceLayout):
        raise TypeError(f"layout must be a SequenceLayout, got {type(layout).__name__}")
    block_sizes = default_block_sizes(block_sizes, layout.shard_len(seq_len))
    return build_schedule(mask, layout=layout, seq_len=seq_len, block_sizes=block_sizes, batch=batch, heads=heads,
                          rotate=rotate)[0]


def default_block_sizes(block_sizes: BlockSizes | None, shard_len: int) -> BlockSizes:
    """``block_sizes``, or what the local attention op picks for one shard of ``shard_len`` tokens."""
    if block_sizes is None:
        return BlockSizes(block_q=default_block(shard_len), block_kv=default_block(shard_len))
    if not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
    return block_sizes
