"""Contextually sparse feed-forward for GPUs (Pallas, Triton backend), decode forward.

Each group of L tokens (one token, or a chunk of L tokens) runs only the neurons listed for it,
in the spirit of Deja Vu (Liu et al., 2023): gather the listed rows of W_gate / W_up, form the
hidden activations, and gather the same rows of W_down for the output. Decode is bandwidth
bound and a group has few tokens, so the neuron list is split across kernel instances (split-K
over neurons) to spread one token over many SMs; the wrapper sums the partial outputs.

Grid (C, P), P = ceil(k_max / block_neurons); instance (g, p) owns entries
j in [p * bn, (p + 1) * bn) of indices[g] (bn = block_neurons) and, with bm = block_model:
  a = activation(x @ W_gate[idx].T)  or  gate[g, :, j]      [Lp, bn], float32
  h = where(j < counts[g], a * (x @ W_up[idx].T), 0)        [Lp, bn], float32
  partial[g, p, :, m:m+bm] = h @ W_down[idx, m:m+bm]          [Lp, bm], float32, per M tile
The first product reduces over M in bm-wide tiles (a loop); the second writes one M tile per
step. An instance whose block lies wholly past counts[g] does nothing (``pl.when``): no weight
loads, no math, no stores. The wrapper computes y = sum_p where(p * bn < counts[g],
partial[g, p], 0), which also hides the never-written partials, and casts to x.dtype.

Two ways to form the products, picked statically from Lp (the next power of two >= L):
  * Lp >= 16: ``tl.dot`` (``lax.dot_general``) in x.dtype with float32 accumulation.
  * Lp in {1, 2, 4, 8} (few tokens, single-token decode above all): ``tl.dot`` needs every dim
    >= 16, so instead broadcast-multiply-and-reduce in float32 over a 3-D intermediate per M
    tile: sum(x[:, None, :] * W[idx, m:m+bm][None], axis=-1) for the pre-activations
    ([Lp, bn, bm] -> [Lp, bn]) and sum(h[:, :, None] * W_down[idx, m:m+bm][None], axis=1) for
    the partial output ([Lp, bn, bm] -> [Lp, bm]). This keeps L padded only to Lp, not to 16.
    To bound the registers held by the intermediate, bm is also capped so that
    Lp * bn * bm <= 16384 (down to bm = 16): Lp = 1 keeps bm = 128 up to bn = 128.

Layout (internal, padded by the wrapper):
  x: [C, Lp, M] with Lp = next power of two >= L, zero rows past L.
  w_gate, w_up, w_down: [F, M], whole in every instance; rows are gathered with a vector of
    indices (an int32 [bn] tile), W[idx, pl.ds(m, bm)] -> [bn, bm].
  indices: int32 [C, Kp], Kp = P * bn, padded with 0; counts: int32 [C].
  gate: float32 [C, Lp, Kp], padded with 0.
Padding entries inside a partial block are redirected to the block's first entry (always
active) before the gathers, so rows listed only as padding are never read (they may hold
anything, NaN included), and h is masked with ``where`` so padding gates cannot leak either.

Triton limits: block_neurons and block_model are powers of two >= 16 (``tl.dot`` shapes on the
Lp >= 16 path, kept on the other for simplicity), Lp a power of two (size 1 included);
block_model is the largest of 128, 64, 32, 16 dividing M (and, for Lp < 16, within the cap above),
so M must be a multiple of 16. h is rounded to x.dtype before the second product on both paths,
so bfloat16 results agree; float32 ``tl.dot`` products use the Triton lowering's default
precision (TF32 on GPU), while the broadcast-reduce path multiplies and sums in full float32
(so in float32, results for L < 16 and L >= 16 may differ at TF32 level).

Traffic: each instance that runs writes Lp * M * 4 bytes of partial output, read back once by the
wrapper's sum, on top of its 2 or 3 gathered [bn, M] weight slices. For one token at Gemma-2B
sizes (M = 2304, ~1100 active neurons, bn = 32, bf16: P = 35, ~15 MB of weight rows) that is
~0.3 MB each way at Lp = 1, against ~5 MB each way had L been padded to 16 for ``tl.dot``.
Larger block_neurons means fewer instances (less partial traffic) but less SM parallelism.
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

_SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_MODEL_TILES = (128, 64, 32, 16)
_MIN_DOT_LEN = 16  # tl.dot needs every dim >= 16; below this Lp, broadcast-multiply-and-reduce.
_MAX_BROADCAST_ELEMENTS = 16384  # Cap on the [Lp, bn, bm] float32 intermediate (register use).


def _block_model(model_dim: int, max_tile: int = _MODEL_TILES[0]) -> int | None:
    """The largest tile of ``_MODEL_TILES`` dividing model_dim and at most max_tile (16 always
    allowed), or None."""
    return next(
        (t for t in _MODEL_TILES if t <= max(max_tile, 16) and model_dim % t == 0), None
    )


def check_support(model_dim: int, dtype) -> None:
    """Raises ValueError unless the kernel supports this model dimension M and dtype."""
    if jnp.dtype(dtype) not in _SUPPORTED_DTYPES:
        raise ValueError(f"sparse_ffn: dtype must be float32 or bfloat16, got {jnp.dtype(dtype)}.")
    if _block_model(model_dim) is None:
        raise ValueError(f"sparse_ffn: model dim M must be a multiple of 16, got {model_dim}.")


def _matmul(a, b, *, transpose_b=False, use_dot=True):
    """``a @ op(b)`` for 2-D tiles, float32 result.

    With use_dot, a ``tl.dot`` in the inputs' dtype with float32 accumulation (every dim >= 16).
    Otherwise a broadcast multiply and a sum in float32 over a 3-D intermediate ([rows(a),
    cols(op(b)), inner]), for tiles whose row count is below ``tl.dot``'s minimum of 16.
    """
    if use_dot:
        return matmul(a, b, transpose_b=transpose_b)
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    if transpose_b:  # [R, K] x [N, K] -> [R, N, K], reduced over K.
        return jnp.sum(a[:, None, :] * b[None, :, :], axis=2)
    return jnp.sum(a[:, :, None] * b[None, :, :], axis=1)  # [R, K] x [K, N] -> [R, K, N].


def _sparse_ffn_kernel(
    x_ref, w_first_ref, w_up_ref, w_down_ref, indices_ref, counts_ref, o_ref, *,
    gated: bool, activation: Callable, block_neurons: int, block_model: int, use_dot: bool,
):
    """One (group, neuron block): a float32 partial output over the block's listed neurons.

    Refs: x [Lp, M]; w_first (w_gate [F, M] if gated, else gate [Lp, bn]); w_up, w_down [F, M];
    indices [bn]; counts []; output o [Lp, M]. use_dot: ``tl.dot`` products (Lp >= 16), else
    broadcast-multiply-and-reduce (Lp < 16).
    """
    matmul = functools.partial(_matmul, use_dot=use_dot)
    start = pl.program_id(1) * block_neurons
    count = counts_ref[...]

    @pl.when(start < count)
    def _():
        entry = start + lax.broadcasted_iota(jnp.int32, (block_neurons,), 0)
        active = entry < count
        idx = jnp.where(active, indices_ref[...], indices_ref[0])
        num_tiles = x_ref.shape[1] // block_model

        def pre_activations(step, carry):
            m_slice = pl.ds(pl.multiple_of(step * block_model, block_model), block_model)
            x = x_ref[:, m_slice]
            up = carry[0] + matmul(x, w_up_ref[idx, m_slice], transpose_b=True)
            if not gated:
                return (up,)
            return up, carry[1] + matmul(x, w_first_ref[idx, m_slice], transpose_b=True)

        zeros = jnp.zeros((x_ref.shape[0], block_neurons), jnp.float32)
        sums = lax.fori_loop(0, num_tiles, pre_activations, (zeros, zeros) if gated else (zeros,))
        a = activation(sums[1]) if gated else w_first_ref[...]
        h = jnp.where(active[None, :], a * sums[0], 0.0).astype(x_ref.dtype)

        @pl.loop(0, num_tiles)
        def _(step):
            m_slice = pl.ds(pl.multiple_of(step * block_model, block_model), block_model)
            o_ref[:, m_slice] = matmul(h, w_down_ref[idx, m_slice])


def _check_inputs(x, w_up, w_down, indices, counts, w_gate, gate, block_neurons):
    """The shared contract checks, this kernel's size support and block_neurons; returns (C, L, M, F, k_max)."""
    sizes = check_sparse_ffn_inputs(x, w_up, w_down, indices, counts, w_gate, gate, check_support)
    if block_neurons < 16 or block_neurons & (block_neurons - 1):
        raise ValueError(f"sparse_ffn: block_neurons must be a power of two >= 16, got {block_neurons}.")
    return sizes


