"""models.load_hf_model: tiny random Hugging Face checkpoints give the logits of the torch model."""

from __future__ import annotations

import copy
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from models import ModelConfig, config_from_hf, load_hf_model  # noqa: E402

VOCAB, BATCH, LENGTH = 97, 2, 16
ATOL = 1e-4  # float32 on both sides; measured differences are about 1e-6
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=64)


def _random_model(config_class, model_class, seed=0, **fields):
    """A tiny model whose weights (norm weights too) are random and large enough for peaked attention."""
    torch.manual_seed(seed)
    config = config_class(**fields, attn_implementation="eager")
    model = model_class(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:  # around 1 (Llama's w) or around 0 (Gemma's 1 + w)
                offset = -0.25 if config.model_type.startswith("gemma") else 0.75
                parameter.copy_(torch.rand_like(parameter) * 0.5 + offset)
            else:
                parameter.normal_(0.0, 0.2)
    return model


def _llama(seed=0, **fields):
    return _random_model(transformers.LlamaConfig, transformers.LlamaForCausalLM, seed,
                         **(SMALL | dict(rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False) | fields))


def _tokens(seed=1):
    return np.random.default_rng(seed).integers(0, VOCAB, (BATCH, LENGTH)).astype(np.int32)


def _max_difference(torch_model, path, **load_kwargs):
    model, config = load_hf_model(path, **load_kwargs)
    tokens = _tokens()
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(tokens).long()).logits.float().numpy()
    actual = np.asarray(model(jnp.asarray(tokens)).logits)
    assert actual.shape == expected.shape == (BATCH, LENGTH, VOCAB)
    assert np.std(expected) > 0.5  # logits far from uniform: a wrong mapping would show
    return float(np.max(np.abs(actual - expected))), config


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    _llama().save_pretrained(path, safe_serialization=True)
    return path


def _copy(path, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(path, target)
    return target


def test_llama_logits_match(llama_path):
    difference, config = _max_difference(_llama(), llama_path)
    assert difference < ATOL
    assert config == ModelConfig(vocab_size=VOCAB, model_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                                 ffn_dim=128, max_seq_len=64, activation="silu", tie_embeddings=False,
                                 scale_embeddings=False, norm_epsilon=1e-5, rope_theta=10000.0)


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_llama_family_logits_match(model_type, tmp_path):
    """Mistral with a sliding window shorter than the sequence; Qwen 2 with q/k/v biases."""
    if model_type == "mistral":
        config_class, model_class = transformers.MistralConfig, transformers.MistralForCausalLM
        fields = dict(sliding_window=6, rope_theta=1000.0)
    else:
        config_class, model_class = transformers.Qwen2Config, transformers.Qwen2ForCausalLM
        fields = dict(rope_theta=1e6, tie_word_embeddings=True)
    torch_model = _random_model(config_class, model_class, **(SMALL | fields))
    torch_model.save_pretrained(tmp_path, safe_serialization=True)
    difference, config = _max_difference(torch_model, tmp_path)
    assert difference < ATOL
    if model_type == "mistral":
        assert {layer.window for layer in config.attention} == {6}
    else:
        assert config.attention_bias and config.tie_embeddings


def test_gemma_tied_logits_match(tmp_path):
    """Gemma: sqrt(M) embedding scale, (1 + w) norms, GeGLU (tanh), head_dim != M / H, tied embeddings."""
    torch_model = _random_model(transformers.GemmaConfig, transformers.GemmaForCausalLM,
                                **(SMALL | dict(head_dim=24, num_key_value_heads=1, rope_theta=10000.0)))
    assert torch_model.config.tie_word_embeddings
    torch_model.save_pretrained(tmp_path, safe_serialization=True)
    difference, config = _max_difference(torch_model, tmp_path)
    assert difference < ATOL
    assert config.tie_embeddings and config.scale_embeddings and config.activation == "gelu"
    assert config.head_dim == 24 and not config.post_norms


def test_gemma2_logits_match(tmp_path):
    """Gemma 2: post-sublayer norms, query_pre_attn_scalar, soft-caps, alternating sliding windows."""
    torch_model = _random_model(transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
                                **(SMALL | dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=5,
                                                attn_logit_softcapping=3.0, final_logit_softcapping=4.0)))
    torch_model.save_pretrained(tmp_path, safe_serialization=True)
    difference, config = _max_difference(torch_model, tmp_path)
    assert difference < ATOL
    assert config.post_norms and config.attention_scale == pytest.approx(24**-0.5)
    assert [layer.kind for layer in config.attention] == ["sliding_window", "full"]
    assert (config.softcap, config.attention_softcap) == (4.0, 3.0)


