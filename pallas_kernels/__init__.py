"""Raw Pallas kernels used by :mod:`jaxsparse.ops`.

Kernels here know tiles, not users: they take arrays in a fixed internal layout plus block
metadata, and import only ``jax`` and ``numpy``. There is no public API promise; call the ops in
``jaxsparse`` instead.

Subpackages:
  common/  version shims and helpers shared by both backends.
  tpu/     Mosaic TPU kernels (scalar prefetch); tested with the TPU interpreter on CPU.
  gpu/     Triton-backend kernels; tested with ``interpret=True`` on CPU.
"""
