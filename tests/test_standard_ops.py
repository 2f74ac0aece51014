"""The standard-op form (opset 27: LinearAttention, CausalConvWithState) run by ONNX Runtime against the PyTorch
references (ops/ssd.py, ops/selective_scan.py, ops/causal_conv.py), op by op."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from mamba_deploy.onnx import standard_ops  # noqa: E402
from mamba_deploy.onnx.export import GraphBuilder  # noqa: E402
from mamba_deploy.ops.causal_conv import causal_conv1d  # noqa: E402
from mamba_deploy.ops.selective_scan import selective_scan_ref  # noqa: E402
from mamba_deploy.ops.ssd import discretize_dt, ssd_scan_ref  # noqa: E402

if not hasattr(onnx.defs, "has") or not onnx.defs.has("LinearAttention"):
    pytest.skip("this onnx does not define opset 27's LinearAttention (needs onnx >= 1.23)", allow_module_level=True)


def _run(g: GraphBuilder, feeds: dict[str, np.ndarray], outputs: list[str]):
    inputs = [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in feeds.items()]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs]
    model = helper.make_model(helper.make_graph(g.nodes, "g", inputs, outs),
                              opset_imports=[helper.make_opsetid("", standard_ops.MIN_OPSET)],
                              ir_version=helper.find_min_ir_version_for([helper.make_opsetid("", 27)]))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(outputs, feeds)


def _builder():
    return GraphBuilder(types.SimpleNamespace(tensors={}))


def _err(a, ref):
    return np.abs(a - ref.numpy()).max() / max(ref.abs().max().item(), 1e-30)


@pytest.mark.parametrize("L,dt_limit", [(1, None), (13, None), (13, (0.01, 0.2))])
def test_ssd_as_linear_attention(L, dt_limit):
    b, H, P, G, N = 2, 4, 3, 2, 5
    rng = torch.Generator().manual_seed(L)
    x, B, C = torch.randn(b, L, H, P, generator=rng), torch.randn(b, L, G, N, generator=rng), \
        torch.randn(b, L, G, N, generator=rng)
    dt_raw, dt_bias = torch.randn(b, L, H, generator=rng), torch.randn(H, generator=rng) - 2
    A, D, h0 = -(1 + 15 * torch.rand(H, generator=rng)), torch.randn(H, 1, generator=rng), \
        torch.randn(b, H, P, N, generator=rng)
    g = _builder()
    dt = standard_ops.discretize(g, "dt_raw", "dt_bias", limit=dt_limit)
    y = standard_ops.ssd(g, "x", dt, "A", "B", "C", "D", "h0", "h1", H, P, G, N)
    g.op("Identity", [y], out="y")
    feeds = {k: v.numpy() for k, v in dict(x=x, dt_raw=dt_raw, dt_bias=dt_bias, A=A, B=B, C=C, D=D, h0=h0).items()}
    y_ort, h_ort = _run(g, feeds, ["y", "h1"])
    dt_ref = discretize_dt(dt_raw.double(), dt_bias.double(), dt_limit or (0.0, float("inf")), torch.float64)
    y_ref, h_ref = ssd_scan_ref(x.double(), dt_ref, A.double(), B.double(), C.double(), D.double(), h0.double())
    assert _err(y_ort, y_ref) <= 1e-5 and _err(h_ort, h_ref) <= 1e-5


@pytest.mark.parametrize("L", [1, 13])
def test_selective_scan_as_linear_attention(L):
    b, d, N = 2, 6, 4
    rng = torch.Generator().manual_seed(L)
    x, z, dt_raw = (torch.randn(b, L, d, generator=rng) for _ in range(3))
    B, C = torch.randn(b, L, N, generator=rng), torch.randn(b, L, N, generator=rng)
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(d, 1) * (0.5 + torch.rand(d, 1, generator=rng))
    D, dt_bias, h0 = torch.randn(d, generator=rng), torch.randn(d, generator=rng) - 2, torch.randn(b, d, N, generator=rng)
    g = _builder()
    dt = standard_ops.discretize(g, "dt_raw", "dt_bias")
    y = standard_ops.selective_scan(g, "x", dt, "A", "B", "C", "D", "z", "h0", "h1", d, N)
    g.op("Identity", [y], out="y")
    feeds = {k: v.numpy() for k, v in dict(x=x, z=z, dt_raw=dt_raw, dt_bias=dt_bias, A=A, B=B, C=C, D=D,
                                           h0=h0).items()}
    y_ort, h_ort = _run(g, feeds, ["y", "h1"])
    t = lambda v: v.double().transpose(1, 2)  # noqa: E731  [b, L, f] → [b, f, L]
    y_ref, h_ref = selective_scan_ref(t(x), t(dt_raw), A.double(), t(B), t(C), D.double(), t(z), dt_bias.double(),
                                      True, h0.double())
    assert _err(y_ort, y_ref.transpose(1, 2)) <= 1e-5 and _err(h_ort, h_ref) <= 1e-5


@pytest.mark.parametrize("L", [1, 2, 9])
def test_causal_conv_with_state_keeps_our_state_layout(L):
    b, c, k = 2, 5, 4
    rng = torch.Generator().manual_seed(L)
    u, w, bias, s0 = torch.randn(b, c, L, generator=rng), torch.randn(c, 1, k, generator=rng), \
        torch.randn(c, generator=rng), torch.randn(b, c, k, generator=rng)
    g = _builder()
    y = standard_ops.causal_conv(g, "u", "u", "s0", "s1", "w", "bias", k)
    g.op("Identity", [y], out="y")
    y_ort, s_ort = _run(g, {k_: v.numpy() for k_, v in dict(u=u, w=w, bias=bias, s0=s0).items()}, ["y", "s1"])
    y_ref, s_ref = causal_conv1d(u, s0, w, bias)
    assert np.abs(y_ort - y_ref.numpy()).max() <= 1e-5 and np.array_equal(s_ort, s_ref.numpy())
