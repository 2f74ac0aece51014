"""The chunked prefill scan (SelectiveScan's default ONNX function body) against the sequential one it replaced
and against float64 references, in ONNX Runtime, at sequence lengths 1, 7, 257 and 4096 from a non-zero state:
the op alone (random inputs spanning the softplus threshold) and whole artifacts (logits and final states)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from mamba_deploy.checkpoint import load_model
from mamba_deploy.model import MambaState
from mamba_deploy.onnx import contract
from mamba_deploy.onnx.export import export
from mamba_deploy.onnx.functions import selective_scan_function
from mamba_deploy.ops.selective_scan import selective_scan_ref
from mamba_deploy.runtime.ort_session import OrtSession

LENGTHS = [1, 7, 257, 4096]
REL = 1e-5   # fp32: the two algorithms differ only in summation order


def rel_err(actual, reference) -> float:
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(actual - reference).max() / max(np.abs(reference).max(), 1e-30))


def scan_session(algorithm: str) -> ort.InferenceSession:
    """A model of one SelectiveScan node (fp32) whose function body is ``algorithm``."""
    spec = contract.SELECTIVE_SCAN
    node = helper.make_node(spec.op_type, [p.name for p in spec.inputs], [p.name for p in spec.outputs],
                            domain=contract.DOMAIN)
    vi = lambda p: helper.make_tensor_value_info(p.name, TensorProto.FLOAT, list(p.shape))  # noqa: E731
    graph = helper.make_graph([node], "op", [vi(p) for p in spec.inputs], [vi(p) for p in spec.outputs])
    model = helper.make_model(graph, ir_version=contract.IR_VERSION,
                              functions=[selective_scan_function(contract.DEFAULT_OPSET, algorithm)],
                              opset_imports=[helper.make_opsetid("", contract.DEFAULT_OPSET),
                                             helper.make_opsetid(contract.DOMAIN, contract.DOMAIN_VERSION)])
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def scan_sessions():
    return {a: scan_session(a) for a in ("chunked", "sequential")}


@pytest.mark.parametrize("L", LENGTHS)
def test_chunked_scan_op_equals_sequential_and_float64(scan_sessions, L):
    g = torch.Generator().manual_seed(L)
    b, d, N = 2, 24, 16
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    delta = r(b, d, L) * 4 - 2                   # δ_raw + bias from ≈ −15 (δ ≈ 3e-7) to past the threshold 20
    delta[0, 0, : min(L, 3)] = 30.0
    feeds = dict(x=r(b, d, L), delta=delta, A=-torch.exp(r(d, N)), B=r(b, N, L), C=r(b, N, L), D=r(d),
                 delta_bias=r(d), z=r(b, d, L), ssm_state=r(b, d, N) * 3)          # non-zero initial state
    np_feeds = {k: v.numpy() for k, v in feeds.items()}
    y_c, h_c = scan_sessions["chunked"].run(None, np_feeds)
    y_s, h_s = scan_sessions["sequential"].run(None, np_feeds)
    assert np.isfinite(y_c).all() and np.isfinite(h_c).all()
    assert rel_err(y_c, y_s) <= REL and rel_err(h_c, h_s) <= REL
    f64 = {k: v.double() for k, v in feeds.items()}
    y_ref, h_ref = selective_scan_ref(f64["x"], f64["delta"], f64["A"], f64["B"], f64["C"], f64["D"], f64["z"],
                                      f64["delta_bias"], True, f64["ssm_state"])
    assert rel_err(y_c, y_ref) <= REL and rel_err(h_c, h_ref) <= REL
    # the initial state matters (a scan that ignored it would fail here)
    y_zero = scan_sessions["chunked"].run(None, {**np_feeds, "ssm_state": 0 * np_feeds["ssm_state"]})[0]
    assert rel_err(y_zero[..., :1], y_ref[..., :1]) > 1e-3


def test_chunked_body_has_few_loops_and_no_sequence_length():
    fn = selective_scan_function(contract.DEFAULT_OPSET, "chunked")
    scans = [n for n in fn.node if n.op_type == "Scan"]
    assert len(scans) == 3                                      # local scans, chunk carry, re-scan
    assert all(len(next(a.g for a in s.attribute if a.name == "body").node) <= 12 for s in scans)
    assert not [n for n in fn.node if n.op_type in ("Loop", "Softplus")]


@pytest.fixture(scope="module")
def artifacts(tiny_checkpoint, tmp_path_factory):
    ckpt = tiny_checkpoint("state-spaces", seed=3)
    root = tmp_path_factory.mktemp("chunked")
    return ckpt, {a: export(ckpt, root / a, prefill_scan=a) for a in ("chunked", "sequential")}


@pytest.mark.parametrize("L", LENGTHS)
def test_chunked_prefill_artifact_equals_sequential(artifacts, L):
    ckpt, arts = artifacts
    sessions = {a: OrtSession(p) for a, p in arts.items()}
    assert sessions["chunked"].manifest["custom_ops"][1]["algorithm"] == "chunked"
    g = torch.Generator().manual_seed(L)
    warm = torch.randint(0, 96, (2, 5), generator=g)
    ids = torch.randint(0, 96, (2, L), generator=g)
    _, state = sessions["sequential"].prefill(warm)             # a non-zero state to start from
    assert all(s.abs().max() > 0 for s in state.ssm)
    out = {a: s.prefill(ids, state) for a, s in sessions.items()}
    (lc, sc), (ls, ss) = out["chunked"], out["sequential"]
    assert rel_err(lc, ls) <= REL
    for a, b in zip(sc.ssm + sc.conv, ss.ssm + ss.conv):
        assert rel_err(a, b) <= REL
    # an independent reference: the PyTorch model from the same state, in float64
    model = load_model(ckpt, dtype="fp32", scan_backend="reference").double().eval()
    with torch.no_grad():
        ref_logits, ref_state = model(ids, MambaState([c.double() for c in state.conv],
                                                      [s.double() for s in state.ssm]))
    assert rel_err(lc, ref_logits[:, -1]) <= REL
    assert rel_err(sc.ssm[-1], ref_state.ssm[-1]) <= REL
