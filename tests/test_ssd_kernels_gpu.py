"""The Mamba-2 plugin kernels (plugins/ssd.cu) through their C ABI, on a GPU.

Ground truth: the float64 sequential recurrence ``ssd_reference`` (tests/test_triton_ssd.py) on the *same* (already
rounded) inputs, so the only differences are the kernels' fp32 arithmetic and the rounding of y to the activation
dtype. Error measure: normwise relative error max|out − ref| / max|ref| per tensor. Tolerances as for the Mamba-1
kernels (tests/test_plugin_kernels_gpu.py): fp32 y and state 1e-5; fp16 y 1e-3 (fp16 rounding 4.9e-4), bf16 y
8e-3 (bf16 rounding 3.9e-3); the fp32 state 1e-5 for every activation dtype. Outputs are poisoned with NaN before
every launch. Inputs in Mamba-2's ranges: dt = softplus(dt_raw + dt_bias) with dt_bias from dt in [1e-3, 0.1]
(upstream's init), A = −U(1, 16). ``MAMBA_DEPLOY_GPU_REPORT_SSD`` names a JSON file for every case's errors.
Skipped without a CUDA device or without nvcc.
"""
from __future__ import annotations

import math

import pytest
import torch

from helpers import KERNEL_DTYPES as DTYPES
from helpers import KERNEL_STATE_TOL as STATE_TOL
from helpers import KERNEL_Y_TOL as Y_TOL
from helpers import enqueue_on_stream, kernel_module_setup, max_rel, poisoned
from test_triton_ssd import ssd_reference

kernels, RESULTS, library = kernel_module_setup("MAMBA_DEPLOY_GPU_REPORT_SSD")

DEV = "cuda"
rel_err = max_rel      # normwise: max|out − ref| / max|ref|; NaN (a poisoned element left unwritten) fails


