"""AdamW with linear warm-up, cosine decay and global-norm gradient clipping (optax)."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(config) -> optax.Schedule:
    """Linear warm-up from 0 to ``lr`` over ``warmup`` steps, then cosine down to ``lr * min_lr_ratio``
    at ``decay_steps``, constant after that."""
    warmup = min(config.warmup, config.decay_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.lr,
        warmup_steps=warmup,
        decay_steps=max(config.decay_steps, warmup + 1),
        end_value=config.lr * config.min_lr_ratio,
    )


def decay_mask(params):
    """Weight decay on matrices only: True for leaves with two or more axes (not norms or biases)."""
    return jax.tree.map(lambda leaf: leaf.ndim >= 2, params)


def make_optimizer(config) -> optax.GradientTransformation:
    """``clip_by_global_norm(clip_norm)`` (when > 0) followed by AdamW on :func:`learning_rate_schedule`."""
    adamw = optax.adamw(
        learning_rate_schedule(config),
        b1=config.adam_b1,
        b2=config.adam_b2,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
        mask=decay_mask,
    )
    # The same chain either way, so a run resumed with clipping switched on or off restores its state.
    clip = optax.clip_by_global_norm(config.clip_norm) if config.clip_norm > 0 else optax.identity()
    return optax.chain(clip, adamw)
