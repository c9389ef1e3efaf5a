"""Which FFN neurons a token (or a chunk of tokens) uses: static-capacity index lists with counts."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jaxsparse.ops.compaction import compact
from jaxsparse.ops.top_k_positions import top_k_positions


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ActiveNeurons:
    """The active neurons of C groups (tokens, or chunks of L consecutive tokens), at most k_max each.

    Attributes:
      indices: int32 ``[C, k_max]``; ``indices[g, :counts[g]]`` are group g's active neurons,
        distinct and ascending; the entries after them are padding (0) that ops never use.
      counts: int32 ``[C]`` in ``[0, k_max]``: how many entries of ``indices[g]`` are active.
      selected: int32 ``[C]``: how many neurons were active before the ``k_max`` cap. ``selected -
        counts`` (:attr:`dropped`) neurons were left out of a group that overflowed.
    """

    indices: jax.Array
    counts: jax.Array
    selected: jax.Array

    @property
    def k_max(self) -> int:
        return self.indices.shape[-1]

    @property
    def num_groups(self) -> int:
        return self.indices.shape[0]

    @property
    def dropped(self) -> jax.Array:
        """int32 ``[C]``: active neurons left out because the group had more than ``k_max``."""
        return self.selected - self.counts

    def valid(self) -> jax.Array:
        """bool ``[C, k_max]``: which entries of ``indices`` are active (not padding)."""
        return jnp.arange(self.k_max, dtype=jnp.int32) < self.counts[:, None]

    def dense(self, num_neurons: int) -> jax.Array:
        """bool ``[C, F]``: the active set of each group as a dense mask."""
        rows = jnp.arange(self.num_groups)[:, None]
        return jnp.zeros((self.num_groups, num_neurons), bool).at[rows, self.indices].max(self.valid())


def select_active_neurons(activations, k_max: int, *, chunk: int = 1) -> ActiveNeurons:
    """The neurons with nonzero activation, per token or as a union per chunk of tokens.

    A neuron is active for a group when its activation is nonzero for at least one of the group's
    tokens. Overflow policy "keep the largest": a group with more than ``k_max`` active neurons keeps
    the ``k_max`` of largest ``max |activation|`` over its tokens, and reports the rest in
    :attr:`ActiveNeurons.dropped`. Without overflow the selection is a compaction
    (:func:`~jaxsparse.ops.compaction.compact`); the top-k selection runs only when some group
    overflows (``lax.cond``).

    Args:
      activations: ``[N, F]`` gate activations (e.g. after statistical top-k or CATS), N tokens.
      k_max: static capacity per group, in ``[1, F]``.
      chunk: L, tokens per group: consecutive rows ``g*L .. g*L+L-1`` share one set (the union).
        ``N % L == 0``. Use 1 for per-token sets, N for one set for the whole batch.

    Returns:
      :class:`ActiveNeurons` with ``C = N // L`` groups.

    Raises:
      ValueError: ``activations`` not 2-D, ``k_max`` outside ``[1, F]``, ``chunk`` not dividing N.
    """
    activations = jnp.asarray(activations)
    if activations.ndim != 2:
        raise ValueError(f"activations must be [N, F], got shape {activations.shape}")
    tokens, neurons = activations.shape
    if isinstance(k_max, bool) or not isinstance(k_max, int) or not 1 <= k_max <= neurons:
        raise ValueError(f"k_max must be an integer in [1, {neurons}] (F), got {k_max!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1 or tokens % chunk:
        raise ValueError(f"chunk must be a positive integer dividing N={tokens}, got {chunk!r}")
    magnitude = jnp.abs(activations.astype(jnp.float32)).reshape(tokens // chunk, chunk, neurons)
    priority = jnp.max(magnitude, axis=1)
    active = priority > 0
    compacted, selected = compact(active, k_max)  # both branches pad with 0 past the count
    indices = lax.cond(
        jnp.any(selected > k_max),
        lambda: top_k_positions(priority, k_max, valid=active)[0],  # the largest, ascending
        lambda: compacted,
    )
    return ActiveNeurons(indices=indices, counts=jnp.minimum(selected, k_max), selected=selected)
