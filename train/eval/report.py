"""The evaluation table as markdown, and its section of BENCHMARKS.md (through :mod:`train.benchmarks_md`,
the writer the benchmark scripts use)."""

from __future__ import annotations

import pathlib

from train import benchmarks_md
from train.benchmarks_md import BENCHMARKS_MD, cpu_heading, markdown_table
from train.eval.harness import EvalResult
from train.eval.settings import describe_layout

SECTION = "eval-cpu"
TITLE = "Long-context evaluation (`python -m train.eval`)"
LOSS_WORDS = {"all": "every token", "answers": "the supervised tokens (answers, MQAR values, copies)"}
GROUP_NAMES = {"layout": "attention layout", "kv": "KV selection at decode", "ffn": "FFN sparsity"}


def _percent(value: float) -> str:
    return f"{100 * value:.0f}%"


def format_markdown(result: EvalResult) -> str:
    """A heading naming the machine and the run, a few lines of setup, and the task x setting table."""
    config, model = result.config, result.model
    tasks = [task.name for task in config.tasks]
    header = ["group", "setting", "prefill pairs (of causal)", "keys read / decode step", "FFN active",
              *tasks, "mean"]
    table = []
    for row in result.rows:
        accuracy = [row.accuracy[name] for name in tasks]
        table.append([GROUP_NAMES[row.setting.group], row.setting.label, _percent(row.attention_share),
                      _percent(row.keys_share), _percent(row.ffn_active), *(f"{value:.2f}" for value in accuracy),
                      f"{sum(accuracy) / len(accuracy):.2f}"])
    lines = markdown_table(header, table, "ll" + "r" * (len(header) - 2))
    if result.restored_from is not None:
        training = f"restored from `{result.restored_from}` (not trained by this run)"
    else:
        loss = "n/a" if result.final_loss is None else f"{result.final_loss:.3f}"
        training = (f"{result.steps} AdamW steps on the task mixture, batch {config.batch_size} x {config.seq_len} "
                    f"tokens, lr {config.lr:g}, loss on {LOSS_WORDS[config.loss_on]}, final loss {loss} "
                    f"({result.train_seconds:.0f} s)")
    trained = next((row for row in result.rows if row.setting.policy is None and row.setting.attention is None
                    and row.setting.ffn_sparsity is None), None)
    task_lines = ", ".join(f"{task.name} (answer {task.answer_len} tokens)" for task in config.tasks)
    sparsity = f", ffn_sparsity {model.spark_sparsity:g}" if model.ffn == "spark" else ""
    notes = [
        cpu_heading(),
        "",
        f"- model: `{result.preset}` ({model.ffn} FFN{sparsity}, {model.num_layers} layers, M = {model.model_dim}, "
        f"trained attention: {describe_layout(model.attention)}), byte tokens.",
        f"- training: {training}.",
        f"- evaluation: {config.eval_examples} held-out examples per task, prompts of {config.prompt_len} tokens: "
        f"{task_lines}; exact match of the greedy answer ({result.eval_seconds:.0f} s).",
        *([f"- answer tokens right, teacher-forced, as trained: "
           + ", ".join(f"{name} {value:.2f}" for name, value in trained.token_accuracy.items())
           + " (a digit at random: 0.10)."] if trained is not None else []),
        "- layout and FFN rows score one teacher-forced forward with the changed config and the trained weights "
        "(equal to greedy full-cache decoding); KV rows run `models.generate`: the first answer token comes from "
        "the prefill, the others from decode steps whose full-attention layers read only the selected keys "
        "(sliding-window layers keep their window).",
        "- prefill pairs: (query, key) pairs the masks visit, over those of causal attention; keys read: share of "
        "the cache a decode step reads, over layers and answer tokens (Quest: whole pages, an upper bound).",
        "",
    ]
    return "\n".join(notes + lines)


def write_section(markdown: str, *, path: pathlib.Path = BENCHMARKS_MD, name: str = SECTION,
                  title: str = TITLE) -> None:
    """Replaces this table's section of ``path`` (between its markers), keeping the rest of the file."""
    benchmarks_md.write_section(name, markdown, title=title, path=path)
