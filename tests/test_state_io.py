"""State save/restore: a state saved in this process and restored in a NEW process continues bit-identically (fp32)
on the same backend and within the fp32 tolerance on the other backend; states of another artifact or family,
and files that are not states, are refused with one line; generate --state-out / --state-in split a generation
into two runs that give the tokens of one."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mamba_deploy.cli import main
from mamba_deploy.errors import UserError
from mamba_deploy.onnx.export import export
from mamba_deploy.runtime.session import open_session

BACKENDS = ("onnxruntime", "torch")
PROMPT = [(13 * k + 4) % 96 for k in range(37)]
STEPS = 24
FP32_ATOL = 1e-5     # fp32 artifact vs PyTorch (mamba_deploy/onnx/tolerances.py)


@pytest.fixture(scope="module")
def artifact(tiny_checkpoint, tmp_path_factory):
    return export(tiny_checkpoint("state-spaces", seed=8), tmp_path_factory.mktemp("state") / "tiny")


def rollout(session, state, logits, steps=STEPS):
    """Greedy continuation: per step (logits, token), feeding back the session's own state."""
    out = []
    for _ in range(steps):
        token = logits[:, :96].argmax(-1)
        out.append(logits.clone())
        logits, state = session.step(token, state)
    return torch.stack(out)


CHILD = textwrap.dedent("""
    import sys, torch
    from mamba_deploy.runtime.session import open_session
    sys.path.insert(0, sys.argv[3])
    from test_state_io import rollout
    artifact, out = sys.argv[1], sys.argv[2]
    results = {}
    for backend in ("onnxruntime", "torch"):
        s = open_session(artifact, backend)
        for saved_by in ("onnxruntime", "torch"):
            st = s.load_state(f"{out}/{saved_by}.safetensors")
            results[f"{saved_by}->{backend}"] = rollout(s, st.state, st.logits)
            results[f"{saved_by}->{backend}:n"] = torch.tensor(st.n_tokens)
    torch.save(results, f"{out}/child.pt")
""")


def test_restore_in_a_new_process_continues(artifact, tmp_path):
    here = {}
    for backend in BACKENDS:
        s = open_session(str(artifact), backend)
        logits, state = s.prefill(torch.tensor([PROMPT]))
        s.save_state(state, tmp_path / f"{backend}.safetensors", len(PROMPT), logits)
        here[backend] = rollout(s, state, logits)        # the same continuation without save/restore
    subprocess.run([sys.executable, "-c", CHILD, str(artifact), str(tmp_path), str(__import__("pathlib").Path(
        __file__).parent)], check=True, timeout=300)
    child = torch.load(tmp_path / "child.pt")
    for saved_by in BACKENDS:
        for backend in BACKENDS:
            got = child[f"{saved_by}->{backend}"]
            assert int(child[f"{saved_by}->{backend}:n"]) == len(PROMPT)
            if saved_by == backend:                       # same backend: bit-identical
                assert torch.equal(got, here[backend]), (saved_by, backend)
            else:                                          # the other backend: fp32 tolerance, same tokens
                torch.testing.assert_close(got, here[saved_by], atol=FP32_ATOL, rtol=1e-4)
                assert torch.equal(got[:, :, :96].argmax(-1), here[saved_by][:, :, :96].argmax(-1))


