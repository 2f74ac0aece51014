"""Mamba-2 and FalconMamba ONNX artifacts (custom-op form at opset 18, standard-op form at opset 27) on ONNX Runtime
against the PyTorch model: a prefill + 256-step rollout (fp32 ≤ 1e-5; fp16 within the fp16 tolerance), prefill from
a state, one scan node per layer; `check` passes on a faithful artifact and fails (exit 1) on a perturbed weight."""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner

from helpers import one_thread  # noqa: F401  (autouse fixture: one torch thread for tiny models)
from mamba_deploy.checkpoint import load_model, save_model
from mamba_deploy.cli import main
from mamba_deploy.model import random_model

pytest.importorskip("onnxruntime")
STANDARD = 27          # the standard-op form (LinearAttention, CausalConvWithState)
SCAN_OPS = {"mamba2": ("SSDScanStep", "SSDScan"), "falcon_mamba": ("SelectiveScanStep", "SelectiveScan")}


def tiny_config(family: str):
    if family == "mamba2":   # groups, a chunk that does not divide the prompt, a non-trivial dt_limit, D per channel
        from mamba_deploy.families.mamba2.config import Mamba2Config
        return Mamba2Config(d_model=32, n_layer=2, vocab_size=96, d_state=16, headdim=16, ngroups=2, chunk_size=8,
                            dt_limit=(1e-3, 0.2), D_has_hdim=True)
    from mamba_deploy.families.falcon_mamba.config import FalconMambaConfig
    return FalconMambaConfig(d_model=32, n_layer=2, vocab_size=96, d_state=8, tie_embeddings=False)


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module", params=sorted(SCAN_OPS))
def ckpt(request, tmp_path_factory):
    model = random_model(tiny_config(request.param), seed=3)
    return request.param, save_model(model, tmp_path_factory.mktemp("ckpt") / request.param)


@pytest.fixture(scope="module")
def artifacts(ckpt, tmp_path_factory):
    """(family, checkpoint, {(opset, dtype): artifact dir}), exported lazily."""
    family, path = ckpt
    made: dict = {}

    def get(opset: int, dtype: str = "fp32") -> Path:
        if (opset, dtype) not in made:
            out = tmp_path_factory.mktemp("art") / f"{family}-{opset}-{dtype}"
            r = _cli("export", "--model", path, "--out", out, "--opset", opset, "--dtype", dtype)
            assert r.exit_code == 0, r.output
            made[(opset, dtype)] = out
        return made[(opset, dtype)]

    return family, path, get


def _ops(artifact: Path, graph: str) -> list[str]:
    return [n.op_type for n in onnx.load(str(artifact / graph), load_external_data=False).graph.node]


@pytest.mark.parametrize("opset", [18, STANDARD])
def test_one_scan_node_per_layer(artifacts, opset):
    family, _, get = artifacts
    art = get(opset)
    step_op, scan_op = SCAN_OPS[family]
    step, prefill = _ops(art, "step.onnx"), _ops(art, "prefill.onnx")
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["family"] == family and manifest["onnx"]["opset"] == opset
    if opset == STANDARD:
        assert step.count("LinearAttention") == prefill.count("LinearAttention") == 2
        assert step.count("CausalConvWithState") == prefill.count("CausalConvWithState") == 2
        assert step_op not in step and scan_op not in prefill and manifest["custom_ops"] == []
        for g in ("step.onnx", "prefill.onnx"):
            assert all(f.domain != "mamba_deploy" for f in onnx.load(str(art / g), load_external_data=False).functions)
    else:
        assert step.count(step_op) == 2 and prefill.count(scan_op) == 2 and "LinearAttention" not in step
        assert {(o["op_type"], o["graph"], o["count"]) for o in manifest["custom_ops"]} == \
            {(step_op, "step", 2), (scan_op, "prefill", 2)}


def _rollout(sess, ref, steps: int, seed: int):
    """Prefill 13 tokens then ``steps`` greedy steps (the reference's tokens) on both; every step's logits and states
    (each backend feeding back its own state) → list of (logits, ref logits, states, ref states)."""
    ids = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits, state = sess.prefill(ids)
        ref_logits, ref_state = ref(ids)
        ref_logits = ref_logits[:, -1]
        out = [(logits, ref_logits, state, ref_state)]
        for _ in range(steps):
            tok = ref_logits.argmax(-1)
            logits, state = sess.step(tok, state)
            ref_logits, ref_state = ref.step(tok, ref_state)
            out.append((logits, ref_logits, state, ref_state))
    return out


@pytest.mark.parametrize("opset", [18, STANDARD])
def test_onnxruntime_rollout_256_steps_fp32(artifacts, opset):
    from mamba_deploy.runtime import open_session

    _, path, get = artifacts
    worst = 0.0
    for logits, ref_logits, state, ref_state in _rollout(open_session(get(opset), backend="onnxruntime"),
                                                        load_model(path), 256, seed=opset):
        worst = max([worst, (logits - ref_logits).abs().max().item()]
                    + [(a - b.to(a.dtype)).abs().max().item() for a, b in zip(state.ssm + state.conv,
                                                                               ref_state.ssm + ref_state.conv)])
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("opset", [18, STANDARD])
def test_onnxruntime_rollout_fp16_within_fp16_tolerance(artifacts, opset):
    from mamba_deploy.artifact import within
    from mamba_deploy.runtime import open_session

    _, path, get = artifacts
    for logits, ref_logits, _, _ in _rollout(open_session(get(opset, "fp16"), backend="onnxruntime"),
                                             load_model(path), 64, seed=opset + 1):
        assert within(logits, ref_logits, "fp16")


