"""Time the Triton SSD (Mamba-2) scan, forward and forward+backward, beside upstream's own Triton SSD.

    PYTHONPATH=$PWD python scripts/bench_ssd.py --out ssd_bench.json \\
        [--upstream-src ../shared/anchors/mamba_ssm-2.3.2.post1.tar.gz]

Shape (default): batch 8, L 2048, 32 heads × headdim 64, d_state 128, 1 group, bf16, chunk 64, D per head,
dt_bias + softplus, no initial state; inputs random (upstream's test ranges). Every configuration of
``triton_ssd.BENCH_CONFIGS`` is timed (median of triton.testing.do_bench after warm-up); forward+backward is one
``torch.autograd.grad`` over every input. Upstream ``mamba_chunk_scan_combined`` (mamba_ssm 2.3.2, pure Triton:
no compiled extension needed) is loaded from its sdist or an unpacked source tree when given, and timed on the
same tensors at chunk 64 and 256 (its Mamba2 module's default); without it the JSON says so. ``--plugin`` also times the TensorRT plugin's Mamba-2 CUDA kernels
(plugins/ssd.cu, through the C ABI): the decode step at batch 1/8/64 (one layer of the benchmark model: 32 heads
× 64, d_state 128, fp16; effective bandwidth over the bytes it must move) and the sequence scan at batch 1/8,
L 2048 beside the Triton SSD forward on the same inputs. Writes JSON with the device, versions and all timings.
"""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import torch

from mamba_deploy.devices import require_cuda
from mamba_deploy.io import write_json


def bench_ms(fn) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def make_inputs(batch, L, H, P, G, N, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*s, dt=dtype):
        return torch.randn(*s, device="cuda", generator=g).to(dt)
    return dict(x=r(batch, L, H, P), dt=r(batch, L, H) * 0.5 - 1, A=-torch.rand(H, device="cuda", generator=g) - 0.5,
                B=r(batch, L, G, N), C=r(batch, L, G, N), D=r(H, dt=torch.float32),
                dt_bias=-torch.rand(H, device="cuda", generator=g))


def load_upstream(src: Path):
    """upstream's mamba_chunk_scan_combined from an sdist (.tar.gz) or source folder, without its compiled parts:
    a bare ``mamba_ssm`` package object whose __path__ points at the sources (its __init__ imports CUDA modules)."""
    if src.is_file():
        tmp = Path(tempfile.mkdtemp(prefix="mamba_ssm_src_"))
        with tarfile.open(src) as t:
            t.extractall(tmp)
        src = next(tmp.glob("mamba_ssm-*"))
    root = src / "mamba_ssm" if (src / "mamba_ssm").is_dir() else src
    for name, path in (("mamba_ssm", root), ("mamba_ssm.ops", root / "ops"),
                       ("mamba_ssm.ops.triton", root / "ops" / "triton"), ("mamba_ssm.utils", root / "utils")):
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)]
        sys.modules[name] = mod
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    return mamba_chunk_scan_combined


def save(path: Path, res: dict) -> None:
    write_json(path, res)


def kernel_breakdown(fn, reps: int = 5) -> dict:
    """Where the time goes: GPU time per kernel name (µs per call, mean over ``reps`` calls) from torch.profiler."""
    from mamba_deploy.bench import profile_kernels
    return {r["name"][:80]: round(r["us_per_iter"], 2) for r in profile_kernels(fn, reps)}


