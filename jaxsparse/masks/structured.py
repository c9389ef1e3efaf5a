"""Masks defined by positions alone; each classifies blocks exactly from their bounds.

Every mask here is a function of ``q_idx - kv_idx``, of ``kv_idx``, or of both chunk ids, so a block's
answer follows from the range of those quantities over the block: O(1) work per block, no ``T x S``
array.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxsparse.masks.base import BlockGrid, Mask, pytree_mask


def _check_int(name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a python int, got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _ranges_intersect(lo_a, hi_a, lo_b, hi_b):
    return (lo_a <= hi_b) & (lo_b <= hi_a)


@pytree_mask()
class Full(Mask):
    """Every query sees every key."""

    def __call__(self, b, h, q_idx, kv_idx):
        return jnp.ones(jnp.broadcast_shapes(jnp.shape(q_idx), jnp.shape(kv_idx)), bool)

    def block_visibility(self, grid: BlockGrid):
        everything = jnp.ones((grid.num_q_blocks, grid.num_kv_blocks), bool)
        return everything, everything


@pytree_mask()
class Causal(Mask):
    """Query ``i`` sees key ``j`` when ``j <= i + offset``."""

    offset: int = 0

    def __call__(self, b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + self.offset

    def block_visibility(self, grid: BlockGrid):
        lo, hi = grid.offset_range()  # of q_idx - kv_idx
        return hi >= -self.offset, lo >= -self.offset


@pytree_mask()
class SlidingWindow(Mask):
    """Query ``i`` sees key ``j`` when ``i - left <= j <= i + right``."""

    left: int
    right: int = 0

    def __call__(self, b, h, q_idx, kv_idx):
        offset = q_idx - kv_idx
        return (offset <= self.left) & (offset >= -self.right)

    def block_visibility(self, grid: BlockGrid):
        lo, hi = grid.offset_range()
        return _ranges_intersect(lo, hi, -self.right, self.left), (lo >= -self.right) & (hi <= self.left)


@pytree_mask()
class Sinks(Mask):
    """Every query sees the first ``num_sinks`` keys (StreamingLLM's attention sinks)."""

    num_sinks: int

    def __call__(self, b, h, q_idx, kv_idx):
        return jnp.broadcast_to(kv_idx < self.num_sinks, jnp.broadcast_shapes(jnp.shape(q_idx), jnp.shape(kv_idx)))

    def block_visibility(self, grid: BlockGrid):
        shape = (grid.num_q_blocks, grid.num_kv_blocks)
        return (
            jnp.broadcast_to(grid.kv_start < self.num_sinks, shape),
            jnp.broadcast_to(grid.kv_end <= self.num_sinks, shape),
        )


@pytree_mask()
class Chunked(Mask):
    """Query ``i`` sees key ``j`` when both lie in the same chunk of ``size`` positions."""

    size: int

    def __call__(self, b, h, q_idx, kv_idx):
        return q_idx // self.size == kv_idx // self.size

    def block_visibility(self, grid: BlockGrid):
        q_first, q_last = grid.q_start // self.size, (grid.q_end - 1) // self.size
        kv_first, kv_last = grid.kv_start // self.size, (grid.kv_end - 1) // self.size
        any_visible = _ranges_intersect(q_first, q_last, kv_first, kv_last)
        return any_visible, (q_first == q_last) & (kv_first == kv_last) & (q_first == kv_first)


@pytree_mask()
class Dilated(Mask):
    """Query ``i`` sees key ``j`` when ``i - j`` is a multiple of ``stride`` (combine with a window)."""

    stride: int

    def __call__(self, b, h, q_idx, kv_idx):
        return (q_idx - kv_idx) % self.stride == 0

    def block_visibility(self, grid: BlockGrid):
        lo, hi = grid.offset_range()
        # A multiple of stride lies in [lo, hi] iff the largest one <= hi is >= lo.
        any_visible = (hi // self.stride) * self.stride >= lo
        all_visible = (lo == hi) & (lo % self.stride == 0) if self.stride > 1 else jnp.ones_like(any_visible)
        return any_visible, all_visible


@pytree_mask()
class PowerOfTwo(Mask):
    """Query ``i`` sees key ``j`` when ``i - j`` is 0 or a power of two (PowerAttention)."""

    def __call__(self, b, h, q_idx, kv_idx):
        offset = q_idx - kv_idx
        return (offset == 0) | ((offset > 0) & ((offset & (offset - 1)) == 0))

    def block_visibility(self, grid: BlockGrid):
        lo, hi = grid.offset_range()
        # Largest power of two <= hi (for hi >= 1).
        largest = jnp.left_shift(1, 31 - lax.clz(jnp.maximum(hi, 1).astype(jnp.int32)))
        any_visible = ((lo <= 0) & (hi >= 0)) | ((hi >= 1) & (largest >= jnp.maximum(lo, 1)))
        # Every offset in [lo, hi] allowed: within {0, 1, 2}, or a single power of two.
        single_power = (lo == hi) & (lo > 0) & ((lo & (lo - 1)) == 0)
        return any_visible, ((lo >= 0) & (hi <= 2)) | single_power


def full() -> Mask:
    """Every query sees every key (dense attention)."""
    return Full()


def causal(offset: int = 0) -> Mask:
    """Causal mask: query ``i`` sees key ``j`` when ``j <= i + offset``.

    Args:
      offset: shifts the diagonal; use ``S - T`` when the ``T`` queries are the last positions of a
        length-``S`` sequence (bottom-right alignment). Default 0 (top-left, as FlexAttention).
    """
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"causal(offset) must be a python int, got {type(offset).__name__}")
    return Causal(offset)


def sliding_window(left: int, right: int = 0) -> Mask:
    """Local band: query ``i`` sees key ``j`` when ``i - left <= j <= i + right``.

    ``sliding_window(w)`` is a causal window of ``w + 1`` keys (the token and ``w`` before it).

    Args:
      left: keys visible before the query, ``>= 0``.
      right: keys visible after the query, ``>= 0`` (0: nothing from the future).
    """
    return SlidingWindow(_check_int("sliding_window(left)", left, minimum=0), _check_int("sliding_window(right)", right, minimum=0))


def sinks(num_sinks: int) -> Mask:
    """The first ``num_sinks`` keys are visible to every query (StreamingLLM attention sinks).

    Combine with a window: ``causal() & (sinks(4) | sliding_window(1024))``.
    """
    return Sinks(_check_int("sinks(num_sinks)", num_sinks, minimum=0))


def chunked(size: int) -> Mask:
    """Block-local attention: queries see keys of their own chunk of ``size`` positions (Llama 4)."""
    return Chunked(_check_int("chunked(size)", size, minimum=1))


def dilated(stride: int) -> Mask:
    """Query ``i`` sees key ``j`` when ``(i - j) % stride == 0`` (dilated attention; combine with a window)."""
    return Dilated(_check_int("dilated(stride)", stride, minimum=1))


def power_of_two() -> Mask:
    """PowerAttention: query ``i`` sees keys at offsets 0, 1, 2, 4, 8, ... behind it."""
    return PowerOfTwo()
