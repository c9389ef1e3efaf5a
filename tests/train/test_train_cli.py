"""``python -m train`` flags: layering (defaults, --config, flags, --model.*, --set) and clear errors."""

import json

import pytest

from train.cli import main, parse_args


def error_of(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_defaults_and_flags():
    train_config, model_config = parse_args([])
    assert train_config.preset == "spark-tiny" and train_config.run_dir == "runs/spark-tiny"
    assert train_config.resume and not train_config.fresh and train_config.lr == pytest.approx(3e-3)
    assert model_config.ffn == "spark"
    train_config, model_config = parse_args(
        ["--preset", "moe-tiny", "--steps", "20", "--batch-size", "4", "--seq-len", "64", "--no-resume",
         "--warmup-steps", "none", "--data", "a.txt", "b/", "--data", "c.txt", "--mesh", "data=2,fsdp=-1",
         "--model.experts_per_token=1", "--model.num_layers", "2", "--model.attention=null",
         "--set", "model.aux_loss_weights={\"z_loss\": 0.0}", "--set", "train.lr=1e-3", "--compare-dense"])
    assert (train_config.preset, train_config.steps, train_config.batch_size, train_config.seq_len) == ("moe-tiny", 20, 4, 64)
    assert train_config.resume is False and train_config.warmup_steps is None and train_config.lr == 1e-3
    assert train_config.data == ("a.txt", "b/", "c.txt") and train_config.compare_dense
    assert model_config.experts_per_token == 1 and model_config.num_layers == 2 and len(model_config.attention) == 2
    assert model_config.aux_weights == {"load_balance": 0.0, "z_loss": 0.0}


def test_config_file_then_flags_on_top(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"preset": "spark-tiny", "steps": 40, "lr": 1e-3,
                                "model": {"ffn_sparsity": 0.5, "num_layers": 2, "attention": None}}))
    train_config, model_config = parse_args(["--config", str(path), "--steps", "50", "--model.ffn_sparsity=0.75"])
    assert train_config.steps == 50 and train_config.lr == 1e-3
    assert model_config.ffn_sparsity == 0.75 and model_config.num_layers == 2
    # A run's own config.json ({"model": full config, "train": ...}) reproduces that run's configs.
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps({"model": model_config.to_dict(), "train": train_config.to_dict()}))
    again_train, again_model = parse_args(["--config", str(saved)])
    assert again_train == train_config and again_model == model_config


@pytest.mark.parametrize("argv, flag", [
    (["--preset", "nope-tiny"], "--preset"),
    (["--steps", "0"], "--steps"),
    (["--steps", "ten"], "--steps"),
    (["--lr", "-1"], "--lr"),
    (["--holdout", "1.5"], "--holdout"),
    (["--mesh", "data=two"], "--mesh"),
    (["--mesh", "pipeline=2"], "--mesh"),
    (["--model.ffn_sparsity=1.5"], "--model.ffn_sparsity"),
    (["--model.ffn_sparsity=lots"], "--model.ffn_sparsity"),
    (["--model.no_such_field=1"], "--model.no_such_field"),
    (["--set", "model.num_layers=0"], "--model.num_layers"),
    (["--set", "nonsense"], "--set"),
    (["--bogus-flag"], "--bogus-flag"),
    (["--config", "/nonexistent/run.json"], "--config"),
])
def test_bad_values_are_argparse_errors_naming_the_flag(capsys, argv, flag):
    assert flag in error_of(capsys, argv)


def test_runtime_errors_leave_no_run_dir(tmp_path, capsys):
    run_dir = tmp_path / "run"
    common = ["--output-dir", str(run_dir), "--no-progress", "--mesh", "none", "--cache-dir", str(tmp_path)]
    assert main(["--data", str(tmp_path / "missing_corpus"), *common]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--seq-len", "1024", *common]) == 2
    assert "max_seq_len 256" in capsys.readouterr().err
    assert main(["--batch-size", "3", *common[:-4], "--mesh", "data=2"]) == 2
    assert "--batch-size 3" in capsys.readouterr().err
    assert not run_dir.exists()
