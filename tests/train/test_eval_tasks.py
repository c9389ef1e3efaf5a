"""Synthetic long-context tasks (``train.eval.tasks``) and a smoke run of the evaluation harness."""

import dataclasses

import numpy as np
import pytest

from models import ModelConfig, attention_pattern
from train.eval import tasks
from train.eval.__main__ import eval_config, parse_args
from train.eval.harness import EvalConfig, run
from train.eval.report import format_markdown, write_section
from train.eval.settings import Setting, decode_key_share, default_settings

TASKS = [*tasks.default_tasks(), tasks.PasskeyTask(digits=3, depth=0.0),
         tasks.MQARTask(num_queries=2, num_pairs=6, key_len=1, value_len=3), tasks.NeedleTask(distractors=3, depth=1.0),
         tasks.CopyTask(answer_tokens=1)]


@pytest.mark.parametrize("task", TASKS, ids=repr)
def test_batches_are_deterministic_and_shaped(task):
    length = task.min_length + 40
    first = tasks.make_batch(task, 5, length, seed=3)
    again = tasks.make_batch(task, 5, length, seed=3)
    other = tasks.make_batch(task, 5, length, seed=4)
    for name in ("tokens", "answer_start", "answers", "supervised"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.tokens, other.tokens)
    assert first.tokens.shape == (5, length) and first.tokens.dtype == np.int32
    assert first.answer_start.shape == (5,) and first.answer_start.dtype == np.int32
    assert first.answers.shape == (5, task.answer_len) and first.answer_len == task.answer_len
    assert first.supervised.shape == (5, length) and first.supervised.dtype == bool
    assert first.tokens.min() >= 0 and first.tokens.max() < 128  # ASCII bytes: vocab 256


@pytest.mark.parametrize("task", TASKS, ids=repr)
def test_answer_span_matches_metadata(task):
    batch = tasks.make_batch(task, 20, task.min_length + 57, seed=0)
    for tokens, start, answer, supervised in zip(batch.tokens, batch.answer_start, batch.answers, batch.supervised):
        assert start + task.answer_len == len(tokens)  # the answer closes the sequence
        np.testing.assert_array_equal(tokens[start:], answer)
        assert supervised[start:].all()
        assert tasks.decode(answer).isalnum()


@pytest.mark.parametrize("task", TASKS, ids=repr)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_solver_solves_every_example(task, seed):
    for length in (task.min_length, task.min_length + 1, task.min_length + 71, 256):
        batch = tasks.make_batch(task, 50, length, seed=seed)
        assert tasks.exact_match(tasks.reference_answers(task, batch), batch.answers).all()


def test_mqar_supervises_every_query_value():
    task = tasks.MQARTask(num_queries=3, num_pairs=5)
    example = task.example(64, np.random.default_rng(0))
    text = tasks.decode(example.tokens)
    context, _, queries = text.partition(tasks.MQAR_SEPARATOR)
    values = dict((record[:2], record[2:]) for record in context.split())
    assert tasks.decode(example.tokens[example.supervised]) == "".join(values[record[:2]] for record in queries.split())


def test_needle_depth_places_the_needle():
    early = tasks.NeedleTask(depth=0.0, distractors=0).example(200, np.random.default_rng(0))
    late = tasks.NeedleTask(depth=1.0, distractors=0).example(200, np.random.default_rng(0))
    assert tasks.decode(early.tokens).startswith("The code of ")
    assert tasks.decode(late.tokens).split("What is")[0].rstrip().endswith(tasks.decode(late.answer) + ".")


def test_mixture_rows_cycle_through_tasks():
    chosen = tasks.default_tasks()
    tokens, supervised, task_index = tasks.mixture_batch(chosen, 6, 128, seed=0, step=1)
    again, _, _ = tasks.mixture_batch(chosen, 6, 128, seed=0, step=1)
    np.testing.assert_array_equal(tokens, again)
    assert tokens.shape == supervised.shape == (6, 128)
    assert list(task_index) == [1, 2, 3, 0, 1, 2]  # mqar, needle, copy, passkey, mqar, needle
    copy_supervised = 128 - chosen[3].distance_for(128)
    assert list(supervised.sum(axis=1)) == [8, 4, copy_supervised, 5, 8, 4]


