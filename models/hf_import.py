"""Hugging Face Llama / Mistral / Qwen 2 / Gemma / Gemma 2 checkpoints as dense :class:`~models.Transformer` models.

A folder written by ``save_pretrained`` (``config.json`` plus ``model.safetensors``, or shards listed
in ``model.safetensors.index.json``) becomes a dense model of :mod:`models` with the same logits::

    from models import load_hf_model

    model, config = load_hf_model("path/to/llama")     # Transformer, ModelConfig
    logits = model(tokens).logits                       # tokens int32 [B, T] -> float32 [B, T, V]

How the Hugging Face conventions map onto :class:`~models.config.ModelConfig` and the parameters:

| Hugging Face | here |
|---|---|
| ``embed_tokens.weight [V, M]`` | ``embed.embedding [V, M]`` |
| ``self_attn.q_proj.weight [H D, M]`` | ``attention.query.kernel [M, H, D]`` (``W.T`` reshaped) |
| ``self_attn.{k,v}_proj.weight [K D, M]`` | ``attention.{key,value}.kernel [M, K, D]`` |
| ``self_attn.o_proj.weight [M, H D]`` | ``attention.out.kernel [H, D, M]`` |
| ``mlp.{gate,up}_proj.weight [F, M]`` | ``ffn.{w_gate,w_up} [F, M]`` (neuron-major, unchanged) |
| ``mlp.down_proj.weight [M, F]`` | ``ffn.w_down [F, M]`` (``W.T``) |
| ``input_layernorm`` | ``attention_norm`` |
| ``post_attention_layernorm`` (Llama family) | ``ffn_norm`` |
| Gemma 2 (``post_norms=True``): ``post_attention_layernorm`` | ``post_attention_norm`` |
| Gemma 2: ``pre_feedforward_layernorm``, ``post_feedforward_layernorm`` | ``ffn_norm``, ``post_ffn_norm`` |
| ``norm.weight``, ``lm_head.weight`` | ``final_norm.scale``, ``unembed.embedding`` (absent when tied) |

- Rotary: Hugging Face's ``rotate_half`` pairs ``(x[i], x[i + D/2])``, as
  :func:`jaxsparse.nn.apply_rotary` does, so q/k columns are copied without a permutation.
  ``rope_theta`` is carried over; rope scaling (``rope_type`` other than ``"default"``) and
  partial rotary factors raise ``NotImplementedError``.
- Norms: the RMSNorm epsilon is ``rms_norm_eps``. Gemma's norms compute ``x_hat * (1 + w)``: the
  import stores ``scale = 1 + w`` (in float32, as Gemma does), Llama's ``w`` is stored as is.
- Embeddings: Gemma multiplies them by ``sqrt(M)`` (``scale_embeddings=True``), the Llama family
  does not.
- Activation: ``silu`` -> ``"silu"`` (SwiGLU); ``gelu_pytorch_tanh`` / ``gelu_new`` and Gemma's
  legacy ``gelu`` -> ``"gelu"`` (tanh form); ``gelu`` elsewhere -> ``"gelu_exact"``.
- Attention: ``head_dim``, GQA heads, Gemma 2's ``query_pre_attn_scalar ** -0.5`` scale and its
  attention / final logit soft-caps; ``layer_types`` (``"sliding_attention"`` with
  ``sliding_window`` keys, the query's own included, as Hugging Face's ``kv > q - window``) become
  per-layer :class:`~models.config.LayerAttention`. Qwen 2's q/k/v biases use
  ``attention_bias=True`` with a zero output bias.

Tensors are read with ``safetensors.numpy`` (no torch); bfloat16 tensors, which numpy lacks, are read
from the raw file as ``ml_dtypes.bfloat16``. Install the reader with ``pip install -e ".[hf]"``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import LayerAttention, ModelConfig
from models.transformer import Transformer

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma", "gemma2")
_GEMMA_TYPES = ("gemma", "gemma2")
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu", "gelu_new": "gelu",
                "gelu": "gelu_exact", "relu": "relu"}
_INDEX_FILE = "model.safetensors.index.json"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved


def config_from_hf(hf_config, *, dtype="float32", param_dtype=None) -> ModelConfig:
    """The dense :class:`~models.config.ModelConfig` of a Hugging Face ``config.json``.

    Args:
      hf_config: the ``config.json`` contents as a dict (or a ``transformers`` config object),
        with ``model_type`` one of :data:`SUPPORTED_MODEL_TYPES`.
      dtype: computation dtype of the model.
      param_dtype: parameter dtype; None: ``dtype``.

    Returns:
      A ``ModelConfig`` with ``ffn="dense"``, ``ffn_dim = intermediate_size`` and
      ``max_seq_len = max_position_embeddings`` (see the module docstring for the other fields).

    Raises:
      ValueError: an unsupported ``model_type``, a missing required key, or a value that
        ``ModelConfig`` rejects.
      NotImplementedError: a feature of the checkpoint that :mod:`models` does not have (rope
        scaling, MLP biases, bidirectional attention, an unknown activation or layer type).
    """
    if hasattr(hf_config, "to_dict") and not isinstance(hf_config, Mapping):
        hf_config = hf_config.to_dict()
    if not isinstance(hf_config, Mapping):
        raise TypeError(f"hf_config must be a dict (config.json), got {type(hf_config).__name__}")
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {list(SUPPORTED_MODEL_TYPES)}")

    def required(key):
        if hf_config.get(key) is None:
            raise ValueError(f"config.json of model_type {model_type!r} has no {key!r}")
        return hf_config[key]

    model_dim, num_heads = required("hidden_size"), required("num_attention_heads")
    num_layers = required("num_hidden_layers")
    head_dim = hf_config.get("head_dim") or model_dim // num_heads
    gemma = model_type in _GEMMA_TYPES
    if hf_config.get("mlp_bias"):
        raise NotImplementedError(f"{model_type}: mlp_bias=True (FFN biases) is not supported by models' FFNs")
    if hf_config.get("use_bidirectional_attention"):
        raise NotImplementedError(f"{model_type}: use_bidirectional_attention is not supported (models are causal)")
    gemma2 = model_type == "gemma2"
    return ModelConfig(
        vocab_size=required("vocab_size"),
        model_dim=model_dim,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=hf_config.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        ffn="dense",
        ffn_dim=required("intermediate_size"),
        max_seq_len=required("max_position_embeddings"),
        activation=_activation(hf_config, model_type),
        attention=_layer_attention(hf_config, model_type, num_layers),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", True)),
        scale_embeddings=gemma,
        norm_epsilon=float(hf_config.get("rms_norm_eps", 1e-6)),
        post_norms=gemma2,
        attention_bias=model_type == "qwen2" or bool(hf_config.get("attention_bias", False)),
        attention_scale=float(required("query_pre_attn_scalar")) ** -0.5 if gemma2 else None,
        rope_theta=_rope_theta(hf_config, model_type),
        softcap=_optional_float(hf_config.get("final_logit_softcapping")) if gemma2 else None,
        attention_softcap=_optional_float(hf_config.get("attn_logit_softcapping")) if gemma2 else None,
        dtype=dtype,
        param_dtype=dtype if param_dtype is None else param_dtype,
    )


def load_hf_model(path, *, dtype="float32", param_dtype=None) -> tuple[Transformer, ModelConfig]:
    """Loads a Hugging Face ``save_pretrained`` folder into a dense :class:`~models.Transformer`.

    Args:
      path: a folder with ``config.json`` and ``model.safetensors`` (or the shards listed in
        ``model.safetensors.index.json``; without an index, every ``*.safetensors`` file in it).
      dtype: computation dtype of the model (``"float32"``, ``"bfloat16"``).
      param_dtype: parameter dtype; None: ``dtype``. Tensors are cast to it (Gemma's ``1 + w``
        norm scales are formed in float32 first).

    Returns:
      ``(model, config)``: the model with the checkpoint's weights, and its
      :func:`config_from_hf` config. ``model(tokens).logits`` matches the Hugging Face model's
      logits (float32: to about 1e-5).

    Raises:
      FileNotFoundError: ``path`` is not a folder, or ``config.json``, the safetensors files or a
        shard named in the index are missing.
      ValueError: an unsupported ``model_type``; tensors the model needs that the checkpoint lacks,
        or checkpoint tensors the model has no place for (named in the message); a tensor of the
        wrong shape (named, with the expected and actual shapes); a tied checkpoint whose
        ``lm_head.weight`` differs from its embeddings.
      NotImplementedError: a checkpoint feature :mod:`models` does not have (see
        :func:`config_from_hf`).
      ImportError: ``safetensors`` is not installed (``pip install -e ".[hf]"``).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_hf_model: {path!r} is not a folder (expected a save_pretrained folder)")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"load_hf_model: no config.json in {path!r}")
    with open(config_path) as file:
        hf_config = json.load(file)
    config = config_from_hf(hf_config, dtype=dtype, param_dtype=param_dtype)
    tensors = _read_checkpoint(path)

    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    prefix = "model." if any(name.startswith("model.") for name in tensors) else ""
    plan = _parameter_plan(config, hf_config["model_type"], prefix)
    names = {name for name in tensors if not name.endswith(_IGNORED_SUFFIXES)}
    if config.tie_embeddings and "lm_head.weight" in names:
        embeddings = tensors.get(f"{prefix}embed_tokens.weight")
        if embeddings is None or not np.array_equal(tensors["lm_head.weight"], embeddings):
            raise ValueError("lm_head.weight: the config ties the embeddings (tie_word_embeddings), but the "
                             "checkpoint's lm_head.weight differs from embed_tokens.weight")
        names.discard("lm_head.weight")
    missing = sorted(set(plan) - names)
    unexpected = sorted(names - set(plan))
    if missing:
        raise ValueError(f"the checkpoint in {path!r} lacks {len(missing)} tensor(s) a {hf_config['model_type']} "
                         f"model needs: {_listing(missing)}")
    if unexpected:
        raise ValueError(f"the checkpoint in {path!r} has {len(unexpected)} tensor(s) with no place in the "
                         f"{hf_config['model_type']} model: {_listing(unexpected)}")

    target_dtype = jnp.dtype(config.param_dtype)
    for name, (target, expected_shape, convert) in plan.items():
        array = tensors[name]
        if tuple(array.shape) != expected_shape:
            raise ValueError(f"tensor {name!r}: expected shape {expected_shape}, got {tuple(array.shape)}")
        _variable(model, target).set_value(jnp.asarray(convert(array), dtype=target_dtype))
    for target in _zero_parameters(config, hf_config["model_type"]):
        variable = _variable(model, target)
        variable.set_value(jnp.zeros(variable.get_value().shape, target_dtype))
    unset = [path for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model))
             if isinstance(leaf, jax.ShapeDtypeStruct)]
    if unset:  # the plan and the model disagree: a bug here, not in the checkpoint
        raise RuntimeError(f"load_hf_model left parameters unset: {unset[:5]}")
    return model, config


