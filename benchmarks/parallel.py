"""Sequence-parallelism benchmark: prints tables and regenerates its section of BENCHMARKS.md.

    python -m benchmarks.parallel           # 8 fake CPU devices, T = 16384
    python -m benchmarks.parallel --quick   # T = 4096, smoke run (writes nothing)

Ring attention (``jaxsparse.parallel.ring_attention``) on a ring of 8 fake CPU devices:

* load balance: tiles (q block x kv block x head) each device visits under a causal mask, for the
  contiguous, zigzag and striped layouts (from the static plan, ``ring_plan``);
* communication: ring steps, rotations (``ppermute`` of k and v) and bytes each device sends, for
  ``causal & sliding_window(1024)`` under the contiguous layout vs a dense ring (and the token ring);
* wall time of the ring vs single-device ``jaxsparse.attention`` (both ``implementation='xla'``),
  with the ratio of the work they do. The fake devices share this machine's cores, so the ring
  cannot be faster here: the wall ratio shows its overhead; on real devices the time follows the
  busiest device's share of the work.
"""

from __future__ import annotations

import os

# Before jax is imported anywhere: 8 fake CPU devices.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from train.benchmarks_md import cpu_heading, markdown_table, write_section  # noqa: E402
from jaxsparse import BlockSizes, attention, make_block_mask, masks  # noqa: E402
from jaxsparse.parallel.layouts import KINDS, SequenceLayout  # noqa: E402
from jaxsparse.parallel.ring_attention import ring_attention, ring_plan  # noqa: E402
from jaxsparse.testing import median_time  # noqa: E402

TITLE = "Sequence parallelism (`python -m benchmarks.parallel`)"
DEVICES, HEADS, KV_HEADS, HEAD_DIM, WINDOW = 8, 4, 2, 64, 1024
BLOCKS = BlockSizes(block_q=128, block_kv=128)


def balance_rows(seq_len):
    rows = []
    for kind in KINDS:
        plan = ring_plan(masks.causal(), seq_len, SequenceLayout(kind=kind, num_shards=DEVICES), BLOCKS)
        blocks = plan.device_blocks
        goal = "<= 1.05" if kind != "contiguous" else "(unbalanced baseline)"
        rows.append([kind, int(blocks.max()), f"{blocks.mean():.0f}", f"{plan.imbalance:.3f}", goal])
        print("balance", *rows[-1], flush=True)
    return rows


def communication_rows(seq_len):
    window = masks.causal() & masks.sliding_window(WINDOW)
    shard_len = seq_len // DEVICES
    needed = 1 + -(-WINDOW // shard_len)  # the own shard and those the window reaches back into
    cases = [
        ("full (dense ring)", masks.full(), "contiguous", "kv", f"{DEVICES - 1} rotations"),
        ("causal", masks.causal(), "zigzag", "kv", f"{DEVICES - 1} rotations"),
        (f"causal & sliding_window({WINDOW})", window, "contiguous", "kv", f"{needed - 1} rotation(s): {needed} shards"),
        (f"causal & sliding_window({WINDOW}), token ring", window, "contiguous", "q",
         "(queries travel +1: the window is n - 1 steps away)"),
    ]
    rows = []
    for name, mask, kind, rotate, goal in cases:
        plan = ring_plan(mask, seq_len, SequenceLayout(kind=kind, num_shards=DEVICES), BLOCKS, heads=HEADS, rotate=rotate)
        sent = plan.bytes_sent_per_device(batch=1, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=jnp.float32)
        backward = plan.bytes_sent_per_device(batch=1, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                                              dtype=jnp.float32, backward=True)
        rows.append([name, kind, plan.steps, plan.rotations, f"{sent / 2**20:.1f}", f"{backward / 2**20:.1f}",
                     f"{plan.computed.mean():.0%}", goal])
        print("communication", *rows[-1], flush=True)
    return rows


def wall_time_rows(seq_len, repeats):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:DEVICES]), ("ring",))
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (1, seq_len, HEADS, HEAD_DIM))
    k = jax.random.normal(keys[1], (1, seq_len, KV_HEADS, HEAD_DIM))
    v = jax.random.normal(keys[2], (1, seq_len, KV_HEADS, HEAD_DIM))
    rows = []
    window = masks.causal() & masks.sliding_window(WINDOW)
    for name, mask, kind in (("causal", masks.causal(), "zigzag"), (f"causal & sliding_window({WINDOW})", window, "contiguous")):
        layout = SequenceLayout(kind=kind, num_shards=DEVICES)
        single = jax.jit(lambda q, k, v, mask=mask: attention(q, k, v, mask, implementation="xla", block_sizes=BLOCKS))
        ring = jax.jit(lambda q, k, v, mask=mask, layout=layout: ring_attention(
            q, k, v, mask, mesh=mesh, axis_name="ring", layout=layout, block_sizes=BLOCKS, implementation="xla"))
        tokens = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "ring"))
        permuted = [jax.device_put(layout.permute(x), tokens) for x in (q, k, v)]
        single_seconds = median_time(single, q, k, v, repeats=repeats)
        ring_seconds = median_time(ring, *permuted, repeats=repeats)
        plan = ring_plan(mask, seq_len, layout, BLOCKS, heads=HEADS)
        single_tiles = int(make_block_mask(mask, q_len=seq_len, kv_len=seq_len, block_q=BLOCKS.block_q,
                                           block_kv=BLOCKS.block_kv).kv_counts.sum()) * HEADS
        ring_tiles = int(plan.visible_blocks.sum())
        busiest = int(plan.device_blocks.max())
        rows.append([name, kind, f"{single_seconds:.2f}", f"{ring_seconds:.2f}", f"{ring_seconds / single_seconds:.2f}",
                     f"{ring_tiles / single_tiles:.3f}", f"{busiest / single_tiles:.3f} (ideal {1 / DEVICES:.3f})"])
        print("wall time", *rows[-1], flush=True)
    return rows