def sparse_ffn_forward(
    x, w_up, w_down, indices, counts, *, w_gate=None, gate=None,
    activation: Callable = jax.nn.gelu, block_neurons: int = 32, num_warps: int = 4,
    num_stages: int = 1, interpret: bool = False,
) -> jax.Array:
    """Sparse FFN over each group's listed neurons, float32 accumulation::

        a[g, l, j] = activation(x[g, l] . w_gate[indices[g, j]])  if w_gate, else gate[g, l, j]
        h[g, l, j] = a[g, l, j] * (x[g, l] . w_up[indices[g, j]])
        y[g, l] = sum_{j < counts[g]} h[g, l, j] * w_down[indices[g, j]]

    Args:
      x: [C, L, M], float32 or bfloat16; C groups of L tokens. L < 16 is padded to the next
        power of two and computed without tl.dot (see the module docstring).
      w_up, w_down: [F, M] in x.dtype, neuron-major (row n is neuron n).
      indices: int32 [C, k_max] in [0, F); group g's active neurons first, then padding.
      counts: int32 [C] in [0, k_max]; the number of active leading entries of indices[g].
      w_gate: [F, M] in x.dtype, or None.
      gate: float32 [C, L, k_max], or None; exactly one of w_gate and gate.
      activation: elementwise, applied in float32 to the gate pre-activations (w_gate form).
      block_neurons: entries of indices per kernel instance, a power of two >= 16.
      num_warps, num_stages: Triton launch settings; interpret: run on CPU.

    Returns:
      y: [C, L, M] in x.dtype.

    Raises:
      ValueError: on bad shapes, dtypes, w_gate/gate combination or block_neurons.
    """
    groups, length, model_dim, _, k_max = _check_inputs(
        x, w_up, w_down, indices, counts, w_gate, gate, block_neurons
    )
    num_blocks = max(1, -(-k_max // block_neurons))
    padded_len = 1 << max(0, length - 1).bit_length()  # Next power of two >= L.
    use_dot = padded_len >= _MIN_DOT_LEN
    max_tile = _MODEL_TILES[0] if use_dot else (
        _MAX_BROADCAST_ELEMENTS // (padded_len * block_neurons)
    )
    block_model = _block_model(model_dim, max_tile)
    pad_k, pad_l = num_blocks * block_neurons - k_max, padded_len - length
    x = jnp.pad(x, ((0, 0), (0, pad_l), (0, 0)))
    indices = jnp.pad(indices, ((0, 0), (0, pad_k)))
    weight_spec = pl.BlockSpec(w_up.shape, lambda g, p: (0, 0))
    if gate is None:
        first, first_spec = w_gate, weight_spec
    else:
        first = jnp.pad(gate, ((0, 0), (0, pad_l), (0, pad_k)))
        first_spec = pl.BlockSpec((None, padded_len, block_neurons), lambda g, p: (g, 0, p))
    kernel = functools.partial(
        _sparse_ffn_kernel, gated=gate is None, activation=activation,
        block_neurons=block_neurons, block_model=block_model, use_dot=use_dot,
    )
    partials = pl.pallas_call(
        kernel,
        grid=(groups, num_blocks),
        in_specs=[
            pl.BlockSpec((None, padded_len, model_dim), lambda g, p: (g, 0, 0)),
            first_spec, weight_spec, weight_spec,
            pl.BlockSpec((None, block_neurons), lambda g, p: (g, p)),
            pl.BlockSpec((None,), lambda g, p: (g,)),
        ],
        out_specs=pl.BlockSpec((None, None, padded_len, model_dim), lambda g, p: (g, p, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((groups, num_blocks, padded_len, model_dim), jnp.float32),
        compiler_params=compat.TritonCompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=FORWARD_NAME,
    )(x, first, w_up, w_down, indices, counts)
    written = jnp.arange(num_blocks, dtype=jnp.int32) * block_neurons < counts[:, None]
    y = jnp.sum(jnp.where(written[:, :, None, None], partials, 0.0), axis=1)
    return y[:, :length].astype(x.dtype)
