"""``jaxsparse.grouped_matmul``: one matmul per group of consecutive rows (the dropless MoE GEMM)."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np

# implementation name -> module with ``grouped_matmul(x, w, sizes, *, transpose_rhs)`` and
# ``transposed_grouped_matmul(x, dy, sizes)`` (and ``check_support`` for kernels); lazy imports.
_MODULES = {
    "reference": "jaxsparse.ops.grouped_matmul.reference",
    "xla": "jaxsparse.ops.grouped_matmul.xla",
    "pallas_tpu": "jaxsparse.ops.grouped_matmul.pallas_tpu",
    "pallas_gpu": "jaxsparse.ops.grouped_matmul.pallas_gpu",
}
IMPLEMENTATIONS = tuple(_MODULES)


def _check(x, w, group_sizes) -> None:
    if x.ndim != 2:
        raise ValueError(f"x must be [N, M], got shape {x.shape}")
    if w.ndim != 3 or w.shape[1] != x.shape[1]:
        raise ValueError(f"w must be [E, M, F] with M = {x.shape[1]} (x's last dim), got shape {w.shape}")
    if group_sizes.shape != (w.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be integer [E] = [{w.shape[0]}], got {group_sizes.dtype} {group_sizes.shape}")
    if w.dtype != x.dtype:
        raise TypeError(f"w must have x's dtype {x.dtype}, got {w.dtype}")
    if not isinstance(group_sizes, jax.core.Tracer):
        sizes = np.asarray(group_sizes)
        total = int(sizes.sum())
        if total > x.shape[0] or (sizes.size and int(sizes.min()) < 0):
            raise ValueError(f"group_sizes must be >= 0 and sum to at most N = {x.shape[0]}, got sum {total}")


def _module(name: str | None, x, w):
    name = "xla" if name is None else name
    if name not in _MODULES:
        raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {name!r}")
    module = importlib.import_module(_MODULES[name])
    if hasattr(module, "check_support"):
        module.check_support(x.shape[1], w.shape[2], x.dtype)
    return module


def grouped_matmul(x, w, group_sizes, *, implementation: str | None = None):
    """Row groups times their own matrix: ``y[rows of e] = x[rows of e] @ w[e]``.

    The rows of ``x`` are sorted by group: group 0's ``group_sizes[0]`` rows first, then group 1's,
    and so on; rows past ``sum(group_sizes)`` are padding and give 0. This is the dropless MoE
    matmul (MegaBlocks; megablox): tokens sorted by expert, each expert's rows times its weight.
    Differentiable in ``x`` and ``w`` (custom VJP: ``dx`` is the same op against ``w[e].T``, ``dw[e]
    = x[rows of e].T @ dy[rows of e]``), with every implementation's own kernels.

    Args:
      x: ``[N, M]``.
      w: ``[E, M, F]``, x's dtype.
      group_sizes: integer ``[E]``, each >= 0, summing to at most N (checked when concrete).
      implementation: ``"reference"`` (dense: every row against every group, masked; E times the
        FLOPs), ``"xla"`` (a loop over (group, row tile) pairs: one dense matmul's FLOPs plus at
        most a partial tile per group), ``"pallas_tpu"``, ``"pallas_gpu"``, or None (``"xla"``).

    Returns:
      ``[N, F]`` in x's dtype (float32 accumulation).

    Raises:
      ValueError / TypeError: bad ranks, shapes, dtypes or group sizes, naming the argument.
      NotImplementedError: a Pallas implementation that cannot run these sizes here.
    """
    x, w, group_sizes = jnp.asarray(x), jnp.asarray(w), jnp.asarray(group_sizes)
    _check(x, w, group_sizes)
    module = _module(implementation, x, w)
    group_sizes = group_sizes.astype(jnp.int32)

    @jax.custom_vjp
    def run(x, w, group_sizes):
        return module.grouped_matmul(x, w, group_sizes, transpose_rhs=False)

    def forward(x, w, group_sizes):
        return run(x, w, group_sizes), (x, w, group_sizes)

    def backward(residuals, d_y):
        x, w, group_sizes = residuals
        d_y = d_y.astype(x.dtype)
        d_x = module.grouped_matmul(d_y, w, group_sizes, transpose_rhs=True)
        d_w = module.transposed_grouped_matmul(x, d_y, group_sizes)
        return d_x, d_w.astype(w.dtype), None

    run.defvjp(forward, backward)
    return run(x, w, group_sizes)
