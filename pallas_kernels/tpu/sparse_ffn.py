"""Sparse feed-forward layer for TPU (Mosaic): only the listed neurons of each group are computed.

A decode op (L small, bandwidth bound): for each group g of L tokens, the k_max entries of
``indices[g]`` name neurons (rows of the [F, M] weights), of which the first ``counts[g]`` are
active. The weights stay in HBM; the rows of the current block of ``block_neurons`` list entries
are copied one by one with async DMAs into VMEM scratch, so only active rows cross the memory bus.
Indices and counts reach the kernel by scalar prefetch (SMEM), which the row copies read.

Kernel:
  ``jaxsparse_sparse_ffn_fwd``  grid (C, P), P = max(ceil(k_max / bn), 1), bn = block_neurons,
      semantics ("parallel", "arbitrary"). Step (g, p) handles list entries [p * bn, (p + 1) * bn)
      of group g: h = a * (x @ w_up_rows^T) [Lp, bn], y += h @ w_down_rows, with
      a = activation(x @ w_gate_rows^T) or the given gate block. y accumulates in a float32 VMEM
      scratch [Lp, M] and is written, in x.dtype, at the last step.

Double buffering: each weight has a VMEM scratch [2, bn, M]. Step p = 0 starts block 0's copies;
every step starts block p + 1's copies (into the other slot) before waiting for and computing
block p. Copies never cross groups, so the "parallel" group axis may be split between cores.
Each weight has a DMA semaphore per slot; every row copy signals it and is waited for once.

Partial blocks: only the n = clip(count - p * bn, 0, bn) active rows of a block are copied; a
block with n = 0 does no DMA and no math. The rows past n in the buffers are stale (an earlier
block's) or uninitialised (NaN in the interpreter), so h is set to 0 there with ``jnp.where`` and
the w_down rows are replaced by 0 (0 * NaN would be NaN): padding list entries, and whatever
weight rows they name, never matter.

Layout: the wrapper pads L to Lp, a multiple of 8, and k_max to a multiple of bn; the gate
[C, L, k_max] travels as [C, P, Lp, bn] float32 so that its block is whole in its last two dims
(any bn that is a multiple of 8 works). Its index map stays on the last active block (block 0
if none), so skipped steps fetch no gate either.

Limits: M a multiple of 128 (``check_support``); float32 or bfloat16. VMEM holds 2 * bn * M *
itemsize bytes per weight (3 weights with w_gate) plus x, y and the float32 accumulator; lower bn
for large M. Indices occupy C * k_max words of SMEM. Counts are clamped to [0, k_max]; padding
entries are never read as rows, so they may hold any int32, but an active index outside [0, F) is
not checked (its DMA reads out of bounds: an error in the interpreter). Checked in the TPU
interpreter and by lowering to Mosaic; not yet compiled on a TPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import compat
from pallas_kernels.common.tiles import matmul
from pallas_kernels.common.sparse_ffn_inputs import check_sparse_ffn_inputs

FORWARD_NAME = "jaxsparse_sparse_ffn_fwd"

_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_SUBLANES = 8


def check_support(model_dim: int, dtype) -> None:
    """Raises ValueError unless the kernel supports this model dimension M and dtype."""
    if model_dim <= 0 or model_dim % 128:
        raise ValueError(
            f"sparse_ffn: model_dim must be a positive multiple of 128, got {model_dim}"
        )
    if jnp.dtype(dtype) not in _DTYPES:
        raise ValueError(f"sparse_ffn: dtype must be float32 or bfloat16, got {jnp.dtype(dtype)}")


def _active_rows(count, block, block_neurons):
    """Number of active list entries in neuron block ``block``: clip(count - block * bn, 0, bn)."""
    return jnp.clip(count - block * block_neurons, 0, block_neurons)


def _forward_kernel(
    indices_ref, counts_ref, x_ref, *refs, computed_gate, activation, block_neurons, width,
):
    num_weights = 3 if computed_gate else 2
    gate_refs, refs = ((), refs) if computed_gate else (refs[:1], refs[1:])
    weight_refs, (y_ref,) = refs[:num_weights], refs[num_weights:num_weights + 1]
    buffer_refs = refs[num_weights + 1:2 * num_weights + 1]
    acc_ref, sems = refs[2 * num_weights + 1:]
    g, block = pl.program_id(0), pl.program_id(1)
    count = counts_ref[g]

    def row_copies(block, j):
        """The DMAs of list entry j of ``block`` (one per weight) into slot block % 2."""
        row = indices_ref[g * width + block * block_neurons + j]
        slot = block % 2
        return [
            compat.make_async_copy(
                weight.at[pl.ds(row, 1)], buffer.at[slot, pl.ds(j, 1)], sems.at[w, slot]
            )
            for w, (weight, buffer) in enumerate(zip(weight_refs, buffer_refs))
        ]

    def for_active_rows(block, method):
        def body(j, carry):
            for copy in row_copies(block, j):
                getattr(copy, method)()
            return carry

        lax.fori_loop(0, _active_rows(count, block, block_neurons), body, 0)

    @pl.when(block == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        for_active_rows(0, "start")

    @pl.when((block + 1) * block_neurons < count)
    def _prefetch_next():
        for_active_rows(block + 1, "start")

    @pl.when(block * block_neurons < count)
    def _compute():
        for_active_rows(block, "wait")
        slot = block % 2
        rows = _active_rows(count, block, block_neurons)
        x = x_ref[...]
        up_ref, down_ref = buffer_refs[:2]
        up = matmul(x, up_ref[slot], transpose_b=True)
        if computed_gate:
            a = activation(matmul(x, buffer_refs[2][slot], transpose_b=True))
        else:
            a = gate_refs[0][...]
        live = lax.broadcasted_iota(jnp.int32, up.shape, 1) < rows
        h = jnp.where(live, a * up, 0.0)
        down = down_ref[slot]
        down = jnp.where(lax.broadcasted_iota(jnp.int32, down.shape, 0) < rows, down, 0)
        acc_ref[...] += matmul(h.astype(down.dtype), down)

    @pl.when(block == pl.num_programs(1) - 1)
    def _finalise():
        y_ref[...] = acc_ref[...].astype(y_ref.dtype)


def _check_inputs(x, w_up, w_down, indices, counts, w_gate, gate, block_neurons):
    """The shared contract checks, this kernel's size support and block_neurons; returns (C, L, M, F, k_max)."""
    sizes = check_sparse_ffn_inputs(x, w_up, w_down, indices, counts, w_gate, gate, check_support)
    if block_neurons <= 0 or block_neurons % _SUBLANES:
        raise ValueError(f"sparse_ffn: block_neurons must be a positive multiple of 8, got {block_neurons}")
    return sizes


