"""Whether the GPU (Triton-backend) kernel tests compile for a real GPU or run in interpret mode.

CI and the development machines have no accelerator, so the kernels are interpreted there. On a
machine with a GPU the same files run compiled (``make test-gpu``, which sets
``JAX_PLATFORMS=cuda,cpu``). Tests that count work with host callbacks stay in interpret mode (the
Triton lowering has no ``debug_callback``); they need the CPU platform listed.
"""

import jax

GPU_INTERPRET = jax.default_backend() != "gpu"

# Compiled, float32 tile products run in TF32 (10-bit mantissa, unit roundoff 2^-11; XLA's default
# precision for float32 matmuls on the same GPUs). Interpret mode multiplies in full float32.
# Largest errors seen on an H100 (2026-11-23): 1.3e-3 absolute for grouped matmul outputs of
# magnitude ~3, 7e-4 for decode attention, 2e-4 for block-sparse attention.
TF32_TOLERANCE = 3e-3


def float32_tolerance(interpreted: float) -> float:
    """A float32 tolerance: ``interpreted`` in interpret mode, at least TF32's on a GPU."""
    return interpreted if GPU_INTERPRET else max(interpreted, TF32_TOLERANCE)
