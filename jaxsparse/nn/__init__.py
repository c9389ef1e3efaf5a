"""Flax NNX layers, each a thin module over one functional op.

Example::

    from flax import nnx
    from jaxsparse import masks, nn

    layer = nn.Attention(512, 8, num_kv_heads=2, mask=masks.causal(), rngs=nnx.Rngs(0))
"""

from jaxsparse.nn.attention import Attention
from jaxsparse.nn.rotary import apply_rotary

__all__ = ["Attention", "apply_rotary"]
