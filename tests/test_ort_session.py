"""The onnxruntime session against the PyTorch model (the reference), on CPU, for tiny random checkpoints in both
formats: 256-step rollouts in which ONNX Runtime feeds back its own state, prefill + steps vs the full sequence,
fp16 within DEFAULT_TOLERANCES, batch rows independent, and clear errors for bad input."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import assert_states_close, within
from mamba_deploy import artifact as spec
from mamba_deploy.artifact import DEFAULT_TOLERANCES
from mamba_deploy.checkpoint import load_model
from mamba_deploy.errors import UserError
from mamba_deploy.model import MambaState
from mamba_deploy.onnx import contract
from mamba_deploy.onnx.export import export
from mamba_deploy.runtime.session import open_session

FP32_ATOL = DEFAULT_TOLERANCES["fp32"][0]  # max abs logit error of an fp32 artifact
VOCAB = 96        # conftest.TINY


@pytest.fixture(scope="module")
def artifact(tiny_checkpoint, tmp_path_factory):
    cache = {}

    def make(fmt="state-spaces", dtype=None, all_logits=False):
        key = (fmt, dtype, all_logits)
        if key not in cache:
            out = tmp_path_factory.mktemp("ort") / f"{fmt}-{dtype}-{int(all_logits)}"
            cache[key] = export(tiny_checkpoint(fmt), out, dtype=dtype, all_logits=all_logits)
        return cache[key]

    return make


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """fp32 PyTorch model of each format, with the sequential reference scan (ground truth)."""
    return {fmt: load_model(tiny_checkpoint(fmt), dtype="fp32", scan_backend="reference").eval()
            for fmt in ("state-spaces", "hf")}


def rollout(step, state, ids):
    """Logits [b, T, V] of feeding ids[:, t] one at a time, each step given the previous step's own state."""
    out = []
    for t in range(ids.shape[1]):
        logits, state = step(ids[:, t], state)
        out.append(logits.float())
    return torch.stack(out, 1), state


def setup(artifact, reference, fmt, seed, shape, dtype=None):
    """(fp32 reference model, onnxruntime session of the ``dtype`` artifact, fresh random ids of ``shape``)."""
    torch.manual_seed(seed)
    return reference[fmt], open_session(artifact(fmt, dtype), backend="onnxruntime"), torch.randint(0, VOCAB, shape)


