"""Decode attention over a KV cache, whole or selected (blocks or positions)."""

from jaxsparse.ops.decode_attention.api import IMPLEMENTATIONS, decode_attention
from jaxsparse.ops.decode_attention.selection import BlockSelection, PositionSelection

__all__ = ["IMPLEMENTATIONS", "BlockSelection", "PositionSelection", "decode_attention"]
