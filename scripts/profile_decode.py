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
import json
import statistics

import torch
import triton.testing

from mamba_deploy.bench import decode_floor_bytes, measure_hbm_bandwidth, weight_bytes
from mamba_deploy.config import config_for_size
from mamba_deploy.model import random_model
from mamba_deploy.ops import triton_decode as td
from mamba_deploy.runtime.fast_session import FastSession

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


def decode_profile(model, batch: int, small_max: int, launch=None) -> dict:
    sess = FastSession(model, small_batch_max=small_max)
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
    out = {"batch": batch, "path": "small" if batch <= small_max else "general",
           "session_step_ms": events_ms(session_step, 100)}
    g = sess._steps[batch]
    out["graph_replay_ms"] = events_ms(g.graph.replay, 100)
    eager = lambda: sess.decoder.step(g.ids, g.state.conv, g.state.ssm)   # noqa: E731
    out["eager_step_ms"] = events_ms(eager, 10, reps=3)
    rows = kernel_table(eager)
    out["kernels"] = rows
    out["kernel_sum_ms"] = sum(r["us_per_step"] for r in rows) / 1e3
    try:
        out["graph_kernels"] = kernel_table(g.graph.replay)[:20]
    except Exception as e:  # profiling graph replays needs CUPTI graph support
        out["graph_kernels_error"] = str(e)[:200]
    del sess
    torch.cuda.empty_cache()
    return out


def sweep_small_kernels(model, M: int) -> dict:
    """Each small-path kernel alone at the 370m shape, cold L2 (do_bench clears it), median µs per config."""
    c = model.config
    layer = model.backbone.layers[0]
    m = layer.mixer
    d, dm = c.d_inner, c.d_model
    res = torch.randn(M, dm, device=dev)
    conv = torch.randn(M, d, c.d_conv, device=dev, dtype=torch.float16)
    cw = m.conv1d.weight[:, 0, :].contiguous()
    xc = torch.empty(M, d, device=dev, dtype=torch.float16)
    z = torch.empty_like(xc)
    XD = m.x_proj.weight.shape[0]
    xdbl = torch.zeros(M, XD, device=dev)
    y = torch.randn(M, d, device=dev, dtype=torch.float16)
    ss = torch.randn(M, d, c.d_state, device=dev)
    A = m.A().contiguous()
    dtw, dtb, D = m.dt_proj.weight.contiguous(), m.dt_proj.bias.float(), m.D.float()
    bench = lambda f: triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median") * 1e3  # noqa: E731
    out = {"M": M, "front": [], "out": [], "ssm": []}
    for bn, bk, nw, ns in [(32, 128, 4, 3), (16, 128, 4, 3), (16, 256, 4, 3), (32, 256, 4, 3), (64, 128, 4, 3),
                           (32, 64, 4, 4), (32, 128, 8, 3), (16, 64, 2, 4), (32, 128, 4, 5)]:
        f = lambda: td.norm_in_proj_conv_xproj(res, layer.norm.weight, 1e-5, m.in_proj.weight, None, conv, cw,  # noqa
                                               m.conv1d.bias, m.x_proj.weight, xc, z, xdbl, block_n=bn,
                                               block_k=bk, num_warps=nw, num_stages=ns)
        out["front"].append({"block_n": bn, "block_k": bk, "num_warps": nw, "num_stages": ns, "us": bench(f)})
    for bn, bk, nw, ns in [(16, 256, 4, 3), (16, 128, 4, 3), (16, 512, 4, 3), (32, 256, 4, 3), (16, 256, 8, 3),
                           (16, 128, 2, 4), (16, 256, 4, 5)]:
        f = lambda: td.out_proj_add(y, m.out_proj.weight, None, res, block_n=bn, block_k=bk, num_warps=nw,  # noqa
                                    num_stages=ns)
        out["out"].append({"block_n": bn, "block_k": bk, "num_warps": nw, "num_stages": ns, "us": bench(f)})
    for bd, rows, nw in [(64, None, 4), (32, None, 4), (128, None, 4), (64, 1, 4), (64, 2, 4), (64, 8, 4),
                         (32, 1, 2), (128, 4, 8)]:
        f = lambda: td.ssm_step(xdbl, dtw, dtb, A, D, xc, z, ss, y, block_d=bd, rows=rows, num_warps=nw)  # noqa
        out["ssm"].append({"block_d": bd, "rows": rows, "num_warps": nw, "us": bench(f)})
    ref = {"in_proj_cublas": lambda: torch.nn.functional.linear(xc[:, :dm], m.in_proj.weight),
           "out_proj_cublas": lambda: torch.nn.functional.linear(y, m.out_proj.weight),
           "x_proj_cublas": lambda: torch.nn.functional.linear(y, m.x_proj.weight),
           "conv_step": lambda: td.conv_step(y, conv, cw, m.conv1d.bias, xc),
           "add_rmsnorm": lambda: td.add_rmsnorm(y[:, :dm], res, layer.norm.weight, 1e-5, xc[:, :dm])}
    out["unfused_us"] = {k: bench(f) for k, f in ref.items()}
    return out


