"""Grouped matmul: one matmul per group of consecutive rows, the dropless MoE GEMM."""

from jaxsparse.ops.grouped_matmul.api import IMPLEMENTATIONS, grouped_matmul
from jaxsparse.ops.grouped_matmul.tiles import GroupTiles, group_tiles

__all__ = ["IMPLEMENTATIONS", "GroupTiles", "group_tiles", "grouped_matmul"]
