"""Version-specific Pallas names, kept in one place.

Pallas moves names between releases (``pltpu.ANY`` became ``pl.ANY``, ``pltpu.DeviceIdType`` became
``pl.DeviceIdType``, ...). Kernels import the names they need from here so that a JAX upgrade is a
one-file change. Checked against jax 0.10.2 (CPU) and 0.11 (H100).
"""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

try:  # GPU Triton backend helpers (load/store with masks).
    from jax.experimental.pallas import triton as pl_triton
except ImportError:  # pragma: no cover - very old or trimmed installs
    pl_triton = None

ANY = getattr(pl, "ANY", None) or getattr(pltpu, "ANY")
PrefetchScalarGridSpec = pltpu.PrefetchScalarGridSpec
SMEM = getattr(pltpu, "SMEM", None)
VMEM = getattr(pltpu, "VMEM", None)
TPUInterpretParams = pltpu.InterpretParams
TPUCompilerParams = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
SemaphoreType = pltpu.SemaphoreType
make_async_copy = pltpu.make_async_copy


def tpu_interpret_params(detect_races: bool = False):
    """The ``interpret=`` value that runs a Mosaic TPU kernel on CPU."""
    return TPUInterpretParams(detect_races=detect_races)


def tpu_interpret_value(interpret):
    """A TPU kernel's ``interpret=`` argument as ``pallas_call`` wants it: True becomes default
    interpreter parameters; False and explicit parameters pass through."""
    return tpu_interpret_params() if interpret is True else interpret


# GPU (Triton backend) names.
TritonCompilerParams = None if pl_triton is None else pl_triton.CompilerParams


def tpu_interpret_races_found() -> bool | None:
    """Whether the last TPU-interpreted kernel run with ``detect_races=True`` found a data race.

    Reads the interpreter's private race-detection state (jax 0.10: ``races.races_found`` in
    ``jax._src.pallas.mosaic.interpret.interpret_pallas_call``); None where this JAX has none.
    """
    try:
        from jax._src.pallas.mosaic.interpret import interpret_pallas_call
    except ImportError:  # pragma: no cover - other JAX layouts
        return None
    races = getattr(interpret_pallas_call, "races", None)
    return None if races is None else bool(races.races_found)


def tpu_lowering_without_tpu(chip_version: str = "v5e"):
    """Context manager that lets ``jax.export(..., platforms=["tpu"])`` lower Mosaic kernels on CPU.

    Mosaic lowering asks for the current device's TPU generation; on a machine without a TPU the
    device kind is "cpu" (or the GPU's name). This registers that kind as ``chip_version`` in the
    (private; jax 0.10 and 0.11) ``tpu_info.registry`` for the duration, so a test can check that a
    kernel lowers to Mosaic (no unsupported primitive) without TPU hardware. The Mosaic compiler
    itself does not run. The chip's info comes from ``get_tpu_info_for_chip`` (jax 0.11 re-exports
    ``tpu_info`` from ``jax._src.tpu_info`` without the private ``_get_tpu_info_impl`` of jax 0.10).
    """
    import contextlib

    from jax._src.pallas.mosaic import tpu_info

    @contextlib.contextmanager
    def registered():
        info = tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion(chip_version), 1)
        kind = jax.devices()[0].device_kind  # "cpu"; on a GPU machine the GPU's name
        tpu_info.registry[kind] = lambda: info
        try:
            yield
        finally:
            del tpu_info.registry[kind]

    return registered()


def triton_lowering_without_gpu(device_kind: str = "NVIDIA H100 80GB HBM3"):
    """Context manager that lets ``.lower(lowering_platforms=("cuda",))`` run the Pallas Triton
    lowering on a machine without a GPU, for a GPU named ``device_kind``.

    jax 0.10 lowers Triton kernels without asking for a device. jax 0.11 looks the current device's
    name up in a list of GPUs it knows and, on CPU, raises "No supported GPU devices found, please
    specify an abstract GPU device"; its remedy is an abstract mesh whose device is that GPU, which
    this sets for the duration. Nothing is compiled.
    """
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="cuda")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("device",), abstract_device=device))
