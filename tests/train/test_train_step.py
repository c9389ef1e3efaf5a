"""The jitted train step learns: three steps on one repeated batch lower its loss, for every tiny preset.

Each preset is cut to two layers (keeping the last two of its attention pattern: Spark's full and
windowed layers) so that compiling stays short on a 2-core CPU; the FFN kinds are unchanged.
"""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from models import Transformer, get_preset
from train.config import TrainConfig
from train.optimizer import learning_rate_schedule, make_optimizer
from train.state import state_layout
from train.step import make_train_step


def two_layer(preset: str):
    config = get_preset(preset)
    return dataclasses.replace(config, num_layers=2, attention=config.attention[-2:])


@pytest.mark.parametrize("preset", ["dense-tiny", "spark-tiny", "blockffn-tiny", "moe-tiny"])
def test_three_steps_on_a_fixed_batch_reduce_its_loss(preset):
    config = two_layer(preset)
    train_config = TrainConfig(preset=preset, steps=3, warmup_steps=0, lr=3e-3)
    tx = make_optimizer(train_config)
    layout = state_layout(lambda: Transformer(config, rngs=nnx.Rngs(0)), tx)
    train_step = make_train_step(layout.graphdef, tx, learning_rate_schedule(train_config))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 33)).astype(np.int32)
    state = layout.init()
    losses = []
    for _ in range(4):  # the 4th step reports the loss after three updates
        state, metrics = train_step(state, tokens)
        losses.append(float(metrics["loss"]))
    assert int(state["step"]) == 4
    assert np.isfinite(float(metrics["grad_norm"]))
    assert losses[3] < losses[0]
    for name in ("ffn_tls", "ffn_cls", "attention_density", "lr", "aux_loss"):
        assert name in metrics
    if config.ffn in ("moe", "blockffn"):
        assert "expert_load_imbalance" in metrics
        assert float(metrics["aux_loss"]) > 0
    if config.ffn == "spark":
        assert float(metrics["ffn_tls"]) > 0.5
