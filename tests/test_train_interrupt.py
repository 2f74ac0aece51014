"""`train` interrupted with Ctrl-C writes a checkpoint that --resume continues from; a GPU-sized config on a CPU
warns with its estimated time."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mamba_deploy.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "model.d_model=32", "--set", "data.seq_len=32", "--batch-size", "8", "--set", "eval.samples=16",
         "--set", "eval.step_lengths=[40]", "--set", "eval.step_samples=4", "--no-progress", "--device", "cpu",
         "--set", "train.log_every=1", "--set", "train.checkpoint_every=100000", "--set", "eval.every=100000"]


def train_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return [r for r in rows if r.get("kind") == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("wait_rows", [3, 7])
def test_ctrl_c_writes_a_checkpoint_that_resume_continues(tmp_path, wait_rows):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mamba_deploy.cli", "train", "--config", "induction-tiny", "--out", str(run),
           "--max-steps", "100000", *SMALL]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 240
        while len(train_rows(run)) < wait_rows and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "mamba-deploy: interrupted" in err
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "trainer_state.pt").is_file(), err
    step = int(ckpts[0].name.split("-")[1])
    assert step >= wait_rows and f"interrupted at step {step}" in err
    r = CliRunner().invoke(main, ["train", "--config", "induction-tiny", "--out", str(run), "--resume",
                                  "--max-steps", str(step + 2), *SMALL])
    assert r.exit_code == 0, r.output
    assert f"resumed from {ckpts[0]} at step {step}" in r.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == step + 2


def test_gpu_sized_presets_are_the_ones_that_warn():
    import torch

    from mamba_deploy.model import MambaLM
    from mamba_deploy.training.config import load_config
    from mamba_deploy.training.trainer import cpu_hours_estimate

    for name, warns in (("induction", True), ("copying", True), ("induction-tiny", False), ("copying-tiny", False)):
        cfg = load_config(name, [])
        with torch.device("meta"):
            n = MambaLM(cfg.model_config(16)).num_parameters()
        hours = cpu_hours_estimate(n, cfg.train.batch_size * cfg.data.seq_len, cfg.train.max_steps,
                                   cfg.train.max_minutes)
        assert (hours > 0.5) == warns, (name, hours)


@pytest.mark.parametrize("slow_cpu", [False, True])
def test_gpu_sized_warning_is_printed_on_cpu(tmp_path, monkeypatch, slow_cpu):
    from mamba_deploy.training import trainer
    if slow_cpu:   # the same tiny run on a CPU a million times slower: GPU-sized
        monkeypatch.setattr(trainer, "CPU_FLOPS", trainer.CPU_FLOPS / 1e6)
    r = CliRunner().invoke(main, ["train", "--config", "induction-tiny", "--out", str(tmp_path / "r"),
                                  "--max-steps", "2", *SMALL])
    assert r.exit_code == 0, r.output
    assert ("warning: induction-tiny is GPU-sized" in r.stderr) == slow_cpu, r.stderr
