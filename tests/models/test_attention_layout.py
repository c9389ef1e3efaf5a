"""Layer masks, document positions and the exact attention density, against brute-force T x T masks."""

import jax.numpy as jnp
import numpy as np
import pytest

from models import LayerAttention
from models.attention_layout import document_starts, layer_mask, visible_share

LENGTH = 13
LAYOUTS = [
    LayerAttention(),
    LayerAttention(kind="sliding_window", window=4),
    LayerAttention(kind="sliding_window", window=3, sinks=2),
    LayerAttention(kind="sliding_window", window=20, sinks=1),
]
SEGMENTS = np.array([[0] * 5 + [1] * 6 + [2] * 2, [7] * LENGTH])


def _dense(layout, segment_ids):
    q, k = np.arange(LENGTH)[:, None], np.arange(LENGTH)[None, :]
    visible = np.asarray(layer_mask(layout)(0, 0, jnp.asarray(q), jnp.asarray(k)))  # [T, T]
    return visible[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])  # [B, T, T]


def test_window_counts_the_query_and_sinks_stay_visible():
    visible = _dense(LayerAttention(kind="sliding_window", window=3, sinks=2), np.zeros((1, LENGTH), int))[0]
    np.testing.assert_array_equal(np.flatnonzero(visible[9]), [0, 1, 7, 8, 9])
    np.testing.assert_array_equal(np.flatnonzero(visible[2]), [0, 1, 2])
    assert not visible[3, 4]  # causal


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: f"{layout.kind}-{layout.window}-{layout.sinks}")
@pytest.mark.parametrize("packed", [False, True])
def test_visible_share_is_exact(layout, packed):
    segment_ids = SEGMENTS if packed else np.zeros((2, LENGTH), int)
    expected = _dense(layout, segment_ids).mean()
    starts = document_starts(jnp.asarray(segment_ids) if packed else None, LENGTH)
    np.testing.assert_allclose(float(visible_share(layout, starts)), expected, rtol=1e-6)


def test_document_starts():
    starts = np.asarray(document_starts(jnp.asarray(SEGMENTS), LENGTH))
    np.testing.assert_array_equal(starts[0], [0] * 5 + [5] * 6 + [11] * 2)
    np.testing.assert_array_equal(starts[1], [0] * LENGTH)
    np.testing.assert_array_equal(np.asarray(document_starts(None, 4)), [[0, 0, 0, 0]])
