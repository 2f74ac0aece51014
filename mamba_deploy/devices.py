"""One validation of device names for every command, session and script (one-line errors, never a traceback)."""
from __future__ import annotations

import torch

from .errors import UserError


def check_device(device, option: str = "--device") -> torch.device:
    """``device`` ("cpu", "cuda", "cuda:N" or a torch.device) as a torch.device that exists on this machine.

    Errors (UserError, one line): a name torch does not know (e.g. "gpu"), a device type other than cpu/cuda,
    cuda without a visible CUDA GPU (a CPU-only torch or no driver), cuda:N beyond the visible GPUs."""
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(str(device).strip().lower())
        except (RuntimeError, ValueError):
            raise UserError(f"{option} {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"{option} {device!r}: mamba-deploy runs on cpu or cuda[:N], not {dev.type}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{option} {device} asked for a CUDA GPU but {_why_no_cuda()}; use {option} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"{option} {device}: only {torch.cuda.device_count()} CUDA GPU(s) are visible "
                            f"(cuda:0…cuda:{torch.cuda.device_count() - 1})")
    return dev


def cpu_threads(requested: int | None = None) -> int:
    """Set and return the number of threads PyTorch uses on the CPU (intra-op; ONNX Runtime sessions get the same
    number). Default: the CPUs this process may run on (``os.sched_getaffinity``), which is what a quiet machine
    wants; on a machine shared with other jobs fewer threads are faster (README: induction-tiny training on two
    busy cores, 0.21 s/step with one thread, 1.5 s/step with two), so pass ``--threads 1`` there."""
    import os
    if requested is None:
        try:
            requested = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            requested = os.cpu_count() or 1
    if requested < 1:
        raise UserError(f"--threads must be >= 1, got {requested}")
    torch.set_num_threads(requested)
    return requested


def _why_no_cuda() -> str:
    return "this PyTorch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"


def require_cuda(what: str) -> None:
    """For GPU-only scripts and benchmarks: exit 2 with one line on stderr when no CUDA GPU is visible."""
    if not torch.cuda.is_available():
        import sys
        print(f"{what}: error: needs a CUDA GPU but {_why_no_cuda()}; run it on a GPU machine", file=sys.stderr)
        raise SystemExit(2)
