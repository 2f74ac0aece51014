"""The PyTorch session: the reference every other backend is compared with."""
from __future__ import annotations

import torch

from ..artifact import ArtifactDims
from ..families import family_of
from ..model import MambaLM, MambaState
from ..errors import UserError
from .session import Session, is_artifact


class TorchSession(Session):
    """``prefill_chunk``: the prompt runs in pieces of at most this many tokens (each continuing from the state
    the previous left), so prefill memory is bounded by the chunk, not the prompt; only the last position's
    logits are computed unless ``all_logits``."""

    backend = "torch"

    def __init__(self, model: MambaLM, prefill_chunk: int = 2048):
        if prefill_chunk < 1:
            raise UserError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.model = model.eval()
        c = model.config
        conv, ssm = family_of(c).state_shapes(c)
        self.set_dims(ArtifactDims(c.n_layer, c.vocab_size, c.padded_vocab_size, tuple(conv), tuple(ssm), model.dtype))
        self.device = model.device

    @torch.inference_mode()
    def prefill(self, input_ids, state=None, all_logits: bool = False):
        ids = self.check_ids(input_ids, 2).to(self.device)
        if state is not None:
            self.check_state(state, ids.shape[0])
        pieces = []
        for t0 in range(0, ids.shape[1], self.prefill_chunk):
            logits, state = self.model(ids[:, t0:t0 + self.prefill_chunk], state,
                                       num_logits=None if all_logits else 1)
            if all_logits:
                pieces.append(logits.float())
        return (torch.cat(pieces, 1) if all_logits else logits[:, -1].float()), state

    @torch.inference_mode()
    def step(self, input_ids, state: MambaState):
        ids = self.check_ids(input_ids, 1).to(self.device)
        self.check_state(state, ids.shape[0])
        logits, state = self.model.step(ids, state)
        return logits.float(), state


def open_torch_session(source, device="cpu", dtype=None, allow_nonfinite: bool = False, prefill_chunk: int = 2048,
                       **_) -> TorchSession:
    """``source``: a MambaLM, a checkpoint ref, or an artifact (its manifest names the source checkpoint)."""
    if isinstance(source, MambaLM):
        return TorchSession(source, prefill_chunk)
    from ..checkpoint import load_model
    if is_artifact(source):
        from ..artifact import read_manifest
        source = read_manifest(source)["source"]["checkpoint"]
    return TorchSession(load_model(source, dtype=dtype, device=device, allow_nonfinite=allow_nonfinite),
                        prefill_chunk)
