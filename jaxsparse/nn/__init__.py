"""Flax NNX layers, each a thin module over one functional op.

Example::

    from flax import nnx
    from jaxsparse import masks, nn

    layer = nn.Attention(512, 8, num_kv_heads=2, mask=masks.causal(), rngs=nnx.Rngs(0))
    ffn = nn.SparkFFN(512, 3072, sparsity=0.92, rngs=nnx.Rngs(0))
"""

from jaxsparse.nn.activity import collect_activity, sparsity_report
from jaxsparse.nn.attention import Attention
from jaxsparse.nn.moe import MoE, BlockFFN, RouterBias
from jaxsparse.nn.rotary import apply_rotary
from jaxsparse.nn.sparse_ffn import SparkFFN, SparseGatedFFN

__all__ = ["Attention", "BlockFFN", "MoE", "RouterBias", "SparkFFN", "SparseGatedFFN", "apply_rotary", "collect_activity", "sparsity_report"]
