"""Pictures of a block pattern: text for terminals and docstrings, matplotlib for notebooks."""

from __future__ import annotations

import numpy as np

FULL, PARTIAL, SKIPPED = "#", "+", "."


def block_states(block_mask, batch: int = 0, head: int = 0) -> np.ndarray:
    """int ``[nq, nk]``: 2 for a full block, 1 for a partial one, 0 for a skipped one."""
    batch = min(batch, block_mask.shape[0] - 1)
    head = min(head, block_mask.shape[1] - 1)
    visited = np.asarray(block_mask.visited()[batch, head])
    states = visited.astype(np.int8)
    indices = np.asarray(block_mask.kv_indices[batch, head])
    counts = np.asarray(block_mask.kv_counts[batch, head])
    is_full = np.asarray(block_mask.kv_full[batch, head])
    for row in range(indices.shape[0]):
        for slot in range(counts[row]):
            if is_full[row, slot]:
                states[row, indices[row, slot]] = 2
    return states


def block_pattern_text(block_mask, batch: int = 0, head: int = 0) -> str:
    """One line per q block: '#' full, '+' partial, '.' skipped; a density line at the end."""
    states = block_states(block_mask, batch, head)
    symbols = np.array([SKIPPED, PARTIAL, FULL])
    lines = ["".join(row) for row in symbols[states]]
    visited = (states > 0).mean()
    lines.append(f"{states.shape[0]}x{states.shape[1]} blocks of {block_mask.block_q}x{block_mask.block_kv}: "
                 f"{visited:.1%} visited, {(states == 2).mean():.1%} full")
    return "\n".join(lines)


def plot_block_pattern(block_mask, batch: int = 0, head: int = 0, ax=None):
    """Draws the block pattern (dark: full, light: partial, white: skipped); returns the axes."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    states = block_states(block_mask, batch, head)
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(states, cmap=ListedColormap(["white", "#9ecae1", "#08519c"]), vmin=0, vmax=2, interpolation="nearest")
    ax.set_xlabel(f"kv block ({block_mask.block_kv} keys)")
    ax.set_ylabel(f"q block ({block_mask.block_q} queries)")
    ax.set_title(f"visited {float((states > 0).mean()):.1%}, full {float((states == 2).mean()):.1%}")
    return ax