@pytest.mark.parametrize("opset", [18, STANDARD])
def test_check_passes_on_faithful_artifact(artifacts, opset, tmp_path):
    _, _, get = artifacts
    r = _cli("check", "--artifact", get(opset), "--steps", 16, "--out", tmp_path)
    assert r.exit_code == 0, r.output
    b = json.loads((tmp_path / "report.json").read_text())["backends"]["onnxruntime"]
    assert b["passed"] and len(b["steps"]) == 17 and b["token_agreement"] == 1.0
    assert b["outputs"]["logits"]["max_abs"] <= 1e-5


def test_check_fails_on_perturbed_weight(artifacts, tmp_path):
    """Layer 1's A_log scaled by 1.01 in the exported copy; the manifest still names the original checkpoint."""
    family, path, _ = artifacts
    model = load_model(path)
    with torch.no_grad():
        model.backbone.layers[1].mixer.A_log.mul_(1.01)
    bad = save_model(model, tmp_path / "bad-ckpt")
    art = tmp_path / "bad-art"
    assert _cli("export", "--model", bad, "--out", art).exit_code == 0
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["source"]["checkpoint"] = str(path)
    (art / "manifest.json").write_text(json.dumps(manifest, indent=2))
    r = _cli("check", "--artifact", art, "--steps", 16, "--out", tmp_path / "check")
    assert r.exit_code == 1, r.output
    b = json.loads((tmp_path / "check" / "report.json").read_text())["backends"]["onnxruntime"]
    assert not b["outputs"]["ssm_state_out.1"]["passed"] and b["outputs"]["ssm_state_out.0"]["passed"]


@pytest.mark.parametrize("opset", [18, STANDARD])
def test_prefill_from_a_state_matches_torch(artifacts, opset):
    """Chunked prefill on ONNX Runtime (13 tokens, then 11 more from the returned state) == torch on all 24."""
    from mamba_deploy.runtime import open_session

    _, path, get = artifacts
    sess = open_session(get(opset), backend="onnxruntime")
    ref = load_model(path)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(7))
    _, state = sess.prefill(ids[:, :13])
    logits, state = sess.prefill(ids[:, 13:], state)
    with torch.no_grad():
        ref_logits, ref_state = ref(ids)
    assert (logits - ref_logits[:, -1].float()).abs().max().item() <= 1e-5
    for a, b in zip(state.ssm + state.conv, ref_state.ssm + ref_state.conv):
        assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-5


def test_generate_and_bench_on_cpu(artifacts, tmp_path):
    """generate: ONNX Runtime (both forms) gives the torch backend's greedy tokens; bench runs and writes JSON."""
    _, _, get = artifacts
    outs = []
    for art, backend in ((get(18), "torch"), (get(18), "onnxruntime"), (get(STANDARD), "onnxruntime")):
        r = _cli("generate", "--artifact", art, "--backend", backend, "--prompt-ids", "1,2,3", "-n", 12)
        assert r.exit_code == 0, r.output
        outs.append(r.stdout.strip().splitlines()[-1])
    assert outs[0] == outs[1] == outs[2] and len(outs[0].split("|")[1].split()) == 12
    r = _cli("bench", "--artifact", get(18), "--backend", "onnxruntime,torch", "--batch", "1,2", "--prompt-len", 9,
             "--gen-len", 4, "--reps", 1, "--warmup", 0, "--json", tmp_path / "b.json")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "b.json").stat().st_size > 0


def test_tensorrt_build_without_plugin(artifacts, tmp_path):
    """TensorRT-RTX (no GPU needed) builds both engines with the ONNX function bodies inlined; with the plugin,
    FalconMamba gets one selective-scan plugin layer per layer, and Mamba-2 a one-line error while the SSD ops have
    no plugin."""
    from mamba_deploy.trt import compat
    if not compat.available():
        pytest.skip("neither tensorrt nor tensorrt_rtx is installed (pip install 'mamba-deploy[tensorrt]')")
    import shutil
    family, _, get = artifacts
    art = tmp_path / "art"
    shutil.copytree(get(18), art)
    r = _cli("build", "--artifact", art, "--no-plugin", "--max-batch", 2, "--max-prefill-len", 16)
    assert r.exit_code == 0, r.output
    report = json.loads((art / "build_report.json").read_text())
    assert set(report["engines"]) == {"step", "prefill"} and not report["plugin"]
    assert (art / "step.engine").stat().st_size > 0 and (art / "prefill.engine").stat().st_size > 0
    r = _cli("build", "--artifact", art, "--max-batch", 2, "--max-prefill-len", 16)
    assert r.exit_code == 0, r.output                 # one PLUGIN_V3 layer per layer (2) in both graphs
    engines = json.loads((art / "build_report.json").read_text())["engines"]
    assert engines["step"]["plugin_layers"] == engines["prefill"]["plugin_layers"] == 2


def test_torch_fast_refuses_other_families(artifacts):
    from mamba_deploy.errors import UserError
    from mamba_deploy.runtime import open_session

    family, _, get = artifacts
    with pytest.raises(UserError, match=f"Mamba-1 blocks only \\(this is a {family} model\\)"):
        open_session(get(18), backend="torch-fast")
