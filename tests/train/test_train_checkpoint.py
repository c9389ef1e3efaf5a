"""Checkpoints and resuming: a saved state comes back exactly, and a run split in two equals one run."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import Transformer, get_preset
from train import TrainConfig, run
from train.checkpoint import Checkpointer
from train.optimizer import make_optimizer
from train.report import format_report
from train.run_dir import RunDirError, check_run_dir, clear_run
from train.state import state_layout

SMALL = dataclasses.replace(get_preset("spark-tiny"), num_layers=1, attention=None)


def small_config(output_dir, **changes):
    values = dict(preset="spark-tiny", steps=8, batch_size=2, seq_len=32, warmup_steps=2, eval_every=4,
                  eval_batches=1, checkpoint_every=4, log_every=2, corpus_bytes=200_000, mesh="none",
                  output_dir=str(output_dir), progress=False)
    values.update(changes)
    return TrainConfig(**values)


def final_state(run_dir, train_config):
    layout = state_layout(lambda: Transformer(SMALL, rngs=nnx.Rngs(0)), make_optimizer(train_config))
    checkpointer = Checkpointer(run_dir)
    state = checkpointer.restore(checkpointer.latest_step(), layout.abstract)
    checkpointer.close()
    return state


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """One uninterrupted 8-step run with its dense twin (shared by the tests that only read its outputs)."""
    cache = tmp_path_factory.mktemp("cache")
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    config = small_config(run_dir, cache_dir=str(cache), compare_dense=True)
    return config, run(config, SMALL, log=lambda message: None)


def test_checkpoint_round_trip_restores_params_opt_state_step_and_keys(tmp_path):
    train_config = small_config(tmp_path)
    tx = make_optimizer(train_config)
    layout = state_layout(lambda: Transformer(SMALL, rngs=nnx.Rngs(0)), tx)
    state = layout.init()
    grads = jax.tree.map(jnp.ones_like, state["params"])
    _, opt_state = jax.jit(tx.update)(grads, state["opt_state"], state["params"])  # non-trivial moments
    state = {**state, "opt_state": opt_state, "step": jnp.asarray(5, jnp.int32),
             "rest": {"rng": jax.random.key(7)}}  # a typed PRNG key, as nnx RNG state holds
    checkpointer = Checkpointer(tmp_path, keep=2)
    checkpointer.save(5, state, {"model": SMALL.to_dict(), "train": train_config.to_dict()})
    restored = checkpointer.restore(5, jax.eval_shape(lambda: state))
    assert checkpointer.configs(5)["model"] == json.loads(json.dumps(SMALL.to_dict()))
    checkpointer.close()
    assert int(restored["step"]) == 5
    assert jax.dtypes.issubdtype(restored["rest"]["rng"].dtype, jax.dtypes.prng_key)
    restored["rest"]["rng"] = jax.random.key_data(restored["rest"]["rng"])
    state["rest"]["rng"] = jax.random.key_data(state["rest"]["rng"])
    assert_trees_equal(restored, state)


def test_resuming_a_4_step_run_to_8_steps_equals_a_straight_8_step_run(tmp_path, straight_run):
    config, summary = straight_run
    split_dir = tmp_path / "split"
    first = run(small_config(split_dir, steps=4, lr_decay_steps=8, cache_dir=config.cache_dir), SMALL,
                log=lambda message: None)
    assert first["step"] == 4 and first["checkpoint_step"] == 4
    messages = []
    second = run(small_config(split_dir, cache_dir=config.cache_dir), SMALL, log=messages.append)
    assert second["start_step"] == 4 and second["step"] == 8
    assert any("resuming from the checkpoint of step 4" in message for message in messages)
    assert_trees_equal(final_state(split_dir, config), final_state(config.run_dir, config))
    assert second["final_loss"] == pytest.approx(summary["final_loss"], rel=1e-6)
    steps = [(r["step"], r["split"]) for r in map(json.loads, open(split_dir / "metrics.jsonl"))]
    assert steps == [(2, "train"), (4, "train"), (4, "eval"), (6, "train"), (8, "train"), (8, "eval")]


def test_metrics_jsonl_plot_and_summary_are_written(straight_run):
    config, summary = straight_run
    records = [json.loads(line) for line in open(os.path.join(config.run_dir, "metrics.jsonl"))]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    for name in ("loss", "lr", "tokens_per_second", "ffn_tls", "ffn_cls", "attention_density", "grad_norm"):
        assert name in train[-1]
    assert [r["step"] for r in records if r["split"] == "eval"] == [4, 8]
    with open(summary["plot"], "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"
    assert summary["parameters"] > 0 and summary["tokens_per_second"] > 0
    assert summary["final_eval_loss"] > 0 and summary["checkpoint_step"] == 8
    saved = json.load(open(os.path.join(config.run_dir, "config.json")))
    assert saved["train"]["steps"] == 8 and saved["model"]["num_layers"] == 1
    twin = summary["dense_twin"]
    assert twin["ffn"] == "dense" and twin["step"] == 8 and twin["final_eval_loss"] > 0
    assert twin["run_dir"] == os.path.join(config.run_dir, "dense_twin")
    report = format_report(summary)
    for text in ("final train loss", "final eval loss", "dense twin", "FFN TLS", "attention density", "parameters",
                 "tokens/s", summary["checkpoint_dir"], summary["plot"]):
        assert text in report


def test_fresh_clears_only_the_files_a_run_owns(tmp_path):
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    (tmp_path / "checkpoints" / "3" / "_CHECKPOINT_METADATA").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("mine")
    run_dir = str(tmp_path)
    with pytest.raises(RunDirError, match="--fresh"):
        check_run_dir(run_dir, SMALL.to_dict(), resume=False, fresh=False)
    assert check_run_dir(run_dir, SMALL.to_dict(), resume=True, fresh=True) == "fresh"
    assert check_run_dir(str(tmp_path / "elsewhere"), SMALL.to_dict(), resume=True, fresh=False) == "new"
    clear_run(run_dir)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_a_checkpoint_of_another_model_config_is_refused_and_nothing_changes(straight_run):
    config, _ = straight_run
    before = {path: os.path.getmtime(path) for path in _files(config.run_dir)}
    other = dataclasses.replace(SMALL, ffn_dim=256)
    with pytest.raises(RunDirError, match=r"different model config.*ffn_dim: 768 -> 256"):
        run(dataclasses.replace(config, steps=10), other, log=lambda message: None)
    with pytest.raises(RunDirError, match="--fresh"):
        run(dataclasses.replace(config, resume=False), SMALL, log=lambda message: None)
    assert {path: os.path.getmtime(path) for path in _files(config.run_dir)} == before


def _files(folder):
    return sorted(os.path.join(parent, name) for parent, _, names in os.walk(folder) for name in names)
