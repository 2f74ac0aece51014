"""The plugin CUDA kernels (``plugins/selective_scan.cu`` for Mamba-1, ``plugins/ssd.cu`` for Mamba-2) through
their C ABI, with ctypes.

The shared library is built by nvcc on first use into a cache folder keyed by a hash of the sources, the flags
and the nvcc version: ``~/.cache/mamba_deploy/plugins/<hash>/libmamba_scan.so`` (``$MAMBA_DEPLOY_CACHE`` moves
the root). ``MAMBA_DEPLOY_SCAN_LIB=/path/libmamba_scan.so`` uses a library built elsewhere (``make -C plugins``).

Where the sources are: the CUDA files live in the repository's top-level ``plugins/`` folder, the one home of
the kernels. A source checkout or an editable install (``pip install -e .``) finds them there. A wheel carries a
copy under ``mamba_deploy/plugins_src/`` only if one was put there before building it (see plugins/README.md);
``find_sources`` looks in both places and says so when neither has them.

Three layers, each usable alone:
  * ``build_library`` / ``load_library``: nvcc and ctypes;
  * ``launch_step`` / ``launch_scan`` (Mamba-1), ``launch_ssd_step`` / ``launch_ssd_scan`` (Mamba-2): raw device
    pointers (ints), sizes, a dtype code and a stream handle; this is what the TensorRT plugins' ``enqueue`` calls;
  * ``selective_state_update_cuda`` / ``selective_scan_cuda`` / ``ssd_state_update_cuda`` / ``ssd_scan_cuda``:
    torch CUDA tensors in, same signature style as ``mamba_deploy.ops`` (used by the GPU tests, and ready for a
    torch fast path).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
from pathlib import Path

from ..errors import UserError
from ..io import atomic_write

LIB_NAME = "libmamba_scan.so"
SOURCES = ("selective_scan.cu", "selective_scan.h", "ssd.cu", "ssd.h", "kernel_common.cuh")
CU_FILES = ("selective_scan.cu", "ssd.cu")      # compiled together into one library
ARCHS = (80, 86, 87, 89, 90)     # SASS for Ampere (A100, A10/30x0, Orin), Ada (L4/L40, 40x0) and Hopper
PTX_ARCH = 90                    # + PTX so newer GPUs JIT-compile it
NVCC_FLAGS = ("-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-lineinfo")
ABI_VERSION = 2                  # 2: the library also holds the Mamba-2 (SSD) kernels
MAX_DSTATE = 256
# dtype codes of the C ABI (enum mamba_scan_dtype)
F32, F16, BF16 = 0, 1, 2
DTYPE_CODES = {"fp32": F32, "fp16": F16, "bf16": BF16}


def find_sources() -> Path:
    """Folder holding selective_scan.cu/.h: the package copy (wheels) or the repository's plugins/."""
    here = Path(__file__).resolve().parent
    for folder in (here.parent / "plugins_src", here.parents[1] / "plugins"):
        if all((folder / s).is_file() for s in SOURCES):
            return folder
    raise UserError("the selective-scan kernel sources (plugins/selective_scan.cu) are not installed with this "
                    "mamba-deploy; use a source checkout (pip install -e .) or set MAMBA_DEPLOY_SCAN_LIB to a "
                    "libmamba_scan.so built with `make -C plugins`")


def find_nvcc() -> str:
    candidates = [os.environ.get("NVCC"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "nvcc"))
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    raise UserError("nvcc (the CUDA compiler) was not found, and the selective-scan plugin kernels must be built "
                    "with it once: install the CUDA toolkit (>= 12) and put nvcc on PATH or set CUDA_HOME, or set "
                    "MAMBA_DEPLOY_SCAN_LIB to a libmamba_scan.so built elsewhere (make -C plugins)")


def nvcc_command(nvcc: str, src: Path, out: Path, archs=ARCHS, ptx_arch=PTX_ARCH) -> list[str]:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    if ptx_arch:
        gencode.append(f"-gencode=arch=compute_{ptx_arch},code=compute_{ptx_arch}")
    return [nvcc, *NVCC_FLAGS, *gencode, "-o", str(out), *(str(src / f) for f in CU_FILES)]


