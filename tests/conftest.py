"""Test-wide set-up: 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after the flag)
from hypothesis import settings  # noqa: E402

# Keep hypothesis fast and deterministic in CI: jit compilation dominates each example.
settings.register_profile("jaxsparse", max_examples=12, deadline=None, derandomize=True, print_blob=True)
settings.load_profile("jaxsparse")

# On a GPU, XLA multiplies float32 matrices in TF32 by default (10-bit mantissa); the tests compare
# float32 results with references at float32 tolerances, as on CPU, so they ask for full float32.
# Pallas kernels choose their own dot precision (see tests/backend.py for their tolerances).
if jax.default_backend() == "gpu":
    jax.config.update("jax_default_matmul_precision", "highest")


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"