def test_exact_match_scores_hand_made_predictions():
    answers = np.array([[1, 2, 3], [4, 5, 6]])
    assert tasks.exact_match(answers, answers).mean() == 1.0
    assert tasks.exact_match(answers + 1, answers).mean() == 0.0
    np.testing.assert_array_equal(tasks.exact_match([[1, 2, 3, 9], [4, 5, 0, 6]], answers), [True, False])
    with pytest.raises(ValueError, match="at least A=3"):
        tasks.exact_match([[1, 2]], [[1, 2, 3]])


@pytest.mark.parametrize("make, message", [
    (lambda: tasks.PasskeyTask(digits=0), "digits"),
    (lambda: tasks.NeedleTask(depth=1.5), "depth"),
    (lambda: tasks.MQARTask(num_pairs=2, num_queries=3), "num_pairs"),
    (lambda: tasks.make_batch(tasks.PasskeyTask(), 2, 10, seed=0), "length"),
    (lambda: tasks.make_batch(tasks.PasskeyTask(), 0, 100, seed=0), "num_examples"),
    (lambda: EvalConfig(loss_on="some"), "loss_on"),
    (lambda: EvalConfig(seq_len=40), "seq_len"),
    (lambda: EvalConfig(preset="nope"), "preset"),
])
def test_bad_arguments_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_decode_key_share_counts_windows_and_budgets():
    config = ModelConfig(vocab_size=256, model_dim=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                         max_seq_len=64, ffn_dim=64, attention=attention_pattern(2, full_every=2, window=8, sinks=2))
    settings = {setting.label: setting for setting in default_settings(config, seq_len=64, top_k=(4,))}
    # Prompt 40, 2 new tokens: one decode step over 41 keys; window layer 8 + 2 of 41, full layer 41 or 4.
    assert decode_key_share(config, None, prompt_len=40, new_tokens=2) == pytest.approx((10 / 41 + 1) / 2)
    top4 = settings["top-4 keys"].policy
    assert decode_key_share(config, top4, prompt_len=40, new_tokens=2) == pytest.approx((10 / 41 + 4 / 41) / 2)
    assert "window 8 + 2 sinks, every layer" in settings and "full causal, every layer" in settings


def test_harness_smoke_run_produces_a_table_with_every_task(tmp_path):
    model = ModelConfig(vocab_size=256, model_dim=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                        max_seq_len=128, ffn="spark", ffn_dim=64, ffn_sparsity=0.5, predictor_dim=8,
                        attention=attention_pattern(2, full_every=2, window=16, sinks=2))
    config = EvalConfig(preset="spark-tiny", steps=2, batch_size=3, seq_len=110, eval_examples=2, warmup_steps=1,
                        checkpoint=str(tmp_path / "model"))
    settings = (Setting(group="layout", label="trained"),)
    messages = []
    result = run(config, model_config=model, settings=settings, log=messages.append)
    restored = run(config, model_config=model, settings=settings, log=messages.append)
    assert result.restored_from is None and restored.restored_from is not None and restored.steps == 0
    assert restored.rows[0].token_accuracy == result.rows[0].token_accuracy
    assert [row.setting for row in result.rows] == list(settings)
    row = result.rows[0]
    assert set(row.accuracy) == {"passkey", "mqar", "needle", "copy"}
    assert all(0.0 <= value <= 1.0 for value in row.accuracy.values())
    assert 0.0 < row.attention_share < 1.0 and 0.0 < row.keys_share < 1.0 and 0.0 < row.ffn_active <= 1.0
    assert result.steps == 2 and np.isfinite(result.final_loss)
    markdown = format_markdown(result)
    for name in ("passkey", "mqar", "needle", "copy", "| attention layout | trained |"):
        assert name in markdown
    target = tmp_path / "BENCHMARKS.md"
    target.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    write_section(markdown, path=target)
    write_section(markdown.replace("trained", "again"), path=target)
    text = target.read_text()
    assert "kept" in text and text.count("<!-- eval-cpu:begin -->") == 1 and "| attention layout | again |" in text


def test_eval_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        EvalConfig().steps = 3


def test_cli_flags_build_the_config():
    quick = eval_config(parse_args(["--quick", "--steps", "3", "--checkpoint", "ck"]))
    assert (quick.steps, quick.eval_examples, quick.top_k, quick.checkpoint) == (3, 8, (8,), "ck")
    full = eval_config(parse_args(["--preset", "dense-tiny", "--loss-on", "all"]))
    assert (full.preset, full.loss_on, full.steps) == ("dense-tiny", "all", EvalConfig().steps)
