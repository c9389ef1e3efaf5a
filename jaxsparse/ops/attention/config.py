"""Tile sizes for block-sparse attention."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tile sizes shared by the forward and backward kernels.

    Attributes:
      block_q: queries per tile (the granularity of the block metadata's rows).
      block_kv: keys per tile (the granularity of its columns).

    The ``xla`` implementation accepts any positive sizes. The Pallas kernels need sizes their
    hardware can tile: multiples of 8 (``block_q``) and 128 (``block_kv``) on TPU, powers of two
    >= 16 on GPU; interpret mode on CPU is checked with the same rules.
    """

    block_q: int = 128
    block_kv: int = 128

    def __post_init__(self):
        for name in ("block_q", "block_kv"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")
