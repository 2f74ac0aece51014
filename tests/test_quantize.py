"""Weight-only quantized artifacts (export --quantize): graph form, manifest, `check` at the quantization's
tolerance (passes on a faithful artifact, fails on one exported from a perturbed weight), the TensorRT-RTX build of
the QDQ form, and one-line errors for options that do not fit."""
from __future__ import annotations

import json
import shutil

import onnx
import pytest
import torch
from click.testing import CliRunner

from mamba_deploy.cli import main
from mamba_deploy.onnx import contract
from mamba_deploy.onnx.quantize import QUANTIZED_LINEARS
from mamba_deploy.artifact import DEFAULT_TOLERANCES, MANIFEST, PREFILL_GRAPH, STEP_GRAPH
from mamba_deploy.trt import compat

N_LAYER = 2   # conftest.TINY
VARIANTS = [("int8", "matmulnbits", None), ("int4", "matmulnbits", 32), ("int4", "matmulnbits", 128),
            ("int8", "qdq", None), ("int4", "qdq", 32)]


def export(ckpt, out, *extra):
    r = CliRunner().invoke(main, ["export", "--model", str(ckpt), "--out", str(out), *extra])
    assert r.exit_code == 0, r.output
    return out


def quant_args(scheme, fmt, block):
    return ["--quantize", scheme, "--quant-format", fmt] + (["--quant-block", str(block)] if block else [])


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint("state-spaces", seed=7)


@pytest.fixture(scope="module")
def artifacts(ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    return {v: export(ckpt, root / "-".join(map(str, v)), *quant_args(*v)) for v in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_quantized_graph_form_and_manifest(artifacts, variant):
    scheme, fmt, block = variant
    art = artifacts[variant]
    m = json.loads((art / MANIFEST).read_text())
    q = m["quantization"]
    assert (q["scheme"], q["format"], q["bits"]) == (scheme, fmt, 8 if scheme == "int8" else 4)
    assert q["block_size"] == (block if block else (128 if fmt == "matmulnbits" else 0))
    assert m["dtypes"]["ssm_state"] == "float32" and m["dtype"] == "fp32"
    for graph in (STEP_GRAPH, PREFILL_GRAPH):
        model = onnx.load(str(art / graph), load_external_data=False)
        nodes = model.graph.node
        quant_op = "MatMulNBits" if fmt == "matmulnbits" else "DequantizeLinear"
        assert sum(n.op_type == quant_op for n in nodes) == 2 * N_LAYER + 1       # in/out_proj per layer + head
        gemm_weights = {n.input[1].split(".")[-2] for n in nodes if n.op_type == "Gemm"}
        assert gemm_weights == {"x_proj", "dt_proj"}                                 # kept fp32
        assert not set(QUANTIZED_LINEARS) & gemm_weights
        init = {t.name: t for t in model.graph.initializer}
        assert init["backbone.layers.0.mixer.in_proj.weight_q"].data_type == {
            ("int8", "matmulnbits"): onnx.TensorProto.UINT8, ("int4", "matmulnbits"): onnx.TensorProto.UINT8,
            ("int8", "qdq"): onnx.TensorProto.INT8, ("int4", "qdq"): onnx.TensorProto.INT4}[(scheme, fmt)]
        assert fmt == "matmulnbits" or model.opset_import[0].version >= 21


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_check_passes_on_quantized_artifact(artifacts, variant, tmp_path):
    r = CliRunner().invoke(main, ["check", "--artifact", str(artifacts[variant]), "--steps", "16",
                                  "--out", str(tmp_path / "check")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "check" / "report.json").read_text())
    assert (report["tolerance"]["atol"], report["tolerance"]["rtol"]) == DEFAULT_TOLERANCES[variant[0]]
    assert report["tolerance"]["atol_relative_to"] and report["passed"]
    assert report["backends"]["onnxruntime"]["outputs"]["logits"]["max_abs"] > 1e-4   # quantization shows


@pytest.mark.parametrize("variant, factor", [(("int8", "matmulnbits", None), 1.5), (("int4", "qdq", 32), 3.0)],
                         ids=["int8", "int4-qdq"])
def test_check_fails_on_perturbed_weight(ckpt, variant, factor, tmp_path):
    """Exported from the checkpoint with layer 1's out_proj weight scaled (by more for the coarser int4 tolerance),
    the manifest still naming the original checkpoint."""
    from mamba_deploy.checkpoint import load_model, save_model

    model = load_model(ckpt)
    with torch.no_grad():
        model.backbone.layers[1].mixer.out_proj.weight.mul_(factor)
    bad = export(save_model(model, tmp_path / "bad-ckpt"), tmp_path / "bad", *quant_args(*variant))
    manifest = json.loads((bad / MANIFEST).read_text())
    manifest["source"]["checkpoint"] = str(ckpt)
    (bad / MANIFEST).write_text(json.dumps(manifest, indent=2))
    r = CliRunner().invoke(main, ["check", "--artifact", str(bad), "--steps", "16", "--out", str(tmp_path / "c")])
    assert r.exit_code == 1, r.output
    assert "FAILED" in r.output


@pytest.mark.skipif(not compat.available(), reason="neither tensorrt nor tensorrt_rtx is installed "
                    "(pip install 'mamba-deploy[tensorrt]')")
@pytest.mark.parametrize("variant", [("int8", "qdq", None), ("int4", "qdq", 32)], ids=lambda v: "-".join(map(str, v)))
def test_tensorrt_builds_qdq_artifact(artifacts, variant, tmp_path):
    from mamba_deploy.trt.builder import build

    art = tmp_path / "art"
    shutil.copytree(artifacts[variant], art)
    report = build(art, max_batch=2, max_prefill_len=16)
    for graph in ("step", "prefill"):
        e = report["engines"][graph]
        assert "DEQUANTIZE" in e["layer_types"] and e["plugin_layers"] == N_LAYER
        assert (art / e["file"]).stat().st_size == e["plan_bytes"] > 0


@pytest.mark.parametrize("args, message", [
    (["--quantize", "int4", "--dtype", "fp16"], "--dtype fp32"),
    (["--quantize", "int4", "--quant-format", "qdq", "--opset", "18"], "--opset 21"),
    (["--quantize", "int4", "--quant-block", "64"], "--quant-block 64"),
    (["--quantize", "int8", "--quant-format", "qdq", "--quant-block", "32"], "per output channel"),
])
def test_bad_quantize_options(ckpt, tmp_path, args, message):
    r = CliRunner().invoke(main, ["export", "--model", str(ckpt), "--out", str(tmp_path / "x"), *args])
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "x").exists()