def cpu_markdown(seq_len, balance, communication, wall) -> str:
    lines = [cpu_heading(), "",
             f"Ring attention on {DEVICES} fake CPU devices (`--xla_force_host_platform_device_count={DEVICES}`), "
             f"T = {seq_len}, blocks {BLOCKS.block_q} x {BLOCKS.block_kv}, from the static plan (`ring_plan`).", "",
             "**Load balance** under `causal()`: (q block, kv block) tiles each device visits over the whole ring "
             "(one head). Goal: zigzag max/mean <= 1.05.", ""]
    lines += markdown_table(["layout", "max tiles / device", "mean", "max / mean", "goal"], balance, "lrrrl")
    lines += ["", f"**Communication** per device, float32, B = 1, H = {HEADS}, K = {KV_HEADS}, D = {HEAD_DIM}: ring steps "
              "run, rotations (one `ppermute` of k and v each; token ring: of q, and partial outputs sent back), MiB "
              "sent in the forward and the backward pass (dK/dV accumulators travel in float32), and the share of "
              "(device, step) pairs computed. Goal: window masks send only the shards the window needs.", ""]
    lines += markdown_table(["mask", "layout", "steps", "rotations", "forward MiB", "backward MiB", "pairs computed", "goal"],
                            communication, "llrrrrrl")
    lines += ["", f"**Wall time** of one forward pass (float32, B = 1, H = {HEADS}, K = {KV_HEADS}, D = {HEAD_DIM}, "
              "`implementation='xla'`), median: single-device `jaxsparse.attention` vs `ring_attention` on the "
              f"{DEVICES} fake devices, which share this machine's cores: the ring cannot be faster here, the wall "
              "ratio is its overhead. Work: tiles the ring visits over all devices / tiles of the single-device op "
              "(1.000: no redundant work), and the busiest device's share (on real devices the ring's time follows it).",
              ""]
    lines += markdown_table(["mask", "layout", "single device (s)", f"ring, {DEVICES} fake devices (s)", "wall ratio",
                             "work ratio", "busiest device share"], wall, "llrrrrr")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T = 4096 (smoke run); does not write BENCHMARKS.md")
    args = parser.parse_args(argv)
    if jax.device_count() < DEVICES:
        raise SystemExit(f"needs {DEVICES} devices (jax was imported before XLA_FLAGS was set?), got {jax.device_count()}")
    seq_len = 4096 if args.quick else 16384
    balance = balance_rows(seq_len)
    communication = communication_rows(seq_len)
    wall = wall_time_rows(seq_len, 1 if args.quick else 3)
    if not args.quick:
        write_section("parallel-cpu", cpu_markdown(seq_len, balance, communication, wall), title=TITLE)
        print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
