"""generate: greedy decoding with KV caches equals the argmax of the full forward on the growing
sequence (for every policy when its budget covers the cache), runs under jit, samples, checks inputs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import LayerAttention, ModelConfig, Transformer, attention_pattern, generate, get_preset
from models.decode_policy import HeavyHitters, QuestPages, StreamingLLM, TokenSelect, TopKKeys

SMALL = dict(vocab_size=64, model_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_seq_len=32)
PROMPT, NEW, CAPACITY = 5, 9, 16


def _sharpened(config):
    """A model whose logits depend on the whole context: at init the residual stream is dominated by
    the token's own embedding and greedy decoding repeats one token, which would test little."""
    model = Transformer(config, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [jax.random.normal(key, leaf.shape, leaf.dtype) * 0.3 for key, leaf in zip(keys, leaves)]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves), rest)


def _prompt(batch=2, vocab=64):
    return jax.random.randint(jax.random.key(2), (batch, PROMPT), 0, vocab)


def _assert_greedy_matches_forward(model, tokens):
    """Causality: the forward on the final sequence gives, at position p - 1, the logits that a
    forward on tokens[:, :p] would; greedy decoding must have picked their argmax."""
    logits = nnx.jit(lambda model, tokens: model(tokens).logits)(model, tokens)
    predicted = np.asarray(jnp.argmax(logits, axis=-1))
    np.testing.assert_array_equal(np.asarray(tokens[:, PROMPT:]), predicted[:, PROMPT - 1 : -1])
    assert len(np.unique(np.asarray(tokens[:, PROMPT:]))) > 2  # the test model does not just repeat


@pytest.mark.parametrize("ffn", [dict(ffn="dense", ffn_dim=48), dict(ffn="moe", num_experts=4, experts_per_token=2,
                                                                      expert_dim=8)], ids=["dense", "moe"])
def test_greedy_equals_full_forward_argmax(ffn):
    model = _sharpened(ModelConfig(**SMALL, **ffn))
    tokens = generate(model, _prompt(), max_new_tokens=NEW)
    assert tokens.shape == (2, PROMPT + NEW) and tokens.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(tokens[:, :PROMPT]), np.asarray(_prompt()))
    _assert_greedy_matches_forward(model, tokens)


@pytest.mark.parametrize("policy", [None, "top_k", "quest", TokenSelect(k=16, sinks=2, recent=4), "streaming_llm",
                                    "h2o", HeavyHitters(budget=16, recent=4, decay=0.5)],
                         ids=["full", "top_k", "quest", "token_select", "streaming_llm", "h2o", "a2sf"])
def test_spark_with_windows_greedy_equals_full_forward_argmax(policy):
    """Sliding-window layers (window 4 + 2 sinks, shorter than the sequence) read their window at
    decode; the full layer's policy has a budget >= the cache, so its selection is exact."""
    config = ModelConfig(**SMALL, ffn="spark", ffn_dim=48, predictor_dim=8,
                         attention=attention_pattern(2, full_every=2, window=4, sinks=2), decode_keys=CAPACITY,
                         score_dims=8)
    model = _sharpened(config)
    tokens = generate(model, _prompt(), max_new_tokens=NEW, policy=policy, capacity=CAPACITY)
    _assert_greedy_matches_forward(model, tokens)


def test_streaming_llm_eviction_equals_a_sinks_and_window_layer():
    """Full layers that keep 2 sinks + the 4 latest tokens (evicting the rest) decode exactly like
    layers trained with a window of 4 and 2 sinks (the 5-token prompt fits both, so the prefills agree)."""
    full = ModelConfig(**SMALL, ffn="dense", ffn_dim=48)
    windowed = dataclasses.replace(full, attention=LayerAttention(kind="sliding_window", window=4, sinks=2))
    evicting = generate(_sharpened(full), _prompt(), max_new_tokens=NEW, policy=StreamingLLM(budget=6, sinks=2))
    np.testing.assert_array_equal(np.asarray(evicting), np.asarray(generate(_sharpened(windowed), _prompt(),
                                                                             max_new_tokens=NEW)))
    assert not np.array_equal(np.asarray(evicting), np.asarray(generate(_sharpened(full), _prompt(), max_new_tokens=NEW)))


