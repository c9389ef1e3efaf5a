"""Functional ops: one folder per op (public api, reference, config, one adapter per backend)."""
