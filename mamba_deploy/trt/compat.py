"""Import whichever TensorRT is installed: ``tensorrt`` (>= 10) or TensorRT-RTX (``tensorrt_rtx_bindings``).

Both expose the same Python API for what we use (Builder, OnnxParser, IPluginV3, Runtime, execute_async_v3), so
the rest of ``mamba_deploy.trt`` imports ``trt`` from here and never names a flavor.

TensorRT-RTX from pip (``tensorrt-rtx-cu13-libs``) ships ``libtensorrt_rtx.so.1`` only, but the library later
``dlopen``s itself as ``libtensorrt_rtx.so`` (when the ONNX parser creates a plugin) and the process dies with
"terminate called without an active exception". ``dlopen`` searches the library's own RPATH (``$ORIGIN``, the
wheel's folder) at call time, so a symlink ``libtensorrt_rtx.so → libtensorrt_rtx.so.1`` in that folder fixes it;
we create it on import. (A preloaded copy under another path does not help: glibc matches an already loaded
library by path or soname, and the soname is ``libtensorrt_rtx.so.1``; LD_LIBRARY_PATH is read only at process
start.) If the folder is read-only we fall back to a symlink in our cache folder, which then has to be on
LD_LIBRARY_PATH when Python starts; the error says exactly that.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from types import ModuleType

from ..errors import UserError

INSTALL_HINT = ("TensorRT is not installed: pip install 'mamba-deploy[tensorrt]' (TensorRT-RTX: "
                "tensorrt-rtx-cu13-libs and tensorrt-rtx-cu13-bindings), or pip install 'tensorrt>=10'")
RTX_LIB = "libtensorrt_rtx.so"


def cache_root() -> Path:
    return Path(os.environ.get("MAMBA_DEPLOY_CACHE", Path.home() / ".cache" / "mamba_deploy"))


def _ensure_rtx_unversioned_lib() -> None:
    """Make ``libtensorrt_rtx.so`` resolvable for TensorRT-RTX's own dlopen (see the module docstring)."""
    try:
        import tensorrt_rtx_libs
    except ImportError:
        return  # libraries installed another way (tarball on LD_LIBRARY_PATH): nothing to do here
    libdir = Path(tensorrt_rtx_libs.__file__).resolve().parent
    versioned = next(iter(sorted(libdir.glob(RTX_LIB + ".*"))), None)
    if versioned is None or (libdir / RTX_LIB).exists():
        return
    try:
        from ..io import atomic_write
        atomic_write(libdir / RTX_LIB, lambda tmp: tmp.symlink_to(versioned.name))
        return
    except OSError:
        pass
    fallback = cache_root() / "tensorrt_rtx_lib"
    fallback.mkdir(parents=True, exist_ok=True)
    link = fallback / RTX_LIB
    if not link.exists():
        link.symlink_to(versioned)
    if str(fallback) not in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep):
        raise UserError(f"TensorRT-RTX needs {RTX_LIB} next to {versioned.name}, and {libdir} is read-only; "
                        f"run `export LD_LIBRARY_PATH={fallback}:$LD_LIBRARY_PATH` and start again")


@functools.lru_cache(maxsize=None)
def _import() -> tuple[ModuleType, str]:
    errors = []
    try:
        import tensorrt as trt
        if int(trt.__version__.split(".")[0]) < 10:
            errors.append(f"tensorrt {trt.__version__} is too old (need >= 10)")
        elif not hasattr(trt, "IPluginV3"):
            errors.append("tensorrt lacks IPluginV3")
        else:
            return trt, "tensorrt"
    except Exception as e:  # the pip `tensorrt` stub raises at import when it could not fetch the real wheel
        errors.append(f"tensorrt: {type(e).__name__}")
    for name in ("tensorrt_rtx_bindings", "tensorrt_rtx"):
        try:
            _ensure_rtx_unversioned_lib()
            trt = __import__(name)
            return trt, "tensorrt_rtx"
        except ImportError as e:
            errors.append(f"{name}: {type(e).__name__}")
    raise UserError(INSTALL_HINT)


def tensorrt() -> ModuleType:
    """The TensorRT module (``tensorrt`` or TensorRT-RTX's bindings); UserError naming what to install if none."""
    return _import()[0]


def flavor() -> str:
    """'tensorrt' or 'tensorrt_rtx'."""
    return _import()[1]


def available() -> bool:
    try:
        _import()
        return True
    except UserError:
        return False


def describe() -> str:
    trt, fl = _import()
    return f"{fl} {trt.__version__}"