def _build_key(src: Path, nvcc: str, archs, ptx_arch) -> str:
    h = hashlib.sha256()
    for s in SOURCES:
        h.update((src / s).read_bytes())
    h.update(repr((NVCC_FLAGS, tuple(archs), ptx_arch)).encode())
    h.update(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    from .compat import cache_root
    return cache_root() / "plugins"


def build_library(out_dir: Path | None = None, archs=ARCHS, ptx_arch=PTX_ARCH, force: bool = False) -> Path:
    """Compile the kernels with nvcc (once per source/flag/nvcc hash) and return the .so path."""
    src = find_sources()
    nvcc = find_nvcc()
    key = _build_key(src, nvcc, archs, ptx_arch)
    out_dir = Path(out_dir) if out_dir else cache_dir() / key
    lib = out_dir / LIB_NAME
    if lib.is_file() and not force:
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)

    def compile_to(tmp: Path) -> None:
        cmd = nvcc_command(nvcc, src, tmp, archs, ptx_arch)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed ({proc.returncode}) building the selective-scan kernels:\n"
                               f"{' '.join(cmd)}\n{proc.stderr[-4000:]}")

    return atomic_write(lib, compile_to)  # a concurrent process sees the old state or the whole library


def library_path() -> Path:
    override = os.environ.get("MAMBA_DEPLOY_SCAN_LIB")
    if override:
        if not Path(override).is_file():
            raise UserError(f"MAMBA_DEPLOY_SCAN_LIB={override} does not exist; build it with `make -C plugins` "
                            "or unset the variable")
        return Path(override)
    return build_library()


_ptr = ctypes.c_void_p
_i64 = ctypes.c_longlong


@functools.lru_cache(maxsize=None)
def load_library() -> ctypes.CDLL:
    """Load (building first if needed) libmamba_scan.so and declare its C signatures."""
    path = library_path()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise UserError(f"cannot load {path}: {e} (a CUDA runtime/driver must be installed to run the kernels)")
    lib.mamba_scan_abi_version.restype = ctypes.c_int
    lib.mamba_scan_abi_version.argtypes = []
    if lib.mamba_scan_abi_version() != ABI_VERSION:
        raise UserError(f"{path} has C ABI version {lib.mamba_scan_abi_version()}, this package needs "
                        f"{ABI_VERSION}; rebuild it")
    common = [_ptr] * 11
    lib.mamba_selective_scan_step.restype = ctypes.c_int
    lib.mamba_selective_scan_step.argtypes = common + [_i64, _i64, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                                       ctypes.c_float, _ptr]
    lib.mamba_selective_scan.restype = ctypes.c_int
    lib.mamba_selective_scan.argtypes = common + [_i64, _i64, _i64, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                                  ctypes.c_float, _ptr]
    ssd_common = [_ptr] * 10
    ssd_tail = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_float, ctypes.c_float, _ptr]
    lib.mamba2_ssd_step.restype = ctypes.c_int
    lib.mamba2_ssd_step.argtypes = ssd_common + [_i64] + [ctypes.c_int] * 4 + ssd_tail
    lib.mamba2_ssd_scan.restype = ctypes.c_int
    lib.mamba2_ssd_scan.argtypes = ssd_common + [_i64, _i64] + [ctypes.c_int] * 4 + ssd_tail
    lib.mamba_scan_error_string.restype = ctypes.c_char_p
    lib.mamba_scan_error_string.argtypes = [ctypes.c_int]
    return lib


def _check(lib, code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"{what} failed: CUDA error {code} ({lib.mamba_scan_error_string(code).decode()})")


# ---- raw pointers (what the TensorRT plugin's enqueue calls) --------------------------------------------------
def launch_step(ptrs: dict, batch: int, dim: int, dstate: int, dtype: int, delta_softplus: bool = True,
                softplus_threshold: float = 20.0, stream: int = 0) -> None:
    """One decode step. ``ptrs``: device addresses (int; 0 = absent for D, delta_bias, z) under the names
    x, delta, A, B, C, D, delta_bias, z, state_in, state_out, y. ``stream``: a cudaStream_t as int."""
    lib = load_library()
    p = ptrs
    code = lib.mamba_selective_scan_step(p["x"], p["delta"], p["A"], p["B"], p["C"], p.get("D") or None,
                                         p.get("delta_bias") or None, p.get("z") or None, p["state_in"],
                                         p["state_out"], p["y"], batch, dim, dstate, dtype, int(delta_softplus),
                                         softplus_threshold, stream or None)
    _check(lib, code, "mamba_selective_scan_step")


