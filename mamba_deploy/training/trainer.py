"""The training loop: AdamW + warmup/cosine, grad clipping, bf16 autocast (fp32 master weights), checkpoints with
resume, metrics JSONL, curves, task evaluation; data parallel over GPUs through torchrun + DDP.

Run layout (``out``)::

    config.toml              the resolved training config (what was actually run)
    metrics.jsonl            one JSON object per line: kind = train | eval | info
    curves.png               loss and accuracy curves
    summary.json             final metrics and where the final checkpoint is
    checkpoints/step-0000500/  config.json + model.safetensors (state-spaces format: a valid --model)
                               + trainer_state.pt (optimizer, step, RNG; what --resume needs)

Data parallel: launched by ``torchrun`` the process sees RANK / LOCAL_RANK / WORLD_SIZE; it joins an NCCL process
group (gloo on CPU), trains a DDP-wrapped model on its own data stream (batches are a function of seed, step and
rank), and only rank 0 logs, evaluates and writes files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import load_model, save_model
from ..devices import check_device
from ..errors import UserError
from ..io import atomic_write, json_text, write_json
from ..model import MambaLM, random_model
from .config import TrainConfig
from .data import IGNORE, make_task
from .evaluate import evaluate_forward, evaluate_step
from .plots import plot_curves

RUN_FILES = ("config.toml", "metrics.jsonl", "curves.png", "summary.json", "checkpoints")
NO_DECAY_NAMES = ("A_log", "D")


# ---- small pieces ------------------------------------------------------------------------------------------------
def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float, time_frac: float = 0.0) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from base_lr to base_lr·min_ratio. The cosine's progress is
    the larger of the step fraction and ``time_frac`` (elapsed / train.max_minutes), so a time-limited run still
    ends with a decayed learning rate."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), time_frac))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and conv kernels) only; never on norms, biases, A_log or D."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        (no_decay if p.dim() < 2 or leaf in NO_DECAY_NAMES else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Dist:
    """torchrun's environment, or a single process."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def init(self, device_type: str):
        if self.enabled and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device_type == "cuda" else "gloo")

    def broadcast(self, values: list[float], device) -> list[float]:
        """Rank 0's values on every rank (decisions that must agree: stop, time-based schedule progress)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.broadcast(t, 0)
        return t.tolist()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.clone()
            torch.distributed.all_reduce(value)
            value /= self.world
        return value

    def close(self):
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def resolve_device(requested: str, dist: Dist) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        check_device("cuda")
        if dist.enabled:
            torch.cuda.set_device(dist.local_rank)
            return torch.device("cuda", dist.local_rank)
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def triton_scan_agrees(device: torch.device, precision: str, config=None) -> tuple[bool, str]:
    """One training step of a small model (``config``'s family and widths, at most 2 layers, 16 tokens; default a
    tiny Mamba-1) with the Triton scan vs the chunked scan, under this run's autocast: (agree, why not). Loss and
    every gradient within 1e-3 (fp32) or 5e-2 (bf16) of the largest entry."""
    if config is None:
        from ..config import MambaConfig
        config = MambaConfig(d_model=32, n_layer=2, vocab_size=16)
    config = dataclasses.replace(config, n_layer=min(config.n_layer, 2), vocab_size=16)
    model = random_model(config, seed=0, device=device)
    ids = torch.randint(0, 16, (3, 97), generator=torch.Generator().manual_seed(0)).to(device)
    results = []
    for backend in ("chunked", "triton"):
        model.scan_backend = backend
        model.zero_grad(set_to_none=True)
        with (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()):
            logits, _ = model(ids)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids.roll(-1, 1).reshape(-1))
        loss.backward()
        results.append([loss.detach()] + [p.grad.detach().clone() for p in model.parameters()])
    tol = 5e-2 if precision == "bf16" else 1e-3
    for ref, got in zip(*results):
        err = (got.float() - ref.float()).abs().max().item() / max(ref.float().abs().max().item(), 1e-6)
        if not err <= tol:
            return False, f"error {err:.3g} of the largest entry in a {precision} training step"
    return True, ""


def choose_scan_backend(requested: str, device: torch.device, precision: str, log, config=None) -> str:
    """``auto``: on CUDA, the Triton scan if it imports and agrees with the chunked scan in a training step
    (:func:`triton_scan_agrees`); otherwise the chunked torch scan. Explicit names are taken as given."""
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "chunked"
    try:
        ok, why = triton_scan_agrees(device, precision, config)
    except Exception as e:  # not there yet, or broken: training must still run
        ok, why = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not ok:
        log(f"triton scan not used ({why}); using 'chunked'")
        return "chunked"
    return "triton"


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints (with trainer_state.pt), oldest first."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "trainer_state.pt").is_file())


class _InterruptFlag:
    """While installed (main thread only), the first Ctrl-C (SIGINT) only sets a flag that the loop checks after
    each whole step, so the run can write a checkpoint that --resume continues from; a second Ctrl-C interrupts
    at once as usual."""

    def __init__(self, enabled: bool = True):
        self.set = False
        self._previous = None
        if enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


# Effective CPU training rate for the GPU-sized-config warning: induction-tiny's 0.13 s/step on 2 cores (README)
# is ~8e9 "6 x parameters x tokens" FLOP/s; small models keep CPUs far from their peak.
CPU_FLOPS = 10e9


def cpu_hours_estimate(n_params: int, tokens_per_step: int, steps: int, max_minutes: float | None) -> float:
    """Hours a run would take on a CPU at ``CPU_FLOPS`` (6 FLOPs per parameter per token, forward + backward),
    capped by the run's own time limit."""
    seconds = 6.0 * n_params * tokens_per_step * steps / CPU_FLOPS
    if max_minutes:
        seconds = min(seconds, 60 * max_minutes)
    return seconds / 3600


