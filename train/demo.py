"""A two-minute tour of block-sparse attention on CPU, printed as pictures and a table.

For each mask: its block picture, its block density, the ``xla`` implementation's largest relative
error against the dense float32 reference (loss value and gradients of ``sum(out ** 2)``), and its
forward speed-up over dense causal XLA attention, measured side by side.
"""

from __future__ import annotations

import argparse
import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import BlockSizes, attention, make_block_mask, masks
from jaxsparse.testing import median_time


def _max_relative_error(a, b):
    """Largest ``max|x - y| / max|y|`` over the leaves (loss value and each gradient)."""
    return max(
        float(jnp.max(jnp.abs(x - y)) / jnp.maximum(jnp.max(jnp.abs(y)), 1e-30))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--length", type=int, default=2048, help="sequence length T = S")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args(argv)
    length, block = args.length, 128
    segment_ids = np.repeat(np.arange(8), length // 8)
    demo_masks = {
        "causal": masks.causal(),
        "causal & sliding_window(256)": masks.causal() & masks.sliding_window(256),
        "causal & (sinks(4) | sliding_window(256))": masks.causal() & (masks.sinks(4) | masks.sliding_window(256)),
        "causal & document(8 docs)": masks.causal() & masks.document(segment_ids),
        "chunked(512)": masks.chunked(512),
        "causal & power_of_two()": masks.causal() & masks.power_of_two(),
    }
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (1, length, args.heads, args.head_dim))
    k, v = (jax.random.normal(key, (1, length, args.heads // 2, args.head_dim)) for key in keys[1:])
    sizes = BlockSizes(block_q=block, block_kv=block)
    print(f"jaxsparse block-sparse attention demo: T = S = {length}, H = {args.heads} (GQA, K = {args.heads // 2}), "
          f"D = {args.head_dim}, blocks {block} x {block}, float32, jax {jax.__version__} on {jax.default_backend()}\n")
    rows = []
    for name, mask in demo_masks.items():
        block_mask = make_block_mask(mask, q_len=length, kv_len=length, block_q=block, block_kv=block)
        print(f"{name}\n{block_mask.visualize()}\n")

        def loss(q, k, v, implementation):
            return jnp.sum(attention(q, k, v, block_mask, implementation=implementation, block_sizes=sizes) ** 2)

        grad = {impl: jax.jit(jax.value_and_grad(lambda q, k, v, impl=impl: loss(q, k, v, impl), argnums=(0, 1, 2)))
                for impl in ("reference", "xla")}
        error = _max_relative_error(grad["xla"](q, k, v), grad["reference"](q, k, v))
        dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
        sparse = jax.jit(lambda q, k, v: attention(q, k, v, block_mask, block_sizes=sizes))
        speedup = median_time(dense, q, k, v) / median_time(sparse, q, k, v)
        rows.append((name, float(block_mask.density), error, speedup))
    print(f"{'mask':44s} {'block density':>13s} {'relative error vs reference':>28s} {'speed-up vs dense causal':>25s}")
    for name, density, error, speedup in rows:
        print(f"{name:44s} {density:13.3f} {error:28.2e} {speedup:24.2f}x")
    print("\nThe training CLI (python -m train --preset ...) arrives with the models and training issue.")


if __name__ == "__main__":
    main()
