"""MoE layers: ``nn.MoE`` (a routed SwiGLU/GeGLU expert layer) and ``nn.BlockFFN``.

Both are thin modules over :mod:`jaxsparse.moe`: a router function, the dispatch
(:func:`~jaxsparse.moe.moe_ffn`, capacity or dropless), and the auxiliary losses, returned when asked.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxsparse import moe
from jaxsparse.nn.parameters import check_positive_int, scaled_normal
from jaxsparse.nn.sparse_ffn import SparseGatedFFN
from jaxsparse.ops.activations import get_activation
from jaxsparse.ops.sparse_ffn import select_active_neurons

ROUTERS = ("top_k", "expert_choice", "sigmoid_bias")


class RouterBias(nnx.Variable):
    """A routing bias that is state, not a parameter: updated by a rule, never by gradients."""


class _Experts(nnx.Module):
    """E gated expert FFNs: ``w_gate``, ``w_up`` ``[E, M, F]`` and ``w_down`` ``[E, F, M]``."""

    def _init_experts(self, model_dim, hidden_dim, num_experts, gated, param_dtype, rngs):
        names_in, names_out = ("experts", "embed", "mlp"), ("experts", "mlp", "embed")
        shape = (num_experts, model_dim, hidden_dim)
        self.w_gate = scaled_normal(rngs, shape, model_dim, param_dtype, names_in) if gated else None
        self.w_up = scaled_normal(rngs, shape, model_dim, param_dtype, names_in)
        self.w_down = scaled_normal(rngs, (num_experts, hidden_dim, model_dim), hidden_dim, param_dtype, names_out)

    def _expert_weights(self, dtype):
        cast = lambda p: None if p is None else p[...].astype(dtype)  # noqa: E731
        return cast(self.w_gate), cast(self.w_up), cast(self.w_down)

    def _route_and_run(self, x, routing, capacity_factor):
        w_gate, w_up, w_down = self._expert_weights(x.dtype)
        return moe.moe_ffn(x, routing, w_up, w_down, w_gate=w_gate, activation=self.activation,
                           capacity_factor=capacity_factor, implementation=self.implementation)


class MoE(_Experts):
    """A routed mixture of gated FFN experts, with optional always-on shared experts.

    ``y = sum over a token's slots of weight * FFN_e(x) (+ shared FFN(x))`` with router
    ``"top_k"`` (softmax, k per token), ``"expert_choice"`` (each expert takes its top tokens) or
    ``"sigmoid_bias"`` (DeepSeek-V3, auxiliary-loss free: call :meth:`update_router_bias` with the
    observed load after each step). The router runs in float32 on ``x @ router``.

    Attributes:
      router: ``nnx.Param`` ``[M, E]`` (logical axes ``("embed", "experts")``).
      w_gate, w_up: ``[E, M, F]``; w_down: ``[E, F, M]`` (``("experts", "embed", "mlp")`` / ...).
      router_bias: :class:`RouterBias` ``[E]`` for ``"sigmoid_bias"``.
      shared: a dense :class:`~jaxsparse.nn.SparseGatedFFN` of width ``num_shared_experts * F``, or None.
    """

    def __init__(self, model_dim: int, hidden_dim: int, num_experts: int, *, router: str = "top_k", k: int = 2,
                 renormalize: str = "sum", capacity_factor: float = 0.0, num_shared_experts: int = 0,
                 activation="silu", router_jitter: float = 0.0, implementation: str | None = None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        """Builds the router, the experts and the shared experts.

        Args:
          model_dim, hidden_dim, num_experts: M, F (per expert), E.
          router: one of :data:`ROUTERS`.
          k: experts per token for ``"top_k"`` and ``"sigmoid_bias"``, in ``[1, E]``.
          renormalize: ``"sum"`` or ``"none"`` for ``"top_k"``.
          capacity_factor: > 0 drops slots over ``ceil(cf * k * N / E)`` per expert; <= 0 is
            dropless; for ``"expert_choice"`` it is the expert capacity factor (must be > 0).
          num_shared_experts: always-on experts (DeepSeek-MoE), as one dense FFN.
          activation: expert activation (``"silu"``: SwiGLU).
          router_jitter: multiplicative jitter of the router input in training (needs an ``rngs``
            ``"jitter"`` stream at call time via ``jitter_key=``).
          implementation: grouped matmul backend for the dropless path.

        Raises:
          ValueError: a non-positive size, unknown router, k outside [1, E], expert choice without a
            positive capacity factor.
        """
        for name, value in (("model_dim", model_dim), ("hidden_dim", hidden_dim), ("num_experts", num_experts)):
            check_positive_int(name, value)
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
        if router != "expert_choice":
            moe.check_k(k, num_experts)
        if router == "expert_choice" and not capacity_factor > 0:
            raise ValueError(f"router='expert_choice' needs capacity_factor > 0, got {capacity_factor!r}")
        get_activation(activation)
        self.router_name, self.k, self.renormalize = router, k, renormalize
        self.capacity_factor, self.activation, self.router_jitter = capacity_factor, activation, router_jitter
        self.implementation = implementation
        self.router = scaled_normal(rngs, (model_dim, num_experts), model_dim, param_dtype, ("embed", "experts"))
        self.router_bias = RouterBias(jnp.zeros(num_experts, jnp.float32)) if router == "sigmoid_bias" else None
        self._init_experts(model_dim, hidden_dim, num_experts, True, param_dtype, rngs)
        self.shared = (SparseGatedFFN(model_dim, hidden_dim * num_shared_experts, rule="none", activation=activation,
                                      param_dtype=param_dtype, rngs=rngs) if num_shared_experts else None)

    def route(self, x, *, jitter_key=None) -> moe.Routing:
        """The routing of tokens ``x [N, M]``."""
        if jitter_key is not None and self.router_jitter:
            x = moe.jitter(x, jitter_key, self.router_jitter)
        logits = jnp.matmul(x.astype(jnp.float32), self.router[...].astype(jnp.float32))
        if self.router_name == "top_k":
            return moe.top_k_router(logits, self.k, renormalize=self.renormalize)
        if self.router_name == "expert_choice":
            return moe.expert_choice_router(logits, self.capacity_factor)
        return moe.sigmoid_bias_router(logits, self.router_bias[...], self.k)

    def __call__(self, x, *, return_aux: bool = False, jitter_key=None):
        """Routes and runs the experts.

        Args:
          x: ``[..., M]``.
          return_aux: also return a dict with ``"load_balance"`` and ``"z_loss"`` (unweighted
            scalars), ``"stats"`` (:class:`~jaxsparse.moe.DispatchStats`) and ``"routing"``.
          jitter_key: a PRNG key for router jitter in training.

        Returns:
          ``y [..., M]`` or ``(y, aux)``.
        """
        tokens = x.reshape(-1, x.shape[-1])
        routing = self.route(tokens, jitter_key=jitter_key)
        capacity_factor = 0.0 if self.router_name == "expert_choice" else self.capacity_factor
        y, stats = self._route_and_run(tokens, routing, capacity_factor)
        if self.shared is not None:
            y = y + self.shared(tokens)
        y = y.reshape(x.shape)
        if not return_aux:
            return y
        aux = {"load_balance": moe.load_balance_loss(routing), "z_loss": moe.router_z_loss(routing.router_logits),
               "stats": stats, "routing": routing}
        return y, aux

    def update_router_bias(self, expert_load, rate: float = 1e-3) -> None:
        """DeepSeek-V3's bias step from the observed load ``[E]`` (``"sigmoid_bias"`` only)."""
        if self.router_bias is None:
            raise ValueError(f"update_router_bias is for router='sigmoid_bias', this layer has router={self.router_name!r}")
        self.router_bias[...] = moe.update_router_bias(self.router_bias[...], expert_load, rate)


