"""The SSD contract ops' ONNX function bodies (run by ONNX Runtime) against ops/ssd.py, op by op."""
from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from mamba_deploy.onnx import contract, functions  # noqa: E402
from mamba_deploy.ops.ssd import discretize_dt, ssd_scan_ref, ssd_state_update  # noqa: E402

from test_ssd import realistic_inputs  # noqa: E402

OPSET = 18
ONNX_DTYPE = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16}


def _session(spec, act, attrs):
    names_in = [p.name for p in spec.inputs]
    names_out = [p.name for p in spec.outputs]
    node = helper.make_node(spec.op_type, names_in, names_out, domain=contract.DOMAIN, **attrs)
    def info(p):
        dims = [d.replace("|", "_or_") for d in p.shape]
        return helper.make_tensor_value_info(p.name, act if p.dtype == "act" else TensorProto.FLOAT, dims)

    vi, vo = [info(p) for p in spec.inputs], [info(p) for p in spec.outputs]
    model = helper.make_model(helper.make_graph([node], "g", vi, vo), functions=functions.ssd_functions(OPSET),
                              opset_imports=[helper.make_opsetid("", OPSET),
                                             helper.make_opsetid(contract.DOMAIN, contract.DOMAIN_VERSION)],
                              ir_version=contract.IR_VERSION)
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _raw_dt(batch, L, H, seed):
    g = torch.Generator().manual_seed(seed)
    return 0.5 * torch.randn(batch, L, H, generator=g), torch.randn(H, generator=g) - 2.0


@pytest.mark.parametrize("act,D_per_channel,dt_limit,L", [
    (act, D_per_channel, dt_limit, 11) for act in (torch.float32, torch.float16) for D_per_channel in (False, True)
    for dt_limit in ((0.0, float("inf")), (0.05, 0.5))] + [
    (torch.float32, True, (0.0, float("inf")), 1),      # a single position
    (torch.float32, False, (0.05, 0.5), 150),           # 3 chunks of 64, the last padded
    (torch.float16, True, (0.0, float("inf")), 128)])   # exactly 2 chunks
def test_ssd_scan_and_step_bodies_match_reference(act, D_per_channel, dt_limit, L):
    b, H, P, G, N = 2, 4, 3, 2, 5
    a = realistic_inputs(b, L, H=H, P=P, G=G, N=N, seed=3)
    dt_raw, dt_bias = _raw_dt(b, L, H, seed=4)
    D = torch.randn(H, P) if D_per_channel else torch.randn(H, 1)
    x, B, C = a["x"].to(act), a["B"].to(act), a["C"].to(act)
    attrs = dict(dt_min=dt_limit[0], dt_max=dt_limit[1])
    # the reference sees exactly what the op sees: activations rounded to act, math in float64
    dt = discretize_dt(dt_raw.to(act).double(), dt_bias.double(), dt_limit, torch.float64)
    y_ref, h_ref = ssd_scan_ref(x.double(), dt, a["A"].double(), B.double(), C.double(), D.double(),
                                a["initial_state"].double())
    feeds = dict(x=x.numpy(), dt=dt_raw.to(act).numpy(), A=a["A"].numpy(), B=B.numpy(), C=C.numpy(),
                 D=D.numpy(), dt_bias=dt_bias.numpy(), ssm_state=a["initial_state"].numpy())
    y, h = _session(contract.SSD_SCAN, ONNX_DTYPE[act], attrs).run(None, feeds)
    tol = 1e-5 if act == torch.float32 else 2e-3
    scale = y_ref.abs().max().item()
    assert y.dtype == feeds["x"].dtype and h.dtype == np.float32
    assert np.abs(y.astype(np.float64) - y_ref.numpy()).max() <= tol * scale
    assert np.abs(h - h_ref.numpy()).max() <= 1e-5 * h_ref.abs().max().item()
    # the step op, one token from the same initial state
    step = _session(contract.SSD_SCAN_STEP, ONNX_DTYPE[act], attrs)
    y1, h1 = step.run(None, {**feeds, "x": feeds["x"][:, 0], "dt": feeds["dt"][:, 0], "B": feeds["B"][:, 0],
                             "C": feeds["C"][:, 0]})
    y1_ref, h1_ref = ssd_state_update(a["initial_state"].double(), x[:, 0].double(), dt[:, 0], a["A"].double(),
                                      B[:, 0].double(), C[:, 0].double(), D.double())
    assert np.abs(y1.astype(np.float64) - y1_ref.numpy()).max() <= tol * y1_ref.abs().max().item()
    assert np.abs(h1 - h1_ref.numpy()).max() <= 1e-5 * h1_ref.abs().max().item()
