"""jaxsparse: sparse Transformer building blocks for JAX.

The top level re-exports the functional API; layers live in :mod:`jaxsparse.nn`, masks in
:mod:`jaxsparse.masks`, sparsity metrics in :mod:`jaxsparse.metrics`.
"""

from jaxsparse import masks, metrics, nn
from jaxsparse.masks import BlockMask, make_block_mask
from jaxsparse.metrics import activation_ratio, chunk_level_sparsity, token_level_sparsity
from jaxsparse.ops.activations import calibrate_cats_threshold, cats, relu2, shifted_relu
from jaxsparse.ops.attention import BlockSizes, attention
from jaxsparse.ops.compaction import compact
from jaxsparse.ops.sparse_ffn import ActiveNeurons, select_active_neurons, sparse_ffn, sparse_ffn_decode
from jaxsparse.ops.top_k_positions import top_k_positions
from jaxsparse.ops.topk import statistical_threshold, statistical_topk, topk_mask

__version__ = "0.1.0"

__all__ = [
    "ActiveNeurons",
    "BlockMask",
    "BlockSizes",
    "activation_ratio",
    "attention",
    "calibrate_cats_threshold",
    "cats",
    "chunk_level_sparsity",
    "compact",
    "make_block_mask",
    "masks",
    "metrics",
    "nn",
    "relu2",
    "select_active_neurons",
    "shifted_relu",
    "sparse_ffn",
    "sparse_ffn_decode",
    "statistical_threshold",
    "statistical_topk",
    "token_level_sparsity",
    "top_k_positions",
    "topk_mask",
]