# ---- the trainer ---------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, out: Path, resume: bool = False, force: bool = False,
                 progress: bool = True, log=print):
        self.cfg, self.out = cfg, Path(out)
        self.dist = Dist()
        self.progress = progress and self.dist.main
        self._log = log
        t = cfg.train
        self.device = resolve_device(t.device, self.dist)
        self.dist.init(self.device.type)
        self._prepare_out_dir(resume, force)

        self.task = make_task(cfg.data)
        self.vocab = self.task.vocab_size
        self.model_config = cfg.model_config(self.vocab)
        self.precision = t.precision if t.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        self.scan_backend = choose_scan_backend(t.scan_backend, self.device, self.precision, self.log,
                                                self.model_config)
        self.model: MambaLM = random_model(self.model_config, seed=t.seed, device=self.device,
                                           scan_backend=self.scan_backend)
        o = cfg.optimizer
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(param_groups(self.model, o.weight_decay), lr=o.lr,
                                           betas=tuple(o.betas), eps=o.eps, **fused)
        self.step = 0
        self.tokens_seen = 0
        self.seconds_before = 0.0  # wall seconds spent before this process (resume)
        if resume:
            self._load_latest()
        self.ddp = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel
            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.valid = {L: self.task.valid_batches(t.seed + 1, cfg.eval.samples, cfg.eval.batch_size, L)
                      for L in cfg.eval_lengths()} if self.dist.main else {}

    # -- logging and files -----------------------------------------------------------------------------------
    def log(self, msg: str):
        if self.dist.main:
            if self.progress:
                from tqdm import tqdm
                tqdm.write(msg)
            else:
                self._log(msg)

    def _record(self, row: dict):
        if self.dist.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json_text(row, indent=None))

    def _prepare_out_dir(self, resume: bool, force: bool):
        if not self.dist.main:
            return
        existing = [n for n in RUN_FILES if (self.out / n).exists()]
        if existing and not resume:
            if not force:
                raise UserError(f"{self.out} already holds a run ({', '.join(existing)}); pass --resume to continue "
                                "it or --force to start over")
            for n in existing:
                p = self.out / n
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        if resume and not list_checkpoints(self.out):
            raise UserError(f"nothing to resume: {self.out / 'checkpoints'} has no complete checkpoint")
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write(self.out / "config.toml", self.cfg.to_toml())

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        if not self.dist.main:
            return None
        path = self.out / "checkpoints" / f"step-{self.step:07d}"
        save_model(self.model, path, force=True)
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "seconds": self.seconds_before, "optimizer": self.optimizer.state_dict(),
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                 "config": self.cfg.to_dict(), "model_config": self.model_config.to_dict()}
        atomic_write(path / "trainer_state.pt", lambda p: torch.save(state, p))
        keep = self.cfg.train.keep_checkpoints
        if keep:
            for old in list_checkpoints(self.out)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def on_interrupt(self, started: float):
        """Ctrl-C between steps: write a checkpoint of the step just completed, then stop (KeyboardInterrupt)."""
        self.seconds_before = time.perf_counter() - started
        path = self.save_checkpoint()
        self.log(f"interrupted at step {self.step}: wrote {path}; continue with --resume")
        raise KeyboardInterrupt

    def _load_latest(self):
        ckpts = list_checkpoints(self.out)
        if not ckpts:  # other ranks: the main rank already checked the directory
            raise UserError(f"nothing to resume: {self.out / 'checkpoints'} has no complete checkpoint")
        path = ckpts[-1]
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
        if state["model_config"] != self.model_config.to_dict():
            raise UserError(f"cannot resume from {path}: its model config differs from this config's "
                            f"({state['model_config']} vs {self.model_config.to_dict()})")
        loaded = load_model(path, dtype=torch.float32)
        self.model.load_state_dict(loaded.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.seconds_before = state.get("seconds", 0.0)
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            with contextlib.suppress(Exception):
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if self.dist.main:  # drop metrics logged after this checkpoint (they will be produced again)
            from .plots import read_metrics
            rows = [r for r in read_metrics(self.out / "metrics.jsonl") if r.get("step", 0) <= self.step]
            atomic_write(self.out / "metrics.jsonl", "".join(json_text(r, indent=None) for r in rows))
        self.log(f"resumed from {path} at step {self.step}")

    # -- evaluation ------------------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, dict]:
        results = {}
        for L, batches in self.valid.items():
            m = evaluate_forward(self.model, batches, self.vocab, self.device, self.autocast())
            results[f"forward@{L}"] = m
            self._record({"kind": "eval", "name": f"forward@{L}", "step": self.step, **m})
        return results

    def evaluate_recurrent(self) -> dict[str, dict]:
        """``model.step`` over each of eval.step_lengths (fp32 weights, from a zero state)."""
        e = self.cfg.eval
        results = {}
        for L in self.cfg.step_eval_lengths():
            batches = self.task.valid_batches(self.cfg.train.seed + 2, e.step_samples, e.step_samples, L)
            total = sum(b[0].shape[1] for b in batches)
            from tqdm import tqdm
            with tqdm(total=total, desc=f"step eval @{L}", disable=not self.progress, leave=False,
                      unit="tok") as bar:
                t0 = time.perf_counter()
                m = evaluate_step(self.model, batches, self.vocab, self.device, progress=bar.update)
            m["seconds"] = round(time.perf_counter() - t0, 2)
            results[f"step@{L}"] = m
            self._record({"kind": "eval", "name": f"step@{L}", "step": self.step, **m})
            self.log(f"recurrent eval (model.step) @ length {L}: accuracy {100 * m['accuracy']:.2f}% "
                     f"(sequences fully right {100 * m['seq_accuracy']:.2f}%, {m['positions']} positions, "
                     f"{m['seconds']} s)")
        return results

    # -- the loop ------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, t, o, s = self.cfg, self.cfg.train, self.cfg.optimizer, self.cfg.schedule
        from tqdm import tqdm

        tokens_per_step = t.batch_size * cfg.data.seq_len * self.dist.world
        n_params = self.model.num_parameters()
        self.log(f"{cfg.name}: {cfg.data.kind} data, vocab {self.vocab}, seq_len {cfg.data.seq_len}; model "
                 f"d_model={self.model_config.d_model} n_layer={self.model_config.n_layer} ({n_params:,} params); "
                 f"device {self.device}, {self.precision}, scan '{self.scan_backend}', world {self.dist.world}")
        self._record({"kind": "info", "step": self.step, "name": cfg.name, "parameters": n_params,
                      "device": str(self.device), "precision": self.precision, "scan_backend": self.scan_backend,
                      "world_size": self.dist.world, "tokens_per_step": tokens_per_step})
        hours = cpu_hours_estimate(n_params, tokens_per_step, t.max_steps - self.step, t.max_minutes)
        if self.device.type == "cpu" and hours > 0.5:
            self.log(f"warning: {cfg.name} is GPU-sized: about {hours:.1f} h on a CPU ({t.max_steps - self.step} "
                     f"steps x {tokens_per_step:,} tokens x {n_params:,} parameters); use a -tiny preset, "
                     "--max-steps or a GPU")
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not self.progress, dynamic_ncols=True,
                   desc=cfg.name, unit="step")
        self.interrupt = _InterruptFlag(enabled=not self.dist.enabled)   # data parallel: Ctrl-C as before
        started = time.perf_counter() - self.seconds_before  # wall time of the whole run, across resumes
        window_t0, window_steps = time.perf_counter(), 0
        loss_acc = torch.zeros((), device=self.device)
        last_eval, last_eval_step, stop_reason = {}, None, None
        time_frac = 0.0  # elapsed / max_minutes, agreed on by all ranks at log steps
        eval_name = f"forward@{cfg.eval_lengths()[0]}"
        self.model.train()
        while self.step < t.max_steps:
            lr = lr_at(self.step, o.lr, s.warmup_steps, t.max_steps, s.min_lr_ratio, time_frac)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            inputs, labels = self.task.train_batch(t.seed, self.step, self.dist.rank, t.batch_size)
            inputs = inputs.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            with self.autocast():
                logits, _ = self.ddp(inputs)
            loss = F.cross_entropy(logits.float()[..., :self.vocab].reshape(-1, self.vocab), labels.reshape(-1),
                                   ignore_index=IGNORE)
            loss.backward()
            grad_norm = (torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip)
                         if o.grad_clip > 0 else None)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            loss_acc += loss.detach()
            self.step += 1
            self.tokens_seen += tokens_per_step
            window_steps += 1
            bar.update(1)
            eval_now = self.step % cfg.eval.every == 0 or self.step == t.max_steps
            log_now = self.step % t.log_every == 0 or eval_now  # (a stop happens only at these steps)

            if log_now:
                mean_loss = self.dist.mean(loss_acc / window_steps).item()
                elapsed = time.perf_counter() - window_t0
                tok_s = window_steps * tokens_per_step / max(elapsed, 1e-9)
                row = {"kind": "train", "step": self.step, "loss": mean_loss, "lr": lr, "tokens_per_s": tok_s,
                       "tokens": self.tokens_seen, "time_s": round(time.perf_counter() - started, 2)}
                if grad_norm is not None:
                    row["grad_norm"] = float(grad_norm)
                self._record(row)
                post = {"loss": f"{mean_loss:.4f}", "tok/s": f"{tok_s:,.0f}"}
                if last_eval:
                    post["acc"] = f"{100 * last_eval['accuracy']:.1f}%"
                bar.set_postfix(post, refresh=False)
                loss_acc.zero_()
                window_t0, window_steps = time.perf_counter(), 0

            if eval_now and self.dist.main:
                res = self.evaluate()
                last_eval, last_eval_step = res[eval_name], self.step
                self.log(f"step {self.step}: eval " + ", ".join(
                    f"{k} loss {v['loss']:.4f} acc {100 * v['accuracy']:.2f}%" for k, v in res.items()))
                if cfg.eval.stop_at_accuracy and last_eval["accuracy"] >= cfg.eval.stop_at_accuracy:
                    stop_reason = (f"accuracy {100 * last_eval['accuracy']:.2f}% >= "
                                   f"{100 * cfg.eval.stop_at_accuracy:.2f}%")
                window_t0 = time.perf_counter()  # evaluation time is not training throughput

            stop = False
            if log_now or eval_now:  # the same steps on every rank: rank 0 decides for all
                if t.max_minutes:
                    time_frac = (time.perf_counter() - started) / (60 * t.max_minutes)
                    if time_frac >= 1 and stop_reason is None:
                        stop_reason = f"time limit of {t.max_minutes} min reached"
                flag, time_frac = self.dist.broadcast([float(stop_reason is not None), time_frac], self.device)
                stop = bool(flag)
                if stop and stop_reason is None:
                    stop_reason = "rank 0 asked to stop"

            if self.step % t.checkpoint_every == 0 and self.step != t.max_steps and not stop:
                self.seconds_before = time.perf_counter() - started
                self.save_checkpoint()
                if self.dist.main:
                    plot_curves(self.out / "metrics.jsonl", self.out / "curves.png", cfg.name)
            if stop:
                self.log(f"stopping at step {self.step}: {stop_reason}")
                break
            if self.interrupt.set:
                self.on_interrupt(started)
        bar.close()
        self.interrupt.restore()
        train_seconds = time.perf_counter() - started
        self.seconds_before = train_seconds

        summary = {"name": cfg.name, "steps": self.step, "tokens": self.tokens_seen,
                   "train_seconds": round(train_seconds, 1), "stop_reason": stop_reason,
                   "scan_backend": self.scan_backend, "precision": self.precision, "world_size": self.dist.world,
                   "device": str(self.device)}
        if self.dist.main:
            if last_eval_step != self.step:
                self.evaluate()
            summary["eval"] = {r["name"]: {k: r[k] for k in ("loss", "accuracy", "seq_accuracy")}
                               for r in _latest_evals(self.out / "metrics.jsonl", self.step)}
            summary["eval"].update({k: {kk: v[kk] for kk in ("loss", "accuracy", "seq_accuracy", "seconds")}
                                    for k, v in self.evaluate_recurrent().items()})
            ckpt = self.save_checkpoint()
            summary["checkpoint"] = str(ckpt)
            plot_curves(self.out / "metrics.jsonl", self.out / "curves.png", cfg.name)
            summary["curves"] = str(self.out / "curves.png")
            write_json(self.out / "summary.json", summary)
            self.log(f"done: {self.step} steps in {train_seconds:.1f} s; checkpoint {ckpt}")
        if self.dist.enabled:
            torch.distributed.barrier()
        return summary


def _latest_evals(metrics: Path, step: int) -> list[dict]:
    from .plots import read_metrics
    rows = [r for r in read_metrics(metrics) if r.get("kind") == "eval" and r["step"] == step
            and r["name"].startswith("forward@")]
    return list({r["name"]: r for r in rows}.values())


def train(cfg: TrainConfig, out: Path, resume: bool = False, force: bool = False, progress: bool = True,
          log=print) -> dict:
    trainer = Trainer(cfg, out, resume=resume, force=force, progress=progress, log=log)
    try:
        return trainer.train()
    finally:
        if hasattr(trainer, "interrupt"):
            trainer.interrupt.restore()
        trainer.dist.close()
