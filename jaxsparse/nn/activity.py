"""Collecting the activity masks of a model's sparse FFN layers, and the sparsity metrics of each."""

from __future__ import annotations

import jax
from flax import nnx

from jaxsparse.metrics import activation_ratio, chunk_level_sparsity, token_level_sparsity


def _recording_layers(model: nnx.Module):
    return [module for _, module in nnx.iter_modules(model) if hasattr(module, "record_activity")]


def collect_activity(model: nnx.Module, *args, **kwargs):
    """Runs ``model(*args, **kwargs)`` once and returns what each sparse FFN layer activated.

    Every layer with a ``record_activity`` attribute (:class:`~jaxsparse.nn.SparseGatedFFN`,
    :class:`~jaxsparse.nn.SparkFFN`, and any layer of yours that sows an ``nnx.Intermediate`` named
    "activity" when it is set) records its bool activity mask for this call only.

    Returns:
      ``(output, {layer path: activity [..., F] for each call of that layer})``, the path joined
      with "/" (e.g. ``"blocks/3/ffn"``); a layer called twice gives a tuple of two masks.
    """
    layers = _recording_layers(model)
    for layer in layers:
        layer.record_activity = True
    try:
        output, intermediates = nnx.capture(model, nnx.Intermediate)(*args, **kwargs)
    finally:
        for layer in layers:
            layer.record_activity = False
    activity = {}
    for path, variable in nnx.to_flat_state(intermediates):
        if path[-1] != "activity":
            continue
        masks = tuple(variable.get_value())
        name = "/".join(map(str, path[:-1])) or type(model).__name__
        activity[name] = masks[0] if len(masks) == 1 else masks
    return output, activity


def sparsity_report(activity: dict, *, chunk_sizes=(8, 32), valid=None) -> dict[str, dict[str, float]]:
    """Per layer: activation ratio, TLS and CLS for each chunk size, as Python floats.

    Args:
      activity: ``{layer: bool [..., T, F]}`` (from :func:`collect_activity`).
      chunk_sizes: the chunk lengths L of the CLS_L columns.
      valid: optional bool ``[..., T]`` marking real (non-padding) tokens.

    Returns:
      ``{layer: {"activation_ratio": r, "tls": s, "cls_8": c8, ...}}``.
    """
    report = {}
    for name, mask in activity.items():
        row = {"activation_ratio": activation_ratio(mask, valid=valid), "tls": token_level_sparsity(mask, valid=valid)}
        for chunk in chunk_sizes:
            row[f"cls_{chunk}"] = chunk_level_sparsity(mask, chunk, valid=valid)
        report[name] = {key: float(value) for key, value in jax.device_get(row).items()}
    return report
