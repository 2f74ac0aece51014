"""The ONNX artifact: graph structure (one custom node per layer, function bodies of standard ops, a Scan whose
size does not depend on seq), onnx.checker, the manifest, and the `export` command's behaviour on bad input."""
from __future__ import annotations

import collections
import hashlib
import json

import onnx
import pytest
from click.testing import CliRunner

from mamba_deploy import artifact
from mamba_deploy.artifact import WEIGHTS_FILE, read_manifest
from mamba_deploy.cli import main
from mamba_deploy.onnx import contract
from mamba_deploy.onnx.export import export, max_opset
from mamba_deploy.onnx.functions import is_standard_domain

N_LAYER = 2  # conftest.TINY


@pytest.fixture(scope="module")
def artifacts(tiny_checkpoint, tmp_path_factory):
    """Factory: the artifact of a tiny checkpoint (fmt, dtype, opset, all_logits), exported once per arguments."""
    cache = {}

    def make(fmt="state-spaces", dtype=None, opset=contract.DEFAULT_OPSET, all_logits=False):
        key = (fmt, dtype, opset, all_logits)
        if key not in cache:
            out = tmp_path_factory.mktemp("art") / f"tiny-{fmt}-{dtype}-{opset}-{int(all_logits)}"
            cache[key] = export(tiny_checkpoint(fmt), out, dtype=dtype, opset=opset, all_logits=all_logits)
        return cache[key]

    return make


def load(artifact, graph):
    return onnx.load(str(artifact / graph), load_external_data=False)


def all_nodes(nodes):
    """Nodes and, recursively, the nodes of their subgraphs (Scan/Loop bodies)."""
    for node in nodes:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(attr.g.node)


@pytest.mark.parametrize("fmt", ["state-spaces", "hf"])
@pytest.mark.parametrize("dtype", [None, "fp16", "bf16"])
def test_checker_and_one_custom_node_per_layer(artifacts, fmt, dtype):
    art = artifacts(fmt, dtype)
    for graph, op in ((artifact.STEP_GRAPH, "SelectiveScanStep"), (artifact.PREFILL_GRAPH, "SelectiveScan")):
        onnx.checker.check_model(str(art / graph), full_check=True)
        model = load(art, graph)
        assert model.ir_version == contract.IR_VERSION
        assert {o.domain: o.version for o in model.opset_import} == {"": contract.DEFAULT_OPSET,
                                                                     contract.DOMAIN: contract.DOMAIN_VERSION}
        custom = [n for n in model.graph.node if n.domain == contract.DOMAIN]
        assert collections.Counter(n.op_type for n in custom) == {op: N_LAYER}
        spec = contract.OPS[op]
        for node in custom:
            assert len(node.input) == len(spec.inputs) and len(node.output) == len(spec.outputs)
            assert {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} == spec.attributes
        # every other node is a standard op; the weights are external (one file shared by both graphs)
        assert all(is_standard_domain(n.domain) for n in model.graph.node if n.domain != contract.DOMAIN)
        assert model.graph.initializer and all(
            t.data_location == onnx.TensorProto.EXTERNAL and t.external_data[0].value == WEIGHTS_FILE
            for t in model.graph.initializer)
        # the function backing the op: same domain/name, standard ops only (Scan body included)
        (fn,) = [f for f in model.functions if (f.domain, f.name) == (contract.DOMAIN, op)]
        assert list(fn.input) == [p.name for p in spec.inputs]
        assert list(fn.output) == [p.name for p in spec.outputs]
        assert {a.name for a in fn.attribute_proto} == set(spec.attributes)
        ops = list(all_nodes(fn.node))
        assert ops and all(is_standard_domain(n.domain) for n in ops), {n.domain for n in ops}
        assert all(f.domain == contract.DOMAIN for f in model.functions)


