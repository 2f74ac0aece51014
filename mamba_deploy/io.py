"""Writing outputs safely: everything goes to a temporary path beside its destination and is renamed into place
only when complete, so a reader sees the old output or the whole new one, never half of one.

    atomic_write(path, data)             a file: ``data`` is bytes, text, or a function that writes the given path
    write_json(path, obj)                JSON that keeps inf/NaN (as the strings "Infinity", "-Infinity", "NaN")
    atomic_directory(out, ...)           a directory, with the rules below

Rules every writer follows:

- Temporary names are unique per writer (``.NAME.tmp-PID-RANDOM``), so two writers never share one; they are
  removed on every exit path (exceptions, Ctrl-C, SIGTERM), and leftovers of a killed process (its PID no longer
  runs) are swept the next time anything is written to the same destination.
- Outputs get the permissions the umask gives (``open`` and ``mkdir`` defaults, also for files a library created
  0600), so another user or a serving container can read them when the umask allows it.
- ``atomic_directory`` never destroys what this tool did not write: ``force`` replaces an existing output only when
  ``is_ours(path)`` recognises it (an artifact's manifest, a checkpoint's marker) or it is empty; an output equal
  to, inside, or containing one of the ``inputs``, or containing the current directory, is refused.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import threading
from pathlib import Path
from typing import Callable, Iterable

from .errors import UserError

_TMP = ".tmp-"
_OLD = ".old-"


def _private_name(path: Path, kind: str, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}{kind}{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def sweep_stale(path: Path) -> list[Path]:
    """Remove the temporaries that killed writers (PID no longer running) left beside ``path``; returns them."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for kind in (_TMP, _OLD):
        for p in path.parent.glob(f".{path.name}{kind}*"):
            pid = p.name[len(path.name) + 1 + len(kind):].split("-", 1)[0]
            if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


class _Terminated(SystemExit):
    """SIGTERM turned into an exception, so ``with`` blocks clean up as they do for Ctrl-C."""


@contextlib.contextmanager
def _sigterm_raises():
    """While the block runs, SIGTERM raises (exit status 143) instead of killing the process without cleanup.
    Only in the main thread and only when nobody else installed a SIGTERM handler."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise _Terminated(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def current_umask() -> int:
    """The process umask (read from /proc where it can be, so it is never changed, even for a moment)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _honour_umask(root: Path) -> None:
    """Give the files under ``root`` the permissions ``open`` would (0o666 minus the umask; executables keep their
    x bits), whatever their writer used: some libraries (safetensors, mkstemp) create files 0600."""
    mask = current_umask()
    paths = [root] if not root.is_dir() else [root, *root.rglob("*")]
    for p in paths:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode
        base = 0o777 if p.is_dir() else 0o666 | (mode & 0o111)
        os.chmod(p, base & ~mask)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[Path], object]) -> Path:
    """Write the file ``path`` atomically. ``data``: bytes, text (UTF-8), or ``write(tmp_path)`` that creates the
    file (it may also create a symlink); the temporary keeps ``path``'s suffix for writers that go by it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    tmp = _private_name(path, _TMP, path.suffix)
    with _sigterm_raises():
        try:
            if callable(data):
                data(tmp)
            else:
                with open(tmp, "xb") as f:
                    f.write(data.encode() if isinstance(data, str) else data)
            _honour_umask(tmp)
            os.replace(tmp, path)
        except BaseException:
            _remove(tmp)
            raise
    return path


def json_safe(x):
    """``x`` with non-finite floats as the strings "NaN", "Infinity", "-Infinity" (JSON has no inf/NaN;
    ``float()`` reads the strings back)."""
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def json_text(obj, indent: int | None = 2) -> str:
    """Standard JSON (no bare NaN/Infinity tokens) of ``obj``, non-finite floats as strings, newline-terminated."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically; inf/NaN become strings (see ``json_safe``)."""
    return atomic_write(path, json_text(obj, indent))


def refuse_existing_file(path: str | os.PathLike | None, option: str,
                         ours: Callable[[Path], bool] | None = None) -> None:
    """A single-file output named by the user (``--json FILE``, ``--state-out FILE`` …) must be a new path: an
    existing file may be the user's data (a checkpoint's weights, the text being scored), so it is refused in one
    line instead of being replaced — unless ``ours(path)`` recognises it as a file mamba-deploy wrote (e.g. a state file).
    ``None`` (option not given) passes. Raises UserError."""
    if path is None:
        return
    p = Path(path)
    if p.exists() and not (p.is_file() and ours is not None and ours(p)):
        what = "a directory" if p.is_dir() else "an existing file"
        raise UserError(f"{option} {p} is {what}; mamba-deploy writes only to a new path: remove it or choose another")


def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


class atomic_directory:
    """``with atomic_directory(out) as tmp:`` — write into ``tmp``; it becomes ``out`` only if the block succeeds.

    An existing ``out`` is refused unless ``force``, and even then only when it is empty or ``is_ours(out)``
    (``what`` names the kind of output in the error, e.g. "artifact"); then it is replaced in one rename after the
    new one is complete. ``inputs``: paths the writer reads; an ``out`` equal to, inside or containing one is refused.
    ``option`` names the output in messages (e.g. "--out")."""

    def __init__(self, out, force: bool = False, is_ours: Callable[[Path], bool] | None = None,
                 what: str = "output", inputs: Iterable = (), option: str | None = None):
        self.out = Path(os.path.abspath(out))
        self.force = force
        self.is_ours = is_ours
        self.what = what
        self.inputs = [Path(p) for p in inputs if p is not None]
        self.label = f"{option} {out}" if option else str(out)
        self._term = None

    def check(self) -> None:
        """The refusals, without writing anything (callers may check before long work)."""
        out = self.out.resolve()
        cwd = Path.cwd().resolve()
        if _contains(out, cwd):
            raise UserError(f"{self.label} is the current directory or contains it; name a new directory, e.g. "
                            f"export/tiny")
        for src in self.inputs:
            if not src.exists():
                continue
            src = src.resolve()
            if out == src:
                raise UserError(f"{self.label} is the input {src}; writing there would destroy it: choose another "
                                "directory")
            if _contains(src, out):
                raise UserError(f"{self.label} lies inside the input {src}; choose a directory outside it")
            if _contains(out, src):
                raise UserError(f"{self.label} contains the input {src}; replacing it would destroy the input: "
                                "choose another directory")
        if self.out.exists() or self.out.is_symlink():
            if not self.out.is_dir() or self.out.is_symlink():
                raise UserError(f"{self.label} exists and is not a directory; choose another path")
            if not self.force:
                raise UserError(f"{self.out} already exists; pass --force to overwrite it")
            if any(self.out.iterdir()) and not (self.is_ours and self.is_ours(self.out)):
                raise UserError(f"{self.out} exists and is not a {self.what} that mamba-deploy wrote; --force replaces "
                                f"only those: remove it yourself or choose another directory")

    def __enter__(self) -> Path:
        self.check()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(self.out)
        self._term = _sigterm_raises()
        self._term.__enter__()
        try:
            self.tmp = _private_name(self.out, _TMP)
            self.tmp.mkdir()     # mode 0o777 minus the umask (mkdtemp would make it 0700)
        except BaseException:
            self._term.__exit__(None, None, None)
            raise
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return False
            old = None
            try:
                _honour_umask(self.tmp)
                if self.out.exists():
                    old = _private_name(self.out, _OLD)
                    self.out.rename(old)
                self.tmp.rename(self.out)
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                if old is not None and not self.out.exists():
                    old.rename(self.out)
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            return False
        finally:
            self._term.__exit__(None, None, None)
