"""Where the torch-fast decode (and prefill) time goes on a GPU: 370m shape, fp16, random weights.

Prints and writes (``--out FILE.json``):
  * the two ceilings measured here: device-to-device copy bandwidth, fp16 matrix-product rate;
  * per batch size and decode path, the step time through the session, the bare graph replay time, and the
    per-kernel device times of one step (torch.profiler over the eager step: same kernels, no launch gaps), so
    graph time − Σ kernel time = what launches and gaps cost;
  * a sweep of launch parameters of the small-batch kernels (each kernel alone, cold L2, do_bench median);
  * prefill time at batch 1 and 8 × 2048 tokens and its top operators.
Run by scripts/gpu_bench.sh.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from mamba_deploy.devices import require_cuda

if __name__ == "__main__":   # before the Triton imports: on a CPU one line and exit 2, not a traceback
    require_cuda("scripts/profile_decode.py")

import triton.testing  # noqa: E402

from mamba_deploy.bench import decode_floor_bytes, measure_hbm_bandwidth, weight_bytes  # noqa: E402
from mamba_deploy.config import config_for_size  # noqa: E402
from mamba_deploy.io import write_json  # noqa: E402
from mamba_deploy.model import random_model  # noqa: E402
from mamba_deploy.ops import triton_decode as td  # noqa: E402
from mamba_deploy.runtime.fast_session import FastSession  # noqa: E402

dev = torch.device("cuda")


def events_ms(fn, n: int, reps: int = 7) -> float:
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        s.record()
        for _ in range(n):
            fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / n)
    return statistics.median(times)


def kernel_table(fn, steps: int = 3) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        if t is None:
            t = getattr(ev, "cuda_time_total", 0)
        if t <= 0:
            continue
        rows.append({"name": ev.key[:80], "count_per_step": ev.count / steps, "us_per_step": t / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows


def print_table(rows, limit=14):
    for r in rows[:limit]:
        print(f"    {r['us_per_step']:9.1f} us  x{r['count_per_step']:6.1f}  {r['name']}")


def ceilings() -> dict:
    bw = measure_hbm_bandwidth(dev)
    a = torch.randn(8192, 8192, device=dev, dtype=torch.float16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.float16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return {"hbm_copy_bytes_per_s": bw, "fp16_matmul_flops": 2 * 8192**3 / (ms / 1e3)}


def decode_profile(model, batch: int, small_max: int, tune: bool = True, launch=None) -> dict:
    sess = FastSession(model, small_batch_max=small_max, tune=tune)
    if launch:
        for k, v in launch.items():
            sess.decoder.launch[k] = dict(v)
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (batch, 32), device=dev)
    toks = torch.randint(0, V, (256, batch), device=dev)
    _, st = sess.prefill(prompt)
    box = {"st": st, "i": 0}

    def session_step():
        _, box["st"] = sess.step(toks[box["i"] % 256], box["st"])
        box["i"] += 1

    for _ in range(20):
        session_step()
    g = sess._steps[batch]
    out = {"batch": batch, "path": sess.decoder.path(batch), "tuned": tune, "selection": g.selection,
           "launch": sess.decoder.launch_for.get((batch, sess.decoder.path(batch)), sess.decoder.launch),
           "session_step_ms": events_ms(session_step, 100)}
    out["graph_replay_ms"] = events_ms(g.graph.replay, 100)

    def eager():
        with torch.inference_mode():
            sess.decoder.step(g.ids, g.state.conv, g.state.ssm)

    out["eager_step_ms"] = events_ms(eager, 10, reps=3)
    rows = kernel_table(eager)
    out["kernels"] = rows
    out["kernel_sum_ms"] = sum(r["us_per_step"] for r in rows) / 1e3
    try:
        out["graph_kernels"] = kernel_table(g.graph.replay)[:20]
    except Exception as e:  # profiling graph replays needs CUPTI graph support
        out["graph_kernels_error"] = str(e)[:200]
    out["tuning_log"] = sess.decoder.tuning_log.get((batch, out["path"]))
    del sess
    torch.cuda.empty_cache()
    return out


def unfused_kernels(model, M: int) -> dict:
    """cuBLAS projections and the general path's Triton kernels alone (cold L2), µs."""
    c = model.config
    layer = model.backbone.layers[0]
    m = layer.mixer
    d, dm = c.d_inner, c.d_model
    res = torch.randn(M, dm, device=dev)
    u = torch.randn(M, dm, device=dev, dtype=torch.float16)
    conv = torch.randn(M, d, c.d_conv, device=dev, dtype=torch.float16)
    cw = m.conv1d.weight[:, 0, :].contiguous()
    xc = torch.empty(M, d, device=dev, dtype=torch.float16)
    y = torch.randn(M, d, device=dev, dtype=torch.float16)
    bench = lambda f: triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median") * 1e3  # noqa: E731
    F = torch.nn.functional
    ref = {"in_proj_cublas": lambda: F.linear(u, m.in_proj.weight),
           "out_proj_cublas": lambda: F.linear(y, m.out_proj.weight),
           "x_proj_cublas": lambda: F.linear(y, m.x_proj.weight),
           "lm_head_cublas": lambda: F.linear(u, model.lm_head.weight),
           "conv_step": lambda: td.conv_step(y, conv, cw, m.conv1d.bias, xc),
           "add_rmsnorm": lambda: td.add_rmsnorm(u, res, layer.norm.weight, 1e-5, torch.empty_like(u))}
    return {k: bench(f) for k, f in ref.items()}


