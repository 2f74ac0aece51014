"""Triton SSD (Mamba-2) on a GPU: the compiled kernels vs the float64 sequential reference at real shapes.

Same reference, inputs and error measure as tests/test_triton_ssd.py (normwise max relative error per output and
gradient). Tolerances: fp32 1e-4 (tensor-core products in exact fp32); fp16 2e-2, bf16 8e-2 (operands rounded to
the activation dtype, fp32 accumulation, tf32 for the products with the fp32 states; L up to 4,096 sums more
rounded terms than the interpreter's tiny shapes). Every output buffer of the caching allocator is NaN-poisoned
first, so an element the kernels do not write shows. ``MAMBA_DEPLOY_GPU_REPORT`` names a JSON file that receives
every case's errors. Skipped without CUDA.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from test_triton_ssd import compare, make_inputs, run_with_grads, ssd_reference

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the compiled Triton SSD kernels run only on a GPU", allow_module_level=True)

from mamba_deploy.ops import triton_ssd  # noqa: E402

DEV = "cuda"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 8e-2}
RESULTS: dict = {}

# name -> (batch, H, P, G, N, D kind): the benchmark's head shape, a grouped odd one, a small-state one
SHAPES = {
    "h8p64g1n128": (2, 8, 64, 1, 128, "head"),
    "h6p48g3n64": (2, 6, 48, 3, 64, "channel"),
    "h4p24g2n17": (3, 4, 24, 2, 17, "head"),
}


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    path = os.environ.get("MAMBA_DEPLOY_GPU_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(RESULTS, f, indent=2)


def poison_allocator():
    torch.empty(256 << 20, device=DEV).fill_(float("nan"))       # freed blocks are reused by the next allocations


def check(name, inp, kw, dtype, config=None, chunk=None):
    ref = run_with_grads(ssd_reference, inp, **kw)
    poison_allocator()
    ours = run_with_grads(triton_ssd.ssd_scan_triton, inp, config=config, chunk_size=chunk, **kw)
    assert ours["y"].dtype == DTYPES[dtype] and ours["final_state"].dtype == torch.float32
    errs = compare(ours, ref)
    RESULTS[name] = errs
    bad = {k: v for k, v in errs.items() if not v <= TOL[dtype]}
    assert not bad, f"{name}: normwise relative error above {TOL[dtype]}: {bad}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("L", [1, 63, 64, 257, 2048])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gpu_matches_float64_reference(shape, L, dtype):
    batch, H, P, G, N, D_kind = SHAPES[shape]
    inp = make_inputs(batch, L, H, P, G, N, D_kind=D_kind, has_bias=True, has_h0=True, act_dtype=DTYPES[dtype],
                      device=DEV, seed=L + N)
    check(f"{shape} L={L} {dtype}", inp, dict(dt_softplus=True), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gpu_long_sequence_mamba2_init_ranges(dtype):
    """L = 4,096 with Mamba-2's initialisation ranges (dt in [1e-3, 0.1] through the bias, A = −U(1, 16)) and the
    dt_limit clamp of upstream's configs; no initial state, D per head."""
    batch, H, P, G, N = 1, 4, 64, 1, 128
    inp = make_inputs(batch, 4096, H, P, G, N, D_kind="head", has_bias=True, has_h0=False,
                      act_dtype=DTYPES[dtype], device=DEV, seed=4096)
    g = torch.Generator(device="cpu").manual_seed(1)
    dt0 = torch.exp(torch.rand(H, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    inp["dt_bias"] = (dt0 + torch.log(-torch.expm1(-dt0))).to(DEV)
    inp["dt"] = (torch.randn(batch, 4096, H, generator=g) * 0.5).to(DEV, DTYPES[dtype])
    inp["A"] = (-(1 + 15 * torch.rand(H, generator=g))).to(DEV)
    check(f"long L=4096 {dtype}", inp, dict(dt_softplus=True, dt_limit=(1e-3, 0.08)), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(triton_ssd.BENCH_CONFIGS))
def test_gpu_every_bench_config(name):
    """Every launch configuration the benchmark times (scripts/bench_ssd.py, bf16) is checked too, in bf16:
    L not a multiple of the chunk, grouped B/C (the options match the main test's, so compiled kernels are shared
    where a configuration does not change them)."""
    inp = make_inputs(2, 300, 8, 64, 2, 128, D_kind="head", has_bias=True, has_h0=True,
                      act_dtype=torch.bfloat16, device=DEV, seed=300)
    check(f"config {name} bf16", inp, dict(dt_softplus=True), "bf16", config=triton_ssd.BENCH_CONFIGS[name])


@pytest.mark.gpu
def test_gpu_gradient_of_final_state_only_and_no_grad_forward():
    """Backward with only the final state used (dy = None inside autograd), and a forward under no_grad (nothing
    saved) equal to the forward with grad."""
    inp = make_inputs(2, 200, 4, 32, 1, 64, D_kind="head", has_bias=True, has_h0=True, act_dtype=torch.float32,
                      device=DEV, seed=9)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inp.items()}
    _, hT = triton_ssd.ssd_scan_triton(**leaves)
    g_ours = torch.autograd.grad(hT.sum(), [leaves["x"], leaves["initial_state"]])
    ref_leaves = {k: v.double().requires_grad_(True) for k, v in inp.items()}
    _, hT_ref = ssd_reference(**ref_leaves)
    g_ref = torch.autograd.grad(hT_ref.sum(), [ref_leaves["x"], ref_leaves["initial_state"]])
    for a, b in zip(g_ours, g_ref):
        assert (a.double() - b).abs().max() <= 1e-4 * b.abs().max()
    with torch.no_grad():
        y0, h0 = triton_ssd.ssd_scan_triton(**inp)
    y1, h1 = triton_ssd.ssd_scan_triton(**leaves)
    assert torch.equal(y0, y1.detach()) and torch.equal(h0, h1.detach())
