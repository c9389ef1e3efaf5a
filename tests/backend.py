"""What the tests' backend can run: compiled or interpreted GPU kernels, and the TPU kernels.

CI and the development machines have no accelerator, so every Pallas kernel is interpreted there. On
a machine with a GPU (``make test-gpu``, which sets ``JAX_PLATFORMS=cuda,cpu``) the GPU kernels run
compiled, and the TPU kernels cannot run at all: ``implementation="pallas_tpu"`` raises
``NotImplementedError`` on a GPU (``jaxsparse.ops.platform.interpret_on``), so their tests are
skipped there. Tests that count work with host callbacks stay in interpret mode (the Triton lowering
has no ``debug_callback``); they need the CPU platform listed.
"""

import jax
import pytest

GPU_INTERPRET = jax.default_backend() != "gpu"

# Compiled, float32 tile products run in TF32 (10-bit mantissa, unit roundoff 2^-11; XLA's default
# precision for float32 matmuls on the same GPUs). Interpret mode multiplies in full float32.
# Largest errors seen on an H100 (2026-11-23): 1.3e-3 absolute for grouped matmul outputs of
# magnitude ~3, 7e-4 for decode attention, 2e-4 for block-sparse attention.
TF32_TOLERANCE = 3e-3


def float32_tolerance(interpreted: float) -> float:
    """A float32 tolerance: ``interpreted`` in interpret mode, at least TF32's on a GPU."""
    return interpreted if GPU_INTERPRET else max(interpreted, TF32_TOLERANCE)


# The TPU kernels run on a TPU or in the TPU interpreter on CPU; on a GPU they refuse to run.
needs_tpu_or_cpu = pytest.mark.skipif(
    jax.default_backend() == "gpu", reason="pallas_tpu runs on a TPU or interpreted on CPU, not on a GPU")