def make_inputs(b, L, H, P, G, N, dtype, seed=0, D_kind="head", large_dt=True):
    """Sequence inputs [b, L, ...] (a decode step takes one position of them)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(DEV)

    dt0 = torch.exp(torch.rand(H, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    dt_bias = (dt0 + torch.log(-torch.expm1(-dt0))).to(DEV)                  # inverse softplus, as upstream's init
    dt = r(b, L, H, scale=0.5)
    if large_dt:  # exercise the softplus threshold (dt_raw + bias > 20 → dt = dt_raw + bias)
        dt.view(-1)[::13] = 25.0
    D = {"none": None, "head": r(H), "head1": r(H, 1), "channel": r(H, P)}[D_kind]
    t = dict(x=r(b, L, H, P), dt=dt, A=(-(1 + 15 * torch.rand(H, generator=g))).to(DEV),
             B=r(b, L, G, N), C=r(b, L, G, N), D=D,
             dt_bias=dt_bias, state=r(b, H, P, N))
    for k in ("x", "dt", "B", "C"):
        t[k] = t[k].to(dtype).contiguous()
    return t


def ref64(t, softplus=True, dt_limit=(0.0, math.inf)):
    f = {k: (v.double() if v is not None else None) for k, v in t.items()}
    return ssd_reference(f["x"], f["dt"], f["A"], f["B"], f["C"], D=f["D"], dt_bias=f["dt_bias"],
                         initial_state=f["state"], dt_softplus=softplus, dt_limit=dt_limit)


def run_kernel(t, step: bool, in_place=False, softplus=True, dt_limit=(0.0, math.inf), threshold=None):
    state_out = t["state"].clone() if in_place else poisoned(t["state"])
    state_in = state_out if in_place else t["state"]
    kw = dict(D=t["D"], dt_bias=t["dt_bias"], dt_softplus=softplus, dt_limit=dt_limit, out_state=state_out)
    if threshold is not None:
        kw["softplus_threshold"] = threshold
    if step:
        one = {k: t[k][:, 0].contiguous() for k in ("x", "dt", "B", "C")}
        y = poisoned(one["x"])
        kernels.ssd_state_update_cuda(state_in, one["x"], one["dt"], t["A"], one["B"], one["C"], out=y, **kw)
        y = y[:, None]
    else:
        y = poisoned(t["x"])
        kernels.ssd_scan_cuda(t["x"], t["dt"], t["A"], t["B"], t["C"], initial_state=state_in, out=y, **kw)
    torch.cuda.synchronize()
    return y, state_out


def check(name, t, y, h, dtype, **ref_kw):
    y_ref, h_ref = ref64(t, **ref_kw)
    ey, eh = rel_err(y, y_ref), rel_err(h, h_ref)
    RESULTS[name] = {"y_rel": ey, "state_rel": eh}
    assert ey <= Y_TOL[dtype], f"{name}: y rel err {ey:.2e} > {Y_TOL[dtype]}"
    assert eh <= STATE_TOL, f"{name}: state rel err {eh:.2e} > {STATE_TOL}"


# (H, P, G, N, D kind): odd head dims and state sizes, grouped B/C, every dispatch branch of N
SHAPES = [(3, 5, 1, 1, "head"), (4, 24, 2, 16, "channel"), (6, 37, 3, 17, "head1"), (8, 64, 1, 64, "none"),
          (4, 64, 2, 128, "head"), (2, 33, 1, 256, "channel")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=[f"H{s[0]}P{s[1]}G{s[2]}N{s[3]}D{s[4]}" for s in SHAPES])
def test_step_kernel_matches_float64_reference(shape, dtype):
    H, P, G, N, D_kind = shape
    t = make_inputs(3, 1, H, P, G, N, DTYPES[dtype], seed=N + P, D_kind=D_kind)
    y, h = run_kernel(t, step=True)
    check(f"step {dtype} H={H} P={P} G={G} N={N} D={D_kind}", t, y, h, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("L", [1, 7, 129])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"H{s[0]}P{s[1]}G{s[2]}N{s[3]}D{s[4]}" for s in SHAPES])
def test_scan_kernel_matches_float64_reference(shape, L, dtype):
    H, P, G, N, D_kind = shape
    t = make_inputs(2, L, H, P, G, N, DTYPES[dtype], seed=1000 * N + L, D_kind=D_kind)
    y, h = run_kernel(t, step=False)
    check(f"scan {dtype} L={L} H={H} P={P} G={G} N={N} D={D_kind}", t, y, h, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_scan_kernel_real_shape(dtype):
    """The benchmark model's layer shape (32 heads × 64, d_state 128, 1 group) at L = 2,048, batch 2."""
    t = make_inputs(2, 2048, 32, 64, 1, 128, DTYPES[dtype], seed=2048)
    y, h = run_kernel(t, step=False)
    check(f"scan real shape {dtype} b=2 L=2048 H=32 P=64 N=128", t, y, h, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("step", [True, False], ids=["step", "scan"])
def test_in_place_state(step):
    for dtype in DTYPES:
        t = make_inputs(3, 1 if step else 7, 4, 24, 2, 17, DTYPES[dtype], seed=3)
        y, h = run_kernel(t, step=step, in_place=True)
        check(f"in-place {'step' if step else 'scan'} {dtype}", t, y, h, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("step", [True, False], ids=["step", "scan"])
def test_optional_inputs_no_softplus_and_clamp(step):
    t = make_inputs(3, 1 if step else 40, 4, 24, 2, 16, torch.float32, seed=5, D_kind="none", large_dt=False)
    t["dt_bias"] = None
    t["dt"] = t["dt"].abs() * 0.1                       # used as is without softplus: keep it positive
    y, h = run_kernel(t, step=step, softplus=False)
    check(f"no bias/D/softplus {'step' if step else 'scan'}", t, y, h, "fp32", softplus=False)
    t = make_inputs(3, 1 if step else 40, 4, 24, 2, 16, torch.float32, seed=6)
    y, h = run_kernel(t, step=step, dt_limit=(0.01, 0.05))   # the clamp binds on both sides
    check(f"dt_limit {'step' if step else 'scan'}", t, y, h, "fp32", dt_limit=(0.01, 0.05))
    # softplus threshold 2 (the contract's attribute): dt_raw + bias above it is used as is
    t = make_inputs(3, 1 if step else 40, 4, 24, 2, 16, torch.float32, seed=7, large_dt=False)
    t["dt"] = t["dt"] * 3
    t["dt"].view(-1)[::5] = 9.0                          # dt_raw + bias ∈ [2.1, 6.8]: past the threshold
    y, h = run_kernel(t, step=step, threshold=2.0)
    raw = t["dt"].double() + t["dt_bias"].double()
    assert (raw > 2).any() and (raw < 2).any()
    ref_in = {**t, "dt": torch.nn.functional.softplus(raw, threshold=2.0), "dt_bias": None}
    check(f"softplus threshold 2 {'step' if step else 'scan'}", ref_in, y, h, "fp32", softplus=False)


@pytest.mark.gpu
def test_zero_sizes_and_bad_arguments():
    t = make_inputs(1, 4, 4, 8, 2, 16, torch.float32)
    ptrs = dict(x=t["x"].data_ptr(), dt=t["dt"].data_ptr(), A=t["A"].data_ptr(), B=t["B"].data_ptr(),
                C=t["C"].data_ptr(), state_in=t["state"].data_ptr(), state_out=t["state"].data_ptr(),
                y=t["x"].data_ptr())
    kernels.launch_ssd_scan(ptrs, 0, 4, 4, 8, 2, 16, kernels.F32)       # empty batch: nothing to do, no error
    out = poisoned(t["state"])
    kernels.launch_ssd_scan({**ptrs, "state_out": out.data_ptr()}, 1, 0, 4, 8, 2, 16, kernels.F32)   # L = 0
    torch.cuda.synchronize()
    assert torch.equal(out, t["state"]), "an empty sequence must copy the initial state to the final state"
    with pytest.raises(RuntimeError, match="CUDA error 1"):
        kernels.launch_ssd_scan(ptrs, 1, 4, 4, 8, 2, 257, kernels.F32)   # d_state above 256
    with pytest.raises(RuntimeError, match="CUDA error 1"):
        kernels.launch_ssd_scan(ptrs, 1, 4, 4, 8, 3, 16, kernels.F32)    # 3 groups do not divide 4 heads
    with pytest.raises(RuntimeError, match="CUDA error 1"):
        kernels.launch_ssd_step(ptrs, 1, 4, 8, 2, 16, 7)                  # unknown dtype code


@pytest.mark.gpu
def test_rollout_1000_steps_drift():
    """1,000 decode steps feeding the kernel's own state back in place (fp32), against the float64 recurrence
    over the same 1,000 tokens; and the scan kernel over those tokens against the step rollout."""
    b, T, H, P, G, N = 2, 1000, 8, 32, 2, 64
    seq = make_inputs(b, T, H, P, G, N, torch.float32, seed=11, large_dt=False)
    y64, h64 = ref64(seq)
    h = seq["state"].clone()
    ys = []
    for i in range(T):
        one = {k: seq[k][:, i].contiguous() for k in ("x", "dt", "B", "C")}
        y, h = kernels.ssd_state_update_cuda(h, one["x"], one["dt"], seq["A"], one["B"], one["C"], D=seq["D"],
                                             dt_bias=seq["dt_bias"], out_state=h)   # in place, as TensorRT does
        ys.append(y)
    ys = torch.stack(ys, 1)
    worst_y = max(rel_err(ys[:, i], y64[:, i]) for i in range(T))
    drift = rel_err(h, h64)
    y_scan, h_scan = run_kernel(seq, step=False)
    RESULTS["rollout_1000"] = {"shape": f"b={b} H={H} P={P} G={G} N={N} fp32", "max_y_rel_over_steps": worst_y,
                               "final_state_rel": drift, "scan_vs_step_y_rel": rel_err(y_scan, ys),
                               "scan_final_state_rel": rel_err(h_scan, h64)}
    print("rollout:", RESULTS["rollout_1000"])
    assert worst_y <= 1e-5 and drift <= 1e-5
    r = RESULTS["rollout_1000"]
    assert r["scan_vs_step_y_rel"] <= 1e-5 and r["scan_final_state_rel"] <= 1e-5


# ---- the plugin's enqueue path ------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("op_type", ["SSDScanStep", "SSDScan"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_plugin_enqueue_with_device_pointers(op_type, dtype):
    """``ScanOpLogic.enqueue`` — the body of the TensorRT plugin's enqueue — for the Mamba-2 ops on fake
    descriptors and raw device pointers, on a non-default stream, fields as an exported node sets them (D as the
    contract's [H, 1])."""
    from mamba_deploy.trt.plugin import ScanOpLogic
    step = op_type == "SSDScanStep"
    t = make_inputs(3, 1 if step else 129, 4, 24, 2, 17, DTYPES[dtype], seed=21, D_kind="head1")
    logic = ScanOpLogic(op_type, {"dt_softplus": [1], "softplus_threshold": [20.0], "dt_min": [0.0],
                                  "dt_max": [float("inf")]})
    xs = {k: (t[k][:, 0].contiguous() if step else t[k]) for k in ("x", "dt", "B", "C")}
    order = [xs["x"], xs["dt"], t["A"], xs["B"], xs["C"], t["D"], t["dt_bias"], t["state"]]
    y, h = poisoned(xs["x"]), poisoned(t["state"])
    assert enqueue_on_stream(logic, order, [y, h]) == 0
    check(f"plugin enqueue {op_type} {dtype}", t, y[:, None] if step else y, h, dtype)
