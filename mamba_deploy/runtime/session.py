"""The session API every backend implements, and ``open_session`` that picks one.

A session holds a model (PyTorch module, ONNX Runtime sessions, TensorRT engines …) and offers:

    new_state(batch)               → MambaState of zeros (torch tensors on the session's device)
    prefill(ids[b, T], state=None) → (logits[b, V] of the last position, fp32 torch tensor; state after T tokens)
    step(ids[b], state)            → (logits[b, V] fp32; state after one more token)

States are ``MambaState`` of torch tensors (conv state in the activation dtype, SSM state fp32; per-row shapes from
the model family, read from the manifest's ``dims``) whatever the backend, so they move between backends and a caller
never sees numpy/TensorRT buffers. ``vocab_size`` is the tokenizer vocabulary, ``padded_vocab_size`` the logits width;
generation never samples an id ≥ ``vocab_size``.
"""
from __future__ import annotations

import abc
import importlib
from pathlib import Path

import torch

from ..artifact import ArtifactDims
from ..errors import UserError
from ..model import MambaState

# backend name → "module:factory" (factory(source, **options) -> Session); imported only when asked for
BACKENDS: dict[str, str] = {
    "torch": "mamba_deploy.runtime.torch_session:open_torch_session",
    "onnxruntime": "mamba_deploy.runtime.ort_session:open_ort_session",
    "torch-fast": "mamba_deploy.runtime.fast_session:open_fast_session",
    "tensorrt": "mamba_deploy.runtime.trt_session:open_trt_session",
}


