"""``jaxsparse.nn.Attention``: multi-head (grouped-query) self-attention over :func:`jaxsparse.attention`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse.kv.cache import KVCache
from jaxsparse.kv.eviction import EvictedKVCache, evicted_decode_step
from jaxsparse.masks import BlockMask, Mask
from jaxsparse.nn.parameters import check_positive_int, check_positive_number, logical_axes
from jaxsparse.nn.rotary import apply_rotary
from jaxsparse.ops.attention import IMPLEMENTATIONS, BlockSizes, attention
from jaxsparse.ops.decode_attention import decode_attention
from jaxsparse.parallel.sharding import DEFAULT_RULES, logical_to_spec
from jaxsparse.parallel.ulysses import ulysses_attention


class Attention(nnx.Module):
    """Self-attention with a composable sparse mask, grouped-query heads and rotary positions.

    The layer projects, rotates, attends and projects back::

        q = einsum("btm,mhd->bthd", x, query.kernel)      # [B, T, H, D]
        k = einsum("btm,mkd->btkd", x, key.kernel)        # [B, T, K, D]
        v = einsum("btm,mkd->btkd", x, value.kernel)      # [B, T, K, D]
        q, k = apply_rotary(q, positions), apply_rotary(k, positions)
        o = jaxsparse.attention(q, k, v, mask)            # [B, T, H, D]
        y = einsum("bthd,hdm->btm", o, out.kernel)        # [B, T, M]

    (plus biases when ``use_bias``). Query head ``h`` reads kv head ``h // (H // K)``; ``K == H`` is
    multi-head attention, ``K == 1`` multi-query attention.

    Parameters carry logical sharding names in their ``out_sharding`` metadata (annotations only;
    no mesh is needed to build or run the layer): ``query.kernel ("embed", "heads", "head_dim")``,
    ``key.kernel`` and ``value.kernel ("embed", "kv_heads", "head_dim")``, ``out.kernel ("heads",
    "head_dim", "embed")``; biases take the names of their output axes. Map them to a mesh with
    ``nnx.get_partition_spec(nnx.state(layer))`` under ``nnx.logical_axis_rules(...)``.

    Attributes:
      query: ``nnx.LinearGeneral`` ``M -> (H, D)``.
      key: ``nnx.LinearGeneral`` ``M -> (K, D)``.
      value: ``nnx.LinearGeneral`` ``M -> (K, D)``.
      out: ``nnx.LinearGeneral`` ``(H, D) -> M``.

    Example::

        from flax import nnx
        from jaxsparse import masks, nn

        layer = nn.Attention(512, 8, num_kv_heads=2, mask=masks.causal() & masks.sliding_window(128),
                             rngs=nnx.Rngs(0))
        y = layer(x)                                              # x [B, T, 512] -> [B, T, 512]
        # Packed documents: positions restart in each document; the mask comes from this batch.
        y = layer(x, positions=positions, mask=masks.causal() & masks.document(segment_ids))
    """

    def __init__(
        self,
        model_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        mask: Mask | None = None,
        rope_theta: float | None = 10000.0,
        softcap: float | None = None,
        scale: float | None = None,
        implementation: str | None = None,
        block_sizes: BlockSizes | None = None,
        use_bias: bool = False,
        sequence_axis: str | None = "sequence",
        dtype=None,
        param_dtype=jnp.float32,
        kernel_init=nnx.initializers.lecun_normal(),
        bias_init=nnx.initializers.zeros_init(),
        rngs: nnx.Rngs,
    ):
        """Builds the four projections.

        Args:
          model_dim: ``M``, the width of the input and the output.
          num_heads: ``H``, query heads.
          num_kv_heads: ``K``, key/value heads; ``H % K == 0``. Default ``H``.
          head_dim: ``D``. Default ``M // H``.
          mask: the layer's :class:`~jaxsparse.masks.Mask` (e.g. ``masks.causal()``); None attends
            to every key. A call's ``mask=`` replaces it.
          rope_theta: rotary frequency base (see :func:`~jaxsparse.nn.apply_rotary`); None disables
            rotary embeddings.
          softcap: optional positive tanh soft-cap on the logits (Gemma 2).
          scale: multiplies ``q . k``; default ``D ** -0.5``.
          implementation: the attention backend (see :func:`jaxsparse.attention`); None picks one.
          block_sizes: attention tile sizes; None picks them from the sequence length.
          use_bias: add biases to the four projections.
          sequence_axis: the mesh axis that splits the sequence. Under an active mesh
            (``jax.set_mesh``) where this axis has more than one device, attention runs as Ulysses
            (:func:`~jaxsparse.parallel.ulysses_attention`: all-to-all from sequence to heads and
            back, the batch split over the mesh axes of the ``"batch"`` sharding rule); otherwise,
            or with None, on the local :func:`jaxsparse.attention`. The result is the same.
          dtype: computation dtype (e.g. ``jnp.bfloat16``); None promotes inputs and parameters.
          param_dtype: dtype of the parameters.
          kernel_init: initializer of the projection kernels, called with the flattened 2-D shape
            ``(fan_in, fan_out)``.
          bias_init: initializer of the biases.
          rngs: the ``params`` stream initialises the kernels.

        Raises:
          ValueError: a non-positive size, ``num_heads % num_kv_heads != 0``, ``M // H == 0``
            without ``head_dim``, an odd ``head_dim`` with rotary embeddings on, a non-positive
            ``rope_theta``, ``softcap`` or ``scale``, an unknown ``implementation``.
          TypeError: a ``mask`` that is not a ``Mask``, ``block_sizes`` that are not ``BlockSizes``.
        """
        check_positive_int("model_dim", model_dim)
        check_positive_int("num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be divisible by num_kv_heads={num_kv_heads}")
        if head_dim is None:
            head_dim = model_dim // num_heads
            if head_dim == 0:
                raise ValueError(f"head_dim defaults to model_dim // num_heads = {model_dim} // {num_heads} = 0; pass a positive head_dim")
        check_positive_int("head_dim", head_dim)
        if rope_theta is not None:
            check_positive_number("rope_theta", rope_theta)
            if head_dim % 2:
                raise ValueError(f"head_dim must be even for rotary embeddings (rope_theta={rope_theta}), got {head_dim}")
        for name, value in (("softcap", softcap), ("scale", scale)):
            if value is not None:
                check_positive_number(name, value)
        if implementation is not None and implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
        if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
            raise TypeError(f"block_sizes must be a BlockSizes or None, got {type(block_sizes).__name__}")
        if mask is not None and not isinstance(mask, Mask):
            raise TypeError(f"mask must be a Mask or None (pass a BlockMask per call), got {type(mask).__name__}")

        self.model_dim = model_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.mask = nnx.data(mask)  # masks built from arrays (global tokens, prefix lengths) hold data
        self.rope_theta = rope_theta
        self.softcap = softcap
        self.scale = scale
        self.implementation = implementation
        self.block_sizes = block_sizes
        self.sequence_axis = sequence_axis

        def projection(in_features, out_features, axis, in_names, out_names):
            return nnx.LinearGeneral(
                in_features,
                out_features,
                axis=axis,
                use_bias=use_bias,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=kernel_init,
                bias_init=bias_init,
                kernel_metadata=logical_axes(in_names + out_names),
                bias_metadata=logical_axes(out_names),
                rngs=rngs,
            )

        self.query = projection(model_dim, (num_heads, head_dim), -1, ("embed",), ("heads", "head_dim"))
        self.key = projection(model_dim, (num_kv_heads, head_dim), -1, ("embed",), ("kv_heads", "head_dim"))
        self.value = projection(model_dim, (num_kv_heads, head_dim), -1, ("embed",), ("kv_heads", "head_dim"))
        self.out = projection((num_heads, head_dim), model_dim, (-2, -1), ("heads", "head_dim"), ("embed",))

    def __call__(self, x, *, positions=None, mask: Mask | BlockMask | None = None, return_lse: bool = False):
        """Attends over the sequence of ``x``.

        Args:
          x: ``[B, T, M]``.
          positions: integer ``[B, T]`` or ``[T]`` token positions for the rotary embeddings
            (per token for packed documents); default ``arange(T)``. Only with rotary embeddings on.
          mask: replaces the layer's mask for this call: a :class:`~jaxsparse.masks.Mask` (e.g.
            ``masks.causal() & masks.document(segment_ids)`` built from this batch) or a
            :class:`~jaxsparse.masks.BlockMask` compiled once and shared across layers. Pass
            ``masks.full()`` to attend everywhere when the layer has a mask.
          return_lse: also return the attention row logsumexp.

        Returns:
          ``y [B, T, M]``, or ``(y, lse)`` with ``lse [B, H, T]`` float32 when ``return_lse``. A
          query that sees no key gets a zero attention output (``y`` is then the output bias).

        Raises:
          ValueError: ``x`` not ``[B, T, M]``; ``positions`` with rotary embeddings off, or of the
            wrong shape; errors of :func:`jaxsparse.attention` for the mask.
          TypeError: non-integer ``positions``; a mask of the wrong type.
        """
        if not hasattr(x, "ndim") or x.ndim != 3 or x.shape[-1] != self.model_dim:
            raise ValueError(f"x must have shape [B, T, M={self.model_dim}], got {getattr(x, 'shape', None)}")
        q = self.query(x)
        k = self.key(x)
        v = self.value(x)
        if self.rope_theta is not None:
            if positions is None:
                positions = jnp.arange(x.shape[1])
            q = apply_rotary(q, positions, theta=self.rope_theta)
            k = apply_rotary(k, positions, theta=self.rope_theta)
        elif positions is not None:
            raise ValueError("positions are only used by rotary embeddings, which are off (rope_theta=None)")
        mask = self.mask if mask is None else mask
        mesh = self._sequence_mesh()
        if mesh is not None:
            if return_lse:
                raise NotImplementedError("return_lse is not available with sequence parallelism (Ulysses)")
            batch_axes = logical_to_spec(("batch",), DEFAULT_RULES, mesh)[0]
            out = ulysses_attention(q, k, v, mask, mesh=mesh, axis_name=self.sequence_axis, batch_axis_name=batch_axes,
                                    scale=self.scale, softcap=self.softcap, block_sizes=self.block_sizes,
                                    implementation=self.implementation)
            return self.out(out)
        result = attention(q, k, v, mask, scale=self.scale, softcap=self.softcap, return_lse=return_lse,
                           implementation=self.implementation, block_sizes=self.block_sizes)
        if return_lse:
            out, lse = result
            return self.out(out), lse
        return self.out(result)

    def _sequence_mesh(self):
        """The active mesh when it splits ``sequence_axis`` over more than one device, else None."""
        mesh = jax.sharding.get_abstract_mesh()
        if self.sequence_axis is None or mesh.empty or self.sequence_axis not in mesh.axis_names:
            return None
        return mesh if mesh.shape[self.sequence_axis] > 1 else None

    def decode(self, x, cache: KVCache | EvictedKVCache, *, select=None, append=None, attention_append=None,
               implementation: str | None = None):
        """Decodes ``Tq`` new tokens against a KV cache: project, rotate, append, select, attend.

        The new tokens sit at positions ``cache.lengths + arange(Tq)``; their keys and values are
        appended first, so each new query sees the cache and the new tokens up to itself. The
        layer's training mask is not applied here: what a query reads is the whole cache or what
        ``select`` returns (express a sliding window or sinks as a selection).

        Args:
          x: ``[B, Tq, M]``.
          cache: this layer's :class:`~jaxsparse.kv.KVCache`, or an
            :class:`~jaxsparse.kv.EvictedKVCache` (one token at a time, ``Tq == 1``), with ``K`` kv
            heads of ``D`` dims.
          select: optional policy ``select(q [B, Tq, H, D], cache) -> BlockSelection |
            PositionSelection`` (e.g. ``functools.partial(jaxsparse.kv.selection.top_k_keys, k=256)``).
          append: for an evicted cache, the eviction policy ``append(cache, keys [B, K, D], values)
            -> cache`` (e.g. ``functools.partial(jaxsparse.kv.streaming_llm_append, sinks=4)``); the
            query then attends to the kept slots, the new token included.
          attention_append: for an evicted cache, instead of ``append``, an eviction policy that
            ranks slots by attention, ``attention_append(cache, keys, values, attention [B, K,
            budget]) -> cache`` (e.g. ``functools.partial(jaxsparse.kv.heavy_hitter_append,
            recent=16)`` for H2O, with ``decay < 1`` for A2SF): the query attends to the kept slots
            and its own token first (:func:`~jaxsparse.kv.attend_and_append`).
          implementation: the decode-attention backend (see :func:`jaxsparse.ops.decode_attention.decode_attention`).

        Returns:
          ``(y [B, Tq, M], the updated cache)``.
        """
        if not hasattr(x, "ndim") or x.ndim != 3 or x.shape[-1] != self.model_dim:
            raise ValueError(f"x must have shape [B, Tq, M={self.model_dim}], got {getattr(x, 'shape', None)}")
        evicted = isinstance(cache, EvictedKVCache)
        kv_heads, head_dim = cache.keys.shape[1], cache.keys.shape[3]
        if kv_heads != self.num_kv_heads or head_dim != self.head_dim:
            raise ValueError(f"the cache has K={kv_heads}, D={head_dim}; this layer needs "
                             f"K={self.num_kv_heads}, D={self.head_dim}")
        if evicted and x.shape[1] != 1:
            raise ValueError(f"an EvictedKVCache decodes one token at a time (Tq = 1), got Tq = {x.shape[1]}")
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.rope_theta is not None:
            positions = cache.lengths[:, None] + jnp.arange(x.shape[1])
            q = apply_rotary(q, positions, theta=self.rope_theta)
            k = apply_rotary(k, positions, theta=self.rope_theta)
        if evicted:
            out, cache = evicted_decode_step(q, cache, k[:, 0], v[:, 0], append=append,
                                             attention_append=attention_append, scale=self.scale,
                                             softcap=self.softcap)
            return self.out(out), cache
        cache = cache.append(k, v)
        selection = None if select is None else select(q, cache)
        out = decode_attention(q, cache, selection=selection, scale=self.scale, softcap=self.softcap,
                               implementation=implementation)
        return self.out(out), cache

