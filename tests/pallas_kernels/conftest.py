"""Fixtures shared by the kernel tests."""

import jax
import pytest


@pytest.fixture(scope="module")
def fast_cpu_compilation():
    """Interpret-mode kernels at test sizes cost XLA compile time, not run time; skipping most XLA
    optimisations makes the Triton-backend kernel files about 1.5x faster. Opt in per module with
    ``pytestmark = pytest.mark.usefixtures("fast_cpu_compilation")``."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)