class Session(abc.ABC):
    backend: str = "?"
    n_layer: int
    vocab_size: int                # tokenizer vocabulary
    padded_vocab_size: int         # logits width (ids from vocab_size on are padding rows)
    conv_shape: tuple[int, ...]    # per-row conv state shape (Mamba-1: d_inner, d_conv)
    ssm_shape: tuple[int, ...]     # per-row SSM state shape (Mamba-1: d_inner, d_state)
    device: torch.device
    state_dtype: torch.dtype       # dtype of the conv state

    def set_dims(self, dims: ArtifactDims) -> None:
        self.n_layer, self.vocab_size, self.padded_vocab_size = dims.n_layer, dims.vocab_size, dims.padded_vocab_size
        self.conv_shape, self.ssm_shape, self.state_dtype = dims.conv_state, dims.ssm_state, dims.state_dtype
    artifact_sha256: str | None = None  # sha256 of the artifact's manifest.json (set by open_session)

    @abc.abstractmethod
    def prefill(self, input_ids: torch.Tensor, state: MambaState | None = None) -> tuple[torch.Tensor, MambaState]:
        ...

    @abc.abstractmethod
    def step(self, input_ids: torch.Tensor, state: MambaState) -> tuple[torch.Tensor, MambaState]:
        ...

    def new_state(self, batch: int) -> MambaState:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise UserError(f"new_state(batch) needs a positive number of sequences, got {batch!r}")
        return MambaState(
            [torch.zeros(batch, *self.conv_shape, dtype=self.state_dtype, device=self.device)
             for _ in range(self.n_layer)],
            [torch.zeros(batch, *self.ssm_shape, dtype=torch.float32, device=self.device)
             for _ in range(self.n_layer)])

    def save_state(self, state: MambaState, path, n_tokens: int, logits: torch.Tensor | None = None):
        """Write ``state`` to a safetensors file with this model's identity and the token count (state_io.py)."""
        from .state_io import save_state
        return save_state(self, state, path, n_tokens, logits)

    def load_state(self, path):
        """Read a state file of this model → ``SavedState(state, n_tokens, logits)``; another artifact or family
        is a one-line UserError (state_io.py)."""
        from .state_io import load_state
        return load_state(self, path)

    # -- input validation shared by all backends ---------------------------------------------------------------
    def check_ids(self, input_ids: torch.Tensor, ndim: int) -> torch.Tensor:
        """``ndim`` 1: one token per sequence (step); 2: [batch, seq] with seq ≥ 1 (prefill). Each message names
        only what is wrong."""
        if not isinstance(input_ids, torch.Tensor):
            try:
                input_ids = torch.as_tensor(input_ids)
            except (TypeError, ValueError, RuntimeError):
                raise UserError(f"input_ids must be a tensor of token ids, got {type(input_ids).__name__}") from None
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise UserError(f"input_ids must hold integer token ids (int64 or int32), got "
                            f"{_dtype(input_ids.dtype)}")
        if input_ids.dim() != ndim:
            want = "[batch] (one token per sequence)" if ndim == 1 else "[batch, seq]"
            raise UserError(f"input_ids must have shape {want}, got shape {tuple(input_ids.shape)}")
        if input_ids.shape[0] < 1:
            raise UserError("input_ids holds no sequence (batch 0)")
        if ndim == 2 and input_ids.shape[1] < 1:
            raise UserError(f"prefill needs at least one token per sequence; input_ids has shape "
                            f"{tuple(input_ids.shape)} (an empty prompt)")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.padded_vocab_size):
            raise UserError(f"token ids must lie in [0, {self.padded_vocab_size}); got {int(input_ids.min())}…"
                            f"{int(input_ids.max())}")
        return input_ids.long()

    def check_state(self, state: MambaState, batch: int) -> None:
        if not isinstance(state, MambaState):
            raise UserError(f"state must be a MambaState (from session.new_state), got {type(state).__name__}")
        if len(state.conv) != self.n_layer or len(state.ssm) != self.n_layer:
            raise UserError(f"state has {len(state.conv)} conv / {len(state.ssm)} ssm layers; this model has "
                            f"{self.n_layer}")
        rows = {t.shape[0] for t in (*state.conv, *state.ssm) if t.dim() > 0}
        if len(rows) == 1 and rows != {batch}:
            raise UserError(f"input_ids has batch {batch} but the state holds {rows.pop()} sequences: give one "
                            f"state row per sequence (session.new_state({batch}))")
        want_conv = (batch, *self.conv_shape)
        want_ssm = (batch, *self.ssm_shape)
        for i, (c, s) in enumerate(zip(state.conv, state.ssm)):
            if tuple(c.shape) != want_conv:
                raise UserError(f"conv_state.{i} has shape {tuple(c.shape)}; expected {want_conv} [batch, …]")
            if tuple(s.shape) != want_ssm:
                raise UserError(f"ssm_state.{i} has shape {tuple(s.shape)}; expected {want_ssm} [batch, …]")
            if s.dtype != torch.float32:
                raise UserError(f"ssm_state.{i} is {_dtype(s.dtype)}; the SSM state is always float32")
            if c.dtype != self.state_dtype:
                raise UserError(f"conv_state.{i} is {_dtype(c.dtype)}; this model's conv state is "
                                f"{_dtype(self.state_dtype)}")


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# what to install for a backend whose package is missing
BACKEND_PACKAGES = {
    "onnxruntime": "onnxruntime (pip install onnxruntime, or onnxruntime-gpu for the CUDA EP)",
    "tensorrt": "TensorRT (pip install tensorrt, or tensorrt-rtx-cu13-bindings and tensorrt-rtx-cu13-libs)",
    "torch-fast": "Triton and a CUDA GPU (pip install triton)",
}


def check_backend_name(backend: str) -> None:
    """One-line error for a backend name that is not registered."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")


def open_session(source, backend: str = "torch", **options) -> Session:
    """Open ``source`` (an artifact directory, a checkpoint ref, or a MambaLM) on ``backend``. Unknown backends and
    missing packages are one-line errors that say what to install."""
    check_backend_name(backend)
    if options.get("device") is not None:
        from ..devices import check_device
        check_device(options["device"], option="device")
    module, factory = BACKENDS[backend].split(":")
    try:
        session = getattr(importlib.import_module(module), factory)(source, **options)
    except ImportError as e:
        if (e.name or "").startswith("mamba_deploy"):
            raise
        what = BACKEND_PACKAGES.get(backend, f"the '{e.name}' package")
        raise UserError(f"backend '{backend}' is not available: it needs {what} ({e.name or e} is not "
                        "installed)") from None
    if is_artifact(source):
        from .state_io import manifest_sha256
        session.artifact_sha256 = manifest_sha256(source)
    return session


def is_artifact(source) -> bool:
    from ..artifact import is_artifact as _is
    return _is(source)
