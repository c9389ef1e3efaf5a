"""MoE benchmark: prints tables and regenerates its sections of BENCHMARKS.md.

    python -m benchmarks.moe           # CPU: grouped matmul vs ragged_dot vs dense; MoE layer tokens/s
    python -m benchmarks.moe --quick   # smaller sizes, smoke run (writes nothing)
    python -m benchmarks.moe --gpu     # GPU: pallas_gpu grouped matmul vs ragged_dot vs dense, bf16

Speed-ups are ratios measured side by side in one run; absolute times only from a GPU. Group sizes
are random (a Dirichlet split of N rows over E groups, so some groups are small or empty).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.benchmarks_md import (
    cpu_heading,
    gpu_heading,
    markdown_table,
    require_gpu,
    write_gpu_placeholder,
    write_section,
)
from jaxsparse.nn import BlockFFN, MoE
from jaxsparse.ops.grouped_matmul import grouped_matmul
from jaxsparse.testing import median_time

TITLE = "Mixture of experts (`python -m benchmarks.moe`)"


def random_group_sizes(num_rows: int, num_groups: int, seed: int = 0) -> jnp.ndarray:
    """A Dirichlet(1) split of ``num_rows`` over ``num_groups`` (sums exactly to ``num_rows``)."""
    shares = np.random.default_rng(seed).dirichlet(np.ones(num_groups))
    sizes = np.floor(shares * num_rows).astype(np.int32)
    sizes[np.argmax(sizes)] += num_rows - sizes.sum()
    return jnp.asarray(sizes)


def grouped_matmul_rows(num_rows, width, experts_list, repeats, dtype=jnp.float32, implementation="xla"):
    """Forward and forward+backward of grouped_matmul vs lax.ragged_dot vs one dense matmul."""
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (num_rows, width), dtype)
    dense_w = jax.random.normal(keys[1], (width, width), dtype)
    rows = []
    for experts in experts_list:
        w = jax.random.normal(keys[2], (experts, width, width), dtype) * width**-0.5
        sizes = random_group_sizes(num_rows, experts)
        candidates = {
            "grouped": lambda x, w: grouped_matmul(x, w, sizes, implementation=implementation),
            "ragged_dot": lambda x, w: jax.lax.ragged_dot(x, w, sizes),
        }
        for pass_ in ("fwd", "fwd+bwd"):
            def timed(fn, weight):
                if pass_ == "fwd":
                    return median_time(jax.jit(fn), x, weight, repeats=repeats)
                loss = lambda x, w: jnp.sum(fn(x, w).astype(jnp.float32))  # noqa: E731
                return median_time(jax.jit(jax.grad(loss, argnums=(0, 1))), x, weight, repeats=repeats)

            t_dense = timed(lambda x, w: x @ w, dense_w)
            t_grouped = timed(candidates["grouped"], w)
            t_ragged = timed(candidates["ragged_dot"], w)
            rows.append(dict(E=experts, pass_=pass_, t_dense=t_dense, t_grouped=t_grouped, t_ragged=t_ragged))
            print(f"gmm E={experts:3d} {pass_:8s} grouped/dense={t_grouped / t_dense:.2f} "
                  f"ragged/grouped={t_ragged / t_grouped:.2f}", flush=True)
    return rows


def layer_rows(batch, length, width, repeats):
    """Training-step tokens/s of MoE layers (forward + backward), relative to a dense SwiGLU of equal FLOPs."""
    x = jax.random.normal(jax.random.key(1), (batch, length, width))
    hidden = 4 * width // 8  # per expert: top-2 of 8 experts of width 4M/8 ~ the FLOPs of a dense 4M/4 FFN
    layers = {
        "top-2 of 8, dropless": MoE(width, hidden, 8, k=2, rngs=nnx.Rngs(0)),
        "top-2 of 8, capacity 1.25": MoE(width, hidden, 8, k=2, capacity_factor=1.25, rngs=nnx.Rngs(0)),
        "BlockFFN, 8 experts": BlockFFN(width, hidden, 8, rngs=nnx.Rngs(0)),
    }
    rows = []
    for name, layer in layers.items():
        graph, state = nnx.split(layer)

        def loss(state, x):
            return jnp.sum(nnx.merge(graph, state)(x) ** 2)

        seconds = median_time(jax.jit(jax.grad(loss)), state, x, repeats=repeats)
        active = None
        if isinstance(layer, BlockFFN):
            _, aux = layer(x, return_aux=True)
            active = float(jnp.mean(aux["activity"]))
        rows.append([name, f"{batch * length / seconds:,.0f}", "-" if active is None else f"{active:.0%}"])
        print("layer", *rows[-1], flush=True)
    return rows


def cpu_markdown(gmm, layers, num_rows, width, batch, length) -> str:
    lines = [cpu_heading(), "", f"**Grouped matmul** (`xla`), float32, N = {num_rows}, M = F = {width}, random group "
             "sizes (Dirichlet), vs `lax.ragged_dot` and one dense `[N, M] x [M, F]` matmul of the same FLOPs. Goals: "
             "within 2x of the dense matmul, >= 4x faster than `ragged_dot` at E = 16. At E = 64 (64 rows per expert "
             "on average) the grouped matmul must read 64 weight matrices (256 MB in float32) for the FLOPs of one "
             "dense matmul that reads one (4 MB): it is bound by weight traffic, not FLOPs, and the `xla` loop also "
             "copies each pair's weight tile.", ""]
    lines += markdown_table(
        ["E", "pass", "grouped / dense time", "ragged_dot / grouped time"],
        [[r["E"], r["pass_"], f"{r['t_grouped'] / r['t_dense']:.2f}x", f"{r['t_ragged'] / r['t_grouped']:.1f}x"]
         for r in gmm], "rlrr")
    lines += ["", f"**MoE layers**, training step (forward + backward), float32, B = {batch}, T = {length}, "
              f"M = {width}, 8 experts of F = {width // 2}. Active: share of (token, expert) pairs BlockFFN uses "
              "(untrained router).", ""]
    lines += markdown_table(["layer", "tokens / s", "active"], layers, "lrr")
    return "\n".join(lines)


def gpu_markdown(rows, num_rows, width) -> str:
    lines = [gpu_heading(), "", f"`pallas_gpu` grouped matmul, bf16, N = {num_rows}, M = F = {width}; TFLOP/s over the "
             "FLOPs of the rows present (2 N M F).", ""]
    flops = 2 * num_rows * width * width
    table = [[r["E"], r["pass_"], f"{flops * (1 if r['pass_'] == 'fwd' else 3) / r['t_grouped'] / 1e12:.0f}",
              f"{r['t_grouped'] / r['t_dense']:.2f}x", f"{r['t_ragged'] / r['t_grouped']:.1f}x"] for r in rows]
    lines += markdown_table(["E", "pass", "grouped TFLOP/s", "grouped / dense time", "ragged_dot / grouped"], table, "rlrrr")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run); does not write BENCHMARKS.md")
    parser.add_argument("--gpu", action="store_true", help="GPU grouped matmul table (needs a GPU)")
    args = parser.parse_args(argv)
    if args.gpu:
        require_gpu()
        rows = grouped_matmul_rows(16384, 4096, [8, 16, 64], 10, jnp.bfloat16, "pallas_gpu")
        write_section("moe-gpu", gpu_markdown(rows, 16384, 4096), title=TITLE)
        return
    num_rows, width = (1024, 256) if args.quick else (4096, 1024)
    batch, length = (2, 128) if args.quick else (8, 512)
    repeats = 1 if args.quick else 3
    gmm = grouped_matmul_rows(num_rows, width, [8, 16] if args.quick else [8, 16, 64], repeats)
    layers = layer_rows(batch, length, 256 if args.quick else 512, repeats)
    if not args.quick:
        write_section("moe-cpu", cpu_markdown(gmm, layers, num_rows, width, batch, length), title=TITLE)
        write_gpu_placeholder("moe-gpu", title=TITLE, how="On an H100 run `python -m benchmarks.moe --gpu`.")
        print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