def prefill_profile(model, batch: int, L: int, impl: str, scan: str, scan_launch=None, ops=False) -> dict:
    sess = FastSession(model, prefill_impl=impl, prefill_scan=scan)
    sess.scan_launch = dict(scan_launch or {})
    ids = torch.randint(0, model.config.vocab_size, (batch, L), device=dev)
    sess.prefill(ids)
    out = {"batch": batch, "prompt_len": L, "impl": impl, "scan": scan, "scan_launch": scan_launch,
           "ms": events_ms(lambda: sess.prefill(ids), 1, reps=5)}
    if ops:
        out["ops"] = kernel_table(lambda: sess.prefill(ids), steps=1)[:15]
    del sess
    torch.cuda.empty_cache()
    return out


def section(report, name, fn):
    try:
        return fn()
    except Exception as e:
        import traceback
        traceback.print_exc()
        report.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:500]
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="370m")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true",
                    help="only the chosen decode path at batch 1 and 64 and the prefill's top operators")
    args = ap.parse_args()
    torch.manual_seed(0)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    report["ceilings"] = ceilings()
    bw = report["ceilings"]["hbm_copy_bytes_per_s"]
    print(f"HBM copy {bw / 1e12:.2f} TB/s; fp16 matmul {report['ceilings']['fp16_matmul_flops'] / 1e12:.0f} TFLOP/s")
    model = random_model(config_for_size(args.size), dtype=torch.float16, device="cuda")
    wb = weight_bytes(model)

    def save():
        if args.out:
            write_json(args.out, report, indent=1)

    report["decode"] = []
    cases = [(1, 16, False), (1, 16, True), (1, 0, True), (8, 16, True), (8, 0, True), (64, 0, True), (64, 64, True)]
    if args.quick:
        cases = [(1, 16, True), (64, 16, True)]
    for batch, small, tune in cases:
        r = section(report, f"decode{batch}-{small}-{tune}", lambda: decode_profile(model, batch, small, tune))
        if r is None:
            continue
        r["floor_ms"] = decode_floor_bytes(model.config, batch, wb, 2) / bw * 1e3
        report["decode"].append(r)
        print(f"decode batch {batch:3d} {r['path']:8s} tuned={tune}: session step {r['session_step_ms']:.4f} ms, "
              f"graph {r['graph_replay_ms']:.4f} ms, sum kernels {r['kernel_sum_ms']:.4f} ms, eager "
              f"{r['eager_step_ms']:.3f} ms, floor {r['floor_ms']:.4f} ms; launch {r['launch']}; selection "
              f"{r['selection']}")
        print_table(r["kernels"], 9)
        if r.get("graph_kernels"):
            print("   graph replay, per kernel:")
            print_table(r["graph_kernels"], 6)
        if r.get("tuning_log"):
            for k, timings in r["tuning_log"].items():
                print(f"   tune {k}: " + "; ".join(f"{t['params']} {t.get('us', float('nan')):.1f}us"
                                                   if "us" in t else f"{t['params']} ERR" for t in timings))
        save()
    for M in (() if args.quick else (1, 8, 64)):
        u = section(report, f"unfused{M}", lambda: unfused_kernels(model, M))
        if u:
            report[f"unfused_us_M{M}"] = u
            print(f"unfused kernels M={M} (us, cold L2): " + ", ".join(f"{k} {v:.1f}" for k, v in u.items()))
    save()
    report["prefill"] = []
    variants = [("rows", "triton-rows", None), ("rows", "triton", None), ("model-layout", "triton", None),
                ("rows", "rows", dict(block_d=32)), ("rows", "rows", dict(block_d=16, num_warps=1)),
                ("rows", "rows", dict(block_d=64, num_warps=2))]
    for batch in (8, 1):
        for impl, scan, sl in (variants[:1] if args.quick else variants if batch == 8 else variants[:3]):
            p = section(report, f"prefill{batch}-{impl}-{scan}-{sl}",
                        lambda: prefill_profile(model, batch, 2048, impl, scan, sl))
            if p:
                report["prefill"].append(p)
                print(f"prefill batch {batch} x 2048 {impl}/{scan} {sl or ''}: {p['ms']:.2f} ms")
        save()
    best = min((p for p in report["prefill"] if p["batch"] == 8), key=lambda p: p["ms"], default=None)
    if best:
        p = section(report, "prefill-ops", lambda: prefill_profile(model, 8, 2048, best["impl"], best["scan"],
                                                                   best["scan_launch"], ops=True))
        if p:
            report["prefill_best_ops"] = p
            print(f"prefill batch 8 best {best['impl']}/{best['scan']} {best['scan_launch']}: {p['ms']:.2f} ms")
            print_table(p["ops"], 12)
    save()
    print("errors:", report.get("errors"))


if __name__ == "__main__":
    main()
