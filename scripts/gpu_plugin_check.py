"""GPU check of the TensorRT plugin kernels: the pytest suite (tests/test_plugin_kernels_gpu.py) and timings.

    PYTHONPATH=$PWD python scripts/gpu_plugin_check.py --out OUTDIR

Writes OUTDIR/pytest.txt, OUTDIR/gpu_kernel_errors.json (errors per case, rollout drift) and
OUTDIR/plugin_kernel_timings.json. Timings: median of triton.testing.do_bench (warm-up first, random inputs),
370m shapes (d_inner 2048, d_state 16); effective bandwidth counts the bytes each kernel must move once.
Comparators: the Triton scan of mamba_deploy.ops (same machine, same inputs) and the chunked PyTorch scan.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from mamba_deploy.devices import require_cuda
from mamba_deploy.io import write_json


def bench_ms(fn) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))


def inputs(b, d, N, L, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    shape, bc = ((b, d), (b, N)) if L is None else ((b, d, L), (b, N, L))

    def r(*s):
        return torch.randn(*s, device="cuda", generator=g)
    A = -torch.arange(1, N + 1, device="cuda", dtype=torch.float32).repeat(d, 1)
    return dict(x=r(*shape).to(dtype), delta=(r(*shape) * 0.5 - 3).to(dtype), A=A, B=r(*bc).to(dtype),
                C=r(*bc).to(dtype), D=r(d), delta_bias=r(d) * 0.1, z=r(*shape).to(dtype), state=r(b, d, N))


def timings() -> dict:
    from mamba_deploy.ops import selective_scan_chunked
    from mamba_deploy.trt import kernels

    out = {"device": torch.cuda.get_device_name(), "step": [], "scan": []}
    d, N = 2048, 16
    for b in (1, 8, 64, 256):
        for dt_name, dt in (("fp16", torch.float16), ("fp32", torch.float32)):
            t = inputs(b, d, N, None, dt)
            y = torch.empty_like(t["x"])
            ms = bench_ms(lambda: kernels.selective_state_update_cuda(
                t["state"], t["x"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"],
                delta_bias=t["delta_bias"], out_state=t["state"], out=y))
            esize = t["x"].element_size()
            bytes_moved = b * d * N * 4 * 2 + d * N * 4 + b * d * esize * 4 + b * N * esize * 2 + d * 8
            out["step"].append({"batch": b, "dtype": dt_name, "d_inner": d, "d_state": N, "us": ms * 1e3,
                                "GB_per_s": bytes_moved / ms / 1e6,
                                "us_for_48_layers": ms * 1e3 * 48})
            print("step", out["step"][-1], flush=True)
    for b, L in ((1, 2048), (8, 2048)):
        for dt_name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            t = inputs(b, d, N, L, dt)
            y = torch.empty_like(t["x"])
            h = torch.empty_like(t["state"])
            ms = bench_ms(lambda: kernels.selective_scan_cuda(
                t["x"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"], delta_bias=t["delta_bias"],
                initial_state=t["state"], out_state=h, out=y))
            esize = t["x"].element_size()
            bytes_moved = b * L * (d * 4 + N * 2) * esize + b * d * N * 8
            row = {"batch": b, "L": L, "dtype": dt_name, "d_inner": d, "d_state": N, "plugin_ms": ms,
                   "GB_per_s": bytes_moved / ms / 1e6}
            try:
                from mamba_deploy.ops.triton_scan import selective_scan_triton
                row["triton_ms"] = bench_ms(lambda: selective_scan_triton(
                    t["x"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"], delta_bias=t["delta_bias"],
                    delta_softplus=True, initial_state=t["state"]))
            except Exception as e:  # a comparator only
                row["triton_error"] = f"{type(e).__name__}: {e}"[:300]
            if b == 1:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                selective_scan_chunked(t["x"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"],
                                       delta_bias=t["delta_bias"], initial_state=t["state"])
                torch.cuda.synchronize()
                row["torch_chunked_ms_single_run"] = (time.perf_counter() - t0) * 1e3
            out["scan"].append(row)
            print("scan", row, flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args()
    require_cuda("scripts/gpu_plugin_check.py")
    args.out.mkdir(parents=True, exist_ok=True)
    rc = 0
    if not args.skip_tests:
        env = {"MAMBA_DEPLOY_GPU_REPORT": str(args.out / "gpu_kernel_errors.json")}
        import os
        proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_plugin_kernels_gpu.py", "-v", "-rs",
                               "-p", "no:cacheprovider", "--durations=5"], capture_output=True, text=True,
                              env={**os.environ, **env})
        (args.out / "pytest.txt").write_text(proc.stdout + proc.stderr)
        print(proc.stdout[-6000:], proc.stderr[-2000:], flush=True)
        rc = proc.returncode
    t = timings()
    write_json(args.out / "plugin_kernel_timings.json", t)
    sys.exit(rc)


if __name__ == "__main__":
    main()