def test_sharded_checkpoint_loads(tmp_path):
    torch_model = _llama(seed=3)
    torch_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    difference, _ = _max_difference(torch_model, tmp_path)
    assert difference < ATOL


def test_bfloat16_checkpoint_loads_as_float32(tmp_path):
    """numpy has no bfloat16: those files are read raw; the values are the bf16 weights exactly."""
    torch_model = _llama(seed=4)
    with torch.no_grad():  # round the weights only: .to(bfloat16) would round the rotary frequencies too
        for parameter in torch_model.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
    copy.deepcopy(torch_model).to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    assert "BF16" in (tmp_path / "model.safetensors").read_bytes()[:4096].decode("latin-1")
    difference, config = _max_difference(torch_model, tmp_path)
    assert difference < ATOL
    assert config.param_dtype == "float32"


def test_bfloat16_parameters(llama_path):
    model, config = load_hf_model(llama_path, dtype="bfloat16")
    assert config.dtype == config.param_dtype == "bfloat16"
    assert model.blocks[0].attention.query.kernel[...].dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(model(jnp.asarray(_tokens())).logits)).all()


def test_config_from_hf_accepts_a_transformers_config():
    config = config_from_hf(transformers.LlamaConfig(**SMALL, rope_theta=500000.0))
    assert config.rope_theta == 500000.0 and config.activation == "silu" and not config.scale_embeddings


def _edit_config(path, **changes):
    config_path = path / "config.json"
    values = json.loads(config_path.read_text()) | changes
    config_path.write_text(json.dumps(values))


def test_unsupported_model_type(llama_path, tmp_path):
    path = _copy(llama_path, tmp_path)
    _edit_config(path, model_type="gpt2")
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*llama"):
        load_hf_model(path)


def test_unsupported_features_raise_not_implemented():
    base = dict(SMALL, model_type="llama")
    with pytest.raises(NotImplementedError, match="rope scaling rope_type='llama3'"):
        config_from_hf(base | {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}})
    with pytest.raises(NotImplementedError, match="mlp_bias"):
        config_from_hf(base | {"mlp_bias": True})
    with pytest.raises(NotImplementedError, match="activation 'tanh'"):
        config_from_hf(base | {"hidden_act": "tanh"})
    with pytest.raises(ValueError, match="no 'hidden_size'"):
        config_from_hf({k: v for k, v in base.items() if k != "hidden_size"})


def _rewrite_weights(path, edit):
    file = path / "model.safetensors"
    tensors = dict(safetensors_numpy.load_file(str(file)))
    edit(tensors)
    safetensors_numpy.save_file(tensors, str(file), metadata={"format": "pt"})


def test_missing_tensor(llama_path, tmp_path):
    path = _copy(llama_path, tmp_path)
    _rewrite_weights(path, lambda tensors: tensors.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_hf_model(path)


def test_unexpected_tensor(llama_path, tmp_path):
    path = _copy(llama_path, tmp_path)
    _rewrite_weights(path, lambda tensors: tensors.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match=r"no place.*'model\.layers\.0\.mlp\.extra\.weight'"):
        load_hf_model(path)


def test_shape_mismatch_names_the_tensor(llama_path, tmp_path):
    path = _copy(llama_path, tmp_path)
    _edit_config(path, intermediate_size=96)
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight': expected shape"):
        load_hf_model(path)


def test_missing_files(llama_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_hf_model(tmp_path / "nowhere")
    path = _copy(llama_path, tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_hf_model(path)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_model(path)