def _activation(hf_config: Mapping, model_type: str) -> str:
    name = hf_config.get("hidden_activation") or hf_config.get("hidden_act")
    if name is None:  # the transformers defaults
        name = "gelu_pytorch_tanh" if model_type in _GEMMA_TYPES else "silu"
    if model_type in _GEMMA_TYPES and name == "gelu":  # Gemma's legacy name for the tanh form
        name = "gelu_pytorch_tanh"
    if name not in _ACTIVATIONS:
        raise NotImplementedError(f"{model_type}: activation {name!r} is not supported; "
                                  f"supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _rope_theta(hf_config: Mapping, model_type: str) -> float:
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    if rope and all(isinstance(value, Mapping) for value in rope.values()):  # one entry per layer type
        distinct = {json.dumps(value, sort_keys=True) for value in rope.values()}
        if len(distinct) > 1:
            raise NotImplementedError(f"{model_type}: rotary parameters that differ between layer types: {rope}")
        rope = next(iter(rope.values()))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise NotImplementedError(f"{model_type}: rope scaling rope_type={rope_type!r} is not supported "
                                  f"(only the default rotary embedding)")
    factor = rope.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))
    if factor != 1.0:
        raise NotImplementedError(f"{model_type}: partial_rotary_factor={factor} is not supported")
    return float(rope.get("rope_theta", hf_config.get("rope_theta", 10000.0)))


