"""jaxsparse: sparse Transformer building blocks for JAX.

The top level re-exports the functional API; layers live in :mod:`jaxsparse.nn`, masks in
:mod:`jaxsparse.masks`.
"""

from jaxsparse import masks, nn
from jaxsparse.masks import BlockMask, make_block_mask
from jaxsparse.ops.attention import BlockSizes, attention

__version__ = "0.1.0"

__all__ = ["BlockMask", "BlockSizes", "attention", "make_block_mask", "masks", "nn"]
