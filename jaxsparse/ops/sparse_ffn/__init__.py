"""Sparse FFN for decoding: active-neuron lists, and an FFN that gathers only their weights."""

from jaxsparse.ops.sparse_ffn.active_set import ActiveNeurons, select_active_neurons
from jaxsparse.ops.sparse_ffn.api import IMPLEMENTATIONS, OVERFLOW_POLICIES, sparse_ffn, sparse_ffn_decode

__all__ = [
    "IMPLEMENTATIONS", "OVERFLOW_POLICIES", "ActiveNeurons", "select_active_neurons", "sparse_ffn", "sparse_ffn_decode",
]
