"""Where the torch-fast decode (and prefill) time goes on a GPU: 370m shape, fp16, random weights.

Prints and writes (``--out FILE.json``):
  * the two ceilings measured here: device-to-device copy bandwidth, fp16 matrix-product rate;
  * per batch size and decode path, the step time through the session, the bare graph replay time, and the
    per-kernel device times of one step (torch.profiler over the eager step: same kernels, no launch gaps), so
    graph time − Σ kernel time = what launches and gaps cost;
  * the general path's kernels and cuBLAS projections alone (cold L2, do_bench median);
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

from mamba_deploy.bench import (decode_floor_bytes, measure_hbm_bandwidth, profile_kernels,  # noqa: E402
                                 weight_bytes)
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


def print_table(rows, limit=14):
    for r in rows[:limit]:
        print(f"    {r['us_per_iter']:9.1f} us  x{r['calls_per_iter']:6.1f}  {r['name'][:80]}")


def ceilings() -> dict:
    bw = measure_hbm_bandwidth(dev)
    a = torch.randn(8192, 8192, device=dev, dtype=torch.float16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.float16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return {"hbm_copy_bytes_per_s": bw, "fp16_matmul_flops": 2 * 8192**3 / (ms / 1e3)}


def decode_profile(model, batch: int, small_max: int, tune: bool = True) -> dict:
    sess = FastSession(model, small_batch_max=small_max, tune=tune)
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
    g = sess.graphed_step(batch)
    plan = sess.decoder.plan(batch)
    out = {"batch": batch, "path": plan.path, "tuned": tune, "selection": plan.selection, "launch": plan.launch,
           "session_step_ms": events_ms(session_step, 100)}
    out["graph_replay_ms"] = events_ms(g.graph.replay, 100)

    def eager():
        with torch.inference_mode():
            sess.decoder.step(g.ids, g.state.conv, g.state.ssm)

    out["eager_step_ms"] = events_ms(eager, 10, reps=3)
    rows = profile_kernels(eager)
    out["kernels"] = rows
    out["kernel_sum_ms"] = sum(r["us_per_iter"] for r in rows) / 1e3
    try:
        out["graph_kernels"] = profile_kernels(g.graph.replay)[:20]
    except Exception as e:  # profiling graph replays needs CUPTI graph support
        out["graph_kernels_error"] = str(e)[:200]
    out["tuning_log"] = plan.tuning
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


def prefill_profile(model, batch: int, L: int) -> dict:
    sess = FastSession(model)
    ids = torch.randint(0, model.config.vocab_size, (batch, L), device=dev)
    sess.prefill(ids)
    out = {"batch": batch, "prompt_len": L, "ms": events_ms(lambda: sess.prefill(ids), 1, reps=5),
           "tiles": sess.decode_info(batch)["prefill"]}
    out["ops"] = profile_kernels(lambda: sess.prefill(ids), iters=1)[:15]
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
                    help="only the chosen decode path at batch 1 and 64")
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
                print(f"   tune {k}: " + "; ".join(f"{t['params']} {t['ms'] * 1e3:.1f}us"
                                                   if "ms" in t else f"{t['params']} ERR" for t in timings))
        save()
    for M in (() if args.quick else (1, 8, 64)):
        u = section(report, f"unfused{M}", lambda: unfused_kernels(model, M))
        if u:
            report[f"unfused_us_M{M}"] = u
            print(f"unfused kernels M={M} (us, cold L2): " + ", ".join(f"{k} {v:.1f}" for k, v in u.items()))
    save()
    report["prefill"] = []
    for batch in (8, 1):
        p = section(report, f"prefill{batch}", lambda: prefill_profile(model, batch, 2048))
        if p:
            report["prefill"].append(p)
            print(f"prefill batch {batch} x 2048: {p['ms']:.2f} ms, tiles {p['tiles']}")
            print_table(p["ops"], 12)
        save()
    print("errors:", report.get("errors"))


if __name__ == "__main__":
    main()