@pytest.mark.parametrize("fmt", ["state-spaces", "hf"])
def test_fp32_rollout_256_steps(artifact, reference, fmt):
    model, sess, ids = setup(artifact, reference, fmt, 0, (2, 256))
    with torch.no_grad():
        want, want_state = rollout(model.step, model.allocate_state(2), ids)
    got, got_state = rollout(sess.step, sess.new_state(2), ids)
    assert got.dtype == torch.float32 and got.shape == (2, 256, VOCAB)
    err = (got - want).abs().max().item()
    assert err <= FP32_ATOL, f"max abs logit error {err:.3g} over 256 steps"
    assert want.abs().max() > 0.1  # the comparison is not between near-zero logits
    assert_states_close(got_state, want_state, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", ["state-spaces", "hf"])
def test_prefill_half_then_steps_equals_full_sequence(artifact, reference, fmt):
    model, sess, ids = setup(artifact, reference, fmt, 1, (2, 64))
    with torch.no_grad():
        full, _ = model(ids)                                     # [b, T, V] in one forward
    logits, state = sess.prefill(ids[:, :32])
    assert logits.shape == (2, VOCAB)
    assert (logits - full[:, 31]).abs().max() <= FP32_ATOL
    steps, _ = rollout(sess.step, state, ids[:, 32:])
    assert (steps - full[:, 32:]).abs().max() <= FP32_ATOL
    # prefill from a given state (chunked prefill), one token (seq = 1), and a longer chunk
    _, s1 = sess.prefill(ids[:, :20])
    l1, s1 = sess.prefill(ids[:, 20:21], s1)
    assert (l1 - full[:, 20]).abs().max() <= FP32_ATOL
    l2, _ = sess.prefill(ids[:, 21:], s1)
    assert (l2 - full[:, -1]).abs().max() <= FP32_ATOL


def test_all_logits_prefill(artifact, reference):
    torch.manual_seed(2)
    model, sess = reference["hf"], open_session(artifact("hf", all_logits=True), backend="onnxruntime")
    ids = torch.randint(0, VOCAB, (3, 17))
    with torch.no_grad():
        full, want_state = model(ids)
    every, state = sess.prefill(ids, all_logits=True)
    assert every.shape == (3, 17, VOCAB) and (every - full).abs().max() <= FP32_ATOL
    last, _ = sess.prefill(ids)
    assert last.shape == (3, VOCAB) and torch.equal(last, every[:, -1])
    assert_states_close(state, want_state, atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="--all-logits"):
        open_session(artifact("hf"), backend="onnxruntime").prefill(ids, all_logits=True)


@pytest.mark.parametrize("fmt", ["state-spaces", "hf"])
def test_fp16_within_tolerance_of_fp32_model(artifact, reference, fmt):
    model, sess, ids = setup(artifact, reference, fmt, 3, (2, 96), dtype="fp16")
    assert sess.state_dtype == torch.float16
    with torch.no_grad():
        full, _ = model(ids)
    logits, state = sess.prefill(ids[:, :48])
    assert state.conv[0].dtype == torch.float16 and state.ssm[0].dtype == torch.float32
    steps, _ = rollout(sess.step, state, ids[:, 48:])
    got = torch.cat([logits[:, None], steps], 1)
    want = full[:, 47:]
    atol, rtol = DEFAULT_TOLERANCES["fp16"]
    assert within(got, want, "fp16"), f"max abs error {(got - want).abs().max():.3g} > atol {atol} + rtol {rtol}·|ref|"
    assert (got - want).abs().max() > 0  # really rounded to fp16 (not silently fp32)


def test_batch_rows_are_independent(artifact):
    """Batch 3 gives what three batch-1 runs give (prefill, then steps)."""
    torch.manual_seed(4)
    sess = open_session(artifact(), backend="onnxruntime")
    ids = torch.randint(0, VOCAB, (3, 24))
    logits, state = sess.prefill(ids[:, :16])
    steps, _ = rollout(sess.step, state, ids[:, 16:])
    for row in range(3):
        l1, s1 = sess.prefill(ids[row:row + 1, :16])
        st1, _ = rollout(sess.step, s1, ids[row:row + 1, 16:])
        assert (l1 - logits[row:row + 1]).abs().max() <= 1e-6
        assert (st1 - steps[row:row + 1]).abs().max() <= 1e-6


def test_state_interchanges_with_torch(artifact, reference):
    """A state produced by PyTorch continues on ONNX Runtime and vice versa (same state layout, model.py MambaState)."""
    torch.manual_seed(5)
    model, sess = reference["state-spaces"], open_session(artifact(), backend="onnxruntime")
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        full, _ = model(ids)
        _, torch_state = model(ids[:, :6])
    l_ort, ort_state = sess.step(ids[:, 6], torch_state)
    assert (l_ort - full[:, 6]).abs().max() <= FP32_ATOL
    with torch.no_grad():
        l_t, _ = model.step(ids[:, 7], ort_state)
    assert (l_t - full[:, 7]).abs().max() <= FP32_ATOL


# ---- bad input -----------------------------------------------------------------------------------------------
def one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_bad_state_and_ids(artifact):
    sess = open_session(artifact(), backend="onnxruntime")
    ids = torch.zeros(2, dtype=torch.long)
    good = sess.new_state(2)
    bad_shape = MambaState([c.clone() for c in good.conv], [s.clone() for s in good.ssm])
    bad_shape.ssm[1] = torch.zeros(2, 64, 9)
    with pytest.raises(UserError, match=r"ssm_state.1 has shape \(2, 64, 9\)") as e:
        sess.step(ids, bad_shape)
    one_line(e)
    with pytest.raises(UserError, match="input_ids has batch 3 but the state holds 2 sequences"):
        sess.step(torch.zeros(3, dtype=torch.long), good)  # batch 3 ids, batch 2 state
    bad_dtype = MambaState(good.conv, [s.double() for s in good.ssm])
    with pytest.raises(UserError, match="float32"):
        sess.prefill(torch.zeros(2, 3, dtype=torch.long), bad_dtype)
    with pytest.raises(UserError, match="layers"):
        sess.step(ids, MambaState(good.conv[:1], good.ssm[:1]))
    with pytest.raises(UserError, match=r"\[0, 96\)"):
        sess.step(torch.tensor([0, 96]), good)
    with pytest.raises(UserError, match=r"\[batch\]"):
        sess.step(torch.zeros(2, 1, dtype=torch.long), good)


def test_bad_artifacts(artifact, tiny_checkpoint, tmp_path):
    art = tmp_path / "other-version"
    shutil.copytree(artifact(), art)
    manifest = json.loads((art / spec.MANIFEST).read_text())
    manifest["format_version"] = spec.FORMAT_VERSION + 1
    manifest["exporter"]["version"] = "9.9.9"
    (art / spec.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="9.9.9") as e:
        open_session(art, backend="onnxruntime")
    one_line(e)
    with pytest.raises(UserError, match="not one"):  # a checkpoint is not an artifact
        open_session(tiny_checkpoint(), backend="onnxruntime")
    with pytest.raises(UserError, match="no bfloat16 kernels on CPU"):
        open_session(artifact(dtype="bf16"), backend="onnxruntime")
    with pytest.raises(UserError, match="onnxruntime-gpu|not supported|CUDA GPU"):
        open_session(artifact(), backend="onnxruntime", device="cuda" if not torch.cuda.is_available() else "xpu")
    # a modified graph file is caught by the checksum (skipped with verify=False)
    art2 = tmp_path / "modified"
    shutil.copytree(artifact(), art2)
    with open(art2 / spec.STEP_GRAPH, "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="bytes"):
        open_session(art2, backend="onnxruntime")
    open_session(art2, backend="onnxruntime", verify=False)


def test_cli_export_then_session_via_subprocess(tiny_checkpoint, tmp_path):
    """The installed command end to end: exit codes, one-line error, no traceback, nothing half-written."""
    import subprocess
    import sys

    out = tmp_path / "a"
    cmd = [sys.executable, "-c", "from mamba_deploy.cli import main; main()",
           "export", "--model", str(tiny_checkpoint("hf")), "--out", str(out)]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert [ln for ln in again.stderr.splitlines() if "error" in ln] == [
        f"mamba-deploy: error: {out} already exists; pass --force to overwrite it"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    logits, _ = open_session(out, backend="onnxruntime").prefill(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, VOCAB)


# ---- CUDA execution provider (IO binding on torch CUDA tensors); runs only where onnxruntime-gpu and a GPU are --
def _cuda_ep() -> bool:
    import onnxruntime as ort
    return torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ep(), reason="needs a CUDA GPU and onnxruntime-gpu (CUDAExecutionProvider)")
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_cuda_io_binding_matches_torch(artifact, reference, dtype):
    torch.manual_seed(6)
    model = reference["state-spaces"]
    sess = open_session(artifact(dtype=dtype), backend="onnxruntime", device="cuda", use_tf32=False)
    ids = torch.randint(0, VOCAB, (3, 80))
    with torch.no_grad():
        full, _ = model(ids)
    logits, state = sess.prefill(ids[:, :40].cuda())
    assert logits.is_cuda and state.ssm[0].is_cuda and state.conv[0].device == sess.device
    steps, state = rollout(sess.step, state, ids[:, 40:].cuda())
    got = torch.cat([logits[:, None], steps], 1).cpu()
    want = full[:, 39:]
    if dtype == "fp32":
        assert (got - want).abs().max() <= FP32_ATOL
    else:
        assert close(got, want, dtype), f"max abs error {(got - want).abs().max():.3g}"