def plugin_timings(H, P, G, N, L) -> dict:
    from mamba_deploy.ops import triton_ssd
    from mamba_deploy.trt import kernels

    out = {"step": [], "scan": []}
    for b in (1, 8, 64):
        t = make_inputs(b, 1, H, P, G, N, torch.float16)
        one = {k: t[k][:, 0].contiguous() for k in ("x", "dt", "B", "C")}
        state = torch.randn(b, H, P, N, device="cuda")
        y = torch.empty_like(one["x"])
        ms = bench_ms(lambda: kernels.ssd_state_update_cuda(state, one["x"], one["dt"], t["A"], one["B"], one["C"],
                                                            D=t["D"], dt_bias=t["dt_bias"], out_state=state, out=y))
        bytes_moved = b * H * P * N * 4 * 2 + b * (2 * H * P + H + 2 * G * N) * 2 + H * 12
        row = {"batch": b, "us": ms * 1e3, "GB_per_s": bytes_moved / ms / 1e6, "us_for_48_layers": ms * 1e3 * 48}
        out["step"].append(row)
        print("plugin step", row, flush=True)
    for b in (1, 8):
        t = make_inputs(b, L, H, P, G, N, torch.float16)
        h0 = torch.randn(b, H, P, N, device="cuda")
        hT = torch.empty_like(h0)
        y = torch.empty_like(t["x"])
        row = {"batch": b, "L": L, "dtype": "fp16",
               "plugin_ms": bench_ms(lambda: kernels.ssd_scan_cuda(
                   t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"], dt_bias=t["dt_bias"], initial_state=h0,
                   out_state=hT, out=y)),
               "triton_fwd_ms": bench_ms(lambda: triton_ssd.ssd_scan_triton(
                   t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"], dt_bias=t["dt_bias"], initial_state=h0))}
        out["scan"].append(row)
        print("plugin scan", row, flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--upstream-src", type=Path, default=None,
                    help="mamba_ssm 2.3.2 sdist (.tar.gz) or unpacked source folder, for the side-by-side timing")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--nheads", type=int, default=32)
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--d-state", type=int, default=128)
    ap.add_argument("--ngroups", type=int, default=1)
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--plugin", action="store_true", help="also time the plugin's CUDA kernels (needs nvcc)")
    args = ap.parse_args()
    require_cuda("scripts/bench_ssd.py")
    import triton

    from mamba_deploy.ops import triton_ssd

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    shape = dict(batch=args.batch, L=args.seqlen, H=args.nheads, P=args.headdim, G=args.ngroups, N=args.d_state)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "shape": shape, "dtype": args.dtype, "ours": {}, "upstream": None}
    inp = make_inputs(*shape.values(), dtype)
    leaves = {k: v.detach().requires_grad_(True) for k, v in inp.items()}
    gy = torch.randn_like(inp["x"])
    for name, cfg in triton_ssd.BENCH_CONFIGS.items():
        def fwd(cfg=cfg):
            return triton_ssd.ssd_scan_triton(**inp, config=cfg)[0]

        def fwd_bwd(cfg=cfg):
            y, _ = triton_ssd.ssd_scan_triton(**leaves, config=cfg)
            return torch.autograd.grad(y, list(leaves.values()), gy)
        try:
            row = {"config": repr(cfg), "fwd_ms": bench_ms(fwd), "fwd_bwd_ms": bench_ms(fwd_bwd)}
        except Exception as e:                     # e.g. out of shared memory for a large tile: record, go on
            row = {"config": repr(cfg), "error": f"{type(e).__name__}: {e}"[:400]}
        res["ours"][name] = row
        print(name, row, flush=True)
        save(args.out, res)                        # a run cut short keeps what it measured
    res["upstream"] = {}
    if args.upstream_src:
        try:
            combined = load_upstream(args.upstream_src)
        except Exception as e:
            combined = None
            res["upstream"]["error"] = f"{type(e).__name__}: {e}"[:600]
        # chunk 64 (ours) and 256 (upstream's Mamba2 module default); the faster one is the comparator
        for chunk in (64, 256) if combined else ():
            def up_fwd(chunk=chunk):
                return combined(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk, D=inp["D"],
                                dt_bias=inp["dt_bias"], dt_softplus=True)

            def up_fwd_bwd(chunk=chunk):
                y = combined(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], chunk, D=leaves["D"],
                             dt_bias=leaves["dt_bias"], dt_softplus=True)
                return torch.autograd.grad(y, list(leaves.values()), gy)
            try:
                ours_y = triton_ssd.ssd_scan_triton(**inp)[0].float()
                up_y = up_fwd().float()
                row = {"fwd_ms": bench_ms(up_fwd), "fwd_bwd_ms": bench_ms(up_fwd_bwd),
                       "y_max_abs_diff_vs_ours": (ours_y - up_y).abs().max().item(),
                       "y_max_abs": up_y.abs().max().item()}
                row["kernel_us"] = kernel_breakdown(up_fwd_bwd)
            except Exception as e:
                row = {"error": f"{type(e).__name__}: {e}"[:600]}
            res["upstream"][f"chunk{chunk}"] = row
            print(f"upstream chunk {chunk}", row, flush=True)
            save(args.out, res)
    else:
        res["upstream"]["error"] = "not measured: --upstream-src not given"
    ok = {k: v["fwd_bwd_ms"] for k, v in res["ours"].items() if "fwd_bwd_ms" in v}
    if ok:
        best = min(ok, key=ok.get)
        res["best"] = {"config": best, "fwd_bwd_ms": ok[best], "fwd_ms": res["ours"][best]["fwd_ms"]}
        try:
            best_cfg = triton_ssd.BENCH_CONFIGS[best]
            res["best"]["kernel_us"] = kernel_breakdown(lambda: torch.autograd.grad(
                triton_ssd.ssd_scan_triton(**leaves, config=best_cfg)[0], list(leaves.values()), gy))
        except Exception as e:
            res["best"]["kernel_us"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        up = [v for v in res["upstream"].values() if isinstance(v, dict) and "fwd_bwd_ms" in v]
        if up:
            fastest = min(up, key=lambda v: v["fwd_bwd_ms"])
            res["best"]["fwd_bwd_ratio_vs_fastest_upstream"] = ok[best] / fastest["fwd_bwd_ms"]
            res["best"]["fwd_ratio_vs_fastest_upstream"] = res["best"]["fwd_ms"] / min(v["fwd_ms"] for v in up)
    if args.plugin:
        del inp, leaves, gy
        torch.cuda.empty_cache()
        try:
            res["plugin"] = plugin_timings(args.nheads, args.headdim, args.ngroups, args.d_state, args.seqlen)
        except Exception as e:
            res["plugin"] = {"error": f"{type(e).__name__}: {e}"[:600]}
    save(args.out, res)
    print(json.dumps(res.get("best"), indent=2))


if __name__ == "__main__":
    main()
