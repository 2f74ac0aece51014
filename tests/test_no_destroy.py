"""The commands never destroy what mamba-deploy did not write: --force replaces only its own outputs, an output
equal to / inside / containing the input is refused, --out . is one line, and nothing hidden is left behind."""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from mamba_deploy.cli import main


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def one_error(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.startswith("mamba-deploy: error:")]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    return lines[0]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def hidden(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


@pytest.fixture()
def ckpt(tmp_path):
    out = tmp_path / "models" / "tiny"
    r = cli("random", "--size", "tiny", "--out", out, "--seed", "3")
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("where,words", [("same", "is the input"), ("inside", "inside the input"),
                                         ("parent", "contains the input")])
def test_export_refuses_out_overlapping_the_input(ckpt, where, words):
    out = {"same": ckpt, "inside": ckpt / "export", "parent": ckpt.parent}[where]
    before = snapshot(ckpt.parent)
    r = cli("export", "--model", ckpt, "--out", out, "--force")
    assert words in one_error(r)
    assert snapshot(ckpt.parent) == before and hidden(ckpt.parent) == [] and hidden(ckpt) == []


@pytest.mark.parametrize("command", ["export", "random"])
def test_force_replaces_only_what_mamba_deploy_wrote(ckpt, tmp_path, command):
    user = tmp_path / "user_folder"
    (user / "deep").mkdir(parents=True)
    (user / "thesis.tex").write_text("years of work")
    (user / "deep" / "data.bin").write_bytes(os.urandom(64))
    art = tmp_path / "art"
    assert cli("export", "--model", ckpt, "--out", art).exit_code == 0
    args = {"export": ["export", "--model", ckpt], "random": ["random", "--size", "tiny"]}[command]
    # a folder of user files, or an output of the other kind (an artifact is not a checkpoint and vice versa)
    other_kind = art if command == "random" else ckpt.parent / "second"
    if command == "export":
        assert cli("random", "--out", other_kind).exit_code == 0
    for victim in (user, other_kind):
        before = snapshot(victim)
        r = cli(*args, "--out", victim, "--force")
        assert "not a" in one_error(r) and "--force replaces only" in one_error(r)
        assert snapshot(victim) == before and hidden(victim.parent) == []
    # its own output of the same kind: replaced
    mine = art if command == "export" else ckpt
    r = cli(*args, "--out", mine, "--force")
    assert r.exit_code == 0, r.output
    assert hidden(mine.parent) == []


@pytest.mark.parametrize("out", [".", "./", "sub/..", ".."])
@pytest.mark.parametrize("force", [False, True])
def test_out_dot_is_one_line_and_leaves_nothing(ckpt, tmp_path, monkeypatch, out, force):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    r = cli("export", "--model", ckpt, "--out", out, *(["--force"] if force else []))
    assert "current directory" in one_error(r)
    assert snapshot(tmp_path) == before and hidden(work) == [] and hidden(tmp_path) == []


def test_exported_artifact_and_checkpoint_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        ckpt, art = tmp_path / "c", tmp_path / "a"
        assert cli("random", "--out", ckpt).exit_code == 0
        assert cli("export", "--model", ckpt, "--out", art).exit_code == 0
    finally:
        os.umask(old)
    for root in (ckpt, art):
        assert stat.S_IMODE(root.stat().st_mode) == 0o755
        files = [p for p in root.iterdir() if p.is_file()]
        assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in files), \
            {p.name: oct(p.stat().st_mode) for p in files}


def test_single_file_outputs_never_replace_existing_files(ckpt, tmp_path):
    """--state-out, --json and --plot name new paths: an existing file (here the checkpoint's own weights, the text
    being scored, an unrelated file) is refused in one line and left as it was."""
    art = tmp_path / "art"
    assert cli("export", "--model", ckpt, "--out", art).exit_code == 0
    text = tmp_path / "t.txt"
    text.write_text("hello world, hello mamba\n" * 4)
    other = tmp_path / "precious.txt"
    other.write_text("mine")
    weights = next(ckpt.glob("*.safetensors"))
    before = snapshot(tmp_path)
    for args, option in (
            (["generate", "--artifact", art, "--prompt-ids", "1,2", "-n", "2", "--state-out", weights], "--state-out"),
            (["eval", "--artifact", art, "--text", text, "--json", text], "--json"),
            (["bench", "--artifact", art, "--backend", "onnxruntime", "--batch", "1", "--prompt-len", "4",
              "--max-new-tokens", "2", "--json", other], "--json"),
            (["bench", "--artifact", art, "--backend", "onnxruntime", "--batch", "1", "--prompt-len", "4",
              "--max-new-tokens", "2", "--plot", other], "--plot"),
            (["check", "--artifact", art, "--steps", "2", "--json", other], "--json"),
            (["check", "--artifact", art, "--steps", "2", "--plot", weights], "--plot")):
        line = one_error(cli(*args))
        assert option in line and "new path" in line, line
    assert snapshot(tmp_path) == before
    # a new path in a directory that does not exist yet is fine (the writer creates it, as for every output)
    fresh = tmp_path / "results" / "ppl.json"
    assert cli("eval", "--artifact", art, "--text", text, "--json", fresh).exit_code == 0 and fresh.is_file()


def test_eval_refuses_an_empty_text_and_a_directory(ckpt, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "is empty" in one_error(cli("eval", "--model", ckpt, "--text", empty))
    assert "is a directory" in one_error(cli("eval", "--model", ckpt, "--text", tmp_path))