def prefill_profile(model, batch: int, L: int) -> dict:
    sess = FastSession(model)
    ids = torch.randint(0, model.config.vocab_size, (batch, L), device=dev)
    sess.prefill(ids)
    out = {"batch": batch, "prompt_len": L, "ms": events_ms(lambda: sess.prefill(ids), 1, reps=5)}
    out["ops"] = kernel_table(lambda: sess.prefill(ids), steps=1)[:15]
    del sess
    torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="370m")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    report["ceilings"] = ceilings()
    bw = report["ceilings"]["hbm_copy_bytes_per_s"]
    print(f"HBM copy {bw / 1e12:.2f} TB/s; fp16 matmul {report['ceilings']['fp16_matmul_flops'] / 1e12:.0f} TFLOP/s")
    model = random_model(config_for_size(args.size), dtype=torch.float16, device="cuda")
    wb = weight_bytes(model)
    report["decode"] = []
    for batch, small in [(1, 16), (1, 0), (8, 16), (8, 0), (16, 16), (64, 0)]:
        r = decode_profile(model, batch, small)
        r["floor_ms"] = decode_floor_bytes(model.config, batch, wb, 2) / bw * 1e3
        report["decode"].append(r)
        print(f"decode batch {batch:3d} {r['path']:8s}: session step {r['session_step_ms']:.4f} ms, graph "
              f"{r['graph_replay_ms']:.4f} ms, Σ kernels {r['kernel_sum_ms']:.4f} ms, eager {r['eager_step_ms']:.3f}"
              f" ms, floor {r['floor_ms']:.4f} ms")
        print_table(r["kernels"], 8)
        if r.get("graph_kernels"):
            print("   graph replay, per kernel:")
            print_table(r["graph_kernels"], 6)
    report["sweeps"] = []
    for M in (1, 8):
        s = sweep_small_kernels(model, M)
        report["sweeps"].append(s)
        for k in ("front", "out", "ssm"):
            best = min(s[k], key=lambda r: r["us"])
            print(f"sweep M={M} {k:5s}: best {best}   (first/default {s[k][0]['us']:.1f} us)")
        print(f"sweep M={M} unfused kernels (us): " + ", ".join(f"{k} {v:.1f}" for k, v in s["unfused_us"].items()))
    # the best launch parameters measured above, applied to the whole graph
    tuned = {k: {kk: vv for kk, vv in min(report["sweeps"][0][k], key=lambda r: r["us"]).items() if kk != "us"}
             for k in ("front", "out")}
    r = decode_profile(model, 1, 16, launch=tuned)
    report["decode_tuned_b1"] = {"launch": tuned, "graph_replay_ms": r["graph_replay_ms"],
                                 "session_step_ms": r["session_step_ms"]}
    print(f"decode batch 1 with tuned {tuned}: graph {r['graph_replay_ms']:.4f} ms, session "
          f"{r['session_step_ms']:.4f} ms")
    report["prefill"] = []
    for batch in (1, 8):
        p = prefill_profile(model, batch, 2048)
        report["prefill"].append(p)
        print(f"prefill batch {batch} x 2048: {p['ms']:.2f} ms")
        print_table(p["ops"], 12)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
