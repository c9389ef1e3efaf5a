"""``train.run``: one training run from configs to checkpoints, metrics, plot and a summary dict."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import jax
import numpy as np
from flax import nnx

from train import run_dir as run_files
from train.checkpoint import Checkpointer
from train.config import DATA_FIELDS, TrainConfig
from train.data import TokenData, load_data
from train.mesh import build_mesh, describe_mesh
from train.metrics_log import MetricsLog, read_metrics
from train.optimizer import learning_rate_schedule, make_optimizer
from train.plot import plot_metrics
from train.state import state_layout
from train.step import make_eval_step, make_train_step

DEFAULT_SEQ_LEN = 128
REPORTED_METRICS = ("ffn_tls", "ffn_cls", "attention_density", "expert_load_imbalance")


def resolve_seq_len(train_config: TrainConfig, model_config) -> int:
    """``--seq-len`` or ``min(128, max_seq_len)``; ValueError naming ``--seq-len`` past ``max_seq_len``."""
    if train_config.seq_len is None:
        return min(DEFAULT_SEQ_LEN, model_config.max_seq_len)
    if train_config.seq_len > model_config.max_seq_len:
        raise ValueError(f"--seq-len {train_config.seq_len} exceeds the model's max_seq_len "
                         f"{model_config.max_seq_len} (raise it with --model.max_seq_len=...)")
    return train_config.seq_len


def run(train_config: TrainConfig, model_config=None, *, log=None) -> dict:
    """Trains a model (resuming from the run directory's latest checkpoint) and returns a summary.

    Everything that can be checked is checked before anything is written: the model config, the
    sequence length, the data (paths, vocabulary), the mesh, and whether the run directory may be
    used (a run of another model config there is refused unless ``fresh``).

    Args:
      train_config: the run's :class:`~train.config.TrainConfig`.
      model_config: a ``models.ModelConfig``; None: ``models.get_preset(train_config.preset)``.
      log: ``log(message)`` for progress messages; None prints them (above the progress bar).

    Returns:
      A dict: ``run_dir``, ``model`` (the config dict), ``ffn``, ``step``, ``start_step``,
      ``final_loss``, ``final_eval_loss``, ``ffn_tls``, ``ffn_cls``, ``attention_density``,
      ``expert_load_imbalance`` (None unless MoE), ``parameters``, ``tokens_per_second``, ``seconds``,
      ``checkpoint_dir``, ``checkpoint_step``, ``metrics_file``, ``plot``, ``data``, ``mesh`` and
      ``dense_twin`` (the same dict for the dense twin with ``compare_dense``, else None).

    Raises:
      ValueError: an unknown preset, a bad config value, a sequence longer than the model's, bad data,
        a mesh that does not fit (each naming its flag); ``train.run_dir.RunDirError`` (a ValueError)
        for a run directory holding another model's run or a run that would be overwritten.
      FileNotFoundError: a ``--data`` path that does not exist.
    """
    import models  # noqa: PLC0415  (heavy; imported when a run starts)

    log = log if log is not None else _print
    if model_config is None:
        model_config = models.get_preset(train_config.preset)
    seq_len = resolve_seq_len(train_config, model_config)
    data = load_data(train_config, vocab_size=model_config.vocab_size, seq_len=seq_len)
    build_mesh(train_config.mesh, train_config.batch_size, seq_len)  # checks the mesh before anything is written
    run_dir = train_config.run_dir
    decision = run_files.check_run_dir(run_dir, model_config.to_dict(), resume=train_config.resume,
                                       fresh=train_config.fresh)
    twin_config = twin_train_config = twin_decision = None
    if train_config.compare_dense and models.dense_twin(model_config) == model_config:
        log("--compare-dense: the model is already dense, so there is no twin to train")
    elif train_config.compare_dense:
        twin_config = models.dense_twin(model_config)
        twin_train_config = dataclasses.replace(train_config, output_dir=os.path.join(run_dir, run_files.DENSE_TWIN_DIR),
                                                compare_dense=False, plot=False)
        twin_decision = "new" if decision == "fresh" else run_files.check_run_dir(
            twin_train_config.run_dir, twin_config.to_dict(), resume=train_config.resume, fresh=train_config.fresh)

    log(f"data: {data.source}; {data.train.size:,} training / {data.heldout.size:,} held-out tokens")
    summary = _train(train_config, model_config, data, seq_len, decision, log, label=train_config.preset)
    if twin_config is not None:
        log(f"dense twin: training {twin_config.ffn} FFN model in {twin_train_config.run_dir}")
        summary["dense_twin"] = _train(twin_train_config, twin_config, data, seq_len, twin_decision, log,
                                       label="dense twin")
    if train_config.plot:
        twin_records = read_metrics(summary["dense_twin"]["metrics_file"]) if summary["dense_twin"] else None
        summary["plot"] = plot_metrics(read_metrics(summary["metrics_file"]), os.path.join(run_dir, run_files.PLOT_FILE),
                                       dense_records=twin_records, title=f"{train_config.preset} ({model_config.ffn} FFN)")
    return summary


def _print(message: str) -> None:
    from tqdm import tqdm  # noqa: PLC0415

    tqdm.write(message)


def _host(values: dict) -> dict:
    return {name: float(value) for name, value in jax.device_get(values).items()}


def _evaluate(eval_step, state, batches) -> dict:
    results = [jax.device_get(eval_step(state, tokens)) for tokens in batches]
    return {name: float(np.mean([result[name] for result in results])) for name in results[0]}


def _train(train_config: TrainConfig, model_config, data: TokenData, seq_len: int, decision: str, log,
           *, label: str) -> dict:
    """One run in ``train_config.run_dir`` (``decision`` from :func:`train.run_dir.check_run_dir`)."""
    from models import Transformer  # noqa: PLC0415

    run_dir = train_config.run_dir
    began = time.perf_counter()
    if decision == "fresh":
        run_files.clear_run(run_dir)
    previous = run_files.saved_configs(run_dir) if decision == "resume" else None
    mesh = build_mesh(train_config.mesh, train_config.batch_size, seq_len)
    tx = make_optimizer(train_config)
    schedule = learning_rate_schedule(train_config)
    layout = state_layout(lambda: Transformer(model_config, rngs=nnx.Rngs(train_config.seed)), tx, mesh)

    configs = {"model": model_config.to_dict(), "train": train_config.to_dict()}
    checkpointer = Checkpointer(run_dir, keep=train_config.keep_checkpoints)
    run_files.write_configs(run_dir, configs)
    start = checkpointer.latest_step() if decision == "resume" else None
    if start is not None:
        state = checkpointer.restore(start, layout.abstract, layout.shardings)
        log(f"{label}: resuming from the checkpoint of step {start} in {checkpointer.directory}")
        changed = [name for name in DATA_FIELDS
                   if previous and run_files.config_differences({name: previous["train"].get(name)},
                                                                {name: configs["train"][name]})]
        if changed:
            log(f"{label}: note: {', '.join(changed)} changed since the checkpoint; the data stream differs from "
                "the original run's")
    else:
        state, start = layout.init(), 0
    metrics_log = MetricsLog(os.path.join(run_dir, run_files.METRICS_FILE), start_step=start)
    log(f"{label}: {model_config.ffn} FFN, {layout.parameter_count:,} parameters, batch {train_config.batch_size} x "
        f"{seq_len} tokens, {describe_mesh(mesh)}, steps {start} -> {train_config.steps}")

    train_step = make_train_step(layout.graphdef, tx, schedule, state_shardings=layout.shardings,
                                 batch_sharding=layout.batch_sharding)
    eval_step = make_eval_step(layout.graphdef, state_shardings=layout.shardings, batch_sharding=layout.batch_sharding)
    put = (lambda tokens: jax.device_put(tokens, layout.batch_sharding)) if mesh is not None else jax.device_put
    eval_batches = [put(tokens) for tokens in data.eval_batches(train_config.eval_batches, train_config.batch_size,
                                                                seq_len)]
    tokens_per_step = train_config.batch_size * seq_len
    timer = _Throughput()
    last_train, last_eval = {}, {}
    saved_step = start if decision == "resume" and start else None

    from tqdm import tqdm  # noqa: PLC0415

    bar = tqdm(total=train_config.steps, initial=start, desc=label, disable=not train_config.progress,
               dynamic_ncols=True, leave=True)
    try:
        for step in range(start, train_config.steps):
            tokens = put(data.batch(train_config.seed, step, train_config.batch_size, seq_len))
            state, metrics = train_step(state, tokens)
            done = step + 1
            timer.step_taken(done == start + 1, metrics)
            bar.update(1)
            last_step = done == train_config.steps
            if done % train_config.log_every == 0 or last_step:
                values = _host(metrics)
                values["tokens_per_second"] = timer.tokens_per_second(tokens_per_step)
                last_train = metrics_log.write(done, "train", values)
                bar.set_postfix(_postfix(values), refresh=False)
            if (train_config.eval_every and done % train_config.eval_every == 0) or last_step:
                with timer.paused():
                    last_eval = metrics_log.write(done, "eval", _evaluate(eval_step, state, eval_batches))
            if (train_config.checkpoint_every and done % train_config.checkpoint_every == 0) or last_step:
                with timer.paused():
                    checkpointer.save(done, state, configs)
                saved_step = done
    finally:
        bar.close()
        checkpointer.close()
    final_step = max(start, train_config.steps)
    if not last_eval:  # nothing left to train (the run was complete): evaluate what was restored, unlogged
        last_eval = _evaluate(eval_step, state, eval_batches)
    if not last_train:
        history = [record for record in read_metrics(metrics_log.path) if record.get("split") == "train"]
        last_train = history[-1] if history else {}
    sparsity_source = {**last_train, **{name: last_eval[name] for name in REPORTED_METRICS if name in last_eval}}
    return {
        "run_dir": run_dir,
        "model": model_config.to_dict(),
        "ffn": model_config.ffn,
        "step": final_step,
        "start_step": start,
        "final_loss": last_train.get("loss"),
        "final_eval_loss": last_eval.get("loss"),
        **{name: sparsity_source.get(name) for name in REPORTED_METRICS},
        "parameters": layout.parameter_count,
        "tokens_per_second": timer.tokens_per_second(tokens_per_step) if timer.steps else None,
        "seconds": time.perf_counter() - began,
        "checkpoint_dir": checkpointer.directory,
        "checkpoint_step": saved_step,
        "metrics_file": metrics_log.path,
        "plot": None,
        "data": data.source,
        "mesh": describe_mesh(mesh),
        "dense_twin": None,
    }


def _postfix(values: dict) -> dict:
    postfix = {"loss": f"{values['loss']:.3f}", "tok/s": f"{values['tokens_per_second']:,.0f}"}
    if "ffn_tls" in values:
        postfix["tls"] = f"{values['ffn_tls']:.2f}"
    return postfix


class _Throughput:
    """Tokens per second over the steps after this process's first one (which includes compiling),
    leaving out evaluation and checkpoint time."""

    def __init__(self):
        self.steps = 0
        self._start = None
        self._excluded = 0.0

    def step_taken(self, first: bool, metrics) -> None:
        if first:
            jax.block_until_ready(metrics)
            self._start = time.perf_counter()
        else:
            self.steps += 1

    def tokens_per_second(self, tokens_per_step: int) -> float:
        if not self.steps:
            return float("nan")
        elapsed = time.perf_counter() - self._start - self._excluded
        return self.steps * tokens_per_step / max(elapsed, 1e-9)

    @contextlib.contextmanager
    def paused(self):
        began = time.perf_counter()
        try:
            yield
        finally:
            self._excluded += time.perf_counter() - began
