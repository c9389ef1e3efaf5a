"""``python -m train.eval``: train a tiny model on synthetic long-context tasks and print the quality vs sparsity table.

Examples::

    python -m train.eval                          # spark-tiny: about 3 minutes on an idle 2-core CPU
    python -m train.eval --quick                  # a short smoke run; writes nothing to BENCHMARKS.md
    python -m train.eval --checkpoint runs/eval   # save the trained model; a second run only evaluates

The table also goes to the ``eval-cpu`` section of BENCHMARKS.md (not with ``--quick``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from train.eval import harness, report
from train.eval.harness import LOSS_ON, EvalConfig

QUICK = dict(steps=40, eval_examples=8, top_k=(8,), quest_pages=(), token_select=(), ffn_sparsities=(0.0,))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = EvalConfig()
    parser = argparse.ArgumentParser(prog="python -m train.eval", description="Train a tiny model on synthetic "
                                     "long-context tasks and print the quality vs sparsity table.")
    parser.add_argument("--preset", default=defaults.preset, help=f"model preset (default {defaults.preset})")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps on the task mixture (default {defaults.steps}; "
                             f"{QUICK['steps']} with --quick)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help=f"sequences per training step (default {defaults.batch_size})")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len,
                        help=f"tokens per training sequence (default {defaults.seq_len})")
    parser.add_argument("--lr", type=float, default=defaults.lr, help=f"peak learning rate (default {defaults.lr:g})")
    parser.add_argument("--loss-on", choices=LOSS_ON, default=defaults.loss_on,
                        help=f"train on every token or on the supervised tokens only (default {defaults.loss_on})")
    parser.add_argument("--eval-examples", type=int, default=None,
                        help=f"held-out examples per task (default {defaults.eval_examples}; "
                             f"{QUICK['eval_examples']} with --quick)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help=f"initialisation and data seed (default {defaults.seed})")
    parser.add_argument("--checkpoint", default=None, metavar="DIR",
                        help="evaluate the model saved in DIR (by this command or by python -m train), or train "
                             "and save it there if DIR holds none")
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps, examples and settings; print the table but write nothing")
    return parser.parse_args(argv)


def eval_config(args: argparse.Namespace) -> EvalConfig:
    """The :class:`EvalConfig` of the parsed flags."""
    base = EvalConfig(**QUICK) if args.quick else EvalConfig()
    changes = dict(preset=args.preset, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                   loss_on=args.loss_on, seed=args.seed, checkpoint=args.checkpoint)
    if args.steps is not None:
        changes["steps"] = args.steps
    if args.eval_examples is not None:
        changes["eval_examples"] = args.eval_examples
    return dataclasses.replace(base, **changes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = harness.run(eval_config(args))
    except ValueError as error:  # a bad flag value, named in the message
        print(f"python -m train.eval: error: {error}", file=sys.stderr)
        return 2
    markdown = report.format_markdown(result)
    print(markdown)
    if not args.quick:
        report.write_section(markdown)
        print(f"\nwrote the {report.SECTION!r} section of {report.BENCHMARKS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
