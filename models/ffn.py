"""The feed-forward layer of a block, one ``jaxsparse.nn`` layer per FFN kind, run with one result shape.

| kind | layer | activity (for TLS / CLS) | auxiliary losses |
|---|---|---|---|
| ``"dense"`` | ``nn.SparseGatedFFN(rule="none")`` | gate entries != 0 ``[B, T, F]`` | none |
| ``"spark"`` | ``nn.SparkFFN`` | gate entries != 0 ``[B, T, F']`` | none |
| ``"moe"`` | ``nn.MoE(router="top_k")``, dropless | routed experts ``[B, T, E]`` | load_balance, z_loss |
| ``"blockffn"`` | ``nn.BlockFFN`` | active experts ``[B, T, E]`` | locality, chunk_sparsity |

Every kind is a gated FFN with ``config.activation``. Degenerate cases equal the dense layer with
copied weights: Spark at ``ffn_sparsity=0`` is ``SparseGatedFFN`` with ``w_gate = [K1^T, 0]``,
``w_up = [0, K2^T]`` (zero columns where the other half of ``x`` sits) and ``w_down = V``; an MoE
with one expert and k = 1 is ``SparseGatedFFN`` with ``w_gate = W_gate[0]^T``, ``w_up = W_up[0]^T``,
``w_down = W_down[0]``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse import moe, nn
from models.config import ModelConfig


def make_ffn(config: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """The FFN layer of one block for ``config.ffn`` (see the module table)."""
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    width = config.model_dim
    if config.ffn == "dense":
        return nn.SparseGatedFFN(width, config.ffn_dim, activation=config.activation, rule="none", dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
    if config.ffn == "spark":
        return nn.SparkFFN(width, config.ffn_dim, predictor_dim=config.predictor_dim, sparsity=config.spark_sparsity,
                           activation=config.activation, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if config.ffn == "moe":
        return nn.MoE(width, config.expert_dim, config.num_experts, router="top_k", k=config.experts_per_token,
                      activation=config.activation, param_dtype=param_dtype, rngs=rngs)
    return nn.BlockFFN(width, config.expert_dim, config.num_experts, activation=config.activation,
                       param_dtype=param_dtype, rngs=rngs)


DECODE_HEADROOM = 1.2  # Spark decode capacity: k_max = 1.2 x the expected active neurons of a token


def decode_ffn(layer: nnx.Module, x):
    """Runs a layer of :func:`make_ffn` on the new tokens of a decode step, ``x [B, Tq, M]``.

    A sparse Spark FFN reads only its active rows (:meth:`jaxsparse.nn.SparkFFN.decode`, one active
    set per token, ``k_max = 1.2 (1 - sparsity) F'``, and ``overflow="dense"``: a step where a token
    has more active neurons runs the dense FFN, so the result always equals the forward). The other
    kinds, and Spark at sparsity 0, run their forward.

    Returns:
      ``y [B, Tq, M]``.
    """
    if isinstance(layer, nn.SparkFFN) and layer.sparsity > 0:
        width = x.shape[-1]
        k_max = min(layer.hidden_dim, math.ceil(DECODE_HEADROOM * (1 - layer.sparsity) * layer.hidden_dim))
        y, _ = layer.decode(x.reshape(-1, width), k_max=k_max, overflow="dense")
        return y.reshape(x.shape).astype(x.dtype)
    return layer(x)


def apply_ffn(layer: nnx.Module, x, *, segment_ids=None):
    """Runs a layer of :func:`make_ffn` on ``x [B, T, M]``.

    Args:
      layer: the FFN layer.
      x: ``[B, T, M]`` in the computation dtype.
      segment_ids: optional int ``[B, T]`` document ids (BlockFFN's locality loss skips pairs of
        neighbours in different documents).

    Returns:
      ``(y [B, T, M], activity bool [B, T, F or E], aux)``: ``aux`` maps each unweighted auxiliary
      loss of the kind (float32 scalars) and, for the MoE kinds, ``"expert_load_imbalance"`` (the
      coefficient of variation of the expert load, 0 when balanced) to its value.
    """
    batch, length, _ = x.shape
    if isinstance(layer, (nn.SparseGatedFFN, nn.SparkFFN)):
        y, activity = layer(x, return_activity=True)
        return y, activity, {}
    if isinstance(layer, nn.BlockFFN):
        y, aux = layer(x, segment_ids=segment_ids, return_aux=True)
        losses = {"locality": aux["locality"], "chunk_sparsity": aux["chunk_sparsity"]}
        activity = aux["activity"]
    else:
        y, aux = layer(x, return_aux=True)
        losses = {"load_balance": aux["load_balance"], "z_loss": aux["z_loss"]}
        activity = aux["routing"].active().reshape(batch, length, -1)
    imbalance, _ = moe.load_imbalance(moe.expert_load(aux["routing"]))
    losses["expert_load_imbalance"] = jax.lax.stop_gradient(imbalance)
    return y.astype(x.dtype), activity, losses
