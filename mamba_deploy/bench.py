"""Benchmark engine: prefill and decode speed of several session backends side by side, against the HBM floor.

For each backend × batch size it measures (medians over ``reps`` repetitions, after warm-up):
  prefill   ms for ``prompt_len`` tokens per sequence, and tokens/s (batch · prompt_len / time)
  decode    ms per step of ``gen_len`` steps fed back the state each step returned, and tokens/s (batch / time)
  memory    memory the backend's run added over what was in use when it started (peak of torch's allocator for
            torch backends, device memory in use at the end for others, peak host RSS on the CPU)
On a GPU also the decode floor: the bytes one step must move (every weight once, the recurrent state read and
written once) over the HBM bandwidth measured in the same run by a large device-to-device copy, and the ratio of
the measured step time to it. Times use CUDA events on the GPU and perf_counter on the CPU; inputs are random
token ids, never zeros.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from .errors import UserError
from .io import atomic_write


@dataclasses.dataclass
class BenchRow:
    backend: str
    batch: int
    prompt_len: int
    gen_len: int
    prefill_ms: float | None = None
    prefill_tokens_per_s: float | None = None
    decode_ms_per_step: float | None = None
    decode_tokens_per_s: float | None = None
    peak_memory_bytes: int | None = None
    memory_kind: str | None = None   # "torch-allocator-peak" | "device-used-delta" | "host-rss-peak" (over the start)
    floor_ms: float | None = None
    ratio_to_floor: float | None = None
    prefill_samples_ms: list[float] = dataclasses.field(default_factory=list)
    decode_samples_ms: list[float] = dataclasses.field(default_factory=list)
    backend_info: dict | None = None        # e.g. torch-fast: decode path chosen and the timings behind it
    notes: str | None = None
    error: str | None = None


# ---------------------------------------------------------------------------------------------------------------
# the floor
# ---------------------------------------------------------------------------------------------------------------
def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter once (a tied embedding/lm_head counts once: decode reads it once, in lm_head)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def state_bytes(cfg, batch: int, act_bytes: int) -> int:
    """Bytes of the recurrent state of ``batch`` sequences (conv state in the activation dtype, SSM state fp32;
    per-row shapes from the config's family)."""
    from .families import family_of
    conv, ssm = family_of(cfg).state_shapes(cfg)
    return batch * cfg.n_layer * (math.prod(conv) * act_bytes + math.prod(ssm) * 4)


def decode_floor_bytes(cfg, batch: int, weights: int, act_bytes: int) -> int:
    """Fewest bytes one decode step moves: the weights once, the state read once and written once."""
    return weights + 2 * state_bytes(cfg, batch, act_bytes)


def measure_hbm_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written (median of ``reps``)."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 4 / statistics.median(times)


# ---------------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------------
class Timer:
    """``with timer: ...`` records elapsed ms of the block: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.ms: float = float("nan")

    def __enter__(self):
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            self.ms = self._start.elapsed_time(self._end)
        else:
            self.ms = (time.perf_counter() - self._t0) * 1e3


def profile_kernels(fn: Callable[[], object], iters: int = 3) -> list[dict]:
    """Per-kernel device time of ``fn`` (torch.profiler, CUDA activity; one untimed call first): rows
    ``{"name", "calls_per_iter", "us_per_iter"}``, slowest first. Self time, so an operator's kernels are not
    counted twice under the operator."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", None)
        if us is None:                                     # older torch
            us = getattr(ev, "self_cuda_time_total", 0.0)
        if us and us > 0:
            rows.append({"name": ev.key[:120], "calls_per_iter": ev.count / iters, "us_per_iter": us / iters})
    return sorted(rows, key=lambda r: -r["us_per_iter"])


