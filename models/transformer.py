"""The decoder-only language model: embedding, pre-norm blocks, final norm, (tied) unembedding."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse import metrics as sparsity_metrics
from jaxsparse.nn.parameters import logical_axes
from jaxsparse.parallel.sharding import with_logical_constraint
from models.attention_layout import document_starts, visible_share
from models.block import Block, rms_norm
from models.config import ModelConfig

ACTIVATION_AXES = ("batch", "sequence", "embed")  # logical axes of the residual stream [B, T, M]
CLS_CHUNK = 8  # the chunk length L of the "ffn_cls" metric (BlockFFN reports 8-token CLS)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelOutput:
    """What :class:`Transformer` returns.

    Attributes:
      logits: float32 ``[B, T, V]`` (soft-capped when ``config.softcap`` is set).
      aux_loss: float32 scalar: ``sum over loss names of weight * (mean over layers of the loss)``
        with ``config.aux_weights``; 0.0 for dense and Spark models. Add it to the LM loss.
      metrics: float32 scalars, no gradient: ``"ffn_tls"``, ``"ffn_cls"`` (token- and 8-token
        chunk-level sparsity of the FFN activations, exact zeros, averaged over layers: neurons for
        dense / Spark, experts for MoE kinds), ``"attention_density"`` (share of the ``T x T``
        (query, key) pairs the layers' masks visit, exact, averaged over layers); for MoE kinds also
        ``"expert_load_imbalance"`` (coefficient of variation of the expert load) and
        ``"aux_<name>"`` for each unweighted auxiliary loss (averaged over layers).
    """

    logits: jax.Array
    aux_loss: jax.Array
    metrics: dict[str, jax.Array]


class Transformer(nnx.Module):
    """A decoder-only LM from ``jaxsparse.nn``: dense, Spark Transformer, BlockFFN or top-k MoE.

    ``x = embed[tokens] * sqrt(M)``; each block ``x += attention(rmsnorm(x))`` (rotary GQA with
    the layer's causal pattern), ``x += ffn(rmsnorm(x))``; ``logits = cap(rmsnorm(x) @ W_out^T)``
    with ``W_out`` the embedding table when tied (Gemma 2 without its post-sublayer norms, which
    ``config.post_norms`` adds). ``config.scale_embeddings=False`` drops the ``sqrt(M)`` (Llama);
    :func:`models.load_hf_model` fills the dense model from Hugging Face Llama / Gemma checkpoints.

    Parameters carry logical axis names: ``embed.embedding`` and ``unembed.embedding`` ``("vocab",
    "embed")``, norm scales ``("norm",)``, attention and FFN weights as in ``jaxsparse.nn``
    (``"heads"``, ``"kv_heads"``, ``"head_dim"``, ``"mlp"``, ``"experts"``).

    Attributes:
      config: the :class:`~models.config.ModelConfig`.
      embed: ``nnx.Embed`` ``[V, M]``, init normal with std ``M ** -0.5``.
      blocks: ``nnx.List`` of :class:`~models.block.Block`, one per ``config.attention`` entry.
      final_norm: ``nnx.RMSNorm``.
      unembed: ``nnx.Embed`` ``[V, M]`` when ``tie_embeddings`` is False, else None.

    Example::

        model = Transformer(get_preset("spark-tiny"), rngs=nnx.Rngs(0))
        out = model(tokens)                       # tokens int32 [B, T]
        loss = cross_entropy(out.logits, targets) + out.aux_loss
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        """Builds the layers of ``config``; the ``params`` stream initialises them."""
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.embed = self._table(config, rngs)
        self.blocks = nnx.List([Block(config, layout, rngs=rngs) for layout in config.attention])
        self.final_norm = rms_norm(config, rngs=rngs)
        self.unembed = None if config.tie_embeddings else self._table(config, rngs)

    @staticmethod
    def _table(config: ModelConfig, rngs: nnx.Rngs) -> nnx.Embed:
        return nnx.Embed(config.vocab_size, config.model_dim, dtype=jnp.dtype(config.dtype),
                         param_dtype=jnp.dtype(config.param_dtype),
                         embedding_init=nnx.initializers.normal(stddev=config.model_dim**-0.5),
                         embedding_metadata=logical_axes(("vocab", "embed")), rngs=rngs)

    def embed_tokens(self, tokens):
        """``embed[tokens] * sqrt(M)`` in the computation dtype: int ``[B, T]`` -> ``[B, T, M]``.

        Without the ``sqrt(M)`` factor when ``config.scale_embeddings`` is False (Llama).
        """
        x = self.embed(tokens)
        if not self.config.scale_embeddings:
            return x
        return x * jnp.asarray(math.sqrt(self.config.model_dim), x.dtype)

    def output_logits(self, x):
        """Final norm, unembedding and soft-cap: ``[B, T, M]`` -> float32 ``[B, T, V]``."""
        table = (self.embed if self.unembed is None else self.unembed).embedding[...]
        hidden = self.final_norm(x)
        logits = jnp.einsum("btm,vm->btv", hidden, table.astype(hidden.dtype), preferred_element_type=jnp.float32)
        if self.config.softcap is not None:
            logits = self.config.softcap * jnp.tanh(logits / self.config.softcap)
        return logits

    def __call__(self, tokens, *, segment_ids=None) -> ModelOutput:
        """Scores every position of ``tokens`` (teacher forcing).

        Args:
          tokens: int ``[B, T]`` with ``T <= max_seq_len``.
          segment_ids: optional int ``[B, T]`` ids of packed documents (constant within a
            document, changing at each boundary): attention stays inside each document and rotary
            positions restart at 0 in each.

        Returns:
          :class:`ModelOutput`.

        Raises:
          ValueError: ``tokens`` not ``[B, T]`` or longer than ``max_seq_len``; ``segment_ids``
            of another shape.
          TypeError: non-integer tokens or segment ids.
        """
        tokens = self._check_tokens(tokens, segment_ids)
        config = self.config
        length = tokens.shape[1]
        starts = document_starts(segment_ids, length)
        positions = jnp.arange(length, dtype=jnp.int32) - starts if segment_ids is not None else jnp.arange(length)
        # Under a mesh, activations are split by batch and by sequence (a no-op without one), so that
        # a "sequence" mesh axis divides the whole block, not only attention (Ulysses inside).
        x = with_logical_constraint(self.embed_tokens(tokens), ACTIVATION_AXES)
        run_block = _run_block if not config.remat else nnx.remat(_run_block)
        tls, cls, layer_aux = [], [], []
        for block in self.blocks:
            x, activity, aux = run_block(block, x, positions, segment_ids)
            x = with_logical_constraint(x, ACTIVATION_AXES)
            tls.append(sparsity_metrics.token_level_sparsity(activity))
            cls.append(sparsity_metrics.chunk_level_sparsity(activity, CLS_CHUNK))
            layer_aux.append(aux)
        mean = lambda values: jnp.mean(jnp.stack(values)).astype(jnp.float32)  # noqa: E731
        share = lambda values: jnp.clip(mean(values), 0.0, 1.0)  # 1 - ratio may round to -3e-8  # noqa: E731
        metrics = {
            "ffn_tls": share(tls),
            "ffn_cls": share(cls),
            "attention_density": mean([visible_share(layout, starts) for layout in config.attention]),
        }
        aux_loss = jnp.zeros((), jnp.float32)
        weights = config.aux_weights
        for name in layer_aux[0]:
            value = mean([aux[name] for aux in layer_aux])
            if name in weights:
                aux_loss = aux_loss + weights[name] * value
                name = f"aux_{name}"
            metrics[name] = value
        metrics = jax.lax.stop_gradient(metrics)
        return ModelOutput(logits=self.output_logits(x), aux_loss=aux_loss, metrics=metrics)

    def _check_tokens(self, tokens, segment_ids):
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be int [B, T], got shape {tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens must hold integers, got dtype {tokens.dtype}")
        if tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(f"tokens: T={tokens.shape[1]} exceeds max_seq_len={self.config.max_seq_len}")
        if segment_ids is not None:
            segment_ids = jnp.asarray(segment_ids)
            if segment_ids.shape != tokens.shape:
                raise ValueError(f"segment_ids must have the tokens' shape {tokens.shape}, got {segment_ids.shape}")
            if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
                raise TypeError(f"segment_ids must hold integers, got dtype {segment_ids.dtype}")
        return tokens


def _run_block(block: Block, x, positions, segment_ids):
    return block(x, positions=positions, segment_ids=segment_ids)


def count_parameters(model: nnx.Module) -> int:
    """The number of scalars in the model's ``nnx.Param`` variables (works on ``nnx.eval_shape`` output)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
