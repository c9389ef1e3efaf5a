"""``jaxsparse.sparse_ffn``: an FFN that reads only the weights of its active neurons (decoding)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxsparse.ops.activations import get_activation
from jaxsparse.ops.sparse_ffn.active_set import ActiveNeurons, select_active_neurons
from jaxsparse.ops.sparse_ffn.reference import reference_sparse_ffn
from jaxsparse.ops.sparse_ffn.xla import xla_sparse_ffn

# implementation name -> module with ``run`` (the internal contract) and ``check_support(M, dtype)``;
# imported lazily so that CPU users never load Triton.
_KERNELS = {
    "pallas_tpu": "jaxsparse.ops.sparse_ffn.pallas_tpu",
    "pallas_gpu": "jaxsparse.ops.sparse_ffn.pallas_gpu",
}
IMPLEMENTATIONS = ("reference", "xla") + tuple(_KERNELS)
OVERFLOW_POLICIES = ("keep_largest", "dense")


def _implementation(name: str | None, model_dim: int, dtype) -> Callable:
    if name is None:
        # The Pallas kernels are validated in interpret mode only; they become the default on their
        # platform once measured on hardware.
        name = "xla"
    if name == "reference":
        return reference_sparse_ffn
    if name == "xla":
        return xla_sparse_ffn
    if name not in _KERNELS:
        raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {name!r}")
    module = importlib.import_module(_KERNELS[name])
    module.check_support(model_dim, dtype)
    return module.run


def _check_weights(x, w_up, w_down, w_gate) -> None:
    if x.ndim < 1:
        raise ValueError(f"x must be [..., M], got a scalar")
    model_dim = x.shape[-1]
    for name, weight in (("w_up", w_up), ("w_down", w_down), ("w_gate", w_gate)):
        if weight is None:
            continue
        if weight.ndim != 2 or weight.shape[1] != model_dim or weight.shape[0] != w_up.shape[0]:
            raise ValueError(f"{name} must be [F, M] = [{w_up.shape[0]}, {model_dim}] (neuron-major), got {weight.shape}")
        if weight.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {weight.dtype}")


def sparse_ffn(x, w_up, w_down, active: ActiveNeurons, *, w_gate=None, gate=None, activation="gelu",
               implementation: str | None = None):
    """Gated FFN over the listed neurons only: ``y = W_down[S]^T (a_S * (x W_up[S]^T))``.

    For each token, ``S`` is its group's active list (``active.indices[g, :active.counts[g]]``) and
    the gate coefficients ``a_S`` are either computed here, ``activation(x W_gate[S]^T)``, or given
    (``gate``: e.g. the statistical top-k activations of a Spark FFN predictor, or CATS-thresholded
    SiLU activations, computed densely beforehand). Groups are consecutive tokens: with C groups and
    N tokens each group of ``L = N / C`` tokens shares one set (``L = 1``: per-token sets; ``L > 1``:
    the chunk form, one union set for a batch of decode requests or a speculative-decoding
    verification chunk, which is where chunk-level sparsity pays).

    Weights are neuron-major ``[F, M]`` (row n holds neuron n's weights) so that gathering a neuron
    reads one contiguous row.

    Args:
      x: ``[..., M]``, N tokens in all; N must be a multiple of C.
      w_up: ``[F, M]``, x's dtype.
      w_down: ``[F, M]``, x's dtype.
      active: :class:`ActiveNeurons` with C groups (from :func:`select_active_neurons` or your own
        predictor); listed entries must be distinct.
      w_gate: ``[F, M]`` or None.
      gate: ``[..., k_max]`` (x's leading shape) gate coefficients of each token for its group's
        listed neurons, or None. Exactly one of ``w_gate`` and ``gate``.
      activation: name in :data:`~jaxsparse.ops.activations.ACTIVATIONS` or a callable, applied to
        ``x W_gate[S]^T`` (unused with ``gate``).
      implementation: ``"reference"`` (dense, the spec), ``"xla"`` (gathers ``k_max`` rows per group),
        ``"pallas_tpu"`` (DMAs the listed rows, skips blocks past the count), ``"pallas_gpu"``
        (Triton, split-K over the list), or None (``"xla"``). Pallas kernels run forward; their
        gradients come from the ``xla`` implementation's VJP.

    Returns:
      ``[..., M]`` in x's dtype.

    Raises:
      ValueError / TypeError: bad shapes or dtypes, both or neither of ``w_gate`` and ``gate``.
      NotImplementedError: a Pallas implementation that cannot run these sizes here.
    """
    x, w_up, w_down = jnp.asarray(x), jnp.asarray(w_up), jnp.asarray(w_down)
    if (w_gate is None) == (gate is None):
        raise ValueError("give exactly one of w_gate (gate computed here) and gate (coefficients given)")
    _check_weights(x, w_up, w_down, w_gate)
    groups, k_max = active.indices.shape
    tokens = x.size // x.shape[-1]
    if tokens % groups:
        raise ValueError(f"x has {tokens} tokens, not a multiple of the {groups} groups of active")
    x_groups = x.reshape(groups, tokens // groups, x.shape[-1])
    if gate is not None:
        gate = jnp.asarray(gate)
        if gate.shape != x.shape[:-1] + (k_max,):
            raise ValueError(f"gate must be {x.shape[:-1] + (k_max,)} (x's tokens by k_max), got {gate.shape}")
        gate = gate.reshape(groups, tokens // groups, k_max)
    run = _implementation(implementation, x.shape[-1], x.dtype)
    y = run(x_groups, w_up, w_down, active.indices, active.counts, w_gate=w_gate, gate=gate,
            activation=get_activation(activation))
    return y.reshape(x.shape)


def sparse_ffn_decode(x, gate_activations, w_up, w_down, *, k_max: int, chunk: int = 1,
                      overflow: str = "keep_largest", implementation: str | None = None):
    """Decode an FFN whose gate activations are known: select, gather, and apply up/down to the active.

    ``y = W_down^T (a * (x W_up^T))`` where ``a`` (``gate_activations``) is already sparse (statistical
    top-k, CATS, ReLU...): only neurons with ``a != 0`` matter, so only their rows of ``W_up`` and
    ``W_down`` are read. This is how SparkFFN (``a`` from its low-rank predictor) and a CATS-style
    gated FFN (``a`` from the full gate projection) decode.

    Overflow policy, when a group has more than ``k_max`` active neurons:
      - ``"keep_largest"``: keep the ``k_max`` of largest ``|a|`` (over the chunk's tokens); the output
        is then approximate for that group, and the count is in ``active.dropped``.
      - ``"dense"``: if any group overflows, compute the whole batch densely (exact; ``lax.cond``, so
        the dense cost is paid only on those steps). ``active.dropped`` still reports the overflow.

    Args:
      x: ``[N, M]``.
      gate_activations: ``[N, F]``, zero for inactive neurons.
      w_up, w_down: ``[F, M]`` neuron-major, x's dtype.
      k_max: static capacity of each group's list, in ``[1, F]``.
      chunk: tokens per group (see :func:`select_active_neurons`).
      overflow: ``"keep_largest"`` or ``"dense"``.
      implementation: as in :func:`sparse_ffn`.

    Returns:
      ``(y [N, M] in x's dtype, ActiveNeurons)``.
    """
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    x, gate_activations = jnp.asarray(x), jnp.asarray(gate_activations)
    if x.ndim != 2 or gate_activations.shape != (x.shape[0], w_up.shape[0]):
        raise ValueError(
            f"x must be [N, M] and gate_activations [N, F]; got {x.shape} and {gate_activations.shape} with F={w_up.shape[0]}"
        )
    active = select_active_neurons(gate_activations, k_max, chunk=chunk)
    per_group = gate_activations.reshape(active.num_groups, chunk, -1)
    gate = jnp.take_along_axis(per_group, active.indices[:, None, :], axis=-1).reshape(x.shape[0], k_max)

    def sparse():
        return sparse_ffn(x, w_up, w_down, active, gate=gate, implementation=implementation)

    if overflow == "keep_largest":
        return sparse(), active

    def dense():
        up = jnp.matmul(x, w_up.T, preferred_element_type=jnp.float32)
        hidden = (gate_activations.astype(jnp.float32) * up).astype(x.dtype)
        return jnp.matmul(hidden, w_down, preferred_element_type=jnp.float32).astype(x.dtype)

    return lax.cond(jnp.any(active.dropped > 0), dense, sparse), active
