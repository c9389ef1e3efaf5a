"""KV selection benchmark: prints tables and regenerates its sections of BENCHMARKS.md.

    python -m benchmarks.kv_selection           # CPU: one decode step, dense vs top-256 selection
    python -m benchmarks.kv_selection --quick   # smaller cache, smoke run (writes nothing)

One decode step of attention (one new query per sequence) at S = 32768 cached positions, H = 32,
K = 8, D = 128, float32: dense decode (reads every key and value) vs selecting 256 keys per kv head
and attending to them, with the selection's cost included. Ratios measured side by side.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from train.benchmarks_md import cpu_heading, markdown_table, write_gpu_placeholder, write_section
from jaxsparse.kv import EvictedKVCache, KVCache
from jaxsparse.kv.selection import attention_mass_recall, top_k_keys
from jaxsparse.ops.decode_attention import decode_attention
from jaxsparse.testing import median_time

TITLE = "KV selection (`python -m benchmarks.kv_selection`)"
HEADS, KV_HEADS, HEAD_DIM, SELECTED = 32, 8, 128, 256


SCORE_DIMS = 16


def decode_rows(batches, capacity, repeats):
    rows = []
    for batch in batches:
        keys = jax.random.split(jax.random.key(batch), 3)
        shape = (batch, KV_HEADS, capacity, HEAD_DIM)
        cache_keys = jax.random.normal(keys[0], shape)
        # The cache keeps a contiguous copy of the first SCORE_DIMS key dims for low-rank scoring.
        cache = KVCache(keys=cache_keys, values=jax.random.normal(keys[1], shape),
                        lengths=jnp.full(batch, capacity, jnp.int32), score_keys=jnp.swapaxes(cache_keys[..., :SCORE_DIMS], 2, 3))
        q = jax.random.normal(keys[2], (batch, 1, HEADS, HEAD_DIM))
        dense = median_time(jax.jit(lambda q, c: decode_attention(q, c)), q, cache, repeats=repeats)
        for rank, method in ((HEAD_DIM, "exact"), (SCORE_DIMS, "exact"), (SCORE_DIMS, "statistical")):
            select = jax.jit(lambda q, c, rank=rank, method=method: top_k_keys(q, c, SELECTED, rank=rank, method=method))
            step = jax.jit(lambda q, c, select=select: decode_attention(q, c, selection=select(q, c)))
            seconds = median_time(step, q, cache, repeats=repeats)
            selection = select(q, cache)
            recall = float(jnp.mean(jax.jit(attention_mass_recall)(q, cache, selection)))
            name = f"top-{SELECTED}, r = {rank}, {method}"
            rows.append([batch, name, f"{float(jnp.mean(selection.counts)):.0f}", f"{recall:.2f}", f"{dense / seconds:.1f}x"])
            print("decode", *rows[-1], flush=True)
    return rows


def memory_rows(capacity, budget_share=0.2):
    """Bytes of keys and values: the full cache vs an evicted cache at ``budget_share`` of it."""
    full = KVCache.create(1, capacity, KV_HEADS, HEAD_DIM)
    budget = int(capacity * budget_share)
    evicted = EvictedKVCache.create(1, budget, KV_HEADS, HEAD_DIM)
    full_bytes = full.keys.nbytes + full.values.nbytes
    rows = [["full cache", f"{full_bytes / 2**20:.0f} MiB", "100%"]]
    for policy in ("StreamingLLM (`streaming_llm_append`)", "H2O / A2SF (`heavy_hitter_append`)", "SnapKV (`snapkv_prefill`)"):
        rows.append([policy, f"{evicted.nbytes() / 2**20:.0f} MiB", f"{evicted.nbytes() / full_bytes:.0%}"])
    return rows


def cpu_markdown(rows, capacity, memory) -> str:
    lines = [cpu_heading(), "", f"One decode step, float32, S = {capacity}, H = {HEADS}, K = {KV_HEADS}, D = {HEAD_DIM}: "
             "`decode_attention` over the whole cache vs `top_k_keys` (score with the first r dims of q and k, keep "
             f"{SELECTED} keys per kv head) followed by `decode_attention` over the selection, selection included. "
             f"The cache keeps a contiguous copy of the first {SCORE_DIMS} key dims (`score_dims`, +{SCORE_DIMS / HEAD_DIM:.1%} "
             "of the key memory) so that r = 16 scoring reads 1/8 of the key bytes. "
             "Goal >= 8x. Recall: mean share of the exact softmax mass the selection covers (random keys: the "
             "attention is diffuse, so recall is low; trained models concentrate it).", ""]
    lines += markdown_table(["batch", "selection", "keys kept (mean)", "recall", "dense / selected"], rows, "rlrrr")
    lines += ["", f"**Eviction memory** at a 20% budget (one sequence, S = {capacity}, K = {KV_HEADS}, D = {HEAD_DIM}, "
              "float32): bytes of the arrays each policy keeps (`EvictedKVCache` holds `budget` slots per head; "
              "positions and scores add 8 bytes per slot).", ""]
    lines += markdown_table(["cache", "keys + values", "of full"], memory, "lrr")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small cache (smoke run); does not write BENCHMARKS.md")
    args = parser.parse_args(argv)
    capacity = 4096 if args.quick else 32768
    rows = decode_rows([1] if args.quick else [1, 8], capacity, 1 if args.quick else 5)
    if not args.quick:
        write_section("kv-cpu", cpu_markdown(rows, capacity, memory_rows(capacity)), title=TITLE)
        write_gpu_placeholder("kv-gpu", title=TITLE, how="A GPU run of this benchmark is not written yet.")
        print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
