"""How the Pallas sparse FFN kernels are called: sizes checked, interpret mode, gradients.

The kernels compute the forward pass only (the op serves decoding). Under differentiation the
backward pass is the VJP of the ``xla`` implementation, so every implementation has gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import jax
import jax.numpy as jnp

from jaxsparse.ops.platform import check_kernel_support, interpret_on
from jaxsparse.ops.sparse_ffn.xla import xla_sparse_ffn

_SUPPORTED_DTYPES = ("float32", "bfloat16")


def check_support(kernel: ModuleType, platform: str, implementation: str, model_dim: int, dtype) -> None:
    """Raises unless ``kernel`` can run these sizes on this machine.

    Raises:
      NotImplementedError: on the other accelerator, or for a size or dtype the kernel does not tile.
    """
    interpret_on(platform, implementation)
    if jnp.dtype(dtype).name not in _SUPPORTED_DTYPES:
        raise NotImplementedError(f"implementation={implementation!r} supports dtypes {_SUPPORTED_DTYPES}, got {dtype}")
    check_kernel_support(kernel.check_support, implementation, model_dim, dtype)


def differentiable_kernel(kernel: ModuleType, platform: str, implementation: str) -> Callable:
    """The kernel's forward with the ``xla`` implementation's VJP, in the ops' internal contract."""

    def run(x, w_up, w_down, indices, counts, *, w_gate, gate, activation):
        def xla(x, w_up, w_down, w_gate, gate, indices, counts):
            return xla_sparse_ffn(x, w_up, w_down, indices, counts, w_gate=w_gate, gate=gate, activation=activation)

        @jax.custom_vjp
        def forward(x, w_up, w_down, w_gate, gate, indices, counts):
            return kernel.sparse_ffn_forward(
                x, w_up, w_down, indices, counts, w_gate=w_gate,
                gate=None if gate is None else gate.astype(jnp.float32),
                activation=activation, interpret=interpret_on(platform, implementation),
            )

        def forward_with_residuals(*operands):
            return forward(*operands), operands

        def backward(operands, d_y):
            *floats, indices, counts = operands
            gradients = jax.vjp(lambda *f: xla(*f, indices, counts), *floats)[1](d_y)
            return (*gradients, None, None)

        forward.defvjp(forward_with_residuals, backward)
        return forward(x, w_up, w_down, w_gate, gate, indices, counts)

    return run
