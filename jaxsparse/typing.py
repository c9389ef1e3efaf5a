"""Axis glossary and array aliases used in docstrings and annotations across jaxsparse.

Axis letters (one meaning each, everywhere):

======  ==========================================================
``B``   batch
``T``   query positions
``S``   key/value positions
``H``   query heads
``K``   key/value heads (``G = H // K`` query heads share one)
``G``   query heads per kv head (grouped-query attention)
``D``   head dimension
``M``   model width
``F``   feed-forward width
``E``   experts
``N``   tokens (``B * T``)
``L``   tokens per group that shares one active-neuron set (a chunk; 1 for per-token sets)
``C``   such groups (``N / L``)
``nq``  query blocks (``ceil(T / block_q)``)
``nk``  key/value blocks (``ceil(S / block_kv)``)
======  ==========================================================

Public layouts follow ``jax.nn.dot_product_attention``: queries ``[B, T, H, D]``, keys and values
``[B, S, K, D]``. Query head ``h`` reads kv head ``h // G``.
"""

from __future__ import annotations

from typing import Union

import jax
import numpy as np

Array = jax.Array
"""Any JAX array; the docstring gives its shape in the glossary's letters."""

ArrayLike = Union[jax.Array, np.ndarray, int, float, bool]
"""Anything ``jnp.asarray`` accepts."""

DType = Union[np.dtype, type]
"""A dtype or scalar type such as ``jnp.float32``."""