def _host_rss(field: str) -> int | None:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process in bytes, from /proc (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_memory_start(device: torch.device, backend: str) -> int | None:
    """What this backend's run is measured from: the memory in use now (torch allocator, device, or host RSS), with
    the peak counters reset where possible, so each backend's figure excludes what earlier backends held."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        if backend.startswith("torch"):
            return torch.cuda.memory_allocated(device)
        free, total = torch.cuda.mem_get_info(device)
        return total - free
    with contextlib.suppress(OSError):       # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    return _host_rss("VmRSS")


def _peak_memory_end(device: torch.device, backend: str, baseline: int | None) -> tuple[int | None, str | None]:
    """Memory this backend's run added over ``baseline`` (bytes) and how it was measured."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        if backend.startswith("torch"):
            return torch.cuda.max_memory_allocated(device) - baseline, "torch-allocator-peak"
        free, total = torch.cuda.mem_get_info(device)
        return total - free - baseline, "device-used-delta"   # not a peak: held at the end of the run, over start
    peak = _host_rss("VmHWM")
    if peak is None or baseline is None:
        return None, None
    return max(0, peak - baseline), "host-rss-peak"


def bench_session(session, backend: str, batch: int, prompt_len: int, gen_len: int, device: torch.device,
                  reps: int = 5, warmup: int = 1, seed: int = 0, budget_s: float | None = None) -> BenchRow:
    """Times ``session.prefill`` and ``session.step`` for one batch size, after untimed warm-up calls.
    ``budget_s`` bounds the time spent: when the first timed repetition shows that ``reps`` would not fit in half
    of it (per phase), fewer are taken (at least one; the samples lists say how many)."""
    row = BenchRow(backend, batch, prompt_len, gen_len)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, session.vocab_size, (batch, prompt_len), generator=g)   # tokenizer ids only
    tokens = torch.randint(1, session.vocab_size, (gen_len, batch), generator=g)
    if device.type == "cuda":
        prompt, tokens = prompt.to(device), tokens.to(device)
    baseline = _peak_memory_start(device, backend)

    def more(first_ms: float) -> int:
        """Timed repetitions after the first timed one: ``reps`` − 1, fewer when the budget would not hold them."""
        if not budget_s:
            return reps - 1
        return max(0, min(reps, int(budget_s * 1e3 / 2 / max(first_ms, 1e-3))) - 1)

    # prefill. Warm-up calls are never timed (compilation, tuning, graph capture, lazy session creation); the
    # state of the first one seeds the decode.
    _, state = session.prefill(prompt)
    start_state = state.clone()
    for _ in range(warmup - 1):
        session.prefill(prompt)
    with Timer(device) as t:
        session.prefill(prompt)
    row.prefill_samples_ms.append(t.ms)
    for _ in range(more(t.ms)):
        with Timer(device) as t:
            session.prefill(prompt)
        row.prefill_samples_ms.append(t.ms)
    row.prefill_ms = statistics.median(row.prefill_samples_ms)
    row.prefill_tokens_per_s = batch * prompt_len / (row.prefill_ms / 1e3)
    # decode: gen_len steps per repetition from the state after the prompt, the returned state passed back
    state = start_state.clone()
    for i in range(max(warmup, 1) * min(gen_len, 8)):
        _, state = session.step(tokens[i % gen_len], state)
    n_timed = None
    while n_timed is None or len(row.decode_samples_ms) < n_timed:
        state = start_state.clone()
        with Timer(device) as t:
            for i in range(gen_len):
                _, state = session.step(tokens[i], state)
        row.decode_samples_ms.append(t.ms / gen_len)
        if n_timed is None:
            n_timed = 1 + more(t.ms)
    row.decode_ms_per_step = statistics.median(row.decode_samples_ms)
    row.decode_tokens_per_s = batch / (row.decode_ms_per_step / 1e3)
    row.peak_memory_bytes, row.memory_kind = _peak_memory_end(device, backend, baseline)
    if hasattr(session, "decode_info"):
        row.backend_info = session.decode_info(batch)
    return row


# ---------------------------------------------------------------------------------------------------------------
# the model and the sessions
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BenchSource:
    """What is benchmarked: a torch model (for torch backends and for export) and/or an artifact directory."""
    label: str
    model: torch.nn.Module | None = None
    artifact: Path | None = None


def load_source(artifact: str | None, model_ref: str | None, random_size: str | None, dtype: torch.dtype,
                device: torch.device, seed: int = 0) -> BenchSource:
    from .model import random_model
    chosen = [x for x in (artifact, model_ref, random_size) if x]
    if len(chosen) != 1:
        raise UserError("give exactly one of --artifact DIR, --model REF or --random SIZE")
    if random_size:
        from .config import config_for_size
        cfg = config_for_size(random_size)
        return BenchSource(f"random-{random_size}", model=random_model(cfg, seed=seed, dtype=dtype, device=device))
    if model_ref:
        from .checkpoint import load_model
        return BenchSource(str(model_ref), model=load_model(model_ref, dtype=dtype, device=device))
    from .runtime.session import is_artifact
    if not is_artifact(artifact):
        raise UserError(f"{artifact} is not an artifact directory (no manifest.json); export one first or use "
                        "--model/--random")
    return BenchSource(str(artifact), artifact=Path(artifact))


