"""Training entry point (``python -m train``).

Until the training CLI lands, ``python -m train`` runs :mod:`train.demo`: a short tour of block-sparse
attention that prints mask pictures and a table of xla vs dense timings and errors.
"""
