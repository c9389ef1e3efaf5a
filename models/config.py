"""What a language model of :mod:`models` is made of: :class:`ModelConfig` and its per-layer attention.

A config is a frozen, hashable dataclass (usable as a static ``jit`` argument) whose fields are
checked on construction: a bad value raises ``ValueError`` naming the field. ``to_dict`` /
``from_dict`` turn it into plain JSON-ready Python values and back (checkpoints, config files).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax.numpy as jnp

from jaxsparse.ops.activations import ACTIVATIONS
from jaxsparse.ops.attention import IMPLEMENTATIONS

FFN_KINDS = ("dense", "spark", "blockffn", "moe")
ATTENTION_KINDS = ("full", "sliding_window")
# The auxiliary losses each FFN kind returns, with their default weights (REFERENCES, MoE):
# Switch load balance alpha ~ 1e-2, ST-MoE z-loss ~ 1e-3, BlockFFN locality 2e-3 and chunk 5e-2.
AUX_LOSSES = {
    "dense": {},
    "spark": {},
    "moe": {"load_balance": 1e-2, "z_loss": 1e-3},
    "blockffn": {"locality": 2e-3, "chunk_sparsity": 5e-2},
}
DEFAULT_SPARK_SPARSITY = 0.92  # Spark Transformer keeps 8% of the FFN neurons.


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive_int(name: str, value) -> None:
    if not _is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_optional_positive_number(name: str, value) -> None:
    if value is not None and (not _is_number(value) or value <= 0):
        raise ValueError(f"{name} must be None or a positive number, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerAttention:
    """The attention pattern of one layer, always causal.

    Attributes:
      kind: ``"full"`` (every earlier token) or ``"sliding_window"`` (the last ``window`` tokens,
        the query's own included, plus the first ``sinks`` tokens of the sequence).
      window: keys in the window, for ``"sliding_window"`` (Gemma 2: 4096); None for ``"full"``.
      sinks: attention-sink tokens always visible (StreamingLLM / LM-Infinite), for
        ``"sliding_window"``; 0 for ``"full"``.

    Raises:
      ValueError: an unknown kind, a window on a full layer or none on a windowed one, negative sinks.
    """

    kind: str = "full"
    window: int | None = None
    sinks: int = 0

    def __post_init__(self):
        if self.kind not in ATTENTION_KINDS:
            raise ValueError(f"attention kind must be one of {ATTENTION_KINDS}, got {self.kind!r}")
        if self.kind == "full":
            if self.window is not None or self.sinks != 0:
                raise ValueError(f"a 'full' attention layer takes no window or sinks, got window={self.window!r}, "
                                 f"sinks={self.sinks!r}")
            return
        _check_positive_int("window", self.window)
        if not _is_int(self.sinks) or self.sinks < 0:
            raise ValueError(f"sinks must be a non-negative int, got {self.sinks!r}")


def attention_pattern(num_layers: int, *, full_every: int = 3, window: int, sinks: int = 0) -> tuple[LayerAttention, ...]:
    """Full causal attention in every ``full_every``-th layer, causal sliding window + sinks elsewhere.

    Layer ``i`` is full when ``i % full_every == full_every - 1``: ``full_every=3`` gives a third
    of the layers full attention (LongGen, Ge et al. 2024, keeps about 1/3 full layers; its exact
    placement is not reproduced), ``full_every=2`` alternates local and global layers starting
    with a local one (Gemma 2).

    Args:
      num_layers: the model's layers.
      full_every: period of the full layers, a positive int (1: all full).
      window: keys in each local layer's window (the query's own included).
      sinks: sink tokens of the local layers.

    Returns:
      A tuple of ``num_layers`` :class:`LayerAttention`.

    Raises:
      ValueError: non-positive ``num_layers`` or ``full_every``, or a bad window / sinks.
    """
    _check_positive_int("num_layers", num_layers)
    _check_positive_int("full_every", full_every)
    local = LayerAttention(kind="sliding_window", window=window, sinks=sinks)
    full = LayerAttention()
    return tuple(full if i % full_every == full_every - 1 else local for i in range(num_layers))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A decoder-only language model: pre-norm RMSNorm blocks, rotary GQA attention, a gated FFN.

    Fields that only some FFN kinds use must stay None for the others (e.g. ``num_experts`` on a
    dense model), so that a config never carries settings that silently do nothing.

    Attributes:
      vocab_size: ``V``.
      model_dim: ``M``.
      num_layers: blocks.
      num_heads, num_kv_heads: ``H`` and ``K`` (``H % K == 0``).
      head_dim: ``D`` (even while rotary embeddings are on).
      ffn_dim: ``F``, the FFN width of ``"dense"`` and ``"spark"`` (Spark's F'); None for MoE kinds.
      max_seq_len: the longest sequence the forward accepts.
      ffn: ``"dense"`` (gated FFN), ``"spark"`` (Spark FFN), ``"blockffn"`` (BlockFFN MoE) or
        ``"moe"`` (top-k softmax routed MoE, dropless).
      activation: the gate activation of every FFN kind (``"gelu"``: GeGLU, tanh form, as Gemma;
        ``"silu"``: SwiGLU; see ``jaxsparse.ops.activations.ACTIVATIONS``).
      ffn_sparsity: Spark only: share of neurons zeroed by statistical top-k, in ``[0, 1)``
        (None: 0.92); 0.0 switches sparsity off (the layer is then a dense gated FFN).
      predictor_dim: Spark only: ``r``, input dims that score the neurons, in ``(0, M)``
        (None: ``max(1, M // 8)``, the layer's default).
      num_experts: ``E`` for ``"moe"`` and ``"blockffn"``.
      experts_per_token: ``k`` for ``"moe"`` (in ``[1, E]``); BlockFFN picks a variable number.
      expert_dim: per-expert hidden width for ``"moe"`` and ``"blockffn"``.
      aux_loss_weights: ``{loss name: weight}`` (or a tuple of pairs) for the kind's auxiliary
        losses: ``"load_balance"``, ``"z_loss"`` (moe), ``"locality"``, ``"chunk_sparsity"``
        (blockffn); None: the defaults of :data:`AUX_LOSSES`; missing names weigh 0. Stored as a
        sorted tuple of ``(name, weight)`` pairs.
      attention: per-layer :class:`LayerAttention`: a tuple of ``num_layers`` of them (see
        :func:`attention_pattern`), one for every layer, or None (all full causal). Stored as a tuple.
      decode_keys: Spark attention at decode: keys kept per kv head by the ``"top_k"`` policy of
        :func:`models.generate` (Spark: 256), also the budget of its ``"quest"`` and
        ``"token_select"`` policies; None: those named policies are unavailable.
      score_dims: dims of q and k that score keys at decode (Spark attention's r), in ``[1, D]``;
        None: all D.
      tie_embeddings: the unembedding reuses the embedding table.
      scale_embeddings: multiply the token embeddings by ``sqrt(M)`` (Gemma; False: Llama).
      norm_epsilon: the epsilon of every RMSNorm, positive (Gemma: 1e-6; Llama: usually 1e-5).
      post_norms: also normalise each sublayer's output before its residual add, ``x += norm(
        attention(norm(x)))`` and ``x += norm(ffn(norm(x)))`` (Gemma 2's post-attention and
        post-FFN norms).
      attention_bias: biases on the four attention projections (Qwen 2 imports set the output
        bias to 0).
      attention_scale: multiplies ``q . k``; None: ``D ** -0.5`` (Gemma 2:
        ``query_pre_attn_scalar ** -0.5``).
      rope_theta: rotary base; None turns rotary embeddings off.
      softcap: tanh soft-cap of the output logits (Gemma 2: 30); None: off.
      attention_softcap: tanh soft-cap of the attention logits (Gemma 2: 50); None: off.
      dtype: computation dtype name (``"float32"``, ``"bfloat16"``); a dtype is accepted and stored
        by name.
      param_dtype: parameter dtype name.
      attention_implementation: the ``jaxsparse.attention`` backend; None picks one.
      remat: rematerialise each block in the backward pass (saves activation memory).

    Raises:
      ValueError: a field of the wrong type or range (the message names it), a field set that the
        FFN kind does not use, ``num_heads % num_kv_heads != 0``, an attention tuple of the wrong
        length, unknown auxiliary loss names.
    """

    vocab_size: int
    model_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int | None = None
    max_seq_len: int
    ffn: str = "dense"
    activation: str = "gelu"
    ffn_sparsity: float | None = None
    predictor_dim: int | None = None
    num_experts: int | None = None
    experts_per_token: int | None = None
    expert_dim: int | None = None
    aux_loss_weights: tuple[tuple[str, float], ...] | None = None
    attention: tuple[LayerAttention, ...] | None = None
    decode_keys: int | None = None
    score_dims: int | None = None
    tie_embeddings: bool = True
    scale_embeddings: bool = True
    norm_epsilon: float = 1e-6
    post_norms: bool = False
    attention_bias: bool = False
    attention_scale: float | None = None
    rope_theta: float | None = 10000.0
    softcap: float | None = None
    attention_softcap: float | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_implementation: str | None = None
    remat: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "model_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "max_seq_len"):
            _check_positive_int(name, getattr(self, name))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be divisible by num_kv_heads={self.num_kv_heads}")
        if self.rope_theta is not None:
            _check_optional_positive_number("rope_theta", self.rope_theta)
            if self.head_dim % 2:
                raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"ffn must be one of {FFN_KINDS}, got {self.ffn!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        self._check_ffn_fields()
        object.__setattr__(self, "aux_loss_weights", self._normalized_aux_weights())
        object.__setattr__(self, "attention", self._normalized_attention())
        if self.decode_keys is not None:
            _check_positive_int("decode_keys", self.decode_keys)
        if self.score_dims is not None and (not _is_int(self.score_dims) or not 1 <= self.score_dims <= self.head_dim):
            raise ValueError(f"score_dims must be None or an int in [1, {self.head_dim}] (head_dim), "
                             f"got {self.score_dims!r}")
        for name in ("tie_embeddings", "scale_embeddings", "post_norms", "attention_bias", "remat"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("softcap", "attention_softcap", "attention_scale"):
            _check_optional_positive_number(name, getattr(self, name))
        if not _is_number(self.norm_epsilon) or self.norm_epsilon <= 0:
            raise ValueError(f"norm_epsilon must be a positive number, got {self.norm_epsilon!r}")
        for name in ("dtype", "param_dtype"):
            object.__setattr__(self, name, _dtype_name(name, getattr(self, name)))
        if self.attention_implementation is not None and self.attention_implementation not in IMPLEMENTATIONS:
            raise ValueError(f"attention_implementation must be None or one of {IMPLEMENTATIONS}, "
                             f"got {self.attention_implementation!r}")

    def _check_ffn_fields(self) -> None:
        used = {
            "dense": ("ffn_dim",),
            "spark": ("ffn_dim", "ffn_sparsity", "predictor_dim"),
            "moe": ("num_experts", "experts_per_token", "expert_dim"),
            "blockffn": ("num_experts", "expert_dim"),
        }[self.ffn]
        required = {"ffn_dim", "num_experts", "expert_dim"} | ({"experts_per_token"} if self.ffn == "moe" else set())
        for name in ("ffn_dim", "ffn_sparsity", "predictor_dim", "num_experts", "experts_per_token", "expert_dim"):
            value = getattr(self, name)
            if name not in used:
                if value is not None:
                    raise ValueError(f"{name} is not used by ffn={self.ffn!r}; leave it None, got {value!r}")
            elif name in required:
                _check_positive_int(name, value)
        if self.ffn == "spark":
            if self.ffn_sparsity is not None and (not _is_number(self.ffn_sparsity) or not 0.0 <= self.ffn_sparsity < 1.0):
                raise ValueError(f"ffn_sparsity must be None or a number in [0, 1), got {self.ffn_sparsity!r}")
            if self.predictor_dim is not None and (not _is_int(self.predictor_dim)
                                                   or not 0 < self.predictor_dim < self.model_dim):
                raise ValueError(f"predictor_dim must be None or an int in (0, {self.model_dim}) (model_dim), "
                                 f"got {self.predictor_dim!r}")
        if self.ffn == "moe" and self.experts_per_token > self.num_experts:
            raise ValueError(f"experts_per_token must be in [1, {self.num_experts}] (num_experts), "
                             f"got {self.experts_per_token!r}")

    def _normalized_aux_weights(self):
        weights = self.aux_loss_weights
        if weights is None:
            return None
        if isinstance(weights, Mapping):
            pairs = tuple(weights.items())
        else:
            try:
                pairs = tuple((name, weight) for name, weight in weights)
            except (TypeError, ValueError):
                raise ValueError(f"aux_loss_weights must be None, a mapping or (name, weight) pairs, "
                                 f"got {weights!r}") from None
        known = AUX_LOSSES[self.ffn]
        unknown = sorted(str(name) for name, _ in pairs if name not in known)
        if unknown:
            raise ValueError(f"aux_loss_weights: ffn={self.ffn!r} has the losses {sorted(known)}, got unknown {unknown}")
        for name, weight in pairs:
            if not _is_number(weight) or weight < 0:
                raise ValueError(f"aux_loss_weights[{name!r}] must be a non-negative number, got {weight!r}")
        return tuple(sorted((name, float(weight)) for name, weight in dict(pairs).items()))

    def _normalized_attention(self):
        attention = self.attention
        if attention is None:
            return (LayerAttention(),) * self.num_layers
        if isinstance(attention, (LayerAttention, Mapping)):
            attention = (attention,) * self.num_layers
        if not isinstance(attention, (tuple, list)):
            raise ValueError(f"attention must be None, a LayerAttention or a sequence of them, "
                             f"got {type(attention).__name__}")
        layers = tuple(LayerAttention(**layer) if isinstance(layer, Mapping) else layer for layer in attention)
        if len(layers) != self.num_layers or not all(isinstance(layer, LayerAttention) for layer in layers):
            raise ValueError(f"attention must hold {self.num_layers} (num_layers) LayerAttention, got {attention!r}")
        return layers

    @property
    def aux_weights(self) -> dict[str, float]:
        """The weight of each auxiliary loss of this FFN kind (defaults filled in, 0 when left out)."""
        if self.aux_loss_weights is None:
            return dict(AUX_LOSSES[self.ffn])
        given = dict(self.aux_loss_weights)
        return {name: given.get(name, 0.0) for name in AUX_LOSSES[self.ffn]}

    @property
    def spark_sparsity(self) -> float:
        """Spark's FFN sparsity with its default filled in."""
        return DEFAULT_SPARK_SPARSITY if self.ffn_sparsity is None else float(self.ffn_sparsity)

    def to_dict(self) -> dict:
        """Plain JSON-ready values: attention as a list of dicts, aux weights as a dict (or None)."""
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        values["attention"] = [dataclasses.asdict(layer) for layer in self.attention]
        values["aux_loss_weights"] = None if self.aux_loss_weights is None else dict(self.aux_loss_weights)
        return values

    @classmethod
    def from_dict(cls, values: Mapping) -> "ModelConfig":
        """The config of :meth:`to_dict`'s output (attention entries may be dicts).

        Raises:
          ValueError: keys that are not fields (named in the message), or any field check.
        """
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(str(key) for key in values if key not in names)
        if unknown:
            raise ValueError(f"ModelConfig.from_dict: unknown keys {unknown}")
        return cls(**values)


def _dtype_name(name: str, value) -> str:
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        raise ValueError(f"{name} must be a floating dtype or its name, got {value!r}") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating dtype, got {dtype.name}")
    return dtype.name