def test_file_contents_and_refusals(artifact, tiny_checkpoint, tmp_path):
    s = open_session(str(artifact), "onnxruntime")
    logits, state = s.prefill(torch.tensor([PROMPT, PROMPT[::-1]]))
    path = s.save_state(state, tmp_path / "s.safetensors", 37, logits)
    tensors = load_file(path)
    assert set(tensors) == {"logits"} | {f"{k}.{i}" for k in ("conv_state", "ssm_state") for i in range(2)}
    for i in range(2):
        assert torch.equal(tensors[f"ssm_state.{i}"], state.ssm[i]) and tensors[f"ssm_state.{i}"].dtype == \
            torch.float32
    back = s.load_state(path)
    assert back.n_tokens == 37 and back.state.batch == 2 and torch.equal(back.logits, logits)
    assert not list(tmp_path.glob(".*tmp*"))                     # no temp file left behind

    other = export(tiny_checkpoint("state-spaces", seed=9), tmp_path / "other")
    with pytest.raises(UserError, match="another model"):
        open_session(str(other), "onnxruntime").load_state(path)
    with pytest.raises(UserError, match="another model"):        # the checkpoint itself is not the artifact
        open_session(str(tiny_checkpoint("state-spaces", seed=8)), "torch").load_state(path)

    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    for key, value, message in (("family", "mamba2", "mamba2 state"), ("format", "x", "not a mamba-deploy state")):
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**meta, key: value})
        with pytest.raises(UserError, match=message):
            s.load_state(tmp_path / "bad.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "ssm_state.1"}, str(tmp_path / "bad.safetensors"), meta)
    with pytest.raises(UserError, match="lacks ssm_state.1"):
        s.load_state(tmp_path / "bad.safetensors")
    save_file({**tensors, "ssm_state.1": tensors["ssm_state.1"][:, :, :3].contiguous()},
              str(tmp_path / "bad.safetensors"), meta)
    with pytest.raises(UserError, match="ssm_state.1 has shape"):
        s.load_state(tmp_path / "bad.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable"):
        s.load_state(tmp_path / "junk.safetensors")
    with pytest.raises(UserError, match="does not exist"):
        s.load_state(tmp_path / "missing.safetensors")


def run_cli(*args):
    r = CliRunner().invoke(main, ["generate", *map(str, args)])
    return r.exit_code, r.output


def tokens_of(output: str) -> list[int]:
    return [int(t) for t in output.split("|", 1)[1].split("state after")[0].split()]


def test_generate_state_out_then_state_in_equals_one_run(artifact, tmp_path):
    ids = ",".join(map(str, PROMPT[:9]))
    code, whole = run_cli("--artifact", artifact, "--backend", "onnxruntime", "--prompt-ids", ids, "-n", 14)
    assert code == 0, whole
    st = tmp_path / "s.safetensors"
    code, first = run_cli("--artifact", artifact, "--backend", "onnxruntime", "--prompt-ids", ids, "-n", 6,
                          "--state-out", st)
    assert code == 0, first
    assert "state after 15 tokens saved" in first
    code, second = run_cli("--artifact", artifact, "--backend", "onnxruntime", "--state-in", st, "-n", 8)
    assert code == 0, second
    assert tokens_of(first) + tokens_of(second) == tokens_of(whole)
    # the second half on the other backend, in a new process (the real command line)
    proc = subprocess.run([sys.executable, "-m", "mamba_deploy.cli", "generate", "--artifact", str(artifact),
                           "--backend", "torch", "--state-in", str(st), "-n", "8", "--state-out", str(st)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert tokens_of(first) + tokens_of(proc.stdout) == tokens_of(whole)
    assert "state after 23 tokens saved" in proc.stderr


def test_generate_state_errors_are_one_line(artifact, tiny_checkpoint, tmp_path):
    st = tmp_path / "s.safetensors"
    assert run_cli("--artifact", artifact, "--prompt-ids", "1,2", "-n", 2, "--state-out", st)[0] == 0
    for args in (("--artifact", artifact, "--prompt-ids", "1,2", "--prompt-ids", "3", "--state-out", st),
                 ("--artifact", artifact, "--state-in", tmp_path / "missing"),
                 ("--model", tiny_checkpoint("state-spaces", seed=8), "--state-in", st),
                 ("--artifact", artifact, "--prompt-ids", "1", "--state-out", tmp_path / "no" / "dir" / "s")):
        code, out = run_cli(*args)
        assert code == 2, out
        assert out.startswith("mamba-deploy: error:") and len(out.strip().splitlines()) == 1, out
