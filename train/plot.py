"""The run's picture: loss and held-out loss against step, and the sparsity the model reached."""

from __future__ import annotations

import os

SPARSITY_METRICS = (("ffn_tls", "FFN token-level sparsity (TLS)"), ("ffn_cls", "FFN chunk-level sparsity (CLS)"),
                    ("attention_density", "attention density"))


def _series(records, split, name):
    points = [(record["step"], record[name]) for record in records
              if record.get("split") == split and record.get(name) is not None]
    return [step for step, _ in points], [value for _, value in points]


def plot_metrics(records: list[dict], path: str | os.PathLike, *, dense_records: list[dict] | None = None,
                 title: str = "") -> str:
    """Writes a two-panel PNG: losses vs step (with the dense twin's if given), and sparsity vs step.

    Args:
      records: the run's metrics records (:func:`train.metrics_log.read_metrics`).
      path: the PNG to write.
      dense_records: the dense twin's records, or None.
      title: the figure title.

    Returns:
      ``path`` as a string.
    """
    import matplotlib  # noqa: PLC0415  (only the plot needs it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, (loss_axes, sparsity_axes) = plt.subplots(1, 2, figsize=(11, 4))
    runs = [("", records)] + ([("dense twin ", dense_records)] if dense_records else [])
    for prefix, run_records in runs:
        style = "--" if prefix else "-"
        for split, label in (("train", "train loss"), ("eval", "held-out loss")):
            steps, values = _series(run_records, split, "loss")
            if steps:
                loss_axes.plot(steps, values, style, marker="o" if split == "eval" else None, markersize=3,
                               label=prefix + label)
    loss_axes.set_xlabel("step")
    loss_axes.set_ylabel("cross entropy (nats / token)")
    loss_axes.set_title("loss")
    loss_axes.grid(alpha=0.3)
    if loss_axes.lines:
        loss_axes.legend()
    for name, label in SPARSITY_METRICS:
        steps, values = _series(records, "train", name)
        if steps:
            sparsity_axes.plot(steps, values, label=label)
    sparsity_axes.set_xlabel("step")
    sparsity_axes.set_ylim(-0.02, 1.02)
    sparsity_axes.set_title("sparsity")
    sparsity_axes.grid(alpha=0.3)
    if sparsity_axes.lines:
        sparsity_axes.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = os.fspath(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
