"""Token- and chunk-level sparsity against explicit loops."""

from __future__ import annotations

import numpy as np
import pytest

import jax

from jaxsparse.metrics import activation_ratio, chunk_level_sparsity, token_level_sparsity


def _random_mask(seed, shape, density):
    return np.random.default_rng(seed).random(shape) < density


def _loop_cls(mask, chunk, valid):
    """CLS by explicit loops over sequences and chunks (a trailing partial chunk counts)."""
    used = []
    for b in range(mask.shape[0]):
        for start in range(0, mask.shape[1], chunk):
            rows = [t for t in range(start, min(start + chunk, mask.shape[1])) if valid[b, t]]
            if rows:
                used.append(np.mean(np.any(mask[b, rows], axis=0)))
    return 1.0 - np.mean(used)


@pytest.mark.parametrize("chunk", [1, 3, 8, 20])
def test_chunk_level_sparsity_matches_loops(chunk):
    mask = _random_mask(0, (3, 20, 48), 0.1)
    valid = _random_mask(1, (3, 20), 0.8)
    np.testing.assert_allclose(float(jax.jit(chunk_level_sparsity, static_argnums=1)(mask, chunk, valid=valid)),
                               _loop_cls(mask, chunk, valid), rtol=1e-6)
    np.testing.assert_allclose(float(chunk_level_sparsity(mask, chunk)), _loop_cls(mask, chunk, np.ones((3, 20), bool)), rtol=1e-6)


def test_token_level_sparsity_and_ratio():
    mask = _random_mask(2, (4, 10, 32), 0.2)
    valid = _random_mask(3, (4, 10), 0.5)
    expected = 1.0 - np.mean(mask[valid])
    np.testing.assert_allclose(float(token_level_sparsity(mask, valid=valid)), expected, rtol=1e-6)
    np.testing.assert_allclose(float(activation_ratio(mask, valid=valid)), 1.0 - expected, rtol=1e-6)
    np.testing.assert_allclose(float(chunk_level_sparsity(mask, 1)), float(token_level_sparsity(mask)), rtol=1e-6)


def test_chunks_are_less_sparse_than_tokens():
    mask = _random_mask(4, (2, 64, 128), 0.05)
    tls, cls8 = float(token_level_sparsity(mask)), float(chunk_level_sparsity(mask, 8))
    # Independent 5% activity: a chunk of 8 uses 1 - 0.95^8 = 34% of the neurons.
    assert tls > cls8 and abs(cls8 - 0.95**8) < 0.03


def test_metric_errors():
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        chunk_level_sparsity(np.ones((2, 4), bool), 0)
    with pytest.raises(ValueError, match="valid must have"):
        token_level_sparsity(np.ones((2, 4), bool), valid=np.ones(3, bool))
    with pytest.raises(ValueError, match=r"mask must be \[..., T, F\]"):
        chunk_level_sparsity(np.ones(4, bool), 2)
