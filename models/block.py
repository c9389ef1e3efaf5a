"""One pre-norm Transformer block: ``x + attention(norm(x))``, then ``x + ffn(norm(x))``.

With ``config.post_norms`` (Gemma 2) each sublayer's output is normalised too before the residual
add: ``x + norm(attention(norm(x)))``, then ``x + norm(ffn(norm(x)))``.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxsparse import masks, nn
from jaxsparse.kv import KVCache
from jaxsparse.nn.parameters import logical_axes
from models.attention_layout import layer_mask
from models.config import LayerAttention, ModelConfig
from models.ffn import apply_ffn, decode_ffn, make_ffn


def rms_norm(config: ModelConfig, *, rngs: nnx.Rngs) -> nnx.RMSNorm:
    """An RMSNorm over ``M`` (epsilon ``config.norm_epsilon``, scale init 1, logical axes ``("norm",)``)."""
    return nnx.RMSNorm(config.model_dim, epsilon=config.norm_epsilon, dtype=jnp.dtype(config.dtype),
                       param_dtype=jnp.dtype(config.param_dtype), scale_metadata=logical_axes(("norm",)), rngs=rngs)


class Block(nnx.Module):
    """A pre-norm block with the attention pattern of its layer and the config's FFN kind.

    Attributes:
      attention_norm, ffn_norm: ``nnx.RMSNorm`` before each sublayer.
      attention: ``nn.Attention`` (rotary, GQA) with the layer's causal mask.
      ffn: the FFN layer of :func:`models.ffn.make_ffn`.
      post_attention_norm, post_ffn_norm: ``nnx.RMSNorm`` after each sublayer when
        ``config.post_norms``, else None.
      layout: the layer's :class:`~models.config.LayerAttention` (static).
    """

    def __init__(self, config: ModelConfig, layout: LayerAttention, *, rngs: nnx.Rngs):
        self.layout = layout
        self.attention_norm = rms_norm(config, rngs=rngs)
        self.attention = nn.Attention(
            config.model_dim, config.num_heads, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
            mask=layer_mask(layout), rope_theta=config.rope_theta, softcap=config.attention_softcap,
            scale=config.attention_scale, use_bias=config.attention_bias,
            implementation=config.attention_implementation, dtype=jnp.dtype(config.dtype),
            param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
        self.ffn_norm = rms_norm(config, rngs=rngs)
        self.ffn = make_ffn(config, rngs=rngs)
        self.post_attention_norm = rms_norm(config, rngs=rngs) if config.post_norms else None
        self.post_ffn_norm = rms_norm(config, rngs=rngs) if config.post_norms else None

    def _attention_residual(self, x, attended):
        if self.post_attention_norm is not None:
            attended = self.post_attention_norm(attended)
        return x + attended.astype(x.dtype)

    def _ffn_residual(self, x, y):
        if self.post_ffn_norm is not None:
            y = self.post_ffn_norm(y)
        return x + y.astype(x.dtype)

    def __call__(self, x, *, positions, segment_ids=None):
        """Training / scoring forward.

        Args:
          x: ``[B, T, M]``.
          positions: int ``[B, T]`` or ``[T]`` rotary positions (restarting in each document).
          segment_ids: optional int ``[B, T]``: attention stays inside each document.

        Returns:
          ``(x [B, T, M], activity bool [B, T, F or E], aux dict)`` (see :func:`models.ffn.apply_ffn`).
        """
        mask = None if segment_ids is None else layer_mask(self.layout) & masks.document(segment_ids)
        positions = None if self.attention.rope_theta is None else positions  # no rotary: positions unused
        x = self._attention_residual(x, self.attention(self.attention_norm(x), positions=positions, mask=mask))
        y, activity, aux = apply_ffn(self.ffn, self.ffn_norm(x), segment_ids=segment_ids)
        return self._ffn_residual(x, y), activity, aux

    def prefill(self, x, cache: KVCache, *, fill=None):
        """The forward over a prompt that also fills ``cache`` with its rotated keys and values.

        Args:
          x: ``[B, P, M]``, positions ``0 .. P - 1``.
          cache: this layer's empty cache (capacity ``>= P``, or an evicting cache).
          fill: ``fill(cache, keys, values, queries, *, scale, softcap) -> cache`` with keys and
            values ``[B, P, K, D]``, the rotated queries ``[B, P, H, D]`` and the layer's logit scale
            and soft-cap (for policies that rank by attention); default ``cache.prefill``.

        Returns:
          ``(x [B, P, M], cache)``.
        """
        hidden = self.attention_norm(x)
        queries, keys, values = (self.attention.query(hidden), self.attention.key(hidden),
                                 self.attention.value(hidden))
        if self.attention.rope_theta is not None:
            positions = jnp.arange(x.shape[1])
            queries = nn.apply_rotary(queries, positions, theta=self.attention.rope_theta)
            keys = nn.apply_rotary(keys, positions, theta=self.attention.rope_theta)
        if fill is None:
            cache = cache.prefill(keys, values)
        else:
            cache = fill(cache, keys, values, queries, scale=self.attention.scale, softcap=self.attention.softcap)
        x = self._attention_residual(x, self.attention(hidden))
        return self._ffn_residual(x, self.ffn(self.ffn_norm(x))), cache

    def decode(self, x, cache: KVCache, *, select=None, append=None, attention_append=None):
        """One decode step: attend over ``cache`` (what ``select(q, cache)`` picks), then the FFN
        (:func:`models.ffn.decode_ffn`: a sparse Spark FFN reads only its active rows).

        Args:
          x: ``[B, 1, M]``.
          cache: this layer's cache.
          select: the selection policy of ``nn.Attention.decode`` or None (the whole cache).
          append, attention_append: the eviction policy of ``nn.Attention.decode`` for an evicting
            cache (one of them), or None.

        Returns:
          ``(x [B, 1, M], cache)``.
        """
        attended, cache = self.attention.decode(self.attention_norm(x), cache, select=select, append=append,
                                                attention_append=attention_append)
        x = self._attention_residual(x, attended)
        return self._ffn_residual(x, decode_ffn(self.ffn, self.ffn_norm(x))), cache
