"""Argument checks shared by the GPU and TPU sparse FFN kernels (same contract on both)."""

from __future__ import annotations

import jax.numpy as jnp


def check_sparse_ffn_inputs(x, w_up, w_down, indices, counts, w_gate, gate, check_support) -> tuple[int, int, int, int, int]:
    """Validates the kernel contract's shapes and dtypes; returns ``(C, L, M, F, k_max)``.

    Contract: x ``[C, L, M]``; w_up, w_down and w_gate (or None) ``[F, M]`` in x's dtype; indices
    int32 ``[C, k_max]``; counts int32 ``[C]``; gate (or None; exactly one of w_gate and gate)
    float32 ``[C, L, k_max]``. ``check_support(M, dtype)`` is the kernel's own size and dtype check,
    run once x's rank is known.

    Raises:
      ValueError: naming the argument, the expected and the actual shape or dtype.
    """
    if x.ndim != 3:
        raise ValueError(f"sparse_ffn: x must be [C, L, M] (rank 3), got shape {x.shape}")
    groups, length, model_dim = x.shape
    check_support(model_dim, x.dtype)
    if (w_gate is None) == (gate is None):
        raise ValueError("sparse_ffn: pass exactly one of w_gate and gate")
    num_neurons = w_up.shape[0] if w_up.ndim == 2 else -1
    for name, weight in (("w_up", w_up), ("w_down", w_down), ("w_gate", w_gate)):
        if weight is None:
            continue
        if weight.shape != (num_neurons, model_dim):
            raise ValueError(f"sparse_ffn: {name} must be [F, M] = [{num_neurons}, {model_dim}] (F from w_up, "
                             f"M from x), got shape {weight.shape}")
        if weight.dtype != x.dtype:
            raise ValueError(f"sparse_ffn: {name} must have x's dtype {x.dtype}, got {weight.dtype}")
    if indices.ndim != 2 or indices.shape[0] != groups or indices.dtype != jnp.int32:
        raise ValueError(f"sparse_ffn: indices must be int32 [C, k_max] with C = {groups}, got {indices.dtype} {indices.shape}")
    if counts.shape != (groups,) or counts.dtype != jnp.int32:
        raise ValueError(f"sparse_ffn: counts must be int32 [{groups}], got {counts.dtype} {counts.shape}")
    k_max = indices.shape[1]
    if gate is not None and (gate.shape != (groups, length, k_max) or gate.dtype != jnp.float32):
        raise ValueError(f"sparse_ffn: gate must be float32 [{groups}, {length}, {k_max}], got {gate.dtype} {gate.shape}")
    return groups, length, model_dim, num_neurons, k_max
