"""Every user mistake is one line on every backend and command: the session API's validation and wording are the
same on torch and onnxruntime, a manifest that disagrees with its graphs is caught on open, `build` verifies
checksums, and the GPU-only scripts say so in one line on a CPU."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mamba_deploy.cli import main
from mamba_deploy.errors import UserError
from mamba_deploy.model import MambaState
from mamba_deploy.runtime import open_session

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sources(tiny_checkpoint, tmp_path_factory):
    ckpt = tiny_checkpoint(seed=21)
    art = tmp_path_factory.mktemp("art") / "a"
    assert CliRunner().invoke(main, ["export", "--model", str(ckpt), "--out", str(art)]).exit_code == 0
    return {"torch": ckpt, "onnxruntime": art}


def _swap(state: MambaState, which: str, i: int, t: torch.Tensor) -> MambaState:
    conv, ssm = list(state.conv), list(state.ssm)
    (conv if which == "conv" else ssm)[i] = t
    return MambaState(conv, ssm)


CASES = {
    "empty prompt": lambda s: s.prefill(torch.zeros(1, 0, dtype=torch.long)),
    "empty prompts, batch 3": lambda s: s.prefill(torch.zeros(3, 0, dtype=torch.int32)),
    "new_state(0)": lambda s: s.new_state(0),
    "new_state(-2)": lambda s: s.new_state(-2),
    "new_state(1.5)": lambda s: s.new_state(1.5),
    "step ids batch 3, state batch 2": lambda s: s.step(torch.tensor([1, 2, 3]), s.new_state(2)),
    "prefill ids batch 1, state batch 4": lambda s: s.prefill(torch.tensor([[1, 2]]), s.new_state(4)),
    "conv state float64": lambda s: s.step(torch.tensor([1]), _swap(s.new_state(1), "conv", 1,
                                                                    s.new_state(1).conv[1].double())),
    "ssm state bfloat16": lambda s: s.step(torch.tensor([1]), _swap(s.new_state(1), "ssm", 0,
                                                                    s.new_state(1).ssm[0].bfloat16())),
    "float ids": lambda s: s.step(torch.tensor([1.0]), s.new_state(1)),
    "2-D ids to step": lambda s: s.step(torch.tensor([[1, 2]]), s.new_state(1)),
    "1-D ids to prefill": lambda s: s.prefill(torch.tensor([1, 2])),
    "no ids": lambda s: s.step(torch.zeros(0, dtype=torch.long), s.new_state(1)),
}
EXPECT = {
    "empty prompt": "at least one token per sequence; input_ids has shape (1, 0)",
    "empty prompts, batch 3": "input_ids has shape (3, 0)",
    "new_state(0)": "positive number of sequences, got 0",
    "new_state(-2)": "got -2",
    "new_state(1.5)": "got 1.5",
    "step ids batch 3, state batch 2": "input_ids has batch 3 but the state holds 2 sequences",
    "prefill ids batch 1, state batch 4": "input_ids has batch 1 but the state holds 4 sequences",
    "conv state float64": "conv_state.1 is float64; this model's conv state is float32",
    "ssm state bfloat16": "ssm_state.0 is bfloat16; the SSM state is always float32",
    "float ids": "integer token ids (int64 or int32), got float32",
    "2-D ids to step": "shape [batch] (one token per sequence), got shape (1, 2)",
    "1-D ids to prefill": "shape [batch, seq], got shape (2,)",
    "no ids": "no sequence (batch 0)",
}


@pytest.mark.parametrize("case", list(CASES))
def test_session_api_same_validation_and_wording_on_every_backend(sources, case):
    messages = {}
    for backend, src in sources.items():
        s = open_session(src, backend)
        with pytest.raises(UserError) as e:
            CASES[case](s)
        messages[backend] = str(e.value)
        assert "\n" not in messages[backend]
    assert len(set(messages.values())) == 1, messages      # the same sentence on every backend
    message = messages["torch"]
    assert EXPECT[case] in message, message
    # never a self-contradiction: a dtype message names two different dtypes
    if " is " in message and "float" in message:
        named = [w.strip(";,") for w in message.split() if w.strip(";,").startswith(("float", "bfloat"))]
        assert len(set(named)) == len(named), message


EDITS = {  # (section, key, new value) → what the one-line error says
    "d_state": [("dims", "d_state", 32, "dims.d_state is 32 but its config gives 8"),
                ("config", "d_state", 4, r"dims.ssm_state is \[64, 8\] but its config gives \[64, 4\]"),
                ("dims", "ssm_state", [64, 16], r"dims.ssm_state is \[64, 16\] but step.onnx has \[64, 8\]")],
    "vocab_size": [("dims", "padded_vocab_size", 200, "dims.padded_vocab_size is 200 but step.onnx has 96"),
                   ("dims", "vocab_size", 90, "dims.vocab_size is 90 but its config gives 96"),
                   ("config", "vocab_size", 4096, "dims.vocab_size is 96 but its config gives 4096")],
    "d_model": [("dims", "d_model", 48, "dims.d_model is 48 but step.onnx has 32"),
                ("config", "d_model", 16, "dims.d_model is 32 but its config gives 16")],
    "n_layer": [("dims", "n_layer", 3, "dims.n_layer is 3 but step.onnx has 2"),
                ("config", "n_layer", 1, "dims.n_layer is 2 but its config gives 1")],
    "d_inner": [("dims", "d_inner", 96, "dims.d_inner is 96 but its config gives 64"),
                ("config", "expand", 3, r"dims.conv_state is \[64, 4\] but its config gives \[96, 4\]"),
                ("dims", "conv_state", [64, 3], r"dims.conv_state is \[64, 3\] but step.onnx has \[64, 4\]")],
    "d_conv": [("config", "d_conv", 3, r"dims.conv_state is \[64, 4\] but its config gives \[64, 3\]")],
}


@pytest.mark.parametrize("field", list(EDITS))
def test_manifest_cross_checked_against_the_graphs(sources, tmp_path, field):
    for i, (section, key, value, words) in enumerate(EDITS[field]):
        art = tmp_path / f"edited{i}"
        shutil.copytree(sources["onnxruntime"], art)
        m = json.loads((art / "manifest.json").read_text())
        m[section][key] = value
        (art / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(UserError, match=words) as e:
            open_session(art, "onnxruntime")
        assert "\n" not in str(e.value)
        r = CliRunner().invoke(main, ["generate", "--artifact", str(art), "--backend", "onnxruntime",
                                      "--prompt-ids", "1,2"])
        assert r.exit_code == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.output


def test_build_verifies_checksums(sources, tmp_path):
    pytest.importorskip("mamba_deploy.trt.compat")
    art = tmp_path / "corrupt"
    shutil.copytree(sources["onnxruntime"], art)
    data = art / "weights.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x40                        # one flipped bit, same size
    data.write_bytes(bytes(raw))
    r = CliRunner().invoke(main, ["build", "--artifact", str(art)])
    assert r.exit_code == 2, r.output
    assert "weights.onnx.data does not match its sha256" in r.stderr and r.stderr.count("\n") == 1
    assert not (art / "step.engine").exists()


GPU_SCRIPTS = {
    "scripts/gpu_plugin_check.py": ["--out", "{tmp}/o", "--skip-tests"],
    "scripts/profile_decode.py": [],
    "scripts/bench_ssd.py": ["--out", "{tmp}/ssd.json"],
    "scripts/gpu_mamba2_check.sh": [],
    "scripts/gpu_ab_bench.sh": ["{tmp}", "{tmp}"],
    "bench/bench_scan.py": ["--json", "{tmp}/s.json"],
    "bench/bench_train.py": ["--json", "{tmp}/t.json"],
    "scripts/gpu_bench.sh": [],
    "scripts/gpu_ort_cuda_check.sh": [],
    "bench/train_ddp_gpu.sh": [],
    "bench/train_quality_gpu.sh": [],
}


RUN_ON_A_CPU = {"bench/bench_serve.py",              # the serving benchmark measures CPU backends too
                "bench/bench_ort_cpu.py",             # ONNX Runtime on the CPU
                "scripts/check_ssd_vs_upstream.py"}   # runs on the Triton CPU interpreter


def test_every_gpu_script_is_listed():
    on_disk = {str(p.relative_to(ROOT)) for d in ("scripts", "bench") for p in (ROOT / d).iterdir()
               if p.suffix in (".py", ".sh")}
    assert on_disk == set(GPU_SCRIPTS) | RUN_ON_A_CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour; this machine has a CUDA GPU")
@pytest.mark.parametrize("script", list(GPU_SCRIPTS))
def test_gpu_only_scripts_say_so_in_one_line_on_a_cpu(script, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OUT": str(tmp_path / "out"),
           "RUN_ROOT": str(tmp_path / "runs"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    exe = ["bash"] if script.endswith(".sh") else [sys.executable]
    args = [a.format(tmp=tmp_path) for a in GPU_SCRIPTS[script]]
    r = subprocess.run([*exe, str(ROOT / script), *args], capture_output=True, text=True, env=env, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    why = "this PyTorch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
    assert r.stderr.strip().splitlines() == [f"{script}: error: needs a CUDA GPU but {why}; run it on a GPU machine"]
