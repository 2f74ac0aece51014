"""The TensorRT plugin's CUDA kernels (plugins/selective_scan.cu) through their C ABI, on a GPU.

Ground truth: ``mamba_deploy.ops`` reference math (selective_scan_ref / selective_state_update) run in float64 on
the *same* (already rounded) inputs, so the only differences are the kernel's fp32 arithmetic and the rounding of
y to the activation dtype. Error measure: normwise relative error max|out − ref| / max|ref| per tensor.
Tolerances: fp32 y and state 1e-5; fp16 y 1e-3 (fp16 rounding is 4.9e-4), bf16 y 8e-3 (bf16 rounding 3.9e-3);
the fp32 state 1e-5 for every activation dtype (inputs are exact in fp32).
Outputs are poisoned with NaN before every launch. Skipped without a CUDA device or without nvcc.

Also: the plugin's enqueue logic (``ScanOpLogic.enqueue``, what the TensorRT plugin's ``enqueue`` calls) with
fake tensor descriptors and raw device pointers — TensorRT itself is not installed on our GPU machines, so the
pybind trampoline of ``IPluginV3OneRuntime.enqueue`` is not exercised here.
"""
from __future__ import annotations

import pytest
import torch

from helpers import KERNEL_DTYPES as DTYPES
from helpers import KERNEL_STATE_TOL as STATE_TOL
from helpers import KERNEL_Y_TOL as Y_TOL
from helpers import enqueue_on_stream, kernel_module_setup, max_rel, poisoned, scan_inputs
from mamba_deploy.ops import selective_scan_ref, selective_state_update

kernels, RESULTS, library = kernel_module_setup("MAMBA_DEPLOY_GPU_REPORT")
from mamba_deploy.trt.plugin import ScanOpLogic  # noqa: E402

DEV = "cuda"
rel_err = max_rel      # normwise: max|out − ref| / max|ref|; NaN (a poisoned element left unwritten) fails


def make_inputs(b, d, N, L, dtype, seed=0, large_delta=True):
    """Realistic Mamba ranges (tests/helpers.py ``scan_inputs``) on the GPU, named as the kernels' ABI (x, state);
    ``large_delta`` exercises the softplus threshold (δ_raw + bias > 20 → δ = δ_raw + bias)."""
    t = scan_inputs(b, d, N, L, seed=seed, dtype=dtype, device=DEV, dist="s4d-jitter", large_delta=large_delta)
    t["x"], t["state"] = t.pop("u"), t.pop("initial_state")
    return t


def ref64(t, L, softplus=True, D=True, z=True):
    f = {k: v.double() for k, v in t.items()}
    if L is None:
        return selective_state_update(f["state"], f["x"], f["delta"], f["A"], f["B"], f["C"],
                                      D=f["D"] if D else None, z=f["z"] if z else None,
                                      delta_bias=f["delta_bias"], delta_softplus=softplus)
    return selective_scan_ref(f["x"], f["delta"], f["A"], f["B"], f["C"], D=f["D"] if D else None,
                              z=f["z"] if z else None, delta_bias=f["delta_bias"], delta_softplus=softplus,
                              initial_state=f["state"])


def run_kernel(t, L, in_place=False, softplus=True, D=True, z=True):
    state_out = t["state"].clone() if in_place else poisoned(t["state"])
    state_in = state_out if in_place else t["state"]
    y = poisoned(t["x"])
    args = dict(D=t["D"] if D else None, z=t["z"] if z else None, delta_bias=t["delta_bias"],
                delta_softplus=softplus, out_state=state_out, out=y)
    if L is None:
        kernels.selective_state_update_cuda(state_in, t["x"], t["delta"], t["A"], t["B"], t["C"], **args)
    else:
        kernels.selective_scan_cuda(t["x"], t["delta"], t["A"], t["B"], t["C"], initial_state=state_in, **args)
    torch.cuda.synchronize()
    return y, state_out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("N", [1, 16, 17, 64, 256])
def test_step_kernel_matches_float64_reference(dtype, N):
    _check_kernel("step", f"{dtype} N={N}", dtype, make_inputs(3, 37, N, None, DTYPES[dtype], seed=N), None)


