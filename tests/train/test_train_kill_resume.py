"""A ``python -m train`` process killed mid-run continues from its last checkpoint with the same data."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]


def command(run_dir, cache_dir, steps):
    return [sys.executable, "-m", "train", "--preset", "spark-tiny", "--model.num_layers=1", "--model.attention=null",
            "--steps", str(steps), "--lr-decay-steps", "1000", "--warmup-steps", "10", "--checkpoint-every", "2",
            "--batch-size", "2", "--seq-len", "32", "--eval-every", "0", "--eval-batches", "1", "--log-every", "1",
            "--corpus-bytes", "200000", "--mesh", "none", "--no-progress", "--no-plot",
            "--output-dir", str(run_dir), "--cache-dir", str(cache_dir)]


def checkpoint_steps(run_dir):
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists())


def train_losses(run_dir):
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if line.strip()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(command(run_dir, tmp_path, 100_000), cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not checkpoint_steps(run_dir):
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        process.stdout.close()
    saved = checkpoint_steps(run_dir)[-1]
    killed_losses = train_losses(run_dir)
    assert saved >= 2 and saved % 2 == 0

    resumed = subprocess.run(command(run_dir, tmp_path, saved + 2), cwd=ROOT, capture_output=True, text=True,
                             timeout=180)
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert f"resuming from the checkpoint of step {saved}" in resumed.stdout
    assert f"step {saved + 2} (resumed from step {saved})" in resumed.stdout
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, saved + 3))  # no step lost or logged twice
    for step in (saved + 1, saved + 2):
        if step in killed_losses:  # the killed process got that far: the same batch and state give the same loss
            assert abs(losses[step] - killed_losses[step]) <= 1e-5 * abs(killed_losses[step])
    assert checkpoint_steps(run_dir)[-1] == saved + 2
