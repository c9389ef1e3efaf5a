"""Where a Pallas kernel runs: compiled on its own accelerator, interpreted on CPU, refused elsewhere."""

from __future__ import annotations

import jax


def interpret_on(platform: str, implementation: str) -> bool:
    """True on CPU (run the kernel in interpret mode); False on its own platform.

    Raises:
      NotImplementedError: on the other accelerator (a TPU kernel on a GPU, or the reverse).
    """
    backend = jax.default_backend()
    if backend == "cpu":
        return True
    if backend != platform:
        raise NotImplementedError(
            f"implementation={implementation!r} runs on {platform} (or interpreted on CPU), not on {backend}; "
            f"use implementation='xla' or 'pallas_{backend}'"
        )
    return False


def check_kernel_support(check, implementation: str, *sizes) -> None:
    """Runs a kernel module's ``check(*sizes)`` and turns its ValueError into NotImplementedError."""
    try:
        check(*sizes)
    except ValueError as error:
        raise NotImplementedError(f"implementation={implementation!r}: {error}") from error
