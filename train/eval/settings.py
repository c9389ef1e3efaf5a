"""What one evaluation row changes about the trained model: attention layout, KV selection at decode, FFN sparsity.

Every setting reuses the trained weights: the attention layout and Spark's FFN sparsity are config
fields that own no parameters, so a model of the changed config takes the trained state as it is.
"""

from __future__ import annotations

import dataclasses

from models import LayerAttention, ModelConfig, attention_pattern
from models.decode_policy import FullCache, QuestPages, TokenSelect, TopKKeys

GROUPS = ("layout", "kv", "ffn")
DEFAULT_WINDOW_SINKS = 4
# Decode budgets of the KV rows (32 keys: a quarter of a 128-token cache) and the Spark FFN
# sparsity levels evaluated besides the trained one.
DEFAULT_TOP_K = (8, 16, 32)
DEFAULT_QUEST_PAGES = (2, 4)
DEFAULT_TOKEN_SELECT = (12,)
DEFAULT_FFN_SPARSITIES = (0.0, 0.5, 0.8, 0.97)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setting:
    """One evaluation row.

    Attributes:
      group: ``"layout"`` (attention pattern in prefill and decode), ``"kv"`` (KV selection of the
        full-attention layers at decode) or ``"ffn"`` (Spark FFN sparsity).
      label: the row's name in the table.
      attention: the per-layer attention to evaluate with; None: as trained.
      ffn_sparsity: Spark's ``ffn_sparsity`` to evaluate with; None: as trained.
      policy: a :mod:`models.decode_policy` object: answers come from ``models.generate`` with it
        (the first answer token from the prefill, the others from decode steps); None: answers
        come from one teacher-forced forward (the same greedy answers as full-cache decoding).

    Raises:
      ValueError: an unknown group, an empty label.
    """

    group: str
    label: str
    attention: tuple[LayerAttention, ...] | None = None
    ffn_sparsity: float | None = None
    policy: FullCache | TopKKeys | QuestPages | TokenSelect | None = None

    def __post_init__(self):
        if self.group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}, got {self.group!r}")
        if not isinstance(self.label, str) or not self.label:
            raise ValueError(f"label must be a non-empty string, got {self.label!r}")

    def model_config(self, trained: ModelConfig) -> ModelConfig:
        """``trained`` with this setting's attention and FFN sparsity."""
        changes = {}
        if self.attention is not None:
            changes["attention"] = self.attention
        if self.ffn_sparsity is not None:
            changes["ffn_sparsity"] = self.ffn_sparsity
        return dataclasses.replace(trained, **changes)


def describe_layout(layers: tuple[LayerAttention, ...]) -> str:
    """``"full causal"``, ``"window 64 + 4 sinks"`` or ``"1/4 full, 3/4 window 64 + 4 sinks"``."""
    local = [layer for layer in layers if layer.kind == "sliding_window"]
    kinds = sorted({(layer.window, layer.sinks) for layer in local})
    windows = ", ".join(f"window {window}" + (f" + {sinks} sinks" if sinks else "") for window, sinks in kinds)
    if not local:
        return "full causal"
    if len(local) == len(layers):
        return windows
    return f"{len(layers) - len(local)}/{len(layers)} full, {len(local)}/{len(layers)} {windows}"


