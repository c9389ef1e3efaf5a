"""Autoregressive generation with one KV cache per layer: prefill, then a ``lax.scan`` of decode steps."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from models.decode_policy import layer_policy, resolve_policy
from models.transformer import Transformer


def generate(model: Transformer, prompt_tokens, *, max_new_tokens: int, policy=None, temperature: float = 0.0,
             rng=None, capacity: int | None = None):
    """Continues each prompt by ``max_new_tokens`` tokens.

    The prompt runs through the training forward once (each layer's mask) and fills a
    :class:`~jaxsparse.kv.KVCache` per layer; every further token is one ``nn.Attention.decode``
    step per layer inside ``lax.scan``. Full-attention layers read what ``policy`` selects;
    sliding-window layers read their sinks and last ``window`` positions, as in training. A Spark FFN
    reads only the active rows of each new token (gathers; the dense FFN when a token has more than
    1.2x the expected active neurons); the other FFN kinds run their forward. With ``policy=None``
    (or a ``"top_k"`` budget at least the cache capacity) greedy decoding equals the argmax of the
    full forward on the growing sequence.

    Compiled internally with ``jax.jit`` (keyed on the model's graph and the static arguments);
    it also runs inside ``nnx.jit``.

    Args:
      model: a :class:`~models.transformer.Transformer`.
      prompt_tokens: int ``[B, P]``, ``P >= 1`` (no padding: every prompt has length P).
      max_new_tokens: new tokens per sequence, ``>= 0``.
      policy: KV selection or eviction of the full-attention layers: None (the whole cache),
        ``"top_k"`` (Spark attention: ``config.decode_keys`` keys scored on ``config.score_dims``
        dims), ``"quest"``, ``"token_select"``, ``"streaming_llm"`` or ``"h2o"`` (eviction: each full layer
        keeps ``config.decode_keys`` slots per head), or a policy object of :mod:`models.decode_policy`.
      temperature: 0 for greedy (argmax); > 0 samples from ``softmax(logits / temperature)``.
      rng: a PRNG key, needed when ``temperature > 0``.
      capacity: positions per cache, at least ``P + max_new_tokens`` (the default, rounded up to
        what the policy needs, e.g. a multiple of the Quest page size).

    Returns:
      int32 ``[B, P + max_new_tokens]``: the prompts followed by the new tokens.

    Raises:
      ValueError: a prompt that is not ``[B, P]`` with ``P >= 1``, a negative ``max_new_tokens``,
        a negative temperature, sampling without ``rng``, a capacity below ``P + max_new_tokens``,
        an unknown policy.
      TypeError: non-integer prompt tokens.
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be a models.Transformer, got {type(model).__name__}")
    prompt = jnp.asarray(prompt_tokens)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt_tokens must be int [B, P] with P >= 1, got shape {prompt.shape}")
    if not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise TypeError(f"prompt_tokens must hold integers, got dtype {prompt.dtype}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling with temperature > 0 needs rng (a PRNG key)")
    config = model.config
    policies = tuple(layer_policy(layout, resolve_policy(policy, config)) for layout in config.attention)
    needed = prompt.shape[1] + max_new_tokens
    if capacity is None:
        multiple = max(p.capacity_multiple for p in policies)
        capacity = -(-needed // multiple) * multiple
    elif isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < needed:
        raise ValueError(f"capacity must be an int >= P + max_new_tokens = {needed}, got {capacity!r}")
    prompt = prompt.astype(jnp.int32)
    if max_new_tokens == 0:
        return prompt
    keys = None if temperature == 0 else jax.random.split(rng, max_new_tokens)
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, prompt, keys, policies=policies, max_new_tokens=max_new_tokens,
                     temperature=float(temperature), capacity=capacity)


def _sample(logits, key, temperature: float):
    """Next tokens int32 ``[B]`` from float32 logits ``[B, V]``."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("policies", "max_new_tokens", "temperature", "capacity"))
def _generate(graphdef, state, prompt, keys, *, policies, max_new_tokens: int, temperature: float, capacity: int):
    model = nnx.merge(graphdef, state)
    config = model.config
    batch = prompt.shape[0]
    dtype = jnp.dtype(config.dtype)

    x = model.embed_tokens(prompt)
    caches, states = [], []
    for block, policy in zip(model.blocks, policies):
        cache = policy.make_cache(batch, capacity, config.num_kv_heads, config.head_dim, dtype)
        x, cache = block.prefill(x, cache, fill=policy.fill)
        caches.append(cache)
        states.append(policy.init_state(cache, config.num_heads))
    first = _sample(model.output_logits(x[:, -1:])[:, 0], None if keys is None else keys[0], temperature)

    def step(carry, key):
        caches, states, token = carry
        step_model = nnx.merge(graphdef, state)
        x = step_model.embed_tokens(token[:, None])
        new_caches, new_states = [], []
        for block, policy, cache, policy_state in zip(step_model.blocks, policies, caches, states):
            updated = {"state": policy_state}  # select() replaces it; evicting caches never select

            def select(q, cache, policy=policy, policy_state=policy_state, updated=updated):
                chosen, updated["state"] = policy.select(q, cache, policy_state)
                return chosen

            x, cache = block.decode(x, cache, select=select, append=policy.append,
                                    attention_append=policy.attention_append)
            new_caches.append(cache)
            new_states.append(updated["state"])
        token = _sample(step_model.output_logits(x)[:, 0], key, temperature)
        return (new_caches, new_states, token), token

    rest_keys = None if keys is None else keys[1:]
    _, rest = jax.lax.scan(step, (caches, states, first), rest_keys, length=max_new_tokens - 1)
    return jnp.concatenate([prompt, first[:, None], rest.T], axis=1)
