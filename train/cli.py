"""``python -m train``: flags -> (TrainConfig, ModelConfig) -> :func:`train.run` -> a printed report.

Values are layered: the TrainConfig defaults, then ``--config file.json``, then the flags. The model
config is the preset's, then the file's ``"model"`` entries, then ``--model.<field>=value`` and
``--set model.<field>=value`` in the order given. Every value is checked before anything is
written; a bad one stops with an argparse error naming its flag.

Examples::

    python -m train --preset spark-tiny --steps 300
    python -m train --preset moe-tiny --steps 100 --batch-size 4 --seq-len 64 --fresh
    python -m train --preset spark-tiny --model.ffn_sparsity=0.5 --compare-dense
    python -m train --config runs/spark-tiny/config.json --steps 600      # continue a run longer
    python -m train --preset dense-tiny --data my_texts/ --mesh data=2,fsdp=4
"""

from __future__ import annotations

import argparse
import json
import sys

from train.config import TrainConfig
from train.overrides import apply_overrides, coerce, field_types, parse_assignment

_HELP = {
    "preset": "model preset (see --list-presets)",
    "steps": "optimizer steps to train to (a resumed run continues up to this step)",
    "batch_size": "sequences per step",
    "seq_len": "tokens per sequence (default: min(128, the model's max_seq_len))",
    "lr": "peak learning rate",
    "warmup_steps": "linear warm-up steps (default: min(100, steps // 10))",
    "min_lr_ratio": "the cosine decay ends at lr * this",
    "lr_decay_steps": "step where the cosine decay ends (default: --steps)",
    "weight_decay": "AdamW weight decay (matrices only)",
    "adam_b1": "AdamW beta1",
    "adam_b2": "AdamW beta2",
    "adam_eps": "AdamW epsilon",
    "clip_norm": "global gradient-norm clip (0: off)",
    "eval_every": "evaluate on the held-out split every N steps (0: only at the end)",
    "eval_batches": "held-out batches per evaluation",
    "checkpoint_every": "save a checkpoint every N steps (0: only at the end)",
    "keep_checkpoints": "checkpoints to keep",
    "log_every": "write a metrics line every N steps",
    "seed": "initialisation and data seed (the batch of step s depends on seed and s only)",
    "data": "text files, folders or .npy token arrays (default: the built-in standard-library corpus)",
    "holdout": "fraction of the tokens (the last ones) held out for evaluation",
    "corpus_bytes": "size cap of the built-in corpus",
    "cache_dir": "cache folder of the built-in corpus (default: ~/.cache/jaxsparse)",
    "output_dir": "run directory (default: runs/<preset>)",
    "resume": "continue from the latest checkpoint in the run directory (default: on)",
    "fresh": "delete the run directory's previous run and start over",
    "mesh": "device mesh: auto, none, or axis sizes such as data=2,fsdp=4",
    "compare_dense": "also train the dense twin on the same data and report both losses",
    "progress": "show a progress bar",
    "plot": "write metrics.png at the end",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _optional(kind):
    def parse(text: str):
        return None if text.strip().lower() in ("none", "null", "auto", "default") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one flag per TrainConfig field, plus ``--config``, ``--set``, ``--list-presets``.

    Defaults are suppressed, so the namespace holds only what was given on the command line.
    """
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a jaxsparse model preset on the built-in corpus or your data, with checkpoints, "
                    "automatic resume, metrics and a plot.",
        epilog="Any model config field: --model.<field>=value (e.g. --model.ffn_sparsity=0.5) or "
               "--set model.<field>=value. Outputs in the run directory: config.json, checkpoints/, "
               "metrics.jsonl, metrics.png (and dense_twin/ with --compare-dense).",
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE.json",
                        help="JSON with TrainConfig fields and an optional \"model\" object of ModelConfig fields "
                             "(a run's config.json works); flags override it")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", dest="assignments",
                        help="model.<field>=value or train.<field>=value (repeatable)")
    parser.add_argument("--list-presets", action="store_true", help="print the model presets and exit")
    defaults = TrainConfig()
    for name, annotation in field_types(TrainConfig).items():
        flag, default = _flag(name), getattr(defaults, name)
        help_text = _HELP.get(name, name)
        if "default" not in help_text:
            help_text += f" (default: {default!r})"
        if annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif name == "data":
            parser.add_argument(flag, nargs="+", action="extend", metavar="PATH", help=help_text)
        elif annotation in (int, float):
            parser.add_argument(flag, type=annotation, metavar=annotation.__name__.upper(), help=help_text)
        elif annotation in (int | None, float | None):
            kind = int if annotation == int | None else float
            parser.add_argument(flag, type=_optional(kind), metavar=kind.__name__.upper(), help=help_text)
        else:
            parser.add_argument(flag, type=str if annotation is str else _optional(str), help=help_text)
    return parser


def _flag_error(parser, error: Exception):
    """argparse's error for a config ValueError, naming the flag when the message starts with a field."""
    message = str(error)
    first = message.split(" ", 1)[0].rstrip(":")
    if first in field_types(TrainConfig):
        message = f"argument {_flag(first)}: {message}"
    parser.error(message)


def _split_model_flags(parser, extras: list[str]) -> list[tuple[str, str]]:
    """``--model.x=v`` / ``--model.x v`` pairs from the arguments argparse did not know."""
    pairs, index = [], 0
    while index < len(extras):
        item = extras[index]
        if not item.startswith("--model."):
            parser.error(f"unrecognized arguments: {' '.join(extras[index:])}")
        key, sep, value = item[len("--model."):].partition("=")
        if not sep:
            if index + 1 >= len(extras):
                parser.error(f"argument --model.{key}: expected a value")
            value, index = extras[index + 1], index + 1
        pairs.append((key, value))
        index += 1
    return pairs


def _read_config_file(parser, path: str) -> tuple[dict, dict]:
    try:
        with open(path) as file:
            values = json.load(file)
    except FileNotFoundError:
        parser.error(f"argument --config: {path!r} does not exist")
    except (OSError, json.JSONDecodeError) as error:
        parser.error(f"argument --config: cannot read {path!r} as JSON: {error}")
    if not isinstance(values, dict):
        parser.error(f"argument --config: {path!r} must hold a JSON object")
    values = dict(values)
    model = values.pop("model", None) or {}
    train = values.pop("train", None) or {}
    train.update(values)
    if not isinstance(model, dict) or not isinstance(train, dict):
        parser.error(f"argument --config: 'model' and 'train' in {path!r} must be JSON objects")
    known = field_types(TrainConfig)
    unknown = sorted(set(train) - set(known))
    if unknown:
        parser.error(f"argument --config: unknown TrainConfig field(s) {unknown} in {path!r}")
    return train, model


def parse_args(argv=None):
    """``(TrainConfig, ModelConfig)`` from command-line arguments (``sys.argv[1:]`` when None).

    Exits through ``argparse`` (status 2, message naming the flag) on a bad value.
    """
    import models  # noqa: PLC0415

    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    namespace = vars(args)
    if namespace.pop("list_presets", False):
        for name, config in models.PRESETS.items():
            print(f"{name:18s} ffn={config.ffn:8s} layers={config.num_layers} M={config.model_dim} "
                  f"V={config.vocab_size} max_seq_len={config.max_seq_len}")
        parser.exit(0)
    model_pairs = _split_model_flags(parser, extras)
    train_values, model_values = {}, {}
    if "config" in namespace:
        train_values, model_values = _read_config_file(parser, namespace.pop("config"))
    for assignment in namespace.pop("assignments", []) or []:
        try:
            key, value = parse_assignment(assignment)
        except ValueError as error:
            parser.error(str(error))
        scope, dot, field = key.partition(".")
        if not dot:
            scope, field = "train", key
        if scope == "model":
            model_pairs.append((field, value))
        elif scope == "train":
            annotation = field_types(TrainConfig).get(field.replace("-", "_"))
            if annotation is None:
                parser.error(f"argument --set: TrainConfig has no field {field!r}")
            try:
                train_values[field.replace("-", "_")] = coerce(value, annotation, name=f"--set {key}")
            except ValueError as error:
                parser.error(str(error))
        else:
            parser.error(f"argument --set: keys start with 'model.' or 'train.', got {key!r}")
    train_values.update(namespace)
    if isinstance(train_values.get("data"), list):
        train_values["data"] = tuple(train_values["data"])
    try:
        train_config = TrainConfig(**train_values)
    except (TypeError, ValueError) as error:
        _flag_error(parser, error)
    try:
        model_config = models.get_preset(train_config.preset)
    except ValueError as error:
        parser.error(f"argument --preset: {error}")
    try:
        model_config = apply_overrides(model_config, [(name, _as_text(value)) for name, value in model_values.items()],
                                       flag_prefix="--config model.")
        model_config = apply_overrides(model_config, model_pairs)
    except ValueError as error:
        parser.error(str(error))
    return train_config, model_config


def _as_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def main(argv=None) -> int:
    """Parses the flags, trains, prints the report; returns the exit status."""
    from train.loop import run  # noqa: PLC0415
    from train.report import format_report  # noqa: PLC0415

    train_config, model_config = parse_args(argv)
    try:
        summary = run(train_config, model_config)
    except (ValueError, FileNotFoundError) as error:
        print(f"python -m train: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; run again to resume from the last checkpoint in {train_config.run_dir}", file=sys.stderr)
        return 130
    print(format_report(summary))
    return 0