def launch_scan(ptrs: dict, batch: int, dim: int, seqlen: int, dstate: int, dtype: int, delta_softplus: bool = True,
                softplus_threshold: float = 20.0, stream: int = 0) -> None:
    """The scan over ``seqlen`` steps; same pointer names as :func:`launch_step`."""
    lib = load_library()
    p = ptrs
    code = lib.mamba_selective_scan(p["x"], p["delta"], p["A"], p["B"], p["C"], p.get("D") or None,
                                    p.get("delta_bias") or None, p.get("z") or None, p["state_in"], p["state_out"],
                                    p["y"], batch, dim, seqlen, dstate, dtype, int(delta_softplus),
                                    softplus_threshold, stream or None)
    _check(lib, code, "mamba_selective_scan")


# ---- torch tensors ----------------------------------------------------------------------------------------------
def _torch_dtype_code(t) -> int:
    from ..artifact import dtype_info
    try:
        code = DTYPE_CODES.get(dtype_info(t.dtype).name)
    except KeyError:
        code = None
    if code is None:
        raise TypeError(f"activations must be float32/float16/bfloat16, got {t.dtype}")
    return code


def _ptrs(act_dtype, fp32_names, **tensors) -> dict:
    import torch
    out = {}
    for name, t in tensors.items():
        if t is None:
            out[name] = 0
            continue
        if not t.is_cuda or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous CUDA tensor")
        want = torch.float32 if name in fp32_names else act_dtype
        if t.dtype != want:
            raise TypeError(f"{name} must be {want}, got {t.dtype}")
        out[name] = t.data_ptr()
    return out


_FP32 = ("A", "D", "delta_bias", "state_in", "state_out")


def selective_state_update_cuda(state, x, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                                softplus_threshold=20.0, out_state=None, out=None):
    """Same contract as ``ops.selective_state_update`` (x, δ, z [b, d]; B, C [b, N]; state [b, d, N] fp32) on the
    CUDA kernel. ``out_state`` defaults to a new tensor; pass ``state`` itself to update in place."""
    import torch
    b, d = x.shape
    N = A.shape[1]
    out_state = torch.empty_like(state) if out_state is None else out_state
    y = torch.empty_like(x) if out is None else out
    ptrs = _ptrs(x.dtype, _FP32, x=x, delta=delta, A=A, B=B, C=C, D=D, delta_bias=delta_bias, z=z,
                 state_in=state, state_out=out_state, y=y)
    launch_step(ptrs, b, d, N, _torch_dtype_code(x), delta_softplus, softplus_threshold,
                torch.cuda.current_stream(x.device).cuda_stream)
    return y, out_state


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                        initial_state=None, softplus_threshold=20.0, out_state=None, out=None):
    """Same contract as ``ops.selective_scan_ref`` (u, δ, z [b, d, L]; B, C [b, N, L]) on the CUDA kernel."""
    import torch
    b, d, L = u.shape
    N = A.shape[1]
    if initial_state is None:
        initial_state = torch.zeros(b, d, N, dtype=torch.float32, device=u.device)
    out_state = torch.empty_like(initial_state) if out_state is None else out_state
    y = torch.empty_like(u) if out is None else out
    ptrs = _ptrs(u.dtype, _FP32, x=u, delta=delta, A=A, B=B, C=C, D=D, delta_bias=delta_bias, z=z,
                 state_in=initial_state, state_out=out_state, y=y)
    launch_scan(ptrs, b, d, L, N, _torch_dtype_code(u), delta_softplus, softplus_threshold,
                torch.cuda.current_stream(u.device).cuda_stream)
    return y, out_state


# ---- Mamba-2 (SSD): raw pointers ------------------------------------------------------------------------------------
SSD_POINTERS = ("x", "dt", "A", "B", "C", "D", "dt_bias", "state_in", "state_out", "y")


def _ssd_args(ptrs: dict) -> list:
    return [ptrs.get(k) or None for k in SSD_POINTERS]


