"""FalconMambaConfig: a Mamba-1 config plus ``mixer_rms_eps`` (the ε of the weight-less RMSNorms on δ, B and C).

* Hugging Face (transformers ``FalconMambaConfig``, ``tiiuae/falcon-mamba-7b``): the Mamba-1 HF fields with
  ``model_type: "falcon_mamba"`` and ``mixer_rms_eps`` (default 1e-6); falcon-mamba-7b has an untied lm_head.
* state-spaces: upstream has no FalconMamba config; mamba-deploy writes the Mamba-1 state-spaces config with
  ``ssm_cfg.layer = "FalconMamba"`` and ``ssm_cfg.mixer_rms_eps``, and reads that back.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from ...errors import UserError
from ..base import STATE_SPACES
from ..mamba1.config import MambaConfig
from ..mamba1.config import from_hf_json as mamba1_from_hf_json
from ..mamba1.config import from_state_spaces_json as mamba1_from_state_spaces_json
from ..mamba1.config import same_dt_rank
from ..lm_config import to_json_checked

DEFAULT_MIXER_RMS_EPS = 1e-6
SS_LAYER = "FalconMamba"


@dataclasses.dataclass(frozen=True)
class FalconMambaConfig(MambaConfig):
    family: ClassVar[str] = "falcon_mamba"

    mixer_rms_eps: float = DEFAULT_MIXER_RMS_EPS

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.mixer_rms_eps, (int, float)) or isinstance(self.mixer_rms_eps, bool) \
                or not self.mixer_rms_eps > 0:
            raise UserError(f"config field mixer_rms_eps must be a positive number, got {self.mixer_rms_eps!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "family": self.family}

    def to_state_spaces_json(self) -> dict[str, Any]:
        out = super().to_state_spaces_json()
        out["ssm_cfg"] = {**out["ssm_cfg"], "layer": SS_LAYER, "mixer_rms_eps": self.mixer_rms_eps}
        return out

    def to_hf_json(self) -> dict[str, Any]:
        return {**super().to_hf_json(), "architectures": ["FalconMambaForCausalLM"], "model_type": "falcon_mamba",
                "mixer_rms_eps": self.mixer_rms_eps}


def _from_mamba1(config: MambaConfig, mixer_rms_eps) -> FalconMambaConfig:
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(MambaConfig)}
    return FalconMambaConfig(**fields, mixer_rms_eps=mixer_rms_eps)


def from_state_spaces_json(raw: dict[str, Any]) -> FalconMambaConfig:
    ssm = dict(raw.get("ssm_cfg") or {})
    eps = ssm.pop("mixer_rms_eps", DEFAULT_MIXER_RMS_EPS)
    ssm["layer"] = "Mamba1"
    return _from_mamba1(mamba1_from_state_spaces_json({**raw, "ssm_cfg": ssm}), eps)


def from_hf_json(raw: dict[str, Any]) -> FalconMambaConfig:
    return _from_mamba1(mamba1_from_hf_json(raw), raw.get("mixer_rms_eps", DEFAULT_MIXER_RMS_EPS))


def from_json(raw: dict[str, Any], dialect: str) -> FalconMambaConfig:
    return from_state_spaces_json(raw) if dialect == STATE_SPACES else from_hf_json(raw)


def to_json(config: FalconMambaConfig, dialect: str) -> dict[str, Any]:
    """config.json of ``dialect``; checked to read back to ``config`` (a field lost would be a UserError)."""
    return to_json_checked(config, dialect, from_json, alike=same_dt_rank)


# A tiny shape for tests and demos (random weights).
SIZES: dict[str, dict[str, Any]] = {
    "falcon-mamba-tiny": dict(d_model=64, n_layer=2, vocab_size=256, tie_embeddings=False),
}
