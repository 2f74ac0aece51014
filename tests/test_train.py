"""`mamba-deploy train`: synthetic data, schedule, evaluation paths, training + checkpoints + resume, config errors.

The heavy checks (accuracy targets of the paper) run on a GPU with bench/train_quality_gpu.sh; here the CPU shows
that training moves the model, the checkpoint is a valid --model (info, load_model, export), resume is exact, and
user mistakes give one-line errors.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mamba_deploy.cli import main
from mamba_deploy.training.config import load_config, parse_override, preset_names
from mamba_deploy.training.data import IGNORE, InductionHeads, SelectiveCopying, TextData, generator_for
from mamba_deploy.training.evaluate import evaluate_forward, evaluate_step
from mamba_deploy.training.trainer import lr_at, param_groups

# a model small enough that tens of steps take seconds on 2 CPU cores
SMALL = ["--set", "model.d_model=32", "--set", "data.seq_len=32", "--batch-size", "8", "--set", "eval.samples=32",
         "--set", "eval.step_lengths=[40]", "--set", "eval.step_samples=8", "--no-progress", "--device", "cpu"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- data ----------------------------------------------------------------------------------------------------------
def test_selective_copying_structure():
    task = SelectiveCopying(seq_len=80, vocab=16, n_memorize=16)
    x, y = task.sample(generator_for(0, 0, 3), 64, 80)
    body = 80 - 16
    assert x.shape == y.shape == (64, 80)
    for row_x, row_y in zip(x, y):
        data = row_x[:body][row_x[:body] != 0]
        assert len(data) == 16 and ((data >= 1) & (data <= 14)).all()      # 16 data tokens among blanks
        assert (row_x[body:] == 15).all()                                   # markers
        assert torch.equal(row_y[body:], data)                              # output: the data tokens in order
        assert (row_y[:body] == IGNORE).all()                               # loss only where it matters


def test_induction_heads_structure():
    task = InductionHeads(seq_len=256, vocab=16)
    x, y = task.sample(generator_for(0, 0, 5), 128, 256)
    for row_x, row_y in zip(x, y):
        trig = (row_x == 15).nonzero().flatten().tolist()
        assert len(trig) == 2 and trig[1] == 255 and trig[0] <= 253      # trigger once, then again at the end
        assert row_y[-1] == row_x[trig[0] + 1] and row_y[-1] < 15
        assert (row_y[:-1] == IGNORE).all()


def test_batches_are_a_function_of_seed_step_rank():
    task = InductionHeads(seq_len=32)
    a = task.train_batch(seed=1, step=7, rank=0, batch=4)
    assert torch.equal(a[0], task.train_batch(1, 7, 0, 4)[0])            # reproducible (resume)
    assert not torch.equal(a[0], task.train_batch(1, 7, 1, 4)[0])        # each rank its own stream
    assert not torch.equal(a[0], task.train_batch(1, 8, 0, 4)[0])


def test_text_bytes(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(bytes(range(256)) * 8)
    task = TextData(str(f), seq_len=16, val_fraction=0.25)
    x, y = task.sample(generator_for(0, 0, 0), 4, 16)
    assert task.vocab_size == 256 and torch.equal(x[:, 1:], y[:, :-1]) and ((y - x) % 256 == 1).all()


# ---- schedule and optimizer groups ----------------------------------------------------------------------------
def test_lr_schedule():
    assert lr_at(0, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 10, 100, 0.1) == pytest.approx(0.55)           # cosine midpoint
    assert lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_at(20, 1.0, 10, 100, 0.0, time_frac=1.0) == pytest.approx(0.0)  # time-limited run decays fully


def test_no_weight_decay_on_norms_biases_alog_d():
    from mamba_deploy.config import MambaConfig
    from mamba_deploy.model import random_model
    model = random_model(MambaConfig(d_model=16, n_layer=1, vocab_size=16))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no = {names[id(p)].split(".")[-2] + "." + names[id(p)].split(".")[-1] for p in no_decay["params"]}
    assert {"mixer.A_log", "mixer.D", "norm.weight", "norm_f.weight", "conv1d.bias", "dt_proj.bias"} <= no
    yes = {names[id(p)] for p in decay["params"]}
    assert "backbone.layers.0.mixer.in_proj.weight" in yes and not any("A_log" in n or "norm" in n for n in yes)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


# ---- evaluation: forward and recurrent paths agree ----------------------------------------------------------
def test_eval_through_step_matches_forward():
    from mamba_deploy.config import MambaConfig
    from mamba_deploy.model import random_model
    task = SelectiveCopying(seq_len=40, vocab=16, n_memorize=8)
    model = random_model(MambaConfig(d_model=32, n_layer=2, vocab_size=16), seed=3)
    batches = task.valid_batches(seed=0, samples=24, batch=12)
    fwd = evaluate_forward(model, batches, 16, "cpu")
    rec = evaluate_step(model, batches, 16, "cpu")
    assert fwd["positions"] == rec["positions"] == 24 * 8
    assert rec["loss"] == pytest.approx(fwd["loss"], rel=1e-4)
    assert rec["accuracy"] == pytest.approx(fwd["accuracy"])


# ---- training through the CLI -----------------------------------------------------------------------------
@pytest.mark.slow
def test_induction_tiny_trains_on_cpu_and_checkpoint_is_a_model(tmp_path):
    from mamba_deploy.checkpoint import load_model
    from mamba_deploy.model import random_model

    run = tmp_path / "run"
    r = cli("train", "--config", "induction-tiny", "--out", run, "--max-steps", 60, "--device", "cpu",
            "--no-progress", "--set", "eval.every=60", "--set", "eval.samples=128", "--set", "eval.step_lengths=[80]",
            "--set", "eval.step_samples=16")
    assert r.exit_code == 0, r.output
    rows = metrics(run)
    train_rows = [m for m in rows if m["kind"] == "train"]
    assert [m["step"] for m in train_rows] == list(range(10, 61, 10))
    assert all(math.isfinite(m["loss"]) and m["tokens_per_s"] > 0 for m in train_rows)
    summary = json.loads((run / "summary.json").read_text())
    ckpt = Path(summary["checkpoint"])
    assert ckpt.name == "step-0000060" and (run / "curves.png").stat().st_size > 1000
    assert set(summary["eval"]) == {"forward@64", "step@80"}

    # the loss fell: the trained checkpoint vs its own initialisation, on the same fixed validation set
    cfg = load_config("induction-tiny")
    task = InductionHeads(cfg.data.seq_len, cfg.data.vocab)
    batches = task.valid_batches(seed=123, samples=256, batch=128)
    trained = load_model(ckpt)
    init = random_model(trained.config, seed=cfg.train.seed)
    loss_init = evaluate_forward(init, batches, 16, "cpu")["loss"]
    loss_trained = evaluate_forward(trained, batches, 16, "cpu")["loss"]
    assert loss_trained < loss_init - 0.03, (loss_init, loss_trained)

    # every checkpoint is a valid --model: info and export accept it
    r = cli("info", "--model", ckpt, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["config"]["d_model"] == 64
    r = cli("export", "--model", ckpt, "--out", tmp_path / "onnx")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "onnx" / "manifest.json").exists() and (tmp_path / "onnx" / "step.onnx").exists()


@pytest.mark.slow
def test_resume_continues_from_saved_step_exactly(tmp_path):
    from mamba_deploy.checkpoint import load_model

    run = tmp_path / "run"
    args = ["train", "--config", "induction-tiny", "--out", run, "--max-steps", 30, *SMALL,
            "--set", "train.checkpoint_every=10", "--set", "train.keep_checkpoints=0", "--set", "eval.every=10"]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    straight = load_model(run / "checkpoints" / "step-0000030").state_dict()
    # pretend the run died after step 10: drop the later checkpoints, resume
    for step in (20, 30):
        shutil.rmtree(run / "checkpoints" / f"step-{step:07d}")
    r = cli(*args, "--resume")
    assert r.exit_code == 0, r.output
    assert "resumed from" in r.output and "at step 10" in r.output
    resumed = load_model(run / "checkpoints" / "step-0000030").state_dict()
    for k in straight:  # same data stream, same optimizer state: bit-identical weights on the CPU
        assert torch.equal(straight[k], resumed[k]), k
    steps = [m["step"] for m in metrics(run) if m["kind"] == "train"]
    assert steps == [10, 20, 30]  # rows after the checkpoint were dropped and produced again, not duplicated

    r = CliRunner().invoke(main, [str(a) for a in args])  # same --out without --resume/--force
    assert r.exit_code == 2 and "already holds a run" in r.output


@pytest.mark.parametrize("content, message", [
    ("[model\nd_model = 64", "is not valid TOML"),
    ("[model]\nd_model = 64\nn_layer = 2\n[train]\nmax_stpes = 5\n", "unknown keys ['max_stpes']"),
    ("[model]\nd_model = 64\nn_layer = 2\n[data]\nkind = \"images\"\n", "kind must be one of"),
    ("[model]\nd_model = 'big'\nn_layer = 2\n", "d_model must be a positive integer"),
    ("[model]\nd_model = 64\nn_layer = 2\n[data]\nkind = \"text\"\n", "needs a path"),
])
def test_bad_config_is_one_line_error(tmp_path, content, message):
    f = tmp_path / "bad.toml"
    f.write_text(content)
    r = CliRunner().invoke(main, ["train", "--config", str(f), "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mamba-deploy: error:") and message in lines[0], r.output


def test_unknown_preset_and_missing_file(tmp_path):
    r = CliRunner().invoke(main, ["train", "--config", "no-such-preset"])
    assert r.exit_code == 2 and "induction-tiny" in r.output  # lists the presets
    r = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "missing.toml")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_presets_parse_and_overrides():
    assert {"induction-tiny", "copying-tiny", "text-small", "induction", "copying"} <= set(preset_names())
    for name in preset_names():
        if name != "text-small":
            load_config(name).model_config(16)
    cfg = load_config("text-small", [parse_override("data.path=some.txt"), parse_override("model.n_layer=3")])
    assert cfg.data.path == "some.txt" and cfg.model_config(256).n_layer == 3
    r = cli("train", "--config", "copying", "--set", "eval.step_lengths=[1024, 4096]", "--print-config")
    assert "step_lengths = [1024, 4096]" in r.output
    cfg = load_config("copying", [parse_override("data.seq_len=512")])  # step_lengths = [0]: the training length
    assert cfg.step_eval_lengths() == [512] and cfg.eval_lengths() == [512]


@pytest.mark.parametrize("name", ["induction", "copying-tiny", "text-small"])
def test_config_round_trips_through_toml(tmp_path, name):
    """to_toml → file → load_config gives the same TrainConfig, with a changed value in every section."""
    overrides = ["model.d_state=7", "data.seq_len=96", "data.path=corpus.txt", "optimizer.betas=[0.8, 0.9]", "optimizer.lr=0.00025",
                 "schedule.warmup_steps=3", "train.batch_size=5", "eval.step_lengths=[128, 256]"]
    cfg = load_config(name, [parse_override(o) for o in overrides])
    path = tmp_path / f"{cfg.name}.toml"
    path.write_text(cfg.to_toml())
    back = load_config(str(path))
    assert back == cfg
    assert back.model["d_state"] == 7 and back.optimizer.betas == (0.8, 0.9) and back.eval.step_lengths == [128, 256]


def test_text_training_and_torchrun_data_parallel_on_cpu(tmp_path):
    """Two processes under torchrun (gloo on CPU) with DDP: rank 0 writes one run with world_size 2."""
    if shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists():
        pytest.skip("torchrun is not installed next to this Python")
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    run = tmp_path / "ddp"
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "mamba_deploy.cli", "train",
           "--config", "text-small", "--data", str(text), "--out", str(run), "--max-steps", "6",
           "--set", "model.d_model=32", "--set", "model.n_layer=1", "--seq-len", "32", "--batch-size", "4",
           "--set", "train.log_every=3", "--set", "eval.every=6", "--set", "eval.samples=8", "--no-progress",
           "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    info = next(m for m in metrics(run) if m["kind"] == "info")
    assert info["world_size"] == 2 and info["tokens_per_step"] == 2 * 4 * 32
    assert [m["step"] for m in metrics(run) if m["kind"] == "train"] == [3, 6]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["eval"]["forward@32"]["loss"] < math.log(256)