def _check_kernel(kind: str, key: str, dtype: str, t: dict, L) -> None:
    """Run the kernel on ``t`` and compare y and the final state with the float64 reference; record the errors."""
    y, h = run_kernel(t, L)
    y_ref, h_ref = ref64(t, L)
    ey, eh = rel_err(y, y_ref), rel_err(h, h_ref)
    RESULTS.setdefault(kind, {})[key] = {"y_rel": ey, "state_rel": eh}
    assert ey <= Y_TOL[dtype], f"y rel err {ey:.2e} > {Y_TOL[dtype]}"
    assert eh <= STATE_TOL, f"state rel err {eh:.2e} > {STATE_TOL}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("L", [1, 7, 129])
@pytest.mark.parametrize("N", [1, 16, 17, 64, 256])
def test_scan_kernel_matches_float64_reference(dtype, L, N):
    _check_kernel("scan", f"{dtype} N={N} L={L}", dtype, make_inputs(3, 37, N, L, DTYPES[dtype], seed=1000 * N + L),
                  L)


@pytest.mark.gpu
def test_scan_kernel_long_and_wide():
    """Many time chunks and several blocks per batch element (d = 300 → 38 blocks of 8 rows at N = 16)."""
    t = make_inputs(2, 300, 16, 1000, torch.float32, seed=7)
    y, h = run_kernel(t, 1000)
    y_ref, h_ref = ref64(t, 1000)
    ey, eh = rel_err(y, y_ref), rel_err(h, h_ref)
    RESULTS["scan_long"] = {"shape": "b=2 d=300 N=16 L=1000 fp32", "y_rel": ey, "state_rel": eh}
    assert ey <= Y_TOL["fp32"] and eh <= STATE_TOL, (ey, eh)


@pytest.mark.gpu
@pytest.mark.parametrize("L", [None, 7])
def test_in_place_state(L):
    for dtype in DTYPES:
        t = make_inputs(3, 37, 17, L, DTYPES[dtype], seed=3)
        y, h = run_kernel(t, L, in_place=True)
        y_ref, h_ref = ref64(t, L)
        assert rel_err(h, h_ref) <= STATE_TOL
        assert rel_err(y, y_ref) <= Y_TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("L", [None, 7])
def test_optional_inputs_and_no_softplus(L):
    t = make_inputs(3, 37, 16, L, torch.float32, seed=5, large_delta=False)
    t["delta"] = t["delta"].abs()  # without softplus δ must stay positive for a stable recurrence
    t["delta_bias"] = t["delta_bias"].abs() * 0 + 0.01
    y, h = run_kernel(t, L, softplus=False, D=False, z=False)
    y_ref, h_ref = ref64(t, L, softplus=False, D=False, z=False)
    assert rel_err(y, y_ref) <= Y_TOL["fp32"] and rel_err(h, h_ref) <= STATE_TOL


@pytest.mark.gpu
def test_zero_sizes_and_bad_arguments():
    t = make_inputs(1, 8, 16, 4, torch.float32)
    ptrs = dict(x=t["x"].data_ptr(), delta=t["delta"].data_ptr(), A=t["A"].data_ptr(), B=t["B"].data_ptr(),
                C=t["C"].data_ptr(), state_in=t["state"].data_ptr(), state_out=t["state"].data_ptr(),
                y=t["x"].data_ptr())
    kernels.launch_scan(ptrs, 0, 8, 4, 16, kernels.F32)  # empty batch: nothing to do, no error
    with pytest.raises(RuntimeError, match="CUDA error 1"):
        kernels.launch_scan(ptrs, 1, 8, 4, 257, kernels.F32)  # d_state above 256
    with pytest.raises(RuntimeError, match="CUDA error 1"):
        kernels.launch_step(ptrs, 1, 8, 16, 7)  # unknown dtype code


