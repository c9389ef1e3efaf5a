"""Named configs: tiny byte-level models for CPU runs and Gemma-2-2B-shaped models for accelerators.

Tiny presets (vocab 256: raw bytes; ``M = 128``, 4 layers, ``H = 4``, ``K = 2``, ``D = 32``,
``max_seq_len = 256``, about 1.1M parameters each) train a few hundred steps on a 2-core CPU in
minutes. Their FFNs hold the same parameters as the dense one (``3 M F`` with ``F = 512``):

- ``dense-tiny``: GeGLU FFN ``F = 512``, every layer full causal attention.
- ``spark-tiny``: Spark FFN ``F' = 768 = 3/2 F`` (two ``[F', M]`` weights instead of three ``[F, M]``),
  8% of the neurons kept, ``r = 32``; a third of the layers full attention, the others a 64-token
  window with 4 sinks (LongGen style); decode reads the top 64 keys scored on 16 of 32 dims.
- ``blockffn-tiny``: BlockFFN, 16 experts of width 32 (``16 * 32 = F``), paper loss weights.
- ``moe-tiny``: top-2 of 8 GeGLU experts of width 64 (``8 * 64 = F``), dropless.

Gemma-2-2B shapes (Gemma Team 2024, "Gemma 2: Improving Open Language Models at a Practical Size",
and the released config): ``V = 256000``, ``M = 2304``, 26 layers, ``H = 8``, ``K = 4``,
``D = 256``, ``F = 9216``, 8192 context, local (4096-token window) and global layers alternating
starting with a local one, attention soft-cap 50, final soft-cap 30, tied embeddings, GeGLU. Not
reproduced: Gemma's post-attention / post-FFN norms (2 * 26 * 2304 = 0.1M parameters) and its
``1 + scale`` norm parametrisation. About 2.61B parameters.

- ``dense-gemma2-2b``: the dense model above.
- ``spark-gemma2-2b``: the Spark Transformer of You et al. 2025 ("Spark Transformer: Reactivating
  Sparsity in FFN and Attention", pretrained with the Gemma-2 recipe): Spark FFN with 8% of the
  neurons, ``F' = 3/2 * 9216 = 13824`` so that the FFN keeps Gemma's parameter count (the paper
  states an unchanged parameter count; the exact widening is unconfirmed), predictor ``r = 1024``
  (unconfirmed: recalled from the paper, which REFERENCES leaves open), and at most 256 keys per
  token at decode scored on ``r = 128`` of the 256 head dims (256 keys: the paper; 128 dims:
  unconfirmed).
"""

from __future__ import annotations

import dataclasses

from models.config import ModelConfig, attention_pattern

_TINY = dict(vocab_size=256, model_dim=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, max_seq_len=256)
_GEMMA2_2B = dict(vocab_size=256000, model_dim=2304, num_layers=26, num_heads=8, num_kv_heads=4, head_dim=256,
                  max_seq_len=8192, attention=attention_pattern(26, full_every=2, window=4096), softcap=30.0,
                  attention_softcap=50.0, dtype="bfloat16", param_dtype="float32")

PRESETS: dict[str, ModelConfig] = {
    "dense-tiny": ModelConfig(**_TINY, ffn="dense", ffn_dim=512),
    "spark-tiny": ModelConfig(**_TINY, ffn="spark", ffn_dim=768, ffn_sparsity=0.92, predictor_dim=32,
                              attention=attention_pattern(4, full_every=3, window=64, sinks=4), decode_keys=64,
                              score_dims=16),
    "blockffn-tiny": ModelConfig(**_TINY, ffn="blockffn", num_experts=16, expert_dim=32),
    "moe-tiny": ModelConfig(**_TINY, ffn="moe", num_experts=8, experts_per_token=2, expert_dim=64),
    "dense-gemma2-2b": ModelConfig(**_GEMMA2_2B, ffn="dense", ffn_dim=9216),
    "spark-gemma2-2b": ModelConfig(**_GEMMA2_2B, ffn="spark", ffn_dim=13824, ffn_sparsity=0.92, predictor_dim=1024,
                                   decode_keys=256, score_dims=128),
}


def get_preset(name: str) -> ModelConfig:
    """The preset config called ``name``.

    Raises:
      ValueError: an unknown name (the message lists the known ones).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]


def dense_twin(config: ModelConfig) -> ModelConfig:
    """The same model with a dense gated FFN of (about) the same FFN parameter count.

    Everything but the FFN is kept (attention layout, decode settings, dtypes). The dense width:

    - ``"dense"``: unchanged (the config itself).
    - ``"spark"``: ``F = round(2 F' / 3)``: Spark's two ``[F', M]`` weights hold ``2 M F'``
      parameters, a gated FFN's three ``[F, M]`` weights ``3 M F`` (exact when ``3 | 2 F'``).
    - ``"moe"`` / ``"blockffn"``: ``F = E * expert_dim``: the experts' total parameters (the
      router's ``M * E`` and BlockFFN's ``E`` gains are not matched). Compute per token is then
      larger than the MoE's, which uses ``k`` (or a variable number of) experts.
    """
    if config.ffn == "dense":
        return config
    width = round(2 * config.ffn_dim / 3) if config.ffn == "spark" else config.num_experts * config.expert_dim
    return dataclasses.replace(config, ffn="dense", ffn_dim=width, ffn_sparsity=None, predictor_dim=None,
                               num_experts=None, experts_per_token=None, expert_dim=None, aux_loss_weights=None)
