"""Architectures built from ``jaxsparse.nn`` (dense, Spark Transformer, BlockFFN MoE), with presets.

Empty until the models issue lands; run from a checkout (``python -m train``).
"""
