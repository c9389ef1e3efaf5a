"""Sharded training on 8 fake CPU devices (data=2 x fsdp=4, and data=2 x sequence=4) takes the same
steps as one device."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from models import Transformer, attention_pattern, get_preset
from train import TrainConfig, run
from train.checkpoint import Checkpointer
from train.mesh import build_mesh, resolve_mesh_sizes
from train.optimizer import make_optimizer
from train.state import state_layout

MODEL = dataclasses.replace(get_preset("spark-tiny"), num_layers=1, attention=None)


def config(output_dir, mesh):
    return TrainConfig(preset="spark-tiny", steps=2, batch_size=8, seq_len=32, warmup_steps=1, eval_batches=1,
                       log_every=1, corpus_bytes=200_000, mesh=mesh, output_dir=str(output_dir),
                       cache_dir=str(output_dir.parent), progress=False, plot=False)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_data_fsdp_sharded_run_matches_the_single_device_run(tmp_path):
    quiet = {"log": lambda message: None}
    single = run(config(tmp_path / "single", "none"), MODEL, **quiet)
    sharded = run(config(tmp_path / "sharded", "data=2,fsdp=4"), MODEL, **quiet)
    assert sharded["mesh"] == "data=2 x fsdp=4" and single["mesh"] == "single device"
    np.testing.assert_allclose(sharded["final_loss"], single["final_loss"], rtol=1e-5)
    np.testing.assert_allclose(sharded["final_eval_loss"], single["final_eval_loss"], rtol=1e-5)

    sharded_config = config(tmp_path / "sharded", "data=2,fsdp=4")
    tx = make_optimizer(sharded_config)
    mesh = build_mesh(sharded_config.mesh, sharded_config.batch_size)
    layout = state_layout(lambda: Transformer(MODEL, rngs=nnx.Rngs(0)), tx, mesh)
    checkpointers = Checkpointer(sharded_config.run_dir), Checkpointer(tmp_path / "single")
    restored = checkpointers[0].restore(2, layout.abstract, layout.shardings)
    plain = checkpointers[1].restore(2, state_layout(lambda: Transformer(MODEL, rngs=nnx.Rngs(0)), tx).abstract)
    for checkpointer in checkpointers:
        checkpointer.close()
    embedding = restored["params"]["embed"]["embedding"]
    assert embedding.sharding.spec == layout.shardings["params"]["embed"]["embedding"].spec
    assert any(leaf.sharding.spec != jax.sharding.PartitionSpec() for leaf in jax.tree.leaves(restored["params"]))
    for a, b in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(plain["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_sequence_parallel_run_matches_the_single_device_run(tmp_path):
    """data=2 x sequence=4: the residual stream is split by sequence and attention runs as Ulysses."""
    model = dataclasses.replace(get_preset("spark-tiny"), num_layers=2,
                                attention=attention_pattern(2, full_every=2, window=8, sinks=2))
    quiet = {"log": lambda message: None}
    single = run(config(tmp_path / "single", "none"), model, **quiet)
    sharded = run(config(tmp_path / "sequence", "data=2,sequence=4"), model, **quiet)
    assert sharded["mesh"] == "data=2 x sequence=4"
    np.testing.assert_allclose(sharded["final_loss"], single["final_loss"], rtol=1e-5)
    np.testing.assert_allclose(sharded["final_eval_loss"], single["final_eval_loss"], rtol=1e-5)


def test_mesh_sizes():
    assert resolve_mesh_sizes("auto", 1, 8) is None
    assert resolve_mesh_sizes("auto", 8, 8) == {"data": 8}
    assert resolve_mesh_sizes("auto", 8, 2) == {"data": 2}
    assert resolve_mesh_sizes("none", 8, 8) is None
    assert resolve_mesh_sizes("data=2,fsdp=-1", 8, 8) == {"data": 2, "fsdp": 4}
    with pytest.raises(ValueError, match="--batch-size 6"):
        resolve_mesh_sizes("fsdp=4", 8, 6)
    with pytest.raises(ValueError, match="needs 16 devices"):
        resolve_mesh_sizes("data=16", 8, 16)
    with pytest.raises(ValueError, match="--seq-len 30 must be a multiple of the sequence axis 4"):
        resolve_mesh_sizes("data=2,sequence=4", 8, 8, seq_len=30)
