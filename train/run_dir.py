"""What a run directory holds, and whether a new run may start, resume or overwrite it.

Every check here happens before anything is written, so a refused run leaves the directory as it was.

Files a run owns under its directory: ``config.json`` (model + train config), ``checkpoints/``,
``metrics.jsonl``, ``metrics.png`` and ``dense_twin/`` (the ``--compare-dense`` run). ``--fresh``
deletes exactly these, nothing else.
"""

from __future__ import annotations

import json
import os
import shutil

from models import ModelConfig
from train.checkpoint import CHECKPOINT_DIR, latest_checkpoint_step

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
DENSE_TWIN_DIR = "dense_twin"
OWNED = (CONFIG_FILE, CHECKPOINT_DIR, METRICS_FILE, PLOT_FILE, DENSE_TWIN_DIR)


class RunDirError(ValueError):
    """The run directory cannot be used as asked (another model's run, or a run that would be overwritten)."""


def _json_roundtrip(values):
    return json.loads(json.dumps(values))


def holds_run(run_dir: str) -> bool:
    """True when ``run_dir`` has a previous run's config or checkpoints."""
    return os.path.isfile(os.path.join(run_dir, CONFIG_FILE)) or latest_checkpoint_step(run_dir) is not None


def saved_configs(run_dir: str) -> dict | None:
    """The ``{"model": ..., "train": ...}`` of ``run_dir/config.json``, or None when absent."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as file:
        return json.load(file)


def config_differences(saved: dict, requested: dict) -> list[str]:
    """``"field: saved -> requested"`` for every field whose JSON value differs."""
    saved, requested = _json_roundtrip(saved), _json_roundtrip(requested)
    return [f"{name}: {saved.get(name)!r} -> {requested.get(name)!r}"
            for name in sorted(set(saved) | set(requested)) if saved.get(name) != requested.get(name)]


def _with_defaults(saved_model: dict) -> dict:
    """A saved model config with the defaults of fields added since it was written (as is if it no
    longer parses: the comparison then lists what differs)."""
    try:
        return ModelConfig.from_dict(saved_model).to_dict()
    except (TypeError, ValueError):
        return saved_model


def check_run_dir(run_dir: str, model_config: dict, *, resume: bool, fresh: bool) -> str:
    """Decides what the run does with ``run_dir``: ``"new"``, ``"resume"`` or ``"fresh"``.

    Raises:
      RunDirError: ``run_dir`` is a file; it holds a run and neither resume nor fresh was asked;
        or it holds a run of a different model config and fresh was not asked (the message lists
        the differing fields).
    """
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunDirError(f"--output-dir {run_dir!r} is a file, not a directory")
    if not holds_run(run_dir):
        return "new"
    if fresh:
        return "fresh"
    if not resume:
        raise RunDirError(f"--output-dir {run_dir!r} already holds a run; pass --fresh to overwrite it or --resume "
                          "to continue it")
    saved = saved_configs(run_dir)
    if saved is None:
        step = latest_checkpoint_step(run_dir)
        from train.checkpoint import Checkpointer  # noqa: PLC0415

        saved = Checkpointer(run_dir).configs(step)
    differences = config_differences(_with_defaults(saved.get("model", {})), model_config)
    if differences:
        raise RunDirError(f"--output-dir {run_dir!r} holds a run of a different model config; nothing was changed. "
                          f"Differences (saved -> requested): {'; '.join(differences)}. Pass --fresh to overwrite it "
                          "or choose another --output-dir")
    return "resume"


def clear_run(run_dir: str) -> None:
    """Deletes a previous run's files from ``run_dir`` (only those listed in :data:`OWNED`)."""
    for name in OWNED:
        path = os.path.join(run_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def write_configs(run_dir: str, configs: dict) -> None:
    """Writes ``configs`` to ``run_dir/config.json`` (atomically)."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, CONFIG_FILE)
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "w") as file:
        json.dump(configs, file, indent=2, sort_keys=True)
        file.write("\n")
    os.replace(partial, path)