def _export_artifact(model, out_dir: Path) -> Path:
    """Export ``model`` (weights copied to the CPU, same dtype) to an ONNX artifact for the onnxruntime backend."""
    from .model import MambaLM
    from .onnx.export import write_artifact
    cpu_model = MambaLM(model.config, device="cpu", dtype=model.dtype)
    cpu_model.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    write_artifact(cpu_model.eval(), out_dir)
    return out_dir


def open_backend(source: BenchSource, backend: str, device: torch.device, dtype: torch.dtype,
                 workdir: Path, ort_options: dict | None = None):
    from .runtime.session import open_session
    if backend in ("torch", "torch-fast"):
        if source.model is not None:
            return open_session(source.model, backend)
        return open_session(source.artifact, backend, device=str(device), dtype=dtype)
    if backend == "onnxruntime":
        artifact = source.artifact
        if artifact is None:
            artifact = workdir / "artifact"
            if not artifact.exists():
                artifact = _export_artifact(source.model, artifact)
            source.artifact = artifact
        return open_session(artifact, backend, device=str(device), **(ort_options or {}))
    return open_session(source.artifact or source.model, backend, device=str(device))


def model_config(source: BenchSource):
    if source.model is not None:
        return source.model.config
    from .artifact import read_manifest
    from .families import config_from_manifest
    return config_from_manifest(read_manifest(source.artifact))


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
           "host": platform.node()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, sm_count=p.multi_processor_count, gpu_memory_bytes=p.total_memory,
                   cuda=torch.version.cuda)
    else:
        env.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    for mod in ("triton", "onnxruntime"):
        with contextlib.suppress(Exception):
            env[mod] = __import__(mod).__version__
    return env


def run_bench(source: BenchSource, backends: list[str], batches: list[int], prompt_len: int, gen_len: int,
              device: torch.device, dtype: torch.dtype, reps: int = 5, warmup: int = 1, seed: int = 0,
              ort_options: dict | None = None, progress: Callable[[Iterable], Iterable] = lambda x: x,
              budget_s: float | None = None, on_row: Callable[[dict], None] | None = None) -> dict:
    """Every backend × batch; returns the JSON-ready report. A backend that fails to open or run (missing
    provider, export error, out of memory …) gets error rows and the others still run. ``on_row(report)`` is
    called after every row (the CLI rewrites its JSON, so a run cut short keeps what it measured)."""
    on_row = on_row or (lambda report: None)
    cfg = model_config(source)
    act_bytes = torch.empty((), dtype=dtype).element_size()
    report = {"environment": environment(device), "model": {"source": source.label, "config": cfg.to_dict(),
              "dtype": str(dtype).replace("torch.", "")},
              "settings": {"backends": backends, "batches": batches, "prompt_len": prompt_len, "gen_len": gen_len,
                           "reps": reps, "warmup": warmup, "seed": seed, "budget_s": budget_s}, "rows": []}
    if source.model is not None:
        wb = weight_bytes(source.model)
    else:
        from .model import MambaLM
        with torch.device("meta"):
            wb = MambaLM(cfg).num_parameters() * act_bytes
    report["model"]["weight_bytes"] = wb
    bw = None
    if device.type == "cuda":
        bw = measure_hbm_bandwidth(device)
        report["hbm_bandwidth_bytes_per_s"] = bw
    with tempfile.TemporaryDirectory(prefix="mamba-bench-") as tmp:
        for backend in backends:
            try:
                session = open_backend(source, backend, device, dtype, Path(tmp), ort_options)
            except Exception as e:  # a backend that cannot open is reported, the others still run
                for b in batches:
                    report["rows"].append(dataclasses.asdict(BenchRow(backend, b, prompt_len, gen_len,
                                                                      error=f"{type(e).__name__}: {e}")))
                on_row(report)
                continue
            for b in progress(batches):
                try:
                    row = bench_session(session, backend, b, prompt_len, gen_len, device, reps, warmup, seed,
                                        budget_s)
                except torch.cuda.OutOfMemoryError as e:
                    row = BenchRow(backend, b, prompt_len, gen_len, error=f"out of memory: {str(e)[:200]}")
                except Exception as e:
                    row = BenchRow(backend, b, prompt_len, gen_len, error=f"{type(e).__name__}: {e}")
                if bw and row.decode_ms_per_step:
                    row.floor_ms = decode_floor_bytes(cfg, b, wb, act_bytes) / bw * 1e3
                    row.ratio_to_floor = row.decode_ms_per_step / row.floor_ms
                report["rows"].append(dataclasses.asdict(row))
                on_row(report)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            del session
    return report