@pytest.mark.gpu
def test_rollout_1000_steps_drift():
    """1,000 decode steps feeding the kernel's own state back (fp32), against a float64 rollout of the same
    inputs; and the scan kernel over the same 1,000 tokens against the step rollout."""
    b, d, N, T = 2, 64, 16, 1000
    seq = make_inputs(b, d, N, T, torch.float32, seed=11, large_delta=False)
    h = seq["state"].clone()
    h64 = seq["state"].double()
    f64 = {k: v.double() for k, v in seq.items()}
    worst_y, ys = 0.0, []
    for i in range(T):
        step = {k: seq[k][..., i].contiguous() for k in ("x", "delta", "B", "C", "z")}
        y, h = kernels.selective_state_update_cuda(h, step["x"], step["delta"], seq["A"], step["B"], step["C"],
                                                   D=seq["D"], z=step["z"], delta_bias=seq["delta_bias"],
                                                   out_state=h)  # in place, as the TensorRT state ping-pong does
        y64, h64 = selective_state_update(h64, f64["x"][..., i], f64["delta"][..., i], f64["A"], f64["B"][..., i],
                                          f64["C"][..., i], D=f64["D"], z=f64["z"][..., i],
                                          delta_bias=f64["delta_bias"])
        worst_y = max(worst_y, rel_err(y, y64))
        ys.append(y)
    drift = rel_err(h, h64)
    y_scan, h_scan = run_kernel(seq, T)
    scan_vs_step = rel_err(y_scan, torch.stack(ys, -1))
    RESULTS["rollout_1000"] = {"shape": f"b={b} d={d} N={N} fp32", "max_y_rel_over_steps": worst_y,
                               "final_state_rel": drift, "scan_vs_step_y_rel": scan_vs_step,
                               "scan_final_state_rel": rel_err(h_scan, h64)}
    print("rollout:", RESULTS["rollout_1000"])
    assert worst_y <= 1e-5 and drift <= 1e-5 and scan_vs_step <= 1e-5


# ---- the plugin's enqueue path ------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("op_type,L", [("SelectiveScanStep", None), ("SelectiveScan", 129)])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_plugin_enqueue_with_device_pointers(op_type, L, dtype):
    """``ScanOpLogic.enqueue`` — the body of the TensorRT plugin's enqueue — on fake descriptors and raw device
    pointers, on a non-default stream, with the plugin fields as an ONNX node would set them."""
    t = make_inputs(3, 37, 17, L, DTYPES[dtype], seed=21)
    logic = ScanOpLogic(op_type, {"delta_softplus": [1], "softplus_threshold": [20.0]})
    order = [t["x"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["delta_bias"], t["z"], t["state"]]
    y, h = poisoned(t["x"]), poisoned(t["state"])
    assert enqueue_on_stream(logic, order, [y, h]) == 0
    y_ref, h_ref = ref64(t, L)
    ey, eh = rel_err(y, y_ref), rel_err(h, h_ref)
    RESULTS.setdefault("plugin_enqueue", {})[f"{op_type} {dtype}"] = {"y_rel": ey, "state_rel": eh}
    assert ey <= Y_TOL[dtype] and eh <= STATE_TOL, (ey, eh)


@pytest.mark.gpu
def test_tensorrt_plugin_class_enqueue():
    """The IPluginV3 object itself, when a TensorRT Python module is importable on this machine."""
    from mamba_deploy.trt import compat
    if not compat.available():
        pytest.skip("neither tensorrt nor tensorrt_rtx is importable here: the IPluginV3 trampoline is untested "
                    "on this machine (ScanOpLogic.enqueue above is what it calls)")
    trt = compat.tensorrt()
    from mamba_deploy.trt.plugin import plugin_classes
    plugin_cls, creator_cls = plugin_classes(trt)
    creator = creator_cls("SelectiveScanStep")
    plugin = creator.create_plugin("p", trt.PluginFieldCollection([]), trt.TensorRTPhase.RUNTIME)
    t = make_inputs(3, 37, 17, None, torch.float32, seed=22)
    order = [t["x"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["delta_bias"], t["z"], t["state"]]
    y, h = poisoned(t["x"]), poisoned(t["state"])
    descs = []
    for v in order + [y, h]:
        pd = trt.PluginTensorDesc()
        pd.dims = trt.Dims(tuple(v.shape))
        pd.type = trt.DataType.FLOAT
        pd.format = trt.TensorFormat.LINEAR
        descs.append(pd)
    plugin.enqueue(descs[:9], descs[9:], [v.data_ptr() for v in order], [y.data_ptr(), h.data_ptr()], 0,
                   torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    y_ref, h_ref = ref64(t, None)
    assert rel_err(y, y_ref) <= 1e-5 and rel_err(h, h_ref) <= STATE_TOL
