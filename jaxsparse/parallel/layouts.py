"""How a sequence is split over the devices of a ring: which global positions each shard holds.

Sequence parallelism shards the token axis over ``n`` devices. Under a causal mask the naive split
(shard ``i`` holds the ``i``-th contiguous chunk) is unbalanced: the last shard attends to every key,
the first to almost none. Two load-balanced layouts fix that by giving every shard early and late
positions:

* ``"contiguous"``: shard ``i`` holds positions ``[i*c, (i+1)*c)`` with ``c = T / n``.
* ``"zigzag"``: the sequence is cut into ``2n`` equal chunks; shard ``i`` holds chunk ``i`` followed by
  chunk ``2n - 1 - i`` (Ring Flash Attention's zigzag; Llama 3's context parallelism).
* ``"striped"``: shard ``i`` holds positions ``i, i + n, i + 2n, ...`` (Striped Attention, Brandon
  et al. 2023).

A model permutes its token axis once at the input (:meth:`SequenceLayout.permute`), runs every
sequence-parallel layer on the permuted order (masks stay defined on natural positions; the ring
attention maps them), and unpermutes once at the output (:meth:`SequenceLayout.unpermute`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

KINDS = ("contiguous", "zigzag", "striped")
_CHUNKS_PER_SHARD = {"contiguous": 1, "zigzag": 2, "striped": 1}


@dataclasses.dataclass(frozen=True, kw_only=True)
class SequenceLayout:
    """The assignment of global token positions to the ``num_shards`` shards of a ring.

    Attributes:
      kind: ``"contiguous"``, ``"zigzag"`` or ``"striped"`` (see the module docstring).
      num_shards: the ring size ``n`` (the size of the mesh axis that shards the sequence).

    Raises:
      ValueError: an unknown ``kind`` or a ``num_shards`` that is not a positive int.
    """

    kind: str
    num_shards: int

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"SequenceLayout.kind must be one of {KINDS}, got {self.kind!r}")
        if isinstance(self.num_shards, bool) or not isinstance(self.num_shards, int) or self.num_shards <= 0:
            raise ValueError(f"SequenceLayout.num_shards must be a positive int, got {self.num_shards!r}")

    @property
    def chunks_per_shard(self) -> int:
        """Contiguous chunks each shard holds: 1 (contiguous), 2 (zigzag); striped counts as 1."""
        return _CHUNKS_PER_SHARD[self.kind]

    def check_seq_len(self, seq_len: int) -> None:
        """Raises ValueError unless ``seq_len`` splits into whole shards (and chunks) of this layout."""
        divisor = self.num_shards * self.chunks_per_shard
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0 or seq_len % divisor:
            raise ValueError(
                f"seq_len={seq_len!r} must be a positive multiple of num_shards x chunks_per_shard = "
                f"{self.num_shards} x {self.chunks_per_shard} = {divisor} for the {self.kind!r} layout"
            )

    def shard_len(self, seq_len: int) -> int:
        """Tokens per shard, ``c = T / n``."""
        self.check_seq_len(seq_len)
        return seq_len // self.num_shards

    def run_len(self, seq_len: int) -> int:
        """Length of the runs of consecutive positions a shard is made of, each starting at a multiple
        of it: ``T / n`` (contiguous), ``T / 2n`` (zigzag), 1 (striped)."""
        self.check_seq_len(seq_len)
        if self.kind == "striped":
            return 1
        return seq_len // (self.num_shards * self.chunks_per_shard)

    def positions(self, seq_len: int) -> np.ndarray:
        """int32 ``[n, T / n]``: the global positions shard ``i`` holds, in the order it stores them.

        Raises:
          ValueError: ``seq_len`` not a multiple of ``num_shards x chunks_per_shard``.
        """
        self.check_seq_len(seq_len)
        n = self.num_shards
        natural = np.arange(seq_len, dtype=np.int32)
        if self.kind == "contiguous":
            return natural.reshape(n, seq_len // n)
        if self.kind == "striped":
            return np.ascontiguousarray(natural.reshape(seq_len // n, n).T)
        chunks = natural.reshape(2 * n, seq_len // (2 * n))
        return np.concatenate([chunks[:n], chunks[n:][::-1]], axis=1)

    def order(self, seq_len: int) -> np.ndarray:
        """int32 ``[T]``: the natural position stored at each slot of the layout order (the shards
        concatenated), ``positions(seq_len).reshape(-1)``."""
        return self.positions(seq_len).reshape(-1)

    def permute(self, x, axis: int = 1):
        """Natural order -> layout order along ``axis`` (``x[..., order, ...]``; numpy or jax arrays).

        Raises:
          ValueError: ``x.shape[axis]`` not a multiple of ``num_shards x chunks_per_shard``.
        """
        axis = _normalize_axis(x, axis)
        return x[(slice(None),) * axis + (self.order(x.shape[axis]),)]

    def unpermute(self, x, axis: int = 1):
        """Layout order -> natural order along ``axis``; the inverse of :meth:`permute`."""
        axis = _normalize_axis(x, axis)
        return x[(slice(None),) * axis + (np.argsort(self.order(x.shape[axis])),)]


def _normalize_axis(x, axis: int) -> int:
    ndim = np.ndim(x)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis={axis} is out of range for an array of rank {ndim}")
    return axis % ndim