# ---------------------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------------------
def _fmt(x, spec):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        width = int("".join(ch for ch in spec.split(".")[0] if ch.isdigit()) or 0)
        return "-".rjust(width)
    return format(x, spec)


def format_table(report: dict) -> str:
    head = (f"{'backend':<12} {'batch':>5} {'prefill ms':>11} {'prefill tok/s':>14} {'decode ms/step':>15} "
            f"{'decode tok/s':>13} {'floor ms':>9} {'x floor':>8} {'peak MiB':>9}")
    lines = [head, "-" * len(head)]
    for r in report["rows"]:
        if r["error"]:
            lines.append(f"{r['backend']:<12} {r['batch']:>5}  error: {r['error'][:90]}")
            continue
        mem = None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2**20
        lines.append(f"{r['backend']:<12} {r['batch']:>5} {_fmt(r['prefill_ms'], '11.3f')} "
                     f"{_fmt(r['prefill_tokens_per_s'], '14,.0f')} {_fmt(r['decode_ms_per_step'], '15.4f')} "
                     f"{_fmt(r['decode_tokens_per_s'], '13,.0f')} {_fmt(r['floor_ms'], '9.4f')} "
                     f"{_fmt(r['ratio_to_floor'], '8.2f')} {_fmt(mem, '9.0f')}")
    for r in report["rows"]:
        info = r.get("backend_info") or {}
        if info.get("selection"):
            sel = ", ".join(f"{p} {v['graph_ms']:.3f} ms" + (" (rejected)" if v.get("rejected") else "")
                            if "graph_ms" in v else f"{p} failed" for p, v in info["selection"].items())
            lines.append(f"{r['backend']} batch {r['batch']}: decode path {info.get('path')} (graph replay: {sel})")
    bw = report.get("hbm_bandwidth_bytes_per_s")
    if bw:
        lines.append(f"HBM copy bandwidth (read+write) {bw / 1e12:.2f} TB/s; weights "
                     f"{report['model']['weight_bytes'] / 2**20:.0f} MiB")
    return "\n".join(lines)


def plot_decode(report: dict, path: str | os.PathLike) -> Path:
    """Bar chart: decode ms/step per backend, grouped by batch, with each batch's floor as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["decode_ms_per_step"]]
    backends = list(dict.fromkeys(r["backend"] for r in report["rows"]))
    batches = sorted({r["batch"] for r in report["rows"]})
    width = 0.8 / max(1, len(backends))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(batches) * max(1, len(backends)) ** 0.5, 4.2))
    for j, be in enumerate(backends):
        xs, ys = [], []
        for i, b in enumerate(batches):
            for r in rows:
                if r["backend"] == be and r["batch"] == b:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(r["decode_ms_per_step"])
        bars = ax.bar(xs, ys, width, label=be)
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:.3g}", (x, y), ha="center", va="bottom", fontsize=7)
    floor_label = True
    for i, b in enumerate(batches):
        floors = [r["floor_ms"] for r in rows if r["batch"] == b and r["floor_ms"]]
        if floors:
            ax.hlines(floors[0], i - 0.45, i + 0.45, colors="k", linestyles="--",
                      label="HBM floor" if floor_label else None)
            floor_label = False
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("decode ms / step")
    if rows and max(r["decode_ms_per_step"] for r in rows) / min(r["decode_ms_per_step"] for r in rows) > 30:
        ax.set_yscale("log")
    env = report["environment"]
    ax.set_title(f"{report['model']['source']} {report['model']['dtype']} on {env.get('gpu', env['device'])}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda p: fig.savefig(p, dpi=120))
    finally:
        plt.close(fig)
