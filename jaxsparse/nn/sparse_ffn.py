"""Sparse FFN layers: a gated FFN with a sparsified gate (Gemma 3n, CATS) and the Spark FFN.

Both train as masked dense math (fast on accelerators: the zeros come from the activation, not from
gathers) and decode through :func:`jaxsparse.ops.sparse_ffn.sparse_ffn_decode`, which reads only the
active neurons' rows of the up and down weights. Weights are neuron-major ``[F, *]``: row n holds
neuron n's weights, so a gather reads contiguous rows.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxsparse.nn.parameters import check_positive_int, scaled_normal
from jaxsparse.ops.activations import calibrate_cats_threshold, cats, get_activation
from jaxsparse.ops.sparse_ffn import sparse_ffn_decode
from jaxsparse.ops.topk import resolve_k, statistical_topk, topk_mask

GATE_RULES = ("none", "topk", "statistical_topk", "cats")
SPARK_MODES = ("soft", "hard")


class _SparseFFN(nnx.Module):
    """What both layers share: dense gate activations feed training (masked) and decoding (gather).

    Subclasses define ``gate_activations(x) -> a [..., F]`` (zero where a neuron is inactive),
    ``_up(x) -> [..., F]`` (float32 up projection), ``_decode_operands(x) -> (x_in [N, M], w_up
    [F, M], w_down [F, M])`` for :func:`~jaxsparse.ops.sparse_ffn.sparse_ffn_decode`, and ``w_down``.
    """

    record_activity: bool = False

    def _record(self, activity) -> None:
        if self.record_activity:
            self.sow(nnx.Intermediate, "activity", activity)

    def _cast(self, x, weight):
        dtype = self.dtype or jnp.result_type(x, weight[...])
        return x.astype(dtype), weight[...].astype(dtype)

    def _project(self, x, weight):
        """``x @ weight.T`` in float32: ``[..., W] x [F, W] -> [..., F]``."""
        x, weight = self._cast(x, weight)
        # matmul, not einsum("...w,fw->...f"): XLA:CPU ran the einsum form 3x slower (jax 0.10).
        return jnp.matmul(x, weight.T, preferred_element_type=jnp.float32)

    def __call__(self, x, *, return_activity: bool = False):
        """The training / prefill path: masked dense math.

        Args:
          x: ``[..., M]``.
          return_activity: also return the bool activity mask ``[..., F]`` (True where a neuron is
            active) for :mod:`jaxsparse.metrics`.

        Returns:
          ``y [..., M]``, or ``(y, activity)``.
        """
        gate = self.gate_activations(x)
        _, w_down = self._cast(x, self.w_down)
        hidden = (gate * self._up(x)).astype(w_down.dtype)
        y = jnp.matmul(hidden, w_down, preferred_element_type=jnp.float32).astype(w_down.dtype)
        activity = gate != 0
        self._record(activity)
        return (y, activity) if return_activity else y

    def decode(self, x, *, k_max: int, chunk: int = 1, overflow: str = "keep_largest",
               implementation: str | None = None):
        """The decoding path: only the active neurons' rows of the up and down weights are read.

        Equal to ``__call__`` when no group overflows (or with ``overflow="dense"``).

        Args:
          x: ``[N, M]`` (e.g. one token per sequence of a decode batch).
          k_max: static capacity of the active list of each group, in ``[1, F]``.
          chunk: tokens per group sharing one (union) active set; 1 for per-token sets.
          overflow: ``"keep_largest"`` or ``"dense"`` (see
            :func:`~jaxsparse.ops.sparse_ffn.sparse_ffn_decode`).
          implementation: the sparse FFN backend (``"xla"``, ``"pallas_gpu"``, ...).

        Returns:
          ``(y [N, M], ActiveNeurons)``; ``ActiveNeurons.dropped`` counts neurons past ``k_max``.
        """
        gate = self.gate_activations(x)
        self._record(gate != 0)
        x_in, w_up, w_down = self._decode_operands(x)
        return sparse_ffn_decode(x_in, gate, w_up, w_down, k_max=k_max, chunk=chunk, overflow=overflow,
                                 implementation=implementation)


class SparseGatedFFN(_SparseFFN):
    """A gated FFN (GeGLU / SwiGLU) whose gate activation is sparsified by a rule.

    ``y = W_down^T (a * (x W_up^T))`` with ``a = rule(activation(x W_gate^T))``:

    - ``rule="none"``: dense; with ``activation="relu"`` or ``"relu2"`` the gate is sparse by itself.
    - ``rule="topk"``: ``activation(topk_mask(z, k))``, the exact top-k pre-activations.
    - ``rule="statistical_topk"``: ``activation(max(z - theta, 0))`` (Gemma 3n's activation
      sparsity, e.g. ``sparsity=0.95`` with ``activation="gelu"``).
    - ``rule="cats"``: ``cats(activation(z), threshold)`` (CATS: ``activation="silu"`` and a threshold
      from :meth:`calibrate_threshold` or :func:`~jaxsparse.ops.activations.calibrate_cats_threshold`).

    Activations with ``activation(0) = 0`` (gelu, silu, relu, relu2) keep the zeros of the rule.
    Decoding computes the gate densely (``M x F``) and reads only the active rows of ``W_up`` and
    ``W_down``: up to 2/3 of the FFN's bytes are skipped.

    Attributes:
      w_gate, w_up, w_down: ``nnx.Param`` ``[F, M]`` neuron-major, logical axes ``("mlp", "embed")``.
      threshold: the CATS threshold (a float, or None before calibration).
      record_activity: when True, each call sows its activity mask as ``nnx.Intermediate`` "activity"
        (see :func:`~jaxsparse.nn.collect_activity`).
    """

    def __init__(self, model_dim: int, hidden_dim: int, *, activation="gelu", rule: str = "statistical_topk",
                 sparsity: float | None = None, threshold: float | None = None, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        """Builds the three weights.

        Args:
          model_dim: ``M``.
          hidden_dim: ``F``.
          activation: gate activation name (``"gelu"``, ``"gelu_exact"``, ``"silu"``, ``"relu"``,
            ``"relu2"``) or an elementwise callable with ``activation(0) = 0``.
          rule: one of ``"none"``, ``"topk"``, ``"statistical_topk"``, ``"cats"``.
          sparsity: share of gate entries to drop for ``"topk"`` and ``"statistical_topk"``, in [0, 1).
          threshold: the CATS threshold; may be set later with :meth:`calibrate_threshold`.
          dtype: computation dtype; None promotes inputs and parameters.
          param_dtype: parameter dtype.
          rngs: the ``params`` stream initialises the weights.

        Raises:
          ValueError: a non-positive size, an unknown rule or activation, a rule without its setting.
        """
        check_positive_int("model_dim", model_dim)
        check_positive_int("hidden_dim", hidden_dim)
        if rule not in GATE_RULES:
            raise ValueError(f"rule must be one of {GATE_RULES}, got {rule!r}")
        if rule in ("topk", "statistical_topk"):
            if sparsity is None:
                raise ValueError(f"rule={rule!r} needs sparsity in [0, 1)")
            resolve_k(hidden_dim, sparsity=sparsity)
        elif sparsity is not None:
            raise ValueError(f"sparsity is used by the topk rules only, not rule={rule!r}")
        if threshold is not None and rule != "cats":
            raise ValueError(f"threshold is used by rule='cats' only, not rule={rule!r}")
        get_activation(activation)
        self.model_dim, self.hidden_dim = model_dim, hidden_dim
        self.activation, self.rule, self.sparsity, self.threshold = activation, rule, sparsity, threshold
        self.dtype = dtype
        shape, names = (hidden_dim, model_dim), ("mlp", "embed")
        self.w_gate = scaled_normal(rngs, shape, model_dim, param_dtype, names)
        self.w_up = scaled_normal(rngs, shape, model_dim, param_dtype, names)
        self.w_down = scaled_normal(rngs, shape, hidden_dim, param_dtype, names)

    def _up(self, x):
        return self._project(x, self.w_up)

    def _decode_operands(self, x):
        x, w_up = self._cast(x, self.w_up)
        return (x, w_up, self._cast(x, self.w_down)[1])

    def gate_pre_activations(self, x):
        """``z = x W_gate^T``, float32 ``[..., F]``."""
        return self._project(x, self.w_gate)

    def gate_activations(self, x):
        """The sparsified gate ``a [..., F]`` (float32), zero where a neuron is inactive.

        Raises:
          ValueError: rule ``"cats"`` without a threshold.
        """
        activation = get_activation(self.activation)
        z = self.gate_pre_activations(x)
        if self.rule == "topk":
            return activation(topk_mask(z, resolve_k(self.hidden_dim, sparsity=self.sparsity)))
        if self.rule == "statistical_topk":
            return activation(statistical_topk(z, sparsity=self.sparsity, mode="soft"))
        if self.rule == "cats":
            if self.threshold is None:
                raise ValueError("rule='cats' needs a threshold: pass threshold= or call calibrate_threshold(x, sparsity)")
            return cats(activation(z), self.threshold)
        return activation(z)

    def calibrate_threshold(self, x, sparsity: float) -> float:
        """Sets (and returns) the CATS threshold that zeroes ``sparsity`` of the gate on samples ``x``.

        Runs eagerly (not under ``jit``): the threshold becomes a static float of the layer.
        """
        if self.rule != "cats":
            raise ValueError(f"calibrate_threshold is for rule='cats', this layer has rule={self.rule!r}")
        activations = get_activation(self.activation)(self.gate_pre_activations(x))
        self.threshold = float(calibrate_cats_threshold(activations, sparsity))
        return self.threshold


class SparkFFN(_SparseFFN):
    """The Spark FFN: a built-in low-rank predictor chooses ~k of F neurons per token, no extra parameters.

    The input weight ``K [M, F]`` is split by input rows: ``K1`` (the first r) scores every neuron,
    statistical top-k keeps about ``(1 - sparsity) * F`` of them, and ``K2`` (the other ``M - r``
    rows) and the output weight ``V`` are applied to the kept neurons only::

        z1 = x[:r] @ K1                      # [F], the predictor (r / M of the input FLOPs)
        a  = gelu(statistical_topk(z1))      # soft: gelu(max(z1 - theta, 0)); zero off the support
        y  = V^T (a * (x[r:] @ K2))          # only the support's columns of K2 and rows of V matter

    (You et al. 2025, "Spark Transformer"; the paper's r and whether F was widened are unconfirmed.
    To keep the parameter count of a gated FFN of width F_g, use ``hidden_dim = 3 * F_g // 2``.)
    ``mode="hard"`` uses ``gelu(where(z1 > theta, z1, 0))`` instead of the shift. With ``sparsity=0``
    the layer is the dense FFN ``V^T (gelu(x[:r] K1) * (x[r:] K2))``.

    Attributes:
      w_in: ``K^T``, ``[F, M]``: columns ``:r`` are ``K1^T`` (the predictor), the rest ``K2^T``.
      w_out: ``V``, ``[F, M]``. Both neuron-major, logical axes ``("mlp", "embed")``.
      record_activity: as in :class:`SparseGatedFFN`.
    """

    def __init__(self, model_dim: int, hidden_dim: int, *, predictor_dim: int | None = None,
                 sparsity: float = 0.92, activation="gelu", mode: str = "soft", dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        """Builds the split input weight and the output weight.

        Args:
          model_dim: ``M``.
          hidden_dim: ``F``.
          predictor_dim: ``r``, input rows that score the neurons, in ``(0, M)``; default ``M // 8``
            (at least 1).
          sparsity: share of neurons to drop, in ``[0, 1)``; 0.92 keeps 8% as Spark does.
          activation: applied to the kept scores (``activation(0)`` must be 0).
          mode: ``"soft"`` (shift by theta, then ReLU) or ``"hard"`` (keep scores above theta).
          dtype, param_dtype, rngs: as in :class:`SparseGatedFFN`.

        Raises:
          ValueError: a non-positive size, ``predictor_dim`` outside ``(0, M)``, ``sparsity``
            outside ``[0, 1)``, an unknown mode or activation.
        """
        check_positive_int("model_dim", model_dim)
        check_positive_int("hidden_dim", hidden_dim)
        predictor_dim = max(1, model_dim // 8) if predictor_dim is None else predictor_dim
        if isinstance(predictor_dim, bool) or not isinstance(predictor_dim, int) or not 0 < predictor_dim < model_dim:
            raise ValueError(f"predictor_dim (r) must be an int in (0, {model_dim}) (model_dim), got {predictor_dim!r}")
        resolve_k(hidden_dim, sparsity=sparsity)
        if mode not in SPARK_MODES:
            raise ValueError(f"mode must be one of {SPARK_MODES}, got {mode!r}")
        get_activation(activation)
        self.model_dim, self.hidden_dim, self.predictor_dim = model_dim, hidden_dim, predictor_dim
        self.sparsity, self.activation, self.mode, self.dtype = sparsity, activation, mode, dtype
        names = ("mlp", "embed")
        self.w_in = scaled_normal(rngs, (hidden_dim, model_dim), model_dim, param_dtype, names)
        self.w_out = scaled_normal(rngs, (hidden_dim, model_dim), hidden_dim, param_dtype, names)

    @property
    def w_down(self):
        return self.w_out

    def _up(self, x):
        r = self.predictor_dim
        return self._project(x[..., r:], self.w_in[:, r:])

    def _decode_operands(self, x):
        # The sparse op reads whole rows of w_in: zeroing x[:r] drops the predictor columns K1 from
        # the up projection (it re-reads r / M of each gathered row rather than copying K2 out).
        x, w_in = self._cast(x.at[..., : self.predictor_dim].set(0), self.w_in)
        return (x, w_in, self._cast(x, self.w_out)[1])

    def scores(self, x):
        """The predictor's scores ``z1 = x[:r] K1``, float32 ``[..., F]``."""
        r = self.predictor_dim
        return self._project(x[..., :r], self.w_in[:, :r])

    def gate_activations(self, x):
        """``a = activation(statistical_topk(z1))`` float32 ``[..., F]``, zero off the kept support."""
        return get_activation(self.activation)(statistical_topk(self.scores(x), sparsity=self.sparsity, mode=self.mode))