def launch_ssd_step(ptrs: dict, batch: int, nheads: int, headdim: int, ngroups: int, dstate: int, dtype: int,
                    d_per_channel: bool = False, dt_softplus: bool = True, dt_limit=(0.0, math.inf),
                    softplus_threshold: float = 20.0, stream: int = 0) -> None:
    """One Mamba-2 decode step (plugins/ssd.h). ``ptrs``: device addresses (int; 0 = absent for D, dt_bias) under
    the names x, dt, A, B, C, D, dt_bias, state_in, state_out, y. ``stream``: a cudaStream_t as int."""
    lib = load_library()
    code = lib.mamba2_ssd_step(*_ssd_args(ptrs), batch, nheads, headdim, ngroups, dstate, int(d_per_channel),
                               dtype, int(dt_softplus), float(softplus_threshold), float(dt_limit[0]),
                               float(dt_limit[1]), stream or None)
    _check(lib, code, "mamba2_ssd_step")


def launch_ssd_scan(ptrs: dict, batch: int, seqlen: int, nheads: int, headdim: int, ngroups: int, dstate: int,
                    dtype: int, d_per_channel: bool = False, dt_softplus: bool = True, dt_limit=(0.0, math.inf),
                    softplus_threshold: float = 20.0, stream: int = 0) -> None:
    """The Mamba-2 scan over ``seqlen`` steps from state_in; same pointer names as :func:`launch_ssd_step`."""
    lib = load_library()
    code = lib.mamba2_ssd_scan(*_ssd_args(ptrs), batch, seqlen, nheads, headdim, ngroups, dstate,
                               int(d_per_channel), dtype, int(dt_softplus), float(softplus_threshold),
                               float(dt_limit[0]), float(dt_limit[1]), stream or None)
    _check(lib, code, "mamba2_ssd_scan")


# ---- Mamba-2 (SSD): torch tensors -----------------------------------------------------------------------------------
_SSD_FP32 = ("A", "D", "dt_bias", "state_in", "state_out")


def _d_per_channel(D) -> bool:
    """D [H, P] is per channel; [H] and [H, 1] (the graph contract's per-head form) are per head."""
    return D is not None and D.dim() == 2 and D.shape[1] != 1


def ssd_state_update_cuda(state, x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=True, dt_limit=(0.0, math.inf),
                          softplus_threshold=20.0, out_state=None, out=None):
    """One Mamba-2 decode step on the CUDA kernel: x [b, H, P], dt [b, H], B, C [b, G, N] (activation dtype),
    A, dt_bias [H] fp32, D [H], [H, 1] or [H, P] fp32, state [b, H, P, N] fp32. Returns (y [b, H, P], new state);
    ``out_state`` defaults to a new tensor, pass ``state`` itself to update in place."""
    import torch
    b, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    out_state = torch.empty_like(state) if out_state is None else out_state
    y = torch.empty_like(x) if out is None else out
    ptrs = _ptrs(x.dtype, _SSD_FP32, x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias, state_in=state,
                 state_out=out_state, y=y)
    launch_ssd_step(ptrs, b, H, P, G, N, _torch_dtype_code(x), _d_per_channel(D), dt_softplus, dt_limit,
                    softplus_threshold, stream=torch.cuda.current_stream(x.device).cuda_stream)
    return y, out_state


def ssd_scan_cuda(x, dt, A, B, C, D=None, dt_bias=None, initial_state=None, dt_softplus=True,
                  dt_limit=(0.0, math.inf), softplus_threshold=20.0, out_state=None, out=None):
    """The Mamba-2 scan on the CUDA kernel, same arguments as ``ops.triton_ssd.ssd_scan_triton``: x [b, L, H, P],
    dt [b, L, H], B, C [b, L, G, N]; initial_state [b, H, P, N] fp32 (zeros if None). Returns (y, final state)."""
    import torch
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    if initial_state is None:
        initial_state = torch.zeros(b, H, P, N, dtype=torch.float32, device=x.device)
    out_state = torch.empty_like(initial_state) if out_state is None else out_state
    y = torch.empty_like(x) if out is None else out
    ptrs = _ptrs(x.dtype, _SSD_FP32, x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias, state_in=initial_state,
                 state_out=out_state, y=y)
    launch_ssd_scan(ptrs, b, L, H, P, G, N, _torch_dtype_code(x), _d_per_channel(D), dt_softplus, dt_limit,
                    softplus_threshold, stream=torch.cuda.current_stream(x.device).cuda_stream)
    return y, out_state
