"""`mamba-deploy check` (parity.py): passes on a faithful artifact, fails (exit 1) on one whose weights differ from
its source checkpoint, writes the JSON report, the PNG and Polygraphy step files that `polygraphy run` accepts,
and turns bad input into one-line errors. Also: `generate` on the onnxruntime backend == torch."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mamba_deploy.cli import main

STEPS = "12"


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint("state-spaces", seed=5)


def export(model_dir, out: Path) -> Path:
    r = CliRunner().invoke(main, ["export", "--model", str(model_dir), "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def artifact(ckpt, tmp_path_factory):
    return export(ckpt, tmp_path_factory.mktemp("art") / "faithful")


@pytest.fixture(scope="module")
def perturbed_artifact(ckpt, tmp_path_factory):
    """Exported from a copy of the checkpoint with layer 1's A_log scaled by 1.01 (a state-update change: the
    error shows in the SSM state first and reaches the logits over the rollout), while its manifest still names
    the original checkpoint as the source."""
    from mamba_deploy.checkpoint import load_model, save_model

    model = load_model(ckpt)
    with torch.no_grad():
        model.backbone.layers[1].mixer.A_log.mul_(1.01)
    bad_ckpt = save_model(model, tmp_path_factory.mktemp("ckpt") / "perturbed")
    art = export(bad_ckpt, tmp_path_factory.mktemp("art") / "perturbed")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["source"]["checkpoint"] = str(ckpt)
    (art / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return art


def run_check(artifact, out, *extra):
    return CliRunner().invoke(main, ["check", "--artifact", str(artifact), "--steps", STEPS, "--out", str(out),
                                     *extra])


def polygraphy_cli() -> list[str]:
    exe = Path(sys.executable).with_name("polygraphy")
    return [str(exe)] if exe.exists() else [shutil.which("polygraphy") or "polygraphy"]


def test_check_passes_on_faithful_artifact(artifact, tmp_path):
    r = run_check(artifact, tmp_path)
    assert r.exit_code == 0, r.output
    assert "PASSED | onnxruntime vs torch-reference" in r.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    b = report["backends"]["onnxruntime"]
    assert report["passed"] and b["passed"]
    assert len(b["steps"]) == int(STEPS) + 1 and b["steps"][0]["step"] == "prefill"
    assert set(b["outputs"]) == {"logits", "conv_state_out.0", "ssm_state_out.0", "conv_state_out.1",
                                 "ssm_state_out.1"}
    assert b["outputs"]["logits"]["max_abs"] <= 1e-5             # fp32: summation order only
    assert b["token_agreement"] == 1.0
    assert report["reference"]["checkpoint"] == str(Path(json.loads(
        (artifact / "manifest.json").read_text())["source"]["checkpoint"]))
    png = (tmp_path / "errors.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # the printed polygraphy command really runs and passes on the saved step-0 inputs / reference outputs
    cmd = report["polygraphy"]["command"]
    assert cmd in r.stdout and cmd.startswith("polygraphy run ") and "--onnxrt" in cmd
    p = subprocess.run(polygraphy_cli() + cmd.split()[1:], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "PASSED" in p.stdout + p.stderr


def test_check_fails_on_perturbed_artifact(perturbed_artifact, tmp_path):
    r = run_check(perturbed_artifact, tmp_path, "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "e.png"))
    assert r.exit_code == 1, r.output
    assert "FAILED | onnxruntime vs torch-reference" in r.stdout
    assert "mamba-deploy: FAILED:" in r.stderr and "Traceback" not in r.output
    report = json.loads((tmp_path / "r.json").read_text())
    b = report["backends"]["onnxruntime"]
    assert not report["passed"] and not b["outputs"]["ssm_state_out.1"]["passed"]
    assert b["outputs"]["ssm_state_out.0"]["passed"]               # layer 0 untouched
    assert (tmp_path / "e.png").exists()
    # the same step in polygraphy fails too
    p = subprocess.run(polygraphy_cli() + report["polygraphy"]["command"].split()[1:], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0


def test_check_with_model_override_and_tolerance(perturbed_artifact, ckpt, tmp_path):
    """--model names the reference explicitly; loose tolerances let the perturbed artifact pass."""
    r = run_check(perturbed_artifact, tmp_path, "--model", str(ckpt), "--atol", "1e-2", "--rtol", "1e-2",
                  "--batch", "1", "--prompt-len", "3")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tolerance"]["atol"] == 1e-2 and report["batch"] == 1 and report["prompt_len"] == 3


@pytest.mark.parametrize("args, message", [
    (["--artifact", "/nonexistent/artifact"], "does not exist"),
    (["--artifact", "{artifact}", "--backends", "nosuch"], "unknown backend 'nosuch'"),
    (["--artifact", "{artifact}", "--backends", ""], "is empty"),
    (["--artifact", "{artifact}", "--steps", "-1"], "-1 is not in the range x>=0"),
    (["--artifact", "{artifact}", "--model", "/nonexistent/ckpt"], "/nonexistent/ckpt"),
    (["--artifact", "{ckpt}"], "no manifest.json"),
])
def test_check_bad_input_one_line_error(artifact, ckpt, args, message):
    r = CliRunner().invoke(main, ["check"] + [a.format(artifact=artifact, ckpt=ckpt) for a in args])
    assert r.exit_code == 2, r.output
    assert message in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.output


def test_unavailable_backend_names_what_to_install(artifact, monkeypatch):
    from mamba_deploy.runtime import session

    monkeypatch.setitem(session.BACKENDS, "fakert", "fakert_no_such_module:open")
    monkeypatch.setitem(session.BACKEND_PACKAGES, "fakert", "FakeRT (pip install fakert)")
    r = CliRunner().invoke(main, ["check", "--artifact", str(artifact), "--backends", "fakert"])
    assert r.exit_code == 2, r.output
    assert "backend 'fakert' is not available: it needs FakeRT (pip install fakert)" in r.stderr
    assert r.stderr.count("\n") == 1


# ---- generate on the onnxruntime backend --------------------------------------------------------------------
def test_generate_onnxruntime_matches_torch_and_batches(artifact):
    from mamba_deploy.generation import SamplingParams, generate
    from mamba_deploy.runtime.session import open_session

    prompts = [[5, 17, 3], [40, 2, 9, 11, 60, 7, 1], [88]]
    ort = open_session(artifact, "onnxruntime")
    ref = open_session(artifact, "torch")             # the artifact's source checkpoint
    for params in (SamplingParams(), SamplingParams(temperature=0.8, top_k=20)):
        batched = generate(ort, prompts, max_new_tokens=8, params=params, seed=4).tokens
        alone = [generate(ort, [p], max_new_tokens=8, params=params, seed=4).tokens[0]
                 for p in prompts]
        assert batched == alone
        assert batched == generate(ref, prompts, max_new_tokens=8, params=params, seed=4).tokens
    r = CliRunner().invoke(main, ["generate", "--artifact", str(artifact), "--backend", "onnxruntime",
                                  "--prompt-ids", "5,17,3", "-n", "8"])
    assert r.exit_code == 0, r.output
    want = generate(ref, [prompts[0]], max_new_tokens=8).tokens[0]
    assert r.stdout.strip() == "5,17,3 | " + " ".join(map(str, want))
