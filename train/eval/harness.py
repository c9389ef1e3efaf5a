"""Train a tiny model on the synthetic task mixture, then score its greedy answers under each setting.

Training is next-token cross entropy (plus the model's auxiliary loss) with AdamW
(:func:`train.optimizer.make_optimizer`) on batches of :func:`train.eval.tasks.mixture_batch`, on
every token or on the answers only. The state is laid out as ``python -m train``'s (params, other
variables, optimizer state, step), so :class:`train.checkpoint.Checkpointer` saves it and a
training run's checkpoint can be evaluated as well.

Evaluation uses held-out examples (a seed stream the training batches never draw) whose prompts all
have ``P = seq_len - max answer length`` tokens. A setting without a decode policy scores the
answers of one teacher-forced forward: a greedy answer is right exactly when every answer token is
the argmax given the true tokens before it, which is what greedy decoding with the full cache
produces. A setting with a policy runs ``models.generate``: the first answer token comes from the
prefill (the layers' trained masks), each further one from a decode step whose full-attention layers
read what the policy selects.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models import PRESETS, ModelConfig, Transformer, generate, get_preset
from train.checkpoint import Checkpointer
from train.config import TrainConfig
from train.eval import tasks as task_lib
from train.eval import settings as settings_lib
from train.eval.settings import Setting, decode_key_share, default_settings
from train.optimizer import learning_rate_schedule, make_optimizer

LOSS_ON = ("all", "answers")
EVAL_SEED_OFFSET = 1_000_003  # held-out examples: a seed the training batches ([seed, step, row]) never use
PAD_TOKEN = 32  # a space: right padding after the shorter answers (never read by an earlier position)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """The evaluation run: training on the task mixture, then which settings to score.

    Attributes:
      preset: model preset (``models.get_preset``), when no model config is given.
      steps: AdamW steps on the task mixture.
      batch_size: sequences per step (rows cycle through the tasks).
      seq_len: tokens per training sequence (T); evaluation prompts have ``T - max answer length``.
      lr: peak learning rate (linear warm-up, cosine decay to a tenth).
      warmup_steps: warm-up length.
      loss_on: ``"all"`` (next-token loss on every token) or ``"answers"`` (the supervised tokens
        of :class:`~train.eval.tasks.Example`: answers, MQAR query values, the copy's repeats).
      eval_examples: held-out examples per task.
      seed: model initialisation and data seed.
      tasks: the task specs (:func:`train.eval.tasks.default_tasks`).
      top_k, quest_pages, token_select, ffn_sparsities: budgets and levels of
        :func:`train.eval.settings.default_settings`.
      checkpoint: a directory: restore the model saved there (by an earlier evaluation or by
        ``python -m train``) instead of training, or save the trained model there when it holds none.
      log_every: print the training loss every this many steps.

    Raises:
      ValueError: a field of the wrong type or range (named), a sequence too short for a task.
    """

    preset: str = "spark-tiny"
    steps: int = 800
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 25
    loss_on: str = "answers"
    eval_examples: int = 32
    seed: int = 0
    tasks: tuple[task_lib.Task, ...] = dataclasses.field(default_factory=task_lib.default_tasks)
    top_k: tuple[int, ...] = settings_lib.DEFAULT_TOP_K
    quest_pages: tuple[int, ...] = settings_lib.DEFAULT_QUEST_PAGES
    token_select: tuple[int, ...] = settings_lib.DEFAULT_TOKEN_SELECT
    ffn_sparsities: tuple[float, ...] = settings_lib.DEFAULT_FFN_SPARSITIES
    checkpoint: str | None = None
    log_every: int = 50

    def __post_init__(self):
        for name, minimum in (("steps", 0), ("batch_size", 1), ("seq_len", 2), ("warmup_steps", 0),
                              ("eval_examples", 1), ("seed", 0), ("log_every", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {LOSS_ON}, got {self.loss_on!r}")
        if not self.tasks or len({task.name for task in self.tasks}) != len(self.tasks):
            raise ValueError(f"tasks must be distinct tasks, at least one, got {self.tasks!r}")
        for task in self.tasks:
            if self.prompt_len + task.answer_len < task.min_length:
                needed = task.min_length - task.answer_len + self.max_answer_len
                raise ValueError(f"seq_len={self.seq_len} is too short for {task!r}: evaluation prompts of "
                                 f"{self.prompt_len} tokens need seq_len >= {needed}")

    @property
    def max_answer_len(self) -> int:
        return max(task.answer_len for task in self.tasks)

    @property
    def prompt_len(self) -> int:
        """``P``: the length of every evaluation prompt."""
        return self.seq_len - self.max_answer_len

    def train_config(self) -> TrainConfig:
        """The optimizer fields as a :class:`~train.config.TrainConfig` (weight decay, betas, clipping: defaults)."""
        return TrainConfig(preset=self.preset, steps=max(self.steps, 1), batch_size=self.batch_size,
                           seq_len=self.seq_len, lr=float(self.lr), warmup_steps=self.warmup_steps, seed=self.seed,
                           progress=False, plot=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Row:
    """One setting's results.

    Attributes:
      setting: the :class:`~train.eval.settings.Setting`.
      accuracy: ``{task name: exact-match accuracy}`` over the held-out examples.
      token_accuracy: ``{task name: share of answer tokens equal to the truth}`` (teacher-forced for
        rows scored by the forward, free-running greedy for decoded rows).
      attention_share: share of the causal (query, key) pairs the prefill visits (1.0: full causal).
      keys_share: share of the cached keys a decode step reads (see ``decode_key_share``).
      ffn_active: share of FFN neurons (experts for MoE kinds) active per token, ``1 - ffn_tls``.
    """

    setting: Setting
    accuracy: dict[str, float]
    token_accuracy: dict[str, float]
    attention_share: float
    keys_share: float
    ffn_active: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalResult:
    """What :func:`run` returns.

    Attributes:
      preset: the preset name (or ``"custom"``); model: the trained model's config.
      rows: one :class:`Row` per setting.
      steps: training steps taken in this run (0 when restored); final_loss: the last step's
        training loss (None when restored).
      train_seconds, eval_seconds: wall time.
      restored_from: the checkpoint directory the model came from, or None.
      config: the :class:`EvalConfig`.
    """

    preset: str
    model: ModelConfig
    rows: tuple[Row, ...]
    steps: int
    final_loss: float | None
    train_seconds: float
    eval_seconds: float
    restored_from: str | None
    config: EvalConfig


def _masked_loss(graphdef, params, rest, tokens, supervised, answers_only: bool):
    model = nnx.merge(graphdef, params, rest)
    out = model(tokens[:, :-1])
    losses = optax.softmax_cross_entropy_with_integer_labels(out.logits, tokens[:, 1:])
    targets = supervised[:, 1:].astype(jnp.float32)
    weights = targets if answers_only else jnp.ones_like(targets)
    loss = jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    correct = jnp.argmax(out.logits, axis=-1) == tokens[:, 1:]
    row_accuracy = jnp.sum(correct * targets, axis=1) / jnp.maximum(jnp.sum(targets, axis=1), 1.0)
    _, new_rest = nnx.state(model, nnx.Param, ...)
    return loss + out.aux_loss, (loss, row_accuracy, nnx.as_pure(new_rest))


def _make_train_step(graphdef, tx, *, answers_only: bool):
    def step(state, tokens, supervised):
        grad_fn = jax.value_and_grad(_masked_loss, argnums=1, has_aux=True)
        (_, (loss, row_accuracy, rest)), grads = grad_fn(graphdef, state["params"], state["rest"], tokens,
                                                            supervised, answers_only)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {"params": optax.apply_updates(state["params"], updates), "rest": rest, "opt_state": opt_state,
                     "step": state["step"] + 1}
        return new_state, {"loss": loss, "row_accuracy": row_accuracy}

    return jax.jit(step, donate_argnums=0)


def _graphdef(model_config: ModelConfig):
    """The ``nnx.GraphDef`` of a model of ``model_config`` (traced abstractly, nothing allocated)."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0))), nnx.Param, ...)[0]


def _init_state(model_config: ModelConfig, tx, seed: int):
    """``(graphdef, abstract state, init)`` for a model of ``model_config`` trained with ``tx``."""
    graphdef = _graphdef(model_config)

    def init():
        _, params, rest = nnx.split(Transformer(model_config, rngs=nnx.Rngs(seed)), nnx.Param, ...)
        params, rest = nnx.as_pure(params), nnx.as_pure(rest)
        return {"params": params, "rest": rest, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    return graphdef, jax.eval_shape(init), jax.jit(init)


def train(model_config: ModelConfig, config: EvalConfig, *, log: Callable[[str], None] = print):
    """Trains a fresh model on the task mixture.

    Returns:
      ``(graphdef, state, final loss or None)``; ``state`` is the train-state dict.
    """
    train_config = config.train_config()
    tx = make_optimizer(train_config)
    graphdef, _, init = _init_state(model_config, tx, config.seed)
    state = init()
    step_fn = _make_train_step(graphdef, tx, answers_only=config.loss_on == "answers")
    schedule = learning_rate_schedule(train_config)
    metrics = None
    for step in range(config.steps):
        tokens, supervised, task_index = task_lib.mixture_batch(config.tasks, config.batch_size, config.seq_len,
                                                                config.seed, step)
        state, metrics = step_fn(state, tokens, supervised)
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            values = jax.device_get(metrics)
            accuracy = ", ".join(f"{task.name} {np.mean(values['row_accuracy'][task_index == index]):.2f}"
                                 for index, task in enumerate(config.tasks) if np.any(task_index == index))
            log(f"step {step + 1}/{config.steps}: loss {values['loss']:.4f}, lr {float(schedule(step)):.2e}, "
                f"supervised-token accuracy {accuracy}")
    return graphdef, state, None if metrics is None else float(metrics["loss"])


def _check_seq_len(config: EvalConfig, model_config: ModelConfig) -> None:
    if config.seq_len > model_config.max_seq_len:
        raise ValueError(f"seq_len={config.seq_len} exceeds the model's max_seq_len={model_config.max_seq_len}")


def _trained_model(model_config, config: EvalConfig, log):
    """``(model config, state, steps, final loss, seconds, restored_from)``."""
    began = time.perf_counter()
    checkpointer = Checkpointer(config.checkpoint) if config.checkpoint is not None else None
    try:
        step = checkpointer.latest_step() if checkpointer is not None else None
        if step is not None:
            saved = ModelConfig.from_dict(checkpointer.configs(step)["model"])
            if saved != model_config:
                log(f"using the model config saved in {config.checkpoint} (it differs from the requested one)")
            _check_seq_len(config, saved)
            _, abstract, _ = _init_state(saved, make_optimizer(config.train_config()), config.seed)
            state = checkpointer.restore(step, abstract)
            log(f"restored the model of step {step} from {checkpointer.directory}; not training")
            return saved, state, 0, None, time.perf_counter() - began, checkpointer.directory
        _check_seq_len(config, model_config)
        _, state, final_loss = train(model_config, config, log=log)
        if checkpointer is not None:
            checkpointer.save(config.steps, state, {"model": model_config.to_dict(),
                                                    "train": config.train_config().to_dict()})
            log(f"saved the trained model to {checkpointer.directory}")
        return model_config, state, config.steps, final_loss, time.perf_counter() - began, None
    finally:
        if checkpointer is not None:
            checkpointer.close()


@functools.partial(jax.jit, static_argnums=0)
def _forward_answers(graphdef, params, rest, tokens):
    out = nnx.merge(graphdef, params, rest)(tokens)
    return jnp.argmax(out.logits, axis=-1).astype(jnp.int32), out.metrics


@dataclasses.dataclass(frozen=True, kw_only=True)
class _EvalData:
    """Every task's held-out examples, stacked: prompts of ``P`` tokens, answers right-padded."""

    batches: tuple[task_lib.TaskBatch, ...]
    tokens: np.ndarray  # int32 [N, P + A_max]
    prompt_len: int
    answer_len: int  # A_max


def _eval_data(config: EvalConfig) -> _EvalData:
    prompt_len, answer_len = config.prompt_len, config.max_answer_len
    batches = tuple(task_lib.make_batch(task, config.eval_examples, prompt_len + task.answer_len,
                                        EVAL_SEED_OFFSET + config.seed) for task in config.tasks)
    rows = [np.pad(batch.tokens, ((0, 0), (0, answer_len - batch.answer_len)), constant_values=PAD_TOKEN)
            for batch in batches]
    return _EvalData(batches=batches, tokens=np.concatenate(rows), prompt_len=prompt_len, answer_len=answer_len)


def _accuracy(data: _EvalData, predicted: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
    """Per task: exact-match accuracy and the share of answer tokens right."""
    exact, tokens, first = {}, {}, 0
    for batch in data.batches:
        rows = predicted[first:first + len(batch.tokens)]
        exact[batch.task] = float(np.mean(task_lib.exact_match(rows, batch.answers)))
        tokens[batch.task] = float(np.mean(rows[:, :batch.answer_len] == batch.answers))
        first += len(batch.tokens)
    return exact, tokens


def _causal_share(length: int) -> float:
    """The share of ``T x T`` pairs a causal mask visits."""
    return (length + 1) / (2 * length)


def evaluate(model_config: ModelConfig, variables, config: EvalConfig, settings: tuple[Setting, ...], *,
             log: Callable[[str], None] = print) -> tuple[Row, ...]:
    """Scores every setting on the held-out examples.

    Args:
      model_config: the trained model's config.
      variables: ``(params, rest)``: the trained model's ``nnx.Param`` values and its other variables.
      config: the evaluation config.
      settings: the rows.
      log: progress messages.

    Returns:
      One :class:`Row` per setting, in order.
    """
    params, rest = variables
    data = _eval_data(config)
    forward_len = data.tokens.shape[1] - 1
    cache: dict[ModelConfig, tuple[np.ndarray, dict]] = {}

    def forward(setting_config: ModelConfig):
        if setting_config not in cache:
            predicted, metrics = jax.device_get(_forward_answers(_graphdef(setting_config), params, rest,
                                                                 data.tokens[:, :-1]))
            answers = predicted[:, data.prompt_len - 1:data.prompt_len - 1 + data.answer_len]
            cache[setting_config] = (answers, metrics)
        return cache[setting_config]

    rows = []
    for setting in settings:
        began = time.perf_counter()
        setting_config = setting.model_config(model_config)
        answers, metrics = forward(setting_config)  # the prefill's metrics for decoded settings
        if setting.policy is not None:
            model = nnx.merge(_graphdef(setting_config), params, rest)
            generated = generate(model, data.tokens[:, :data.prompt_len], max_new_tokens=data.answer_len,
                                 policy=setting.policy)
            answers = np.asarray(jax.device_get(generated))[:, data.prompt_len:]
        accuracy, token_accuracy = _accuracy(data, answers)
        row = Row(setting=setting, accuracy=accuracy, token_accuracy=token_accuracy,
                  attention_share=float(metrics["attention_density"]) / _causal_share(forward_len),
                  keys_share=decode_key_share(setting_config, setting.policy, prompt_len=data.prompt_len,
                                              new_tokens=data.answer_len),
                  ffn_active=1.0 - float(metrics["ffn_tls"]))
        scores = ", ".join(f"{name} {value:.2f}" for name, value in row.accuracy.items())
        log(f"{setting.group} / {setting.label}: {scores} ({time.perf_counter() - began:.1f} s)")
        rows.append(row)
    return tuple(rows)


def run(config: EvalConfig, *, model_config: ModelConfig | None = None, settings: tuple[Setting, ...] | None = None,
        log: Callable[[str], None] = print) -> EvalResult:
    """Trains (or restores) a model and evaluates it under each setting.

    Args:
      config: the :class:`EvalConfig`.
      model_config: the model; None: ``get_preset(config.preset)``. A checkpoint's saved config
        takes precedence.
      settings: the rows; None: :func:`~train.eval.settings.default_settings` with the config's budgets.
      log: progress messages.

    Returns:
      An :class:`EvalResult`.

    Raises:
      ValueError: an unknown preset, a ``seq_len`` beyond the model's ``max_seq_len``.
    """
    preset = config.preset if model_config is None else "custom"
    model_config = get_preset(config.preset) if model_config is None else model_config
    model_config, state, steps, final_loss, train_seconds, restored = _trained_model(model_config, config, log)
    if settings is None:
        settings = default_settings(model_config, seq_len=config.seq_len, top_k=config.top_k,
                                    quest_pages=config.quest_pages, token_select=config.token_select,
                                    ffn_sparsities=config.ffn_sparsities)
    began = time.perf_counter()
    rows = evaluate(model_config, (state["params"], state["rest"]), config, settings, log=log)
    return EvalResult(preset=preset, model=model_config, rows=rows, steps=steps, final_loss=final_loss,
                      train_seconds=train_seconds, eval_seconds=time.perf_counter() - began,
                      restored_from=restored, config=config)
