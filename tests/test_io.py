"""mamba_deploy.io: temporary path + rename for every output, JSON with inf/NaN, umask, SIGTERM, stale sweeps."""
from __future__ import annotations

import json
import math
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mamba_deploy.errors import UserError
from mamba_deploy.io import atomic_directory, atomic_write, sweep_stale, write_json

ROOT = Path(__file__).resolve().parents[1]


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_atomic_write_two_writers_never_share_a_temporary(tmp_path):
    """A writer that, while writing, lets a second writer write the same destination (what two processes or
    two threads do): both temporaries exist at once, so a fixed name would clobber one of them."""
    dest = tmp_path / "report.json"
    seen = []

    def outer(p: Path):
        p.write_text("outer")
        atomic_write(dest, lambda q: (seen.append(q), q.write_text("inner")))
        seen.append(p)
        assert p.read_text() == "outer"

    atomic_write(dest, outer)
    assert seen[0] != seen[1] and dest.read_text() == "outer"
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("payload", [b"\x00\x01bytes", "text ✓", None])
def test_atomic_write_failure_keeps_the_old_file(tmp_path, payload):
    dest = tmp_path / "engine.plan"
    dest.write_bytes(b"old")

    def failing(p: Path):
        p.write_bytes(b"half")
        raise RuntimeError("writer died")

    atomic_write(tmp_path / "other.bin", payload if payload is not None else (lambda p: p.write_text("x")))
    with pytest.raises(RuntimeError):
        atomic_write(dest, failing)
    assert dest.read_bytes() == b"old" and hidden(tmp_path) == []


def test_write_json_keeps_non_finite_values_as_standard_json(tmp_path):
    obj = {"a": float("nan"), "b": [1.5, float("inf"), -math.inf], "c": {"d": (2, float("-inf"))}, "e": None}
    path = write_json(tmp_path / "r.json", obj)

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    back = json.loads(path.read_text(), parse_constant=no_constants)
    assert back == {"a": "NaN", "b": [1.5, "Infinity", "-Infinity"], "c": {"d": [2, "-Infinity"]}, "e": None}
    assert math.isnan(float(back["a"])) and float(back["b"][1]) == math.inf and float(back["b"][2]) == -math.inf


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_outputs_honour_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        with atomic_directory(tmp_path / "art") as tmp:
            (tmp / "weights.bin").write_bytes(b"w")
            atomic_write(tmp / "manifest.json", "{}")
        atomic_write(tmp_path / "report.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "art").stat().st_mode) == 0o777 & ~mask
    for f in (tmp_path / "art" / "weights.bin", tmp_path / "art" / "manifest.json", tmp_path / "report.json"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from mamba_deploy.io import atomic_directory, atomic_write
    out = Path(sys.argv[1])
    if sys.argv[2] == "dir":
        with atomic_directory(out) as tmp:
            (tmp / "big.bin").write_bytes(b"x" * 1000)
            print(tmp, flush=True)
            time.sleep(120)
    else:
        def slow(p):
            p.write_bytes(b"x" * 1000)
            print(p, flush=True)
            time.sleep(120)
        atomic_write(out, slow)
""")


def start_writer(tmp_path: Path, kind: str) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(root=str(ROOT)))
    out = tmp_path / "out" / ("artifact" if kind == "dir" else "report.json")
    proc = subprocess.Popen([sys.executable, str(script), str(out), kind], stdout=subprocess.PIPE, text=True)
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.exists() and tmp.parent == out.parent
    return proc, out


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_sigterm_removes_the_temporary(tmp_path, kind):
    proc, out = start_writer(tmp_path, kind)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_temporaries_of_killed_writers_are_swept_and_live_ones_kept(tmp_path, kind):
    killed, out = start_writer(tmp_path, kind)
    killed.kill()                                   # SIGKILL: no handler runs, the temporary stays
    killed.wait(timeout=60)
    stale = hidden(out.parent)
    assert len(stale) == 1
    live, _ = start_writer(tmp_path, kind)          # the next writer sweeps it ...
    try:
        left = hidden(out.parent)
        assert stale[0] not in left and len(left) == 1
        if kind == "dir":                           # ... but never a running writer's temporary
            with atomic_directory(out) as tmp:
                (tmp / "f").write_text("new")
        else:
            atomic_write(out, "new")
        assert hidden(out.parent) == left and out.exists()
    finally:
        live.kill()
        live.wait(timeout=60)
    assert [p.name for p in sweep_stale(out)] == left   # now dead too: swept
    assert hidden(out.parent) == []


def test_atomic_directory_refusals(tmp_path, monkeypatch):
    src = tmp_path / "models" / "tiny"
    src.mkdir(parents=True)
    (src / "config.json").write_text("{}")
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "MARK").write_text("")

    def is_ours(p):
        return (p / "MARK").exists()

    cases = {
        src: "is the input", src / "sub": "inside the input", tmp_path / "models": "contains the input",
        user: "not a artifact that mamba-deploy wrote", tmp_path / "mine" / "notes.txt": "not a directory",
    }
    for out, words in cases.items():
        with pytest.raises(UserError, match=words):
            with atomic_directory(out, force=True, is_ours=is_ours, what="artifact", inputs=[src]):
                raise AssertionError("must not be entered")
    monkeypatch.chdir(user)
    for out in (".", "./", "..", str(user / "x" / "..")):
        with pytest.raises(UserError, match="current directory"):
            with atomic_directory(out, force=True, is_ours=is_ours):
                raise AssertionError("must not be entered")
    assert (user / "notes.txt").read_text() == "keep me" and (src / "config.json").exists()
    assert hidden(tmp_path) == [] and hidden(user) == []
    with atomic_directory(ours, force=True, is_ours=is_ours) as tmp:   # ours: replaced
        (tmp / "new").write_text("")
    assert sorted(p.name for p in ours.iterdir()) == ["new"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_directory(empty, force=True, is_ours=is_ours) as tmp:  # empty: nothing to lose
        (tmp / "new").write_text("")
    assert hidden(tmp_path) == []
