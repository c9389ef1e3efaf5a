"""The ``--mesh`` flag: parsing axis sizes, building the mesh, and where the state and batches live."""

from __future__ import annotations

import math

AXES = ("data", "fsdp", "sequence", "tensor", "expert")


def parse_mesh(spec: str) -> dict[str, int] | None:
    """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4}``; ``"none"`` -> None; ``"auto"`` -> ``{}``.

    Raises:
      ValueError: naming ``--mesh`` for unknown axes, repeated axes, sizes that are not positive
        ints (or -1 once), or anything else that does not parse.
    """
    if not isinstance(spec, str):
        raise ValueError(f"--mesh must be a string such as 'data=2,fsdp=4', got {spec!r}")
    text = spec.strip().lower()
    if text in ("none", "off", "single"):
        return None
    if text in ("auto", ""):
        return {}
    sizes: dict[str, int] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in AXES:
            raise ValueError(f"--mesh: expected axis=size with axis in {AXES}, got {part!r} in {spec!r}")
        if name in sizes:
            raise ValueError(f"--mesh: axis {name!r} given twice in {spec!r}")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"--mesh: size of {name!r} must be an int, got {value!r}") from None
        if size == 0 or size < -1:
            raise ValueError(f"--mesh: size of {name!r} must be a positive int or -1, got {size}")
        sizes[name] = size
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"--mesh: at most one axis may be -1, got {spec!r}")
    return sizes


def resolve_mesh_sizes(spec: str, device_count: int, batch_size: int, seq_len: int | None = None) -> dict[str, int] | None:
    """The axis sizes to build for ``spec`` on ``device_count`` devices, checked against the batch.

    ``"auto"`` puts every device on ``data`` (None with one device); when the batch does not divide,
    it takes the largest device count that divides both, so the default always runs.

    Raises:
      ValueError: the sizes do not multiply to the device count, the batch is not a multiple of
        ``data * fsdp`` or ``seq_len`` not a multiple of ``sequence`` (naming ``--mesh`` and
        ``--batch-size`` / ``--seq-len``).
    """
    sizes = parse_mesh(spec)
    if sizes is None:
        return None
    if not sizes:
        if device_count == 1:
            return None
        data = math.gcd(device_count, batch_size)
        return None if data == 1 else {"data": data}
    known = math.prod(size for size in sizes.values() if size != -1)
    if -1 in sizes.values():
        if device_count % known:
            raise ValueError(f"--mesh {spec!r}: the fixed sizes ({known}) do not divide the {device_count} devices")
        sizes = {name: (device_count // known if size == -1 else size) for name, size in sizes.items()}
    total = math.prod(sizes.values())
    if total > device_count:
        raise ValueError(f"--mesh {spec!r} needs {total} devices, only {device_count} available")
    batch_ways = sizes.get("data", 1) * sizes.get("fsdp", 1)
    if batch_size % batch_ways:
        raise ValueError(f"--batch-size {batch_size} must be a multiple of data * fsdp = {batch_ways} (--mesh {spec!r})")
    sequence = sizes.get("sequence", 1)
    if seq_len is not None and seq_len % sequence:
        raise ValueError(f"--seq-len {seq_len} must be a multiple of the sequence axis {sequence} (--mesh {spec!r}): "
                         "attention splits the sequence over it (Ulysses)")
    return sizes


def build_mesh(spec: str, batch_size: int, seq_len: int | None = None):
    """The ``jax.sharding.Mesh`` for ``spec`` (None for a single device), via jaxsparse's ``make_mesh``."""
    import jax  # noqa: PLC0415

    sizes = resolve_mesh_sizes(spec, jax.device_count(), batch_size, seq_len)
    if sizes is None:
        return None
    from jaxsparse.parallel.sharding import make_mesh  # noqa: PLC0415

    devices = jax.devices()[: math.prod(sizes.values())]
    return make_mesh(**sizes, devices=devices)


def describe_mesh(mesh) -> str:
    """``"data=2 x fsdp=4"`` for a mesh, ``"single device"`` for None."""
    if mesh is None:
        return "single device"
    return " x ".join(f"{name}={size}" for name, size in mesh.shape.items() if size > 1) or "1 device"
