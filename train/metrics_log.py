"""Training metrics as JSON lines: one object per logged step (train) or evaluation (eval).

Each line has ``"step"`` and ``"split"`` (``"train"`` or ``"eval"``) and float values such as
``loss``, ``tokens_per_second``, ``lr``, ``ffn_tls``, ``ffn_cls``, ``attention_density`` and, for
MoE models, ``expert_load_imbalance``. A resumed run first drops the lines past its checkpoint step,
so the file never holds two different histories of the same step.
"""

from __future__ import annotations

import json
import math
import os


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Every record of a metrics file (an empty list when it does not exist); damaged lines are skipped."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as file:
        for line in file:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a killed process
                continue
    return records


class MetricsLog:
    """Appends metric records to ``path``, keeping only the records at or before ``start_step``.

    Args:
      path: the ``.jsonl`` file (created with its folder).
      start_step: the step the run starts from (0 for a new run, the checkpoint step on resume).
    """

    def __init__(self, path: str | os.PathLike, *, start_step: int = 0):
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        kept = [record for record in read_metrics(self.path) if record.get("step", 0) <= start_step]
        if start_step == 0:
            kept = []
        with open(self.path, "w") as file:
            for record in kept:
                file.write(json.dumps(record) + "\n")

    def write(self, step: int, split: str, values: dict) -> dict:
        """Appends ``{"step": step, "split": split, **values}`` (non-finite floats written as null)."""
        record = {"step": int(step), "split": split}
        for name, value in values.items():
            value = float(value)
            record[name] = value if math.isfinite(value) else None
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")
        return record
