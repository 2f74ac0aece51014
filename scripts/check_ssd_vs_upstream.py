"""Cross-check the Triton SSD scan against upstream's own Triton SSD (mamba_ssm 2.3.2 ``mamba_chunk_scan_combined``):
y, the final state and the gradients of all eight inputs on the same random inputs, as normwise relative
differences max|ours − upstream| / max|upstream|. An independent implementation of the same math (the tests
compare against a float64 recurrence; this compares against the kernels people train with).

    # GPU
    PYTHONPATH=$PWD python scripts/check_ssd_vs_upstream.py --upstream-src mamba_ssm-2.3.2.post1.tar.gz
    # CPU, both under the Triton interpreter (small shapes; upstream's CUDA-only calls are stubbed)
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python scripts/check_ssd_vs_upstream.py --upstream-src ... --small

Needs ``einops`` (upstream imports it). Prints JSON; exit 1 if any difference exceeds --tol.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ssd import load_upstream  # noqa: E402

NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state")


def stub_cuda_for_interpreter():
    """upstream calls torch.cuda.device / get_device_properties and autotunes (needs a GPU driver); on the CPU
    interpreter: no device switch, a nominal SM count, and only the first autotune config (no benchmarking)."""
    from triton.runtime import autotuner
    torch.cuda.device = lambda idx: contextlib.nullcontext()
    torch.cuda.get_device_properties = lambda dev: types.SimpleNamespace(multi_processor_count=4)
    run = autotuner.Autotuner.run

    def first_config_only(self, *a, **k):
        self.configs = self.configs[:1]
        return run(self, *a, **k)
    autotuner.Autotuner.run = first_config_only


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream-src", type=Path, required=True, help="mamba_ssm 2.3.2 sdist or source folder")
    ap.add_argument("--small", action="store_true", help="tiny shapes (for the CPU interpreter)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--tol", type=float, default=None,
                    help="default: fp32 1e-4 on the interpreter, 1e-2 on a GPU (upstream's fp32 products run in "
                         "tf32 there); bf16 1e-1 (both round products to bf16, in different orders)")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        stub_cuda_for_interpreter()
    combined = load_upstream(args.upstream_src)
    from mamba_deploy.ops.triton_ssd import ssd_scan_triton

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    b, L, H, P, G, N = (2, 80, 4, 16, 2, 16) if args.small else (2, 1000, 8, 64, 2, 128)
    chunk_up, chunk_ours = (32, 16) if args.small else (256, 64)
    g = torch.Generator().manual_seed(0)

    def r(*s, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*s, generator=g) * scale + shift).to(dev, dt)
    inputs = dict(x=r(b, L, H, P), dt=r(b, L, H, scale=0.5, shift=-1.0),
                  A=(-torch.rand(H, generator=g) - 0.5).to(dev), B=r(b, L, G, N), C=r(b, L, G, N),
                  D=r(H, dt=torch.float32), dt_bias=(-torch.rand(H, generator=g)).to(dev),
                  initial_state=r(b, H, P, N, dt=torch.float32))
    gy = r(b, L, H, P, dt=torch.float32)
    gh = r(b, H, P, N, dt=torch.float32)

    def run(fn):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        y, hT = fn(**leaves)
        grads = torch.autograd.grad((y.float() * gy).sum() + (hT.float() * gh).sum(), list(leaves.values()))
        return {"y": y, "final_state": hT, **{"d_" + k: gr for k, gr in zip(NAMES, grads)}}

    up = run(lambda x, dt, A, B, C, D, dt_bias, initial_state: combined(
        x, dt, A, B, C, chunk_up, D=D, dt_bias=dt_bias, initial_states=initial_state, dt_softplus=True,
        return_final_states=True))
    ours = run(lambda **kw: ssd_scan_triton(**kw, chunk_size=chunk_ours))
    diffs = {k: ((ours[k].double() - up[k].double()).abs().max() / up[k].double().abs().max()).item() for k in up}
    tol = args.tol if args.tol is not None else (1e-1 if args.dtype == "bf16" else 1e-2 if dev == "cuda" else 1e-4)
    out = {"device": dev, "dtype": args.dtype, "shape": dict(b=b, L=L, H=H, P=P, G=G, N=N),
           "chunk": {"ours": chunk_ours, "upstream": chunk_up}, "tol": tol, "rel_diff": diffs}
    print(json.dumps(out, indent=2))
    sys.exit(0 if all(v <= tol for v in diffs.values()) else 1)


if __name__ == "__main__":
    main()