class BlockFFN(_Experts):
    """BlockFFN (Song et al. 2025): ReLU + RMSNorm routing over small experts, a variable number per
    token, trained with activation-locality and chunk-sparsification losses for chunk-level sparsity.

    Training runs the dropless dispatch over the active (token, expert) pairs only. :meth:`decode`
    serves a chunk of L tokens (a speculative-decoding chunk or a batch of requests) by running
    only the union of the experts any of them uses.

    Attributes:
      router: ``[M, E]``; router_gain: ``[E]`` (the RMSNorm gain, init 1);
      w_gate (if gated), w_up: ``[E, M, F]``; w_down: ``[E, F, M]``.
    """

    def __init__(self, model_dim: int, hidden_dim: int, num_experts: int, *, gated: bool = True,
                 activation="silu", chunk: int = 64, implementation: str | None = None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        """Args: M, F per expert, E; ``gated`` SwiGLU experts (else ``act(x W_up) W_down``); ``chunk``
        the chunk length of the chunk-sparsification loss (64 in the paper)."""
        for name, value in (("model_dim", model_dim), ("hidden_dim", hidden_dim), ("num_experts", num_experts),
                            ("chunk", chunk)):
            check_positive_int(name, value)
        get_activation(activation)
        self.activation, self.chunk, self.implementation = activation, chunk, implementation
        self.router = scaled_normal(rngs, (model_dim, num_experts), model_dim, param_dtype, ("embed", "experts"))
        self.router_gain = nnx.Param(jnp.ones(num_experts, param_dtype))
        self._init_experts(model_dim, hidden_dim, num_experts, gated, param_dtype, rngs)

    def route(self, x) -> moe.Routing:
        """The BlockFFN routing of tokens ``x [N, M]``."""
        logits = jnp.matmul(x.astype(jnp.float32), self.router[...].astype(jnp.float32))
        return moe.blockffn_router(logits, gain=self.router_gain[...])

    def __call__(self, x, *, segment_ids=None, return_aux: bool = False):
        """Training / prefill.

        Args:
          x: ``[B, T, M]``.
          segment_ids: optional ``[B, T]`` document ids for the locality loss.
          return_aux: also return ``"locality"`` and ``"chunk_sparsity"`` losses (unweighted; paper
            weights 2e-3 and 5e-2 with :class:`~jaxsparse.moe.AdaptiveLossWeight`), ``"stats"``,
            ``"routing"`` and ``"activity"`` (bool ``[B, T, E]`` for TLS/CLS metrics).
        """
        if x.ndim != 3:
            raise ValueError(f"x must be [B, T, M], got shape {x.shape}")
        batch, length, width = x.shape
        tokens = x.reshape(-1, width)
        routing = self.route(tokens)
        y, stats = self._route_and_run(tokens, routing, 0.0)
        y = y.reshape(x.shape)
        if not return_aux:
            return y
        experts = routing.num_experts
        aux = {
            "locality": moe.activation_locality_loss(routing.router_logits.reshape(batch, length, experts),
                                                     segment_ids=segment_ids),
            "chunk_sparsity": moe.chunk_sparsification_loss(routing.router_probs.reshape(batch, length, experts),
                                                            self.chunk),
            "stats": stats, "routing": routing, "activity": routing.active().reshape(batch, length, experts),
        }
        return y, aux

    def decode(self, x, *, max_experts: int, chunk: int | None = None):
        """Runs a chunk of tokens on the union of their active experts only.

        Args:
          x: ``[N, M]``; consecutive groups of ``chunk`` tokens (default: all N) share one union.
          max_experts: static capacity of a union, in ``[1, E]``; a larger union keeps the experts
            of largest weight and reports the rest in ``ActiveNeurons.dropped``.

        Returns:
          ``(y [N, M], ActiveNeurons)`` over experts (indices ``[C, max_experts]``).
        """
        chunk = x.shape[0] if chunk is None else chunk
        routing = self.route(x)
        weights = routing.dense_weights()  # [N, E]
        union = select_active_neurons(weights, max_experts, chunk=chunk)
        groups = union.num_groups
        w_gate, w_up, w_down = (None if w is None else w[union.indices] for w in self._expert_weights(x.dtype))
        xs = x.reshape(groups, chunk, -1)
        gate = jnp.take_along_axis(weights.reshape(groups, chunk, -1), union.indices[:, None, :], axis=-1)
        gate = jnp.where(union.valid()[:, None, :], gate, 0.0)  # [C, L, max_experts]
        act = get_activation(self.activation)
        einsum = lambda spec, a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)  # noqa: E731
        up = einsum("clm,cemf->clef", xs, w_up)
        hidden = act(up) if w_gate is None else act(einsum("clm,cemf->clef", xs, w_gate)) * up
        out = einsum("clef,cefm->clem", hidden.astype(x.dtype), w_down)
        y = jnp.sum(out * gate[..., None], axis=2)
        return y.reshape(x.shape).astype(x.dtype), union
