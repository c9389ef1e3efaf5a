"""The training run's settings: one frozen dataclass, checked on construction, JSON round-trippable."""

from __future__ import annotations

import dataclasses
import math
import os


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything about a training run except the model (that is :class:`models.ModelConfig`).

    Every field is a ``python -m train`` flag: ``batch_size`` is ``--batch-size``.

    Attributes:
      preset: model preset name (``models.get_preset``), used when no model config is given.
      steps: optimizer steps the run ends at (a resumed run continues up to this step).
      batch_size: sequences per step (B).
      seq_len: tokens per sequence (T); None takes ``min(128, model max_seq_len)``.
      lr: peak learning rate, reached after ``warmup_steps``.
      warmup_steps: linear warm-up length; None takes ``min(100, steps // 10)``.
      min_lr_ratio: the cosine decay ends at ``lr * min_lr_ratio``.
      lr_decay_steps: where the cosine ends; None takes ``steps`` (set it to split one schedule over
        several runs: a 4-step run with ``lr_decay_steps=8``, resumed to 8 steps, equals an 8-step run).
      weight_decay: AdamW decoupled weight decay, on matrices only (not norms, biases or router biases).
      adam_b1, adam_b2, adam_eps: AdamW moments.
      clip_norm: global gradient-norm clip; 0 turns clipping off.
      eval_every: evaluate on the held-out split every this many steps (0: only at the end).
      eval_batches: held-out batches per evaluation (fixed windows, the same at every evaluation).
      checkpoint_every: save an orbax checkpoint every this many steps (0: only at the end).
      keep_checkpoints: how many recent checkpoints to keep.
      log_every: write a metrics line (and refresh the progress bar's numbers) every this many steps.
      seed: model initialisation and data-window seed; the batch of step s depends on (seed, s) only.
      data: text files, folders of text files, or one ``.npy`` token array; empty: the built-in
        corpus (the Python standard library's ``*.py`` sources as bytes).
      holdout: fraction of the tokens (the last ones) held out for evaluation.
      corpus_bytes: cap on the built-in corpus size.
      cache_dir: where the built-in corpus ``.npy`` is cached; None: ``$XDG_CACHE_HOME/jaxsparse``
        or ``~/.cache/jaxsparse``.
      output_dir: the run directory; None: ``runs/<preset>``.
      resume: continue from the latest checkpoint in ``output_dir`` if there is one.
      fresh: delete ``output_dir``'s previous run (checkpoints, metrics, plot) and start at step 0.
      mesh: device mesh, ``"auto"`` (all devices on ``data`` when there is more than one), ``"none"``
        (a single device) or axis sizes such as ``"data=2,fsdp=4"`` (one size may be -1).
      compare_dense: after the run, train the model's dense twin the same way on the same data.
      progress: show a tqdm progress bar.
      plot: write ``metrics.png`` at the end.
    """

    preset: str = "spark-tiny"
    steps: int = 200
    batch_size: int = 8
    seq_len: int | None = None
    lr: float = 3e-3
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1
    lr_decay_steps: int | None = None
    weight_decay: float = 0.1
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    clip_norm: float = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    data: tuple[str, ...] = ()
    holdout: float = 0.05
    corpus_bytes: int = 4_000_000
    cache_dir: str | None = None
    output_dir: str | None = None
    resume: bool = True
    fresh: bool = False
    mesh: str = "auto"
    compare_dense: bool = False
    progress: bool = True
    plot: bool = True

    def __post_init__(self):
        if isinstance(self.data, (str, os.PathLike)):
            object.__setattr__(self, "data", (os.fspath(self.data),))
        else:
            object.__setattr__(self, "data", tuple(os.fspath(path) for path in self.data))
        for name in ("steps", "batch_size", "eval_batches", "keep_checkpoints", "log_every", "corpus_bytes"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("eval_every", "checkpoint_every", "seed"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in ("seq_len", "lr_decay_steps"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        if self.warmup_steps is not None:
            _check_int("warmup_steps", self.warmup_steps, minimum=0)
        _check_number("lr", self.lr, low=0.0, low_open=True)
        _check_number("min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        _check_number("weight_decay", self.weight_decay, low=0.0)
        _check_number("adam_b1", self.adam_b1, low=0.0, high=1.0, high_open=True)
        _check_number("adam_b2", self.adam_b2, low=0.0, high=1.0, high_open=True)
        _check_number("adam_eps", self.adam_eps, low=0.0, low_open=True)
        _check_number("clip_norm", self.clip_norm, low=0.0)
        _check_number("holdout", self.holdout, low=0.0, high=1.0, low_open=True, high_open=True)
        if not isinstance(self.preset, str) or not self.preset:
            raise ValueError(f"preset must be a non-empty string, got {self.preset!r}")
        for name in ("resume", "fresh", "compare_dense", "progress", "plot"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        from train.mesh import parse_mesh  # noqa: PLC0415  (mesh imports jax; keep this module light)

        parse_mesh(self.mesh)

    @property
    def run_dir(self) -> str:
        """The output directory: ``output_dir`` or ``runs/<preset>``."""
        return self.output_dir if self.output_dir is not None else os.path.join("runs", self.preset)

    @property
    def warmup(self) -> int:
        """The warm-up length in steps (``warmup_steps`` or its default)."""
        return self.warmup_steps if self.warmup_steps is not None else min(100, self.steps // 10)

    @property
    def decay_steps(self) -> int:
        """The step where the cosine decay ends (``lr_decay_steps`` or ``steps``)."""
        return self.lr_decay_steps if self.lr_decay_steps is not None else self.steps

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        out = dataclasses.asdict(self)
        out["data"] = list(self.data)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """The inverse of :meth:`to_dict`; unknown keys raise ValueError naming them."""
        unknown = sorted(set(values) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known: {field_names()}")
        values = dict(values)
        if "data" in values and values["data"] is not None and not isinstance(values["data"], str):
            values["data"] = tuple(values["data"])
        return cls(**values)


def field_names() -> list[str]:
    """The TrainConfig field names, in declaration order."""
    return [field.name for field in dataclasses.fields(TrainConfig)]


# Fields that decide which tokens a step sees: a resumed run that changes them no longer continues
# the same data stream, which the run reports (it is allowed: one may extend a run on new data).
DATA_FIELDS = ("seed", "batch_size", "seq_len", "data", "holdout", "corpus_bytes")


def _check_int(name, value, *, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_number(name, value, *, low=None, high=None, low_open=False, high_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        interval = f"{'(' if low_open else '['}{low if low is not None else '-inf'}, " \
                   f"{high if high is not None else 'inf'}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
