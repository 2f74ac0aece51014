"""What a scan's ``backend="auto"`` means: the Triton kernels on CUDA when they import, else the chunked PyTorch scan.

Used by the selective scan (Mamba-1 / FalconMamba, ``ops/triton_scan.py``) and the SSD scan (Mamba-2,
``ops/triton_ssd.py``); each passes the name of its Triton kernel module.
"""
from __future__ import annotations

import functools
import importlib

import torch


@functools.lru_cache(maxsize=None)
def kernels_importable(module: str) -> bool:
    """Whether Triton and ``mamba_deploy.ops.<module>`` import on this machine (cached per module)."""
    try:
        import triton  # noqa: F401

        importlib.import_module(f"{__package__}.{module}")
        return True
    except ImportError:
        return False


def resolve_auto(requested: str, device: torch.device | None, module: str) -> str:
    """``auto`` → ``triton`` on a CUDA ``device`` when ``module``'s Triton kernels import, else ``chunked``; other
    names pass through unchanged."""
    if requested != "auto":
        return requested
    return "triton" if device is not None and device.type == "cuda" and kernels_importable(module) else "chunked"
