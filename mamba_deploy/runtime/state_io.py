"""Save and restore a sequence's recurrent state: one safetensors file per state, tied to the model it came from.

A Mamba state is a few MB whatever the context length, so a conversation can be parked on disk and resumed later,
in another process or on another backend, without recomputing its tokens.

File layout (safetensors, tensors on CPU, exactly the bytes the session held):

    conv_state.{i}   [batch, *conv shape]       activation dtype    (names as in the graph contract; per-row
    ssm_state.{i}    [batch, *SSM shape]        float32              shapes from the family, Mamba-1:
                                                                      [d_inner, d_conv] and [d_inner, d_state])
    logits           [batch, vocab] float32     optional: the logits of the last consumed token, so a generation
                                                can continue without feeding a token again
    metadata: format, family, artifact_sha256 (sha256 of the artifact's manifest.json, "" when the session was
              opened from a checkpoint), config_sha256 (of the model config), n_tokens (tokens the state has
              consumed), batch

Loading checks the file against the session: the same family, the same artifact (manifest hash) or — for
sessions opened from a checkpoint — the same config, and the state shapes/dtypes the session's ``new_state``
makes. Anything else is a one-line ``UserError``. Since every backend's state is torch tensors of the same layout,
a state saved from one backend of an artifact loads into any other backend of the same artifact.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from ..artifact import MANIFEST
from ..errors import UserError
from ..io import atomic_write
from ..model import MambaState
from ..onnx import contract

STATE_FORMAT = "mamba-deploy-state/1"


@dataclasses.dataclass
class SavedState:
    """What ``load_state`` returns: the state, how many tokens it has consumed, and the pending logits (or None)."""

    state: MambaState
    n_tokens: int
    logits: torch.Tensor | None = None


def manifest_sha256(artifact_dir) -> str:
    """sha256 of an artifact's manifest.json (which itself lists the sha256 of every graph and weight file)."""
    return hashlib.sha256((Path(artifact_dir) / MANIFEST).read_bytes()).hexdigest()


def session_identity(session) -> dict[str, str]:
    """What a state file records about the model that made it (and what loading compares)."""
    config = getattr(getattr(session, "model", None), "config", None)
    if config is not None:
        cfg, family = config.to_dict(), config.family
    else:
        manifest = getattr(session, "manifest", None) or {}
        cfg, family = manifest.get("config", {}), manifest.get("family", "?")
    return {"family": family,
            "artifact_sha256": getattr(session, "artifact_sha256", None) or "",
            "config_sha256": hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()}


def _tensors(state: MambaState) -> dict[str, torch.Tensor]:
    out = {}
    for i, (c, s) in enumerate(zip(state.conv, state.ssm)):
        out[contract.conv_state_name(i)] = c
        out[contract.ssm_state_name(i)] = s
    return out


def save_state(session, state: MambaState, path, n_tokens: int, logits: torch.Tensor | None = None) -> Path:
    """Write ``state`` (checked against ``session``) and ``n_tokens`` to ``path`` atomically (io.atomic_write).

    ``logits`` [batch, vocab] (fp32), when given, are stored too so a restored generation needs no extra step.
    """
    from safetensors.torch import save_file

    session.check_state(state, state.batch)
    if n_tokens < 0:
        raise UserError(f"n_tokens must be >= 0, got {n_tokens}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in _tensors(state).items()}
    if logits is not None:
        if logits.dim() != 2 or logits.shape[0] != state.batch:
            raise UserError(f"logits must be [batch={state.batch}, vocab], got {tuple(logits.shape)}")
        tensors["logits"] = logits.detach().to("cpu", torch.float32).contiguous()
    meta = {"format": STATE_FORMAT, **session_identity(session), "n_tokens": str(int(n_tokens)),
            "batch": str(state.batch), "backend": session.backend}
    path = Path(path)
    if not path.resolve().parent.is_dir():
        raise UserError(f"cannot write {path}: directory {path.parent} does not exist")
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def is_state_file(path) -> bool:
    """True when ``path`` is a state file ``save_state`` wrote (its safetensors metadata names STATE_FORMAT)."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == STATE_FORMAT
    except (SafetensorError, OSError, ValueError):
        return False


def load_state(session, path) -> SavedState:
    """Read a state file written by ``save_state`` into ``session``'s device and dtypes.

    Errors (one line each): missing or unreadable file, not a state file, another family, another artifact or
    model, state shapes/dtypes that do not match the session.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"state file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors state file ({str(e).splitlines()[0][:160]})") \
            from None
    if meta.get("format") != STATE_FORMAT:
        raise UserError(f"{path} is not a mamba-deploy state file (format {meta.get('format')!r}, expected "
                        f"{STATE_FORMAT!r})")
    mine = session_identity(session)
    if meta.get("family") != mine["family"]:
        raise UserError(f"{path} holds a {meta.get('family')} state; this session runs a {mine['family']} model")
    theirs_art, my_art = meta.get("artifact_sha256", ""), mine["artifact_sha256"]
    if theirs_art or my_art:
        if theirs_art != my_art:
            src = f"artifact with manifest sha256 {theirs_art[:12]}…" if theirs_art else "checkpoint (no artifact)"
            dst = f"artifact with manifest sha256 {my_art[:12]}…" if my_art else "checkpoint (no artifact)"
            raise UserError(f"{path} was saved from another model ({src}); this session runs {dst}: states only "
                            "load into the artifact that made them")
    elif meta.get("config_sha256") != mine["config_sha256"]:
        raise UserError(f"{path} was saved from a model with another config; states only load into the model "
                        "that made them")
    try:
        n_tokens, batch = int(meta["n_tokens"]), int(meta["batch"])
    except (KeyError, ValueError):
        raise UserError(f"{path} lacks a valid n_tokens/batch in its metadata") from None
    want = session.new_state(batch)
    names = list(_tensors(want))
    missing = [n for n in names if n not in tensors]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing[:3])}: it is not a state of this model")
    state = MambaState([tensors[contract.conv_state_name(i)].to(session.device) for i in range(len(want.conv))],
                       [tensors[contract.ssm_state_name(i)].to(session.device) for i in range(len(want.ssm))])
    session.check_state(state, batch)
    logits = tensors.get("logits")
    if logits is not None:
        logits = logits.to(session.device)
    return SavedState(state, n_tokens, logits)