def _layer_attention(hf_config: Mapping, model_type: str, num_layers: int) -> tuple[LayerAttention, ...]:
    window = hf_config.get("sliding_window")
    layer_types = hf_config.get("layer_types")
    if layer_types is None:  # configs written before transformers had layer_types
        if model_type == "gemma2":
            layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
        elif model_type == "mistral" and window is not None:
            layer_types = ["sliding_attention"] * num_layers
        elif model_type == "qwen2" and window is not None and hf_config.get("use_sliding_window"):
            first = hf_config.get("max_window_layers", num_layers)
            layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
        else:
            layer_types = ["full_attention"] * num_layers
    if len(layer_types) != num_layers:
        raise ValueError(f"layer_types has {len(layer_types)} entries, num_hidden_layers={num_layers}")
    layers = []
    for kind in layer_types:
        if kind == "full_attention":
            layers.append(LayerAttention())
        elif kind == "sliding_attention":
            if window is None:
                raise ValueError(f"{model_type}: layer_types has sliding_attention layers but sliding_window is None")
            layers.append(LayerAttention(kind="sliding_window", window=int(window)))
        else:
            raise NotImplementedError(f"{model_type}: layer type {kind!r} is not supported "
                                      f"(only full_attention and sliding_attention)")
    return tuple(layers)


