"""Language models built from the public jaxsparse API: dense, Spark Transformer, BlockFFN and top-k MoE.

Example::

    from flax import nnx
    from models import Transformer, generate, get_preset, load_hf_model

    model = Transformer(get_preset("spark-tiny"), rngs=nnx.Rngs(0))
    out = model(tokens)                        # ModelOutput: logits [B, T, V], aux_loss, metrics
    continued = generate(model, tokens[:, :16], max_new_tokens=32, policy="top_k")
    llama, config = load_hf_model("path/to/save_pretrained/folder")   # pip install -e ".[hf]"
"""

from models.config import LayerAttention, ModelConfig, attention_pattern
from models.generate import generate
from models.hf_import import config_from_hf, load_hf_model
from models.presets import PRESETS, dense_twin, get_preset
from models.transformer import ModelOutput, Transformer, count_parameters

__all__ = [
    "LayerAttention",
    "ModelConfig",
    "ModelOutput",
    "PRESETS",
    "Transformer",
    "attention_pattern",
    "config_from_hf",
    "count_parameters",
    "dense_twin",
    "generate",
    "get_preset",
    "load_hf_model",
]
