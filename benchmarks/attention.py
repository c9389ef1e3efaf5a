"""Block-sparse attention benchmark: prints tables and regenerates its section of BENCHMARKS.md.

    python -m benchmarks.attention            # CPU: xla vs dense XLA attention, metadata build time
    python -m benchmarks.attention --quick    # smaller sizes, for a smoke run
    python -m benchmarks.attention --gpu      # GPU: pallas_gpu vs cuDNN (on a machine with a GPU)

Speed-ups are ratios measured side by side in one run. The ideal speed-up of a sparse mask is
1 / (block density): the share of (q block, kv block) tiles it visits. Absolute times are reported
only from a GPU.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import BlockSizes, attention, make_block_mask, masks
from train.benchmarks_md import (
    BENCHMARKS_MD,
    cpu_heading,
    gpu_heading,
    require_gpu,
    write_gpu_placeholder,
    write_section,
)
from jaxsparse.testing import median_time

TITLE = "Attention (`python -m benchmarks.attention`)"


def packed_documents(length: int, seed: int = 0) -> np.ndarray:
    """Segment ids of documents with lengths drawn between length/64 and length/8."""
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < length:
        sizes.append(int(rng.integers(length // 64, length // 8)))
    return np.repeat(np.arange(len(sizes)), sizes)[:length].astype(np.int32)


def benchmark_masks(length: int):
    """The CPU masks of the benchmark, by name."""
    return {
        "causal": masks.causal(),
        "sliding_window(1024)": masks.sliding_window(1024),
        "sinks(4) | sliding_window(1024)": masks.causal() & (masks.sinks(4) | masks.sliding_window(1024)),
        "causal documents": masks.causal() & masks.document(packed_documents(length)),
    }


def dense_baseline(mask, length: int):
    """``jax.nn.dot_product_attention`` with the same mask, dense (XLA), and a key for its cost.

    Every boolean mask costs the same to the dense op, so runs with the same key are timed once.
    """
    if isinstance(mask, masks.structured.Causal):
        return "is_causal", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
    idx = jnp.arange(length)
    dense_mask = mask(0, 0, idx[:, None], idx[None, :])[None, None]
    return "boolean mask", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=dense_mask)


def with_backward(fn):
    """Forward plus backward: the gradient of a scalar loss with respect to q, k and v."""
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2), argnums=(0, 1, 2))


def cpu_attention_rows(lengths_and_heads, head_dim: int, block: int, repeats: int):
    """Rows of the CPU table; ``lengths_and_heads`` pairs each T with the heads that fit in memory."""
    rows = []
    for length, heads in lengths_and_heads:
        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(key, (1, length, heads, head_dim), jnp.float32) for key in keys)
        sizes = BlockSizes(block_q=block, block_kv=block)
        full_mask = make_block_mask(masks.full(), q_len=length, kv_len=length, block_q=block, block_kv=block)
        ours_dense = lambda q, k, v: attention(q, k, v, full_mask, block_sizes=sizes)  # noqa: E731
        ours_dense_time = {pass_name: median_time(jax.jit(wrap(ours_dense)), q, k, v, repeats=repeats)
                           for pass_name, wrap in (("fwd", lambda f: f), ("fwd+bwd", with_backward))}
        dense_times = {}
        for name, mask in benchmark_masks(length).items():
            block_mask = make_block_mask(mask, q_len=length, kv_len=length, block_q=block, block_kv=block)
            density = float(block_mask.density)
            ours = lambda q, k, v, block_mask=block_mask: attention(q, k, v, block_mask, block_sizes=sizes)  # noqa: E731
            dense_kind, dense = dense_baseline(mask, length)
            for pass_name, wrap in (("fwd", lambda f: f), ("fwd+bwd", with_backward)):
                if (dense_kind, pass_name) not in dense_times:  # slow: fewer repeats
                    dense_times[dense_kind, pass_name] = median_time(jax.jit(wrap(dense)), q, k, v, repeats=2)
                dense_time = dense_times[dense_kind, pass_name]
                ours_time = median_time(jax.jit(wrap(ours)), q, k, v, repeats=repeats)
                speedup = dense_time / ours_time
                own_speedup = ours_dense_time[pass_name] / ours_time
                rows.append(dict(
                    T=length, H=heads, mask=name, pass_=pass_name, density=density, speedup=speedup,
                    own_speedup=own_speedup, ideal=1 / density, efficiency=own_speedup * density,
                ))
                print(f"T={length:6d} {name:32s} {pass_name:8s} density {density:6.3f}  vs dense XLA {speedup:5.2f}x  "
                      f"vs own full mask {own_speedup:5.2f}x (ideal {1 / density:5.2f}x, {own_speedup * density:4.0%})", flush=True)
    return rows


def metadata_rows(length: int, block: int):
    """Build time of causal & sliding_window metadata at ``length``: cold, warm, and inside jit."""
    mask = masks.causal() & masks.sliding_window(1024)

    def build():
        return make_block_mask(mask, q_len=length, kv_len=length, block_q=block, block_kv=block)

    start = time.perf_counter()
    jax.block_until_ready(build())
    cold = time.perf_counter() - start
    warm = median_time(build, repeats=5)
    segment_ids = jnp.asarray(packed_documents(length))
    traced = jax.jit(lambda ids: make_block_mask(masks.causal() & masks.document(ids), q_len=length, kv_len=length,
                                                 block_q=block, block_kv=block))
    traced_time = median_time(traced, segment_ids, repeats=3)
    rows = [
        dict(what="causal & sliding_window(1024), first call (includes compilation)", seconds=cold),
        dict(what="causal & sliding_window(1024), warm", seconds=warm),
        dict(what="causal & document(traced segment ids) inside jit, warm", seconds=traced_time),
    ]
    for row in rows:
        print(f"metadata T=S={length}: {row['what']}: {row['seconds'] * 1e3:.1f} ms", flush=True)
    return rows


def gpu_rows(lengths, heads: int, head_dim: int, repeats: int):
    """pallas_gpu vs cuDNN on bf16, TFLOP/s over computed blocks (needs a GPU)."""
    rows = []
    block = 128
    for length in lengths:
        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(key, (1, length, heads, head_dim), jnp.bfloat16) for key in keys)
        num_blocks = length // block
        scores = jax.random.normal(jax.random.key(1), (num_blocks, num_blocks))
        keep = max(1, num_blocks // 10)
        chosen = jax.lax.top_k(scores, keep)[1]
        patterns = {
            "causal": make_block_mask(masks.causal(), q_len=length, kv_len=length, block_q=block, block_kv=block),
            "90% block sparse": masks.BlockMask.from_indices(
                chosen, jnp.full((num_blocks,), keep), q_len=length, kv_len=length, block_q=block, block_kv=block),
            "dense": make_block_mask(masks.full(), q_len=length, kv_len=length, block_q=block, block_kv=block),
        }
        cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
        cudnn_time = median_time(cudnn, q, k, v, repeats=repeats)
        causal_flops = 4 * heads * head_dim * length * (length + 1) / 2
        rows.append(dict(T=length, what="cuDNN causal", seconds=cudnn_time, tflops=causal_flops / cudnn_time / 1e12))
        for name, block_mask in patterns.items():
            fn = jax.jit(lambda q, k, v, bm=block_mask: attention(q, k, v, bm, implementation="pallas_gpu"))
            seconds = median_time(fn, q, k, v, repeats=repeats)
            flops = 4 * heads * head_dim * block * block * int(block_mask.kv_counts.sum())
            rows.append(dict(T=length, what=f"pallas_gpu {name}", seconds=seconds, tflops=flops / seconds / 1e12))
    for row in rows:
        print(f"T={row['T']:6d} {row['what']:28s} {row['seconds'] * 1e3:8.2f} ms {row['tflops']:7.1f} TFLOP/s", flush=True)
    return rows


def cpu_markdown(rows, meta_rows, head_dim, block) -> str:
    lines = [
        cpu_heading(),
        "",
        f"`xla` implementation vs `jax.nn.dot_product_attention` (dense XLA with the same mask), float32, "
        f"B=1, MHA, D={head_dim}, blocks {block}x{block}, all times measured side by side in one run (H is smaller "
        "at the longer length so that the dense baseline's backward fits in 24 GiB). "
        "*vs dense XLA*: `jax.nn.dot_product_attention` time / `xla` time (the dense op materialises T x S "
        "logits, so it can lose by more than the sparsity alone). *vs own full mask*: `xla` with `full()` / "
        "`xla` with the mask: how well cost follows the visited blocks. Ideal = 1 / block density; "
        "efficiency = (vs own full mask) / ideal (goal >= 0.8).",
        "",
        "| T = S | H | mask | pass | block density | vs dense XLA | vs own full mask | ideal | efficiency |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mask_name = r["mask"].replace("|", "\\|")  # a bare pipe would split the table cell
        lines.append(f"| {r['T']} | {r['H']} | `{mask_name}` | {r['pass_']} | {r['density']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['own_speedup']:.2f}x | {r['ideal']:.2f}x | {r['efficiency']:.0%} |")
    lines += ["", "Block metadata build time (CPU, T = S = 131072, 128 x 128 blocks):", "",
              "| what | time |", "|---|---:|"]
    lines += [f"| {r['what']} | {r['seconds'] * 1e3:.1f} ms |" for r in meta_rows]
    return "\n".join(lines)


def gpu_markdown(rows, heads, head_dim) -> str:
    lines = [
        gpu_heading(),
        "",
        f"bf16, B=1, H={heads}, D={head_dim}, 128 x 128 blocks. TFLOP/s counted over computed blocks "
        "(causal counts the triangle for cuDNN).",
        "",
        "| T = S | what | time | TFLOP/s |",
        "|---:|---|---:|---:|",
    ]
    lines += [f"| {r['T']} | {r['what']} | {r['seconds'] * 1e3:.2f} ms | {r['tflops']:.1f} |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run); does not write BENCHMARKS.md")
    parser.add_argument("--gpu", action="store_true", help="run the GPU comparison (needs a GPU)")
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args(argv)

    if args.gpu:
        require_gpu()
        rows = gpu_rows([8192, 32768], heads=16, head_dim=128, repeats=10)
        write_section("attention-gpu", gpu_markdown(rows, 16, 128), title=TITLE)
        return
    lengths_and_heads, meta_length, repeats = ([(1024, 4)], 8192, 1) if args.quick else ([(4096, 4), (16384, 2)], 131072, 5)
    block = 128
    rows = cpu_attention_rows(lengths_and_heads, args.head_dim, block, repeats)
    meta = metadata_rows(meta_length, block)
    if not args.quick:
        write_section("attention-cpu", cpu_markdown(rows, meta, args.head_dim, block), title=TITLE)
        write_gpu_placeholder("attention-gpu", title=TITLE,
                              how="On an H100 run `python -m benchmarks.attention --gpu` (pallas_gpu vs cuDNN, bf16, "
                                  "D = 128, T = S in {8192, 32768}, causal and 90% block sparsity).")
        print(f"wrote {BENCHMARKS_MD}")


if __name__ == "__main__":
    main()