def test_prefill_scan_is_a_loop_independent_of_seq(artifacts):
    """The graph has no sequence length baked in: the scan is ONNX Scans inside SelectiveScan's body, and every
    axis named seq is symbolic; node counts are the same for an export that also returns all logits."""
    art = artifacts()
    model = load(art, artifact.PREFILL_GRAPH)
    (fn,) = [f for f in model.functions if f.name == "SelectiveScan"]
    scans = [n for n in fn.node if n.op_type == "Scan"]
    assert len(scans) == 3  # the chunked scan: local scans, chunk carry, re-scan (tests/test_chunked_prefill.py)
    assert all(len(next(a.g for a in s.attribute if a.name == "body").node) < 20 for s in scans)
    ids = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in ids] == ["batch", "seq"]
    n_nodes = len(list(all_nodes(model.graph.node))) + sum(len(list(all_nodes(f.node))) for f in model.functions)
    assert n_nodes < 400  # tiny model, 2 layers: a graph unrolled over a sequence would be far larger
    other = load(artifacts(all_logits=True), artifact.PREFILL_GRAPH)
    assert abs(len(other.graph.node) - len(model.graph.node)) < 20  # only the head differs
    # the step graph holds no Scan/Loop at all
    step = load(art, artifact.STEP_GRAPH)
    assert not [n for n in all_nodes(step.graph.node) if n.op_type in ("Scan", "Loop")]
    assert not [n for f in step.functions for n in all_nodes(f.node) if n.op_type in ("Scan", "Loop")]


def test_manifest(artifacts, tiny_checkpoint):
    art = artifacts("hf", "fp16", all_logits=True)
    m = read_manifest(art, verify=True)
    assert m["format_version"] == artifact.FORMAT_VERSION
    assert m["exporter"]["name"] == artifact.EXPORTER_NAME
    assert m["source"]["checkpoint"] == str(tiny_checkpoint("hf").resolve())
    assert m["config"]["d_model"] == 32 and m["dims"]["d_inner"] == 64 and m["dims"]["n_layer"] == N_LAYER
    assert m["dtype"] == "fp16" and m["dtypes"]["ssm_state"] == "float32" and m["dtypes"]["logits"] == "float32"
    assert m["onnx"] == {"ir_version": contract.IR_VERSION, "opset": contract.DEFAULT_OPSET,
                         "domain": contract.DOMAIN, "domain_version": contract.DOMAIN_VERSION}
    assert {op["op_type"] for op in m["custom_ops"]} == {"SelectiveScanStep", "SelectiveScan"}
    assert {(op["op_type"], op["graph"], op["count"]) for op in m["custom_ops"]} == {
        ("SelectiveScanStep", "step", N_LAYER), ("SelectiveScan", "prefill", N_LAYER)}
    assert m["family"] == "mamba1" and m["dims"]["conv_state"] == [64, 4] and m["dims"]["ssm_state"] == [64, 8]
    assert m["graphs"]["prefill"]["all_logits"] is True
    step_in = {p["name"]: p for p in m["graphs"]["step"]["inputs"]}
    assert step_in["input_ids"] == {"name": "input_ids", "dtype": "int64", "shape": ["batch"]}
    assert step_in["conv_state.1"] == {"name": "conv_state.1", "dtype": "float16", "shape": ["batch", 64, 4]}
    assert step_in["ssm_state.0"] == {"name": "ssm_state.0", "dtype": "float32", "shape": ["batch", 64, 8]}
    pre_out = {p["name"]: p for p in m["graphs"]["prefill"]["outputs"]}
    assert pre_out["logits"]["shape"] == ["batch", "seq", 96] and pre_out["logits"]["dtype"] == "float32"
    assert set(pre_out) == {"logits", *contract.state_outputs(N_LAYER)}
    for name, f in m["files"].items():
        data = (art / name).read_bytes()
        assert f == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def test_newest_opset_exports(artifacts):
    art = artifacts(opset=max_opset())
    onnx.checker.check_model(str(art / artifact.PREFILL_GRAPH), full_check=True)
    assert read_manifest(art)["onnx"]["opset"] == max_opset()


