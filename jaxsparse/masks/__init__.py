"""Composable attention masks and their compilation into block metadata.

Masks combine with ``&``, ``|`` and ``~``::

    from jaxsparse import masks
    mask = masks.causal() & (masks.sinks(4) | masks.sliding_window(1024))
    block_mask = masks.make_block_mask(mask, q_len=8192, kv_len=8192)
"""

from jaxsparse.masks.array_masks import document, global_tokens, prefix_lm
from jaxsparse.masks.base import BlockGrid, Mask
from jaxsparse.masks.block_mask import BlockMask, make_block_mask
from jaxsparse.masks.combinators import per_head
from jaxsparse.masks.from_fn import from_fn
from jaxsparse.masks.structured import causal, chunked, dilated, full, power_of_two, sinks, sliding_window

__all__ = [
    "BlockGrid",
    "BlockMask",
    "Mask",
    "causal",
    "chunked",
    "dilated",
    "document",
    "from_fn",
    "full",
    "global_tokens",
    "make_block_mask",
    "per_head",
    "power_of_two",
    "prefix_lm",
    "sinks",
    "sliding_window",
]