def test_heavy_hitters_evict_under_a_small_budget():
    """H2O with 6 slots per head (2 of them the newest tokens) over 14 tokens: the prompt and the
    decoded tokens pass through the eviction rule, and the result departs from full attention."""
    model = _sharpened(ModelConfig(**SMALL, ffn="dense", ffn_dim=48))
    evicting = generate(model, _prompt(), max_new_tokens=NEW, policy=HeavyHitters(budget=6, recent=2))
    assert evicting.shape == (2, PROMPT + NEW)
    np.testing.assert_array_equal(np.asarray(evicting[:, :PROMPT]), np.asarray(_prompt()))
    full = np.asarray(generate(model, _prompt(), max_new_tokens=NEW))
    assert not np.array_equal(np.asarray(evicting), full)
    # A budget (and recent window) beyond the 14 tokens: the cache is capped there and evicts nothing.
    roomy = generate(model, _prompt(), max_new_tokens=NEW, policy=HeavyHitters(budget=32, recent=20))
    np.testing.assert_array_equal(np.asarray(roomy), full)


def test_tiny_spark_preset_runs_top_k_under_jit():
    config = get_preset("spark-tiny")
    model = Transformer(dataclasses.replace(config, decode_keys=8), rngs=nnx.Rngs(0))
    run = nnx.jit(lambda model, prompt: generate(model, prompt, max_new_tokens=12, policy="top_k"))
    prompt = _prompt(vocab=256)
    tokens = run(model, prompt)
    assert tokens.shape == (2, PROMPT + 12)
    np.testing.assert_array_equal(np.asarray(tokens[:, :PROMPT]), np.asarray(prompt))
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 256


def test_sampling_is_reproducible_and_in_range():
    model = _sharpened(ModelConfig(**SMALL, ffn="dense", ffn_dim=48))
    sample = lambda seed: generate(model, _prompt(), max_new_tokens=6, temperature=1.0,  # noqa: E731
                                   rng=jax.random.key(seed))
    first = np.asarray(sample(0))
    np.testing.assert_array_equal(first, np.asarray(sample(0)))
    assert first.shape == (2, PROMPT + 6) and first.min() >= 0 and first.max() < 64
    np.testing.assert_array_equal(np.asarray(generate(model, _prompt(), max_new_tokens=0)), np.asarray(_prompt()))


def test_policy_objects_and_capacity_rounding():
    assert TopKKeys(k=4, rank=2).cache_score_dims == 2
    assert QuestPages(num_pages=2, page_size=8).capacity_multiple == 8


def test_errors():
    model = Transformer(ModelConfig(**SMALL, ffn="dense", ffn_dim=48), rngs=nnx.Rngs(0))
    prompt = _prompt()
    with pytest.raises(ValueError, match="policy"):
        generate(model, prompt, max_new_tokens=2, policy="lru")
    with pytest.raises(ValueError, match="recent"):
        generate(model, prompt, max_new_tokens=2, policy=HeavyHitters(budget=4, recent=4))
    with pytest.raises(ValueError, match="decode_keys"):
        generate(model, prompt, max_new_tokens=2, policy="top_k")
    with pytest.raises(ValueError, match="capacity"):
        generate(model, prompt, max_new_tokens=4, capacity=PROMPT + 3)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompt, max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError, match="rng"):
        generate(model, prompt, max_new_tokens=2, temperature=0.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt, max_new_tokens=-1)
    with pytest.raises(ValueError, match="prompt_tokens"):
        generate(model, prompt[0], max_new_tokens=2)
    with pytest.raises(TypeError, match="prompt_tokens"):
        generate(model, prompt.astype(jnp.float32), max_new_tokens=2)
    with pytest.raises(TypeError, match="model"):
        generate(object(), prompt, max_new_tokens=2)
