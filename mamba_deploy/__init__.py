"""mamba-deploy: Mamba language models outside PyTorch — ONNX export, TensorRT plugin, parity checks, benchmarks.

Imports are lazy: ``import mamba_deploy`` pulls in no kernel, no onnx and no TensorRT.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "MambaConfig": ("config", "MambaConfig"),
    "MambaLM": ("model", "MambaLM"),
    "MambaState": ("model", "MambaState"),
    "random_model": ("model", "random_model"),
    "load_model": ("checkpoint", "load_model"),
    "save_model": ("checkpoint", "save_model"),
    "UserError": ("errors", "UserError"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'mamba_deploy' has no attribute {name!r}")


__all__ = list(_LAZY) + ["__version__"]