# ---- the command ---------------------------------------------------------------------------------------------
def run_cli(*args, **kw):
    result = CliRunner().invoke(main, [str(a) for a in args], **kw)
    assert "Traceback" not in result.output, result.output
    return result


def leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def error_line(result):
    lines = [ln for ln in result.output.splitlines() if ln.startswith("mamba-deploy: error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_cli_export_default_dir_force_and_refusal(tiny_checkpoint, tmp_path, monkeypatch):
    ckpt = tiny_checkpoint("hf")
    monkeypatch.chdir(tmp_path)
    ok = run_cli("export", "--model", ckpt, "--dtype", "fp16")
    assert ok.exit_code == 0, ok.output
    out = tmp_path / "export" / ckpt.name
    assert read_manifest(out, verify=True)["dtype"] == "fp16"
    before = (out / artifact.MANIFEST).read_text()
    # existing --out without --force: one-line error, exit 2, the artifact untouched
    again = run_cli("export", "--model", ckpt)
    assert again.exit_code == 2
    assert "already exists" in error_line(again) and "--force" in error_line(again)
    assert (out / artifact.MANIFEST).read_text() == before
    # --force replaces it (fp32 now), leaving no temporary or old directories behind
    forced = run_cli("export", "--model", ckpt, "--force")
    assert forced.exit_code == 0, forced.output
    assert read_manifest(out, verify=True)["dtype"] == "fp32"
    assert leftovers(out.parent) == []


@pytest.mark.parametrize("case", ["not-a-checkpoint", "missing", "bad-opset"])
def test_cli_export_bad_input(tiny_checkpoint, tmp_path, case):
    out = tmp_path / "art"
    model = {"not-a-checkpoint": tmp_path, "missing": tmp_path / "nope"}.get(case, tiny_checkpoint())
    extra = ["--opset", "11"] if case == "bad-opset" else []
    result = run_cli("export", "--model", model, "--out", out, *extra)
    assert result.exit_code == 2
    line = error_line(result)
    assert {"not-a-checkpoint": "no config.json", "missing": "neither an existing directory",
            "bad-opset": "--opset 11"}[case] in line
    assert not out.exists() and leftovers(tmp_path) == []


def test_failed_export_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    """A failure half-way (here: while building the prefill graph) removes the temporary directory."""
    from mamba_deploy.onnx import export as export_module

    def broken(*a, **k):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(export_module.LMGraphs, "prefill_graph", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        export(tiny_checkpoint(), tmp_path / "art")
    assert list(tmp_path.iterdir()) == []


def test_read_manifest_errors(artifacts, tmp_path):
    import shutil

    from mamba_deploy.errors import UserError

    with pytest.raises(UserError, match="no manifest.json"):
        read_manifest(tmp_path)
    art = tmp_path / "copy"
    shutil.copytree(artifacts(), art)
    manifest = json.loads((art / artifact.MANIFEST).read_text())
    (art / artifact.MANIFEST).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_manifest(art)
    (art / artifact.MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(UserError, match="format 99") as e:
        read_manifest(art)
    assert "\n" not in str(e.value)
    (art / artifact.MANIFEST).write_text(json.dumps(manifest))
    with open(art / WEIGHTS_FILE, "r+b") as f:  # flip one byte of the weights
        f.seek(4096 + 3)
        byte = f.read(1)
        f.seek(4096 + 3)
        f.write(bytes([byte[0] ^ 0xFF]))
    read_manifest(art)  # without verification it opens
    with pytest.raises(UserError, match="sha256"):
        read_manifest(art, verify=True)


# ---- the op bodies on their own, against ops/selective_scan.py ------------------------------------------------
def op_model(spec, act, opset=contract.DEFAULT_OPSET, **attrs):
    """A model holding one custom node (inputs/outputs named as the op's ports) and its function."""
    from onnx import TensorProto, helper

    from mamba_deploy.onnx.functions import functions

    types = {"act": act, "fp32": TensorProto.FLOAT}
    node = helper.make_node(spec.op_type, [p.name for p in spec.inputs], [p.name for p in spec.outputs],
                            domain=contract.DOMAIN, **attrs)
    graph = helper.make_graph(
        [node], "op", [helper.make_tensor_value_info(p.name, types[p.dtype], list(p.shape)) for p in spec.inputs],
        [helper.make_tensor_value_info(p.name, types[p.dtype], list(p.shape)) for p in spec.outputs])
    return helper.make_model(graph, ir_version=contract.IR_VERSION, functions=functions(opset),
                             opset_imports=[helper.make_opsetid("", opset),
                                            helper.make_opsetid(contract.DOMAIN, contract.DOMAIN_VERSION)])


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("delta_softplus", [1, 0])
def test_op_functions_match_reference(dtype, delta_softplus):
    """Both function bodies vs selective_scan_ref / selective_state_update on random inputs whose δ_raw + bias
    spans both sides of the softplus threshold (τ = 20) and very negative values."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from onnx import TensorProto

    from mamba_deploy.ops.selective_scan import selective_scan_ref, selective_state_update

    torch.manual_seed(0)
    act_t, act = {"fp32": (torch.float32, TensorProto.FLOAT), "fp16": (torch.float16, TensorProto.FLOAT16)}[dtype]
    b, d, N, L = 2, 5, 3, 9
    x, z = torch.randn(b, d, L).to(act_t), torch.randn(b, d, L).to(act_t)
    delta = torch.randn(b, d, L) * (0.3 if not delta_softplus else 12)                # raw δ, some > 20
    if delta_softplus:
        delta[0, 0, :3] = 100.0  # where log(1 + e^δ) overflows fp32 without the threshold
    delta = delta.to(act_t)
    A = -torch.rand(d, N) * 2 - 0.1
    B, C = torch.randn(b, N, L).to(act_t), torch.randn(b, N, L).to(act_t)
    D, bias = torch.randn(d), torch.randn(d) * (0.1 if not delta_softplus else 3)
    h0 = torch.randn(b, d, N)
    attrs = {"delta_softplus": delta_softplus, "softplus_threshold": 20.0}
    if delta_softplus:
        assert ((delta.float() + bias[:, None]) > 20).any() and ((delta.float() + bias[:, None]) < -20).any()
    y_ref, h_ref = selective_scan_ref(x, delta, A, B, C, D, z, bias, bool(delta_softplus), h0)
    feeds = {"x": x, "delta": delta, "A": A, "B": B, "C": C, "D": D, "delta_bias": bias, "z": z, "ssm_state": h0}
    np_feeds = {k: v.numpy() for k, v in feeds.items()}
    run = lambda spec, f: ort.InferenceSession(op_model(spec, act, **attrs).SerializeToString(),  # noqa: E731
                                               providers=["CPUExecutionProvider"]).run(None, f)
    y, h = run(contract.SELECTIVE_SCAN, np_feeds)
    tol = 1e-5 if dtype == "fp32" else 2e-3
    assert y.dtype == x.numpy().dtype and h.dtype == np.float32
    assert np.abs(y.astype(np.float32) - y_ref.float().numpy()).max() <= tol * max(1, y_ref.abs().max().item())
    assert np.abs(h - h_ref.numpy()).max() <= 1e-5 * max(1, h_ref.abs().max().item())
    # the step op, t = 0
    step_feeds = {k: (v[..., 0] if k in ("x", "delta", "B", "C", "z") else v) for k, v in feeds.items()}
    y1, h1 = run(contract.SELECTIVE_SCAN_STEP, {k: v.contiguous().numpy() for k, v in step_feeds.items()})
    y1_ref, h1_ref = selective_state_update(h0, step_feeds["x"], step_feeds["delta"], A, step_feeds["B"],
                                            step_feeds["C"], D, step_feeds["z"], bias, bool(delta_softplus))
    assert np.abs(y1.astype(np.float32) - y1_ref.float().numpy()).max() <= tol * max(1, y1_ref.abs().max().item())
    assert np.abs(h1 - h1_ref.numpy()).max() <= 1e-5 * max(1, h1_ref.abs().max().item())
