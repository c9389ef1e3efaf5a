"""Block-sparse attention TPU kernels, run in the TPU interpreter on CPU.

Everything here (dense reference, block metadata, element masks) is built independently of
``jaxsparse`` so that the kernels are checked against a definition, not against the library.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import compat
from pallas_kernels.tpu.block_sparse_attention import (
    block_sparse_attention_backward,
    block_sparse_attention_forward,
)

# Forward and gradient tolerances (atol = rtol) by dtype. bfloat16 rounds q, k, v, p and ds to 8
# mantissa bits before each matmul, so it is compared at about 2**-6.
TOLERANCES = {
    jnp.float32: {"forward": 1e-5, "gradient": 1e-4},
    jnp.bfloat16: {"forward": 2e-2, "gradient": 2e-2},
}


# ----------------------------------------------------------------------------- element masks
#
# Element masks receive (row_tiles, column_tiles, scalars, b, h, q_idx, kv_idx): row tiles [bq, 1]
# and column tiles [1, bkv] of the mask operands, per-sequence scalars, absolute positions.

NO_OPERANDS = ((), (), ())


def causal_mask(rows, columns, scalars, b, h, q_idx, kv_idx):
    """Causal, keys at or past the real length of the sequence (scalar operand) invisible."""
    (kv_len,) = scalars
    return (q_idx >= kv_idx) & (kv_idx < kv_len)


def _select_by_head(h, values):
    """values[h] for a traced scalar h, without a gather (Python list of ints)."""
    selected = jnp.int32(values[0])
    for index, value in enumerate(values[1:], start=1):
        selected = jnp.where(h == index, jnp.int32(value), selected)
    return selected


def sliding_window_mask(windows):
    """Causal sliding window whose width depends on the query head."""

    def element_mask(rows, columns, scalars, b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < _select_by_head(h, windows))

    return element_mask


def segment_mask(rows, columns, scalars, b, h, q_idx, kv_idx):
    """Bidirectional attention inside documents: row (q) and column (kv) segment ids."""
    (q_segments,), (kv_segments,) = rows, columns
    return q_segments == kv_segments


def causal_segment_prefix_mask(rows, columns, scalars, b, h, q_idx, kv_idx):
    """Documents (segment ids), causal except for a per-sequence bidirectional prefix (scalar)."""
    (q_segments,), (kv_segments,), (prefix_len,) = rows, columns, scalars
    return (q_segments == kv_segments) & ((q_idx >= kv_idx) | (kv_idx < prefix_len))


def tile_pattern_mask(rows, columns, scalars, b, h, q_idx, kv_idx):
    """Tiles empty, full or partial by (row kind + column kind) % 3; partial tiles mix element
    bits; a per-query flag (row operand) empties whole rows."""
    row_kind, row_bits, row_alive = rows
    column_kind, column_bits = columns
    kind = (row_kind + column_kind) % 3
    partial_visible = (row_bits + column_bits) % 4 < 2
    return ((kind == 1) | ((kind == 2) & partial_visible)) & (row_alive != 0)


def nothing_visible_mask(rows, columns, scalars, b, h, q_idx, kv_idx):
    return (q_idx < 0) & (kv_idx < 0)


def evaluate_dense_mask(element_mask, operands, batch, num_heads, q_len, kv_len) -> np.ndarray:
    """The element mask on the whole [T, S] grid for every (b, h): bool [B, H, T, S].

    Operands are handed over whole: row values [T, 1], column values [1, S], scalars of batch b
    (or 0 where Bo == 1).
    """
    rows, columns, scalars = operands
    q_idx = jnp.arange(q_len, dtype=jnp.int32)[:, None]
    kv_idx = jnp.arange(kv_len, dtype=jnp.int32)[None, :]

    def of_batch(x, b):
        return x[0 if x.shape[0] == 1 else b]

    def mask_of(b, h):
        row_values = tuple(of_batch(jnp.asarray(x), b)[:, None] for x in rows)
        column_values = tuple(of_batch(jnp.asarray(x), b)[None, :] for x in columns)
        scalar_values = tuple(of_batch(jnp.asarray(x), b) for x in scalars)
        mask = element_mask(
            row_values, column_values, scalar_values, jnp.int32(b), jnp.int32(h), q_idx, kv_idx
        )
        return np.broadcast_to(np.asarray(mask), (q_len, kv_len))

    return np.stack([
        np.stack([mask_of(b, h) for h in range(num_heads)]) for b in range(batch)
    ])


# ----------------------------------------------------------------------------- block metadata


def _block_lists(visited: np.ndarray, full: np.ndarray):
    """Per-row lists of visited columns: (indices, counts, full flags) as int32.

    Args:
      visited, full: bool [Bm, Hm, rows, cols].
    """
    counts = visited.sum(-1).astype(np.int32)
    width = int(counts.max())
    indices = np.zeros((*visited.shape[:3], width), np.int32)
    flags = np.zeros_like(indices)
    for row in np.ndindex(*visited.shape[:3]):
        cols = np.flatnonzero(visited[row])
        indices[row][: len(cols)] = cols
        indices[row][len(cols):] = cols[-1] if len(cols) else 0
        flags[row][: len(cols)] = full[row][cols]
    return jnp.asarray(indices), jnp.asarray(counts), jnp.asarray(flags)


def block_metadata(mask: np.ndarray, block_q: int, block_kv: int):
    """Dense bool mask [Bm, Hm, T, S] -> kv lists and transposed q lists.

    Returns:
      (kv_indices, kv_counts, kv_full, q_indices, q_counts, q_full).
    """
    batches, heads, q_len, kv_len = mask.shape
    tiles = mask.reshape(batches, heads, q_len // block_q, block_q, kv_len // block_kv, block_kv)
    visited, full = tiles.any(axis=(3, 5)), tiles.all(axis=(3, 5))
    kv_lists = _block_lists(visited, full)
    q_lists = _block_lists(visited.swapaxes(2, 3), full.swapaxes(2, 3))
    return (*kv_lists, *q_lists)


# ----------------------------------------------------------------------------- dense reference


def reference_attention(q, k, v, mask, *, scale, softcap):
    """Dense float32 attention with safe empty rows.

    Args:
      q: [B, H, T, D]; k, v: [B, K, S, D]; mask: bool broadcastable to [B, H, T, S].

    Returns:
      (o [B, H, T, D], lse [B, H, T]), both float32.
    """
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    group_size = q.shape[1] // k.shape[1]
    k, v = jnp.repeat(k, group_size, axis=1), jnp.repeat(v, group_size, axis=1)
    logits = jnp.einsum("bhtd,bhsd->bhts", q, k, precision="highest") * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jax.lax.stop_gradient(logits.max(-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(logits - row_max)
    row_sum = weights.sum(-1, keepdims=True)
    safe_sum = jnp.where(row_sum > 0, row_sum, 1.0)
    o = jnp.einsum("bhts,bhsd->bhtd", weights, v, precision="highest") / safe_sum
    lse = jnp.where(row_sum > 0, row_max + jnp.log(safe_sum), -jnp.inf)[..., 0]
    return o, lse


# ----------------------------------------------------------------------------- harness


@dataclasses.dataclass(frozen=True, kw_only=True)
class Case:
    element_mask: Callable
    operands: tuple = NO_OPERANDS  # (row_operands, column_operands, scalar_operands)
    batch: int = 1
    num_heads: int = 2
    num_kv_heads: int = 2
    q_len: int = 128
    kv_len: int = 128
    head_dim: int = 32
    block_q: int = 32
    block_kv: int = 32
    dtype: type = jnp.float32
    softcap: float | None = None
    # Metadata batch/head sizes: 1 broadcasts (the mask must then not depend on that axis).
    metadata_batch: int = 1
    metadata_heads: int = 1
    seed: int = 0


def random_inputs(case: Case):
    keys = jax.random.split(jax.random.key(case.seed), 4)
    q_shape = (case.batch, case.num_heads, case.q_len, case.head_dim)
    kv_shape = (case.batch, case.num_kv_heads, case.kv_len, case.head_dim)
    q, do = (jax.random.normal(key, q_shape, jnp.float32) for key in keys[:2])
    k, v = (jax.random.normal(key, kv_shape, jnp.float32) for key in keys[2:])
    return tuple(x.astype(case.dtype) for x in (q, k, v)), do.astype(case.dtype)


def case_mask_and_metadata(case: Case):
    mask = evaluate_dense_mask(
        case.element_mask, case.operands, case.batch, case.num_heads, case.q_len, case.kv_len
    )
    metadata_mask = mask[: case.metadata_batch, : case.metadata_heads]
    assert (np.broadcast_to(metadata_mask, mask.shape) == mask).all(), "mask is not broadcastable"
    return mask, block_metadata(metadata_mask, case.block_q, case.block_kv)


def run_kernels(case: Case, interpret=True):
    """Kernel forward and backward on random inputs.

    Returns:
      (mask, (o, lse), (dq, dk, dv), reference (o, lse), reference (dq, dk, dv)).
    """
    (q, k, v), do = random_inputs(case)
    mask, (kv_indices, kv_counts, kv_full, q_indices, q_counts, q_full) = case_mask_and_metadata(
        case
    )
    scale = case.head_dim**-0.5
    settings = dict(
        element_mask=case.element_mask, scale=scale, softcap=case.softcap,
        block_q=case.block_q, block_kv=case.block_kv, interpret=interpret,
    )
    o, lse = block_sparse_attention_forward(
        q, k, v, kv_indices, kv_counts, kv_full, case.operands, **settings
    )
    grads = block_sparse_attention_backward(
        q, k, v, o, lse, do, kv_indices, kv_counts, kv_full, q_indices, q_counts, q_full,
        case.operands, **settings,
    )

    def reference_output(q, k, v):
        return reference_attention(q, k, v, mask, scale=scale, softcap=case.softcap)[0]

    reference = reference_attention(q, k, v, mask, scale=scale, softcap=case.softcap)
    _, pullback = jax.vjp(reference_output, *(x.astype(jnp.float32) for x in (q, k, v)))
    reference_grads = pullback(do.astype(jnp.float32))
    return mask, (o, lse), grads, reference, reference_grads


def assert_matches_reference(case: Case, interpret=True):
    mask, (o, lse), grads, (ref_o, ref_lse), ref_grads = run_kernels(case, interpret)
    tolerance = TOLERANCES[case.dtype]
    assert o.dtype == case.dtype and lse.dtype == jnp.float32
    assert o.shape == ref_o.shape and lse.shape == ref_lse.shape
    np.testing.assert_allclose(
        np.asarray(o, np.float32), ref_o, atol=tolerance["forward"], rtol=tolerance["forward"]
    )
    np.testing.assert_allclose(lse, ref_lse, atol=tolerance["forward"], rtol=tolerance["forward"])
    for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert grad.dtype == case.dtype and grad.shape == ref_grad.shape, name
        np.testing.assert_allclose(
            np.asarray(grad, np.float32), ref_grad, atol=tolerance["gradient"],
            rtol=tolerance["gradient"], err_msg=name,
        )
    return mask, (o, lse), grads


def causal_case(kv_len=128, kv_lengths=None, **overrides) -> Case:
    """Causal over kv_len padded keys; by default the last 16 of them are padding.

    Args:
      kv_lengths: optional real lengths per sequence (a scalar operand [B]); default [kv_len - 16]
        shared by the batch (Bo == 1).
    """
    lengths = jnp.array([kv_len - 16] if kv_lengths is None else kv_lengths, jnp.int32)
    return Case(
        element_mask=causal_mask, operands=((), (), (lengths,)), q_len=kv_len, kv_len=kv_len,
        **overrides,
    )


def tile_pattern_operands(q_len, kv_len, block_q, block_kv, seed, empty_rows=()):
    """Operands of ``tile_pattern_mask``: tiles empty, full or random, and some rows emptied."""
    rng = np.random.default_rng(seed)
    row_kind = np.repeat(rng.integers(0, 3, q_len // block_q), block_q)
    column_kind = np.repeat(rng.integers(0, 3, kv_len // block_kv), block_kv)
    row_bits, column_bits = rng.integers(0, 4, q_len), rng.integers(0, 4, kv_len)
    row_alive = np.ones(q_len, np.int32)
    row_alive[list(empty_rows)] = 0
    rows = tuple(jnp.asarray(x[None], jnp.int32) for x in (row_kind, row_bits, row_alive))
    columns = tuple(jnp.asarray(x[None], jnp.int32) for x in (column_kind, column_bits))
    return rows, columns, ()


# ----------------------------------------------------------------------------- tests


def test_causal_with_padded_keys_f32_no_races():
    race_checking = compat.tpu_interpret_params(detect_races=True)
    assert_matches_reference(causal_case(), interpret=race_checking)
    assert compat.tpu_interpret_races_found() is False


def test_per_batch_per_head_metadata():
    """Metadata with Bm = B and Hm = H (the other tests broadcast at least one axis), and a
    per-sequence scalar operand (Bo = B): each batch has its own real length."""
    assert_matches_reference(
        causal_case(kv_len=64, kv_lengths=[48, 21], batch=2, metadata_batch=2, metadata_heads=2)
    )


@pytest.mark.parametrize("num_kv_heads, softcap", [(2, None), (1, 0.5)])
def test_sliding_window_per_head_gqa(num_kv_heads, softcap):
    case = Case(
        element_mask=sliding_window_mask([8, 24, 40, 72]), num_heads=4,
        num_kv_heads=num_kv_heads, head_dim=64, block_q=32, block_kv=64, metadata_heads=4,
        softcap=softcap,
    )
    assert_matches_reference(case)


def test_segment_ids_per_batch_metadata():
    # Batch 0 has only full tiles on the diagonal, batch 1 only partial tiles: reading the other
    # batch's lists or segment ids gives wrong answers.
    segments = jnp.array([[0] * 64 + [1] * 64, [0] * 40 + [1] * 70 + [2] * 18], jnp.int32)
    case = Case(
        element_mask=segment_mask, operands=((segments,), (segments,), ()), batch=2, num_heads=4,
        num_kv_heads=2, block_q=64, block_kv=64, metadata_batch=2,
    )
    assert_matches_reference(case)


def test_segment_ids_with_per_sequence_prefix_and_broadcast_rows():
    """Different q and kv lengths and tilings; q segment ids shared by the batch (Bo = 1), kv
    segment ids and a bidirectional prefix length per sequence (Bo = B)."""
    q_segments = jnp.array([[0] * 20 + [1] * 44], jnp.int32)
    kv_segments = jnp.array([[0] * 20 + [1] * 76 + [2] * 32, [0] * 50 + [1] * 78], jnp.int32)
    prefix = jnp.array([30, 5], jnp.int32)
    case = Case(
        element_mask=causal_segment_prefix_mask,
        operands=((q_segments,), (kv_segments,), (prefix,)), batch=2, q_len=64, kv_len=128,
        block_q=16, block_kv=64, metadata_batch=2,
    )
    assert_matches_reference(case)


def test_random_block_sparse_full_and_partial_tiles():
    case = Case(
        element_mask=tile_pattern_mask, operands=tile_pattern_operands(64, 128, 32, 32, seed=0),
        q_len=64, kv_len=128, seed=1,
    )
    _, metadata = case_mask_and_metadata(case)
    kv_counts, kv_full = metadata[1], metadata[2]
    listed = np.arange(kv_full.shape[-1]) < np.asarray(kv_counts)[..., None]
    assert np.asarray(kv_full)[listed].any() and not np.asarray(kv_full)[listed].all()
    assert len(set(np.asarray(kv_counts).ravel())) > 1, "want rows of different lengths"
    assert_matches_reference(case)


def test_empty_rows_give_zero_output_and_zero_gradients():
    # Rows 3, 40, 41 inside partial or full tiles are emptied element by element; rows 64:96 are a
    # whole q block with nothing listed.
    empty_rows = [3, 40, 41, *range(64, 96)]
    operands = tile_pattern_operands(128, 128, 32, 32, seed=2, empty_rows=empty_rows)
    case = Case(element_mask=tile_pattern_mask, operands=operands, seed=2)
    mask, (o, lse), (dq, dk, dv) = assert_matches_reference(case)
    empty = ~mask.any(-1)  # [B, H, T]
    assert empty[..., 64:96].all() and empty[..., empty_rows].all()
    assert (~empty).any()
    assert (np.asarray(o)[empty] == 0).all()
    assert (np.asarray(lse)[empty] == -np.inf).all()
    assert np.isfinite(np.asarray(lse)[~empty]).all()
    assert (np.asarray(dq)[empty] == 0).all()
    for grad in (o, dq, dk, dv):
        assert np.isfinite(np.asarray(grad)).all()


def test_nothing_visible_anywhere():
    case = Case(element_mask=nothing_visible_mask, q_len=64, kv_len=64)
    _, metadata = case_mask_and_metadata(case)
    assert metadata[0].shape[-1] == 0, "lists of width 0 must be accepted"
    _, (o, lse), grads, _, _ = run_kernels(case)
    assert (np.asarray(o) == 0).all() and (np.asarray(lse) == -np.inf).all()
    for grad in grads:
        assert (np.asarray(grad) == 0).all()


def test_bfloat16_with_softcap():
    case = Case(
        element_mask=sliding_window_mask([16, 48]), num_kv_heads=1, dtype=jnp.bfloat16,
        block_q=64, block_kv=32, metadata_heads=2, softcap=1.0,
    )
    assert_matches_reference(case)


def test_lowers_to_mosaic_for_tpu():
    """All three kernels lower to Mosaic (not interpret) with TPU-sized tiles, GQA, a soft cap and
    a mask built from every kind of operand: segment ids as row and column operands (per batch),
    a per-sequence prefix length as a scalar operand, plus broadcast (Bo = 1) operands."""
    batch, seq_len = 2, 256
    segments = jnp.array([[0] * 100 + [1] * 156, [0] * 200 + [1] * 56], jnp.int32)
    prefix = jnp.array([64, 10], jnp.int32)
    shared_flags = jnp.ones((1, seq_len), jnp.int32)
    shared_length = jnp.array([seq_len - 16], jnp.int32)

    def element_mask(rows, columns, scalars, b, h, q_idx, kv_idx):
        q_segments, q_flags = rows
        kv_segments, kv_flags = columns
        prefix_len, kv_len = scalars
        same_document = q_segments == kv_segments
        causal_or_prefix = (q_idx >= kv_idx) | (kv_idx < prefix_len)
        return same_document & causal_or_prefix & (kv_idx < kv_len) & ((q_flags & kv_flags) != 0)

    operands = ((segments, shared_flags), (segments, shared_flags), (prefix, shared_length))
    case = Case(
        element_mask=element_mask, operands=operands, batch=batch, num_heads=4, num_kv_heads=2,
        q_len=seq_len, kv_len=seq_len, head_dim=128, block_q=128, block_kv=128,
        dtype=jnp.bfloat16, softcap=1.0, metadata_batch=batch,
    )
    (q, k, v), do = random_inputs(case)
    _, metadata = case_mask_and_metadata(case)
    kv_counts, kv_full = np.asarray(metadata[1]), np.asarray(metadata[2])
    listed = np.arange(kv_full.shape[-1]) < kv_counts[..., None]
    assert not kv_full[listed].all(), "the element mask must be evaluated (partial tiles)"
    settings = dict(
        element_mask=case.element_mask, scale=0.125, softcap=case.softcap, block_q=128,
        block_kv=128,
    )

    def forward_and_backward(q, k, v, do, metadata, operands):
        o, lse = block_sparse_attention_forward(q, k, v, *metadata[:3], operands, **settings)
        return block_sparse_attention_backward(
            q, k, v, o, lse, do, *metadata, operands, **settings
        )

    with compat.tpu_lowering_without_tpu():
        exported = jax.export.export(jax.jit(forward_and_backward), platforms=["tpu"])(
            q, k, v, do, metadata, operands
        )
    module = exported.mlir_module()
    for name in ("fwd", "bwd_dq", "bwd_dkv"):
        assert f"jaxsparse_block_sparse_attention_{name}" in module
    assert module.count("tpu_custom_call") >= 3


@pytest.mark.parametrize(
    "q_shape, kv_shape, block_q, match",
    [
        ((1, 3, 64, 32), (1, 2, 64, 32), 32, "multiple of K"),
        ((1, 2, 64, 32), (1, 2, 64, 32), 48, "block_q"),
        ((1, 2, 64), (1, 2, 64, 32), 32, "rank 4"),
    ],
)
def test_rejects_bad_shapes(q_shape, kv_shape, block_q, match):
    q, k = jnp.zeros(q_shape), jnp.zeros(kv_shape)
    lists = jnp.zeros((1, 1, 2, 1), jnp.int32)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention_forward(
            q, k, k, lists, jnp.zeros((1, 1, 2), jnp.int32), lists, NO_OPERANDS,
            element_mask=causal_mask, scale=1.0, softcap=None, block_q=block_q, block_kv=32,
            interpret=True,
        )


@pytest.mark.parametrize(
    "operands, error, match",
    [
        (((jnp.zeros((1, 48), jnp.int32),), (), ()), ValueError, "row operand 0"),
        (((), (jnp.zeros((3, 64), jnp.int32),), ()), ValueError, "column operand 0"),
        (((), (), (jnp.zeros((2, 1), jnp.int32),)), ValueError, "scalar operand 0"),
        (((jnp.zeros((2, 64), jnp.float32),), (), ()), TypeError, "row operand 0"),
        (((), ()), ValueError, "mask_operands"),
    ],
)
def test_rejects_bad_mask_operands(operands, error, match):
    q = jnp.zeros((2, 2, 64, 32))
    lists = jnp.zeros((1, 1, 2, 1), jnp.int32)
    with pytest.raises(error, match=match):
        block_sparse_attention_forward(
            q, q, q, lists, jnp.zeros((1, 1, 2), jnp.int32), lists, operands,
            element_mask=segment_mask, scale=1.0, softcap=None, block_q=32, block_kv=32,
            interpret=True,
        )