def _optional_float(value):
    return None if value is None else float(value)


def _parameter_plan(config: ModelConfig, model_type: str, prefix: str) -> dict:
    """``{checkpoint name: (model path, Hugging Face shape, numpy conversion)}`` for every tensor."""
    vocab, width, ffn_dim = config.vocab_size, config.model_dim, config.ffn_dim
    heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    gemma = model_type in _GEMMA_TYPES

    def same(array):
        return array

    def norm_scale(array):  # Gemma: x_hat * (1 + w), formed in float32 as Gemma does
        return np.asarray(array, np.float32) + np.float32(1.0) if gemma else array

    def in_projection(count):  # [N D, M] -> [M, N, D]
        return lambda array: np.asarray(array).T.reshape(width, count, head_dim)

    def out_projection(array):  # [M, H D] -> [H, D, M]
        return np.asarray(array).T.reshape(heads, head_dim, width)

    def transpose(array):
        return np.asarray(array).T

    plan = {f"{prefix}embed_tokens.weight": (("embed", "embedding"), (vocab, width), same),
            f"{prefix}norm.weight": (("final_norm", "scale"), (width,), norm_scale)}
    if not config.tie_embeddings:
        plan["lm_head.weight"] = (("unembed", "embedding"), (vocab, width), same)
    if config.post_norms:  # Gemma 2: post_attention_layernorm is the attention's output norm
        norms = {"input_layernorm": "attention_norm", "post_attention_layernorm": "post_attention_norm",
                 "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffn_norm"}
    else:
        norms = {"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    for layer in range(config.num_layers):
        source, target = f"{prefix}layers.{layer}.", ("blocks", layer)
        for hf_name, name in norms.items():
            plan[f"{source}{hf_name}.weight"] = (target + (name, "scale"), (width,), norm_scale)
        for hf_name, name, count in (("q_proj", "query", heads), ("k_proj", "key", kv_heads),
                                     ("v_proj", "value", kv_heads)):
            plan[f"{source}self_attn.{hf_name}.weight"] = (target + ("attention", name, "kernel"),
                                                           (count * head_dim, width), in_projection(count))
            if config.attention_bias:
                plan[f"{source}self_attn.{hf_name}.bias"] = (
                    target + ("attention", name, "bias"), (count * head_dim,),
                    lambda array, count=count: np.asarray(array).reshape(count, head_dim))
        plan[f"{source}self_attn.o_proj.weight"] = (target + ("attention", "out", "kernel"), (width, heads * head_dim),
                                                    out_projection)
        if config.attention_bias and model_type != "qwen2":
            plan[f"{source}self_attn.o_proj.bias"] = (target + ("attention", "out", "bias"), (width,), same)
        plan[f"{source}mlp.gate_proj.weight"] = (target + ("ffn", "w_gate"), (ffn_dim, width), same)
        plan[f"{source}mlp.up_proj.weight"] = (target + ("ffn", "w_up"), (ffn_dim, width), same)
        plan[f"{source}mlp.down_proj.weight"] = (target + ("ffn", "w_down"), (width, ffn_dim), transpose)
    return plan


def _zero_parameters(config: ModelConfig, model_type: str) -> list[tuple]:
    """Model parameters the checkpoint has no tensor for and that are exactly 0 (Qwen 2's o_proj bias)."""
    if config.attention_bias and model_type == "qwen2":
        return [("blocks", layer, "attention", "out", "bias") for layer in range(config.num_layers)]
    return []


def _variable(model: nnx.Module, path: tuple) -> nnx.Variable:
    node = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _read_checkpoint(path: str) -> dict[str, np.ndarray]:
    """Every tensor of the folder's safetensors files (the index's shards, or all ``*.safetensors``)."""
    index_path = os.path.join(path, _INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as file:
            weight_map = json.load(file).get("weight_map")
        if not isinstance(weight_map, Mapping):
            raise ValueError(f"{index_path!r} has no weight_map")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(path, name)):
                raise FileNotFoundError(f"shard {name!r} named in {_INDEX_FILE} is missing from {path!r}")
    else:
        files = sorted(name for name in os.listdir(path) if name.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files (nor {_INDEX_FILE}) in {path!r}")
    tensors = {}
    for name in files:
        for key, array in _read_safetensors(os.path.join(path, name)).items():
            if key in tensors:
                raise ValueError(f"tensor {key!r} appears in more than one safetensors file of {path!r}")
            tensors[key] = array
    return tensors


def _read_safetensors(file_path: str) -> dict[str, np.ndarray]:
    """One safetensors file as numpy arrays: ``safetensors.numpy.load_file``, or, for files holding
    bfloat16 (which numpy lacks), the raw little-endian buffers viewed as ``ml_dtypes.bfloat16``."""
    try:
        from safetensors.numpy import load_file
    except ImportError as error:
        raise ImportError('load_hf_model reads safetensors files: pip install -e ".[hf]" (or safetensors)') from error
    header, data_start = _safetensors_header(file_path)
    dtypes = {info["dtype"] for name, info in header.items() if name != "__metadata__"}
    if not dtypes & set(_RAW_DTYPES):
        return load_file(file_path)
    known = _numpy_dtypes()
    unknown = sorted(dtypes - set(known))
    if unknown:
        raise NotImplementedError(f"{file_path!r}: safetensors dtypes {unknown} are not supported")
    buffer = np.memmap(file_path, dtype=np.uint8, mode="r", offset=data_start)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = np.dtype(known[info["dtype"]]).newbyteorder("<")
        tensors[name] = np.array(buffer[start:end].view(dtype).reshape(info["shape"]))
    return tensors


_RAW_DTYPES = ("BF16",)


def _numpy_dtypes() -> dict:
    import ml_dtypes

    return {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
            "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _safetensors_header(file_path: str) -> tuple[dict, int]:
    with open(file_path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{file_path!r} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", prefix)
        try:
            header = json.loads(file.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{file_path!r} is not a safetensors file (bad header)") from None
    return header, 8 + length