def sparse_ffn_forward(
    x: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    indices: jax.Array,
    counts: jax.Array,
    *,
    w_gate: jax.Array | None = None,
    gate: jax.Array | None = None,
    activation: Callable[[jax.Array], jax.Array] = jax.nn.gelu,
    block_neurons: int = 128,
    interpret: bool | compat.TPUInterpretParams = False,
) -> jax.Array:
    """Sparse FFN: y[g, l] = sum_{j < counts[g]} a[g, l, j] (x[g, l] . w_up[i_j]) w_down[i_j].

    With i_j = indices[g, j] and a[g, l, j] = activation(x[g, l] . w_gate[i_j]) when w_gate is
    given, else gate[g, l, j]. Float32 accumulation; in bfloat16, h is rounded to bfloat16 before
    the w_down matmul.

    Args:
      x: [C, L, M] float32 or bfloat16; M a multiple of 128.
      w_up, w_down: [F, M] in x.dtype, neuron-major (row n holds neuron n's weights).
      indices: int32 [C, k_max]: the active neurons of each group first (in [0, F)), then padding
        entries (never read: any value).
      counts: int32 [C] in [0, k_max]: number of active leading entries of indices[g].
      w_gate: [F, M] in x.dtype, or None.
      gate: [C, L, k_max] float32 gate coefficients, or None. Exactly one of w_gate and gate.
      activation: elementwise, applied in float32 to the gate pre-activations (w_gate form).
      block_neurons: list entries per grid step (bn), a multiple of 8.
      interpret: True (or ``pltpu.InterpretParams``) to run in the TPU interpreter on CPU.

    Returns:
      y [C, L, M] in x.dtype; groups with count 0 give exactly 0.

    Raises:
      ValueError: on wrong ranks, shapes or dtypes, both or neither of w_gate and gate, or
        block_neurons not a multiple of 8.
    """
    groups, length, model_dim, num_neurons, k_max = _check_inputs(
        x, w_up, w_down, indices, counts, w_gate, gate, block_neurons
    )
    bn = block_neurons
    num_blocks = max(pl.cdiv(k_max, bn), 1)
    width = num_blocks * bn
    padded_length = pl.cdiv(length, _SUBLANES) * _SUBLANES
    x = jnp.pad(x, ((0, 0), (0, padded_length - length), (0, 0)))
    indices = jnp.pad(indices.astype(jnp.int32), ((0, 0), (0, width - k_max))).reshape(-1)
    counts = jnp.clip(counts.astype(jnp.int32), 0, k_max)
    computed_gate = w_gate is not None
    weights = (w_up, w_down, w_gate) if computed_gate else (w_up, w_down)

    def group_index_map(g, p, *_):
        return g, 0, 0

    def gate_index_map(g, p, indices_ref, counts_ref):
        last_active = jnp.maximum(pl.cdiv(counts_ref[g], bn) - 1, 0)
        return g, jnp.minimum(p, last_active), 0, 0

    group_spec = pl.BlockSpec((None, padded_length, model_dim), group_index_map)
    gate_inputs, gate_specs = (), ()
    if not computed_gate:
        gate = jnp.pad(
            gate.astype(jnp.float32),
            ((0, 0), (0, padded_length - length), (0, width - k_max)),
        )
        gate = gate.reshape(groups, padded_length, num_blocks, bn).transpose(0, 2, 1, 3)
        gate_inputs = (gate,)
        gate_specs = (pl.BlockSpec((None, None, padded_length, bn), gate_index_map),)
    kernel = functools.partial(
        _forward_kernel, computed_gate=computed_gate, activation=activation, block_neurons=bn,
        width=width,
    )
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid_spec=compat.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(groups, num_blocks),
            in_specs=[
                group_spec, *gate_specs,
                *(pl.BlockSpec(memory_space=compat.ANY) for _ in weights),
            ],
            out_specs=group_spec,
            scratch_shapes=[
                *(compat.VMEM((2, bn, model_dim), x.dtype) for _ in weights),
                compat.VMEM((padded_length, model_dim), jnp.float32),
                compat.SemaphoreType.DMA((len(weights), 2)),
            ],
        ),
        compiler_params=compat.TPUCompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=compat.tpu_interpret_value(interpret),
        name=FORWARD_NAME,
    )(indices, counts, x, *gate_inputs, *weights)
    return y[:, :length]