def default_settings(config: ModelConfig, *, seq_len: int, top_k: tuple[int, ...] = DEFAULT_TOP_K,
                     quest_pages: tuple[int, ...] = DEFAULT_QUEST_PAGES,
                     token_select: tuple[int, ...] = DEFAULT_TOKEN_SELECT,
                     ffn_sparsities: tuple[float, ...] = DEFAULT_FFN_SPARSITIES) -> tuple[Setting, ...]:
    """The rows of the trade-off table for a model trained with ``config``.

    - layout: as trained, every layer full causal, every layer sliding window + sinks, and (when the
      trained model is all full) a third of the layers full (:func:`models.attention_pattern`).
      The window and sinks are the trained local layers' (the first kind), else ``seq_len // 4``
      and 4 sinks. Layouts equal to the trained one are left out.
    - kv: full cache, top-k keys for each ``top_k`` (scored on ``config.score_dims`` dims),
      Quest with each ``quest_pages`` pages of 16, TokenSelect voting each ``token_select`` tokens
      (plus 4 sinks and 16 recent).
    - ffn (Spark models only): each ``ffn_sparsities`` level other than the trained one.

    Raises:
      ValueError: a non-positive budget or a sparsity outside ``[0, 1)`` (naming the argument).
    """
    for name, budgets in (("top_k", top_k), ("quest_pages", quest_pages), ("token_select", token_select)):
        if any(isinstance(value, bool) or not isinstance(value, int) or value < 1 for value in budgets):
            raise ValueError(f"{name} must hold positive ints, got {budgets!r}")
    if any(not 0.0 <= value < 1.0 for value in ffn_sparsities):
        raise ValueError(f"ffn_sparsities must hold numbers in [0, 1), got {ffn_sparsities!r}")
    trained = config.attention
    local = next((layer for layer in trained if layer.kind == "sliding_window"), None)
    window, sinks = (local.window, local.sinks) if local else (max(1, seq_len // 4), DEFAULT_WINDOW_SINKS)
    layers = config.num_layers
    every_local = (LayerAttention(kind="sliding_window", window=window, sinks=sinks),) * layers
    layouts = [(f"trained: {describe_layout(trained)}", None),
               ("full causal, every layer", (LayerAttention(),) * layers),
               (f"{describe_layout(every_local)}, every layer", every_local)]
    if local is None:
        hybrid = attention_pattern(layers, full_every=3, window=window, sinks=sinks)
        layouts.append((describe_layout(hybrid), hybrid))
    settings = [Setting(group="layout", label=label, attention=attention) for label, attention in layouts
                if attention is None or attention != trained]
    settings.append(Setting(group="kv", label="full cache", policy=FullCache()))
    rank = f", {config.score_dims} dims" if config.score_dims is not None else ""
    settings += [Setting(group="kv", label=f"top-{k} keys{rank}", policy=TopKKeys(k, config.score_dims)) for k in top_k]
    for policy in (QuestPages(pages) for pages in quest_pages):
        settings.append(Setting(group="kv", label=f"Quest {policy.num_pages} x {policy.page_size}", policy=policy))
    for policy in (TokenSelect(k) for k in token_select):
        settings.append(Setting(group="kv", label=f"TokenSelect {policy.k} + {policy.sinks} + {policy.recent}",
                                policy=policy))
    if config.ffn == "spark":
        settings += [Setting(group="ffn", label=f"ffn_sparsity {level:g}", ffn_sparsity=float(level))
                     for level in ffn_sparsities if level != config.spark_sparsity]
    return tuple(settings)


def _keys_read(layer: LayerAttention, policy, length: int) -> int:
    """Keys one decode step of ``layer`` reads from a cache of ``length`` keys (at most, for Quest)."""
    if layer.kind == "sliding_window":
        return min(layer.sinks, max(length - layer.window, 0)) + min(length, layer.window)
    if isinstance(policy, TopKKeys):
        return min(policy.k, length)
    if isinstance(policy, QuestPages):
        return min(policy.num_pages * policy.page_size, length)
    if isinstance(policy, TokenSelect):
        return min(policy.k + policy.sinks + policy.recent, length)
    return length


def decode_key_share(config: ModelConfig, policy, *, prompt_len: int, new_tokens: int) -> float:
    """The share of the cached keys a decode step reads, averaged over layers and decode steps.

    Decode step ``i`` (``1 .. new_tokens - 1``: the first new token comes from the prefill) reads
    a cache of ``prompt_len + i`` keys; with one new token the share is taken at ``prompt_len + 1``.
    Sliding-window layers read their sinks and window; full layers what ``policy`` selects (None:
    every key). Quest counts whole pages, an upper bound when a chosen page is partly empty.
    """
    lengths = range(prompt_len + 1, prompt_len + max(new_tokens, 2))
    shares = [_keys_read(layer, policy, length) / length for length in lengths for layer in config.attention]
    return sum(shares) / len(shares)
