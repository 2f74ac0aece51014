"""MambaConfig: one description of a Mamba-1 language model, read from and written to both config.json dialects.

* state-spaces (``state-spaces/mamba-370m``, upstream ``mamba_ssm/models/config_mamba.py``): ``d_model, n_layer,
  vocab_size, ssm_cfg{d_state, d_conv, expand, dt_rank, conv_bias, bias, layer}, rms_norm, residual_in_fp32,
  fused_add_norm, pad_vocab_size_multiple, tie_embeddings``; ``vocab_size`` is the *unpadded* tokenizer size (50277)
  and the weights are padded up to a multiple of ``pad_vocab_size_multiple`` (50280). It has no field for the norm
  ε (upstream uses 1e-5): we write ``norm_epsilon`` only when ε differs, and read it back.
* Hugging Face (``state-spaces/mamba-370m-hf``, transformers ``MambaConfig``): ``hidden_size, state_size,
  num_hidden_layers, expand, conv_kernel, time_step_rank, use_bias, use_conv_bias, residual_in_fp32,
  layer_norm_epsilon, vocab_size, tie_word_embeddings``; ``vocab_size`` is the *padded* size. We also write the
  tokenizer vocabulary as ``tokenizer_vocab_size`` (and ``pad_vocab_size_multiple``) and read them back, so a
  model saved in either format samples from the same ids; without that key the padded size is the vocabulary.

Derived dims: ``d_inner = expand · d_model``; ``dt_rank = ⌈d_model / 16⌉`` when "auto" (an integer equal to that
is read as "auto", so both dialects give equal configs).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from ...errors import UserError
from ..base import STATE_SPACES
from ..lm_config import (DEFAULT_NORM_EPS, LMConfig, check_state_spaces, hf_json, lm_from_hf,
                         lm_from_state_spaces, released_sizes, require, state_spaces_json, to_json_checked)


@dataclasses.dataclass(frozen=True)
class MambaConfig(LMConfig):
    """The shared LM fields (``LMConfig``: d_model, n_layer, vocab_size, residual_in_fp32, norm_eps,
    pad_vocab_size_multiple 8, tie_embeddings) and the Mamba-1 block's."""
    family: ClassVar[str] = "mamba1"

    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    conv_bias: bool = True
    bias: bool = False  # in_proj / out_proj bias

    def __post_init__(self):
        self.check_positive_ints(("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand",
                                  "pad_vocab_size_multiple"))
        if self.dt_rank != "auto" and (not isinstance(self.dt_rank, int) or self.dt_rank < 1):
            raise UserError(f"config field dt_rank must be 'auto' or a positive integer, got {self.dt_rank!r}")

    # ---- derived dims -------------------------------------------------------------------------------------
    @property
    def dt_rank_value(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(d_inner=self.d_inner, dt_rank_value=self.dt_rank_value, padded_vocab_size=self.padded_vocab_size)
        return d

    # ---- the two dialects ---------------------------------------------------------------------------------
    def to_state_spaces_json(self) -> dict[str, Any]:
        return state_spaces_json(self, {"layer": "Mamba1", "d_state": self.d_state, "d_conv": self.d_conv,
                                        "expand": self.expand, "dt_rank": self.dt_rank, "conv_bias": self.conv_bias,
                                        "bias": self.bias})

    def to_hf_json(self) -> dict[str, Any]:
        return hf_json(self, "MambaForCausalLM", "mamba", {
            "state_size": self.d_state,
            "expand": self.expand,
            "conv_kernel": self.d_conv,
            "intermediate_size": self.d_inner,
            "time_step_rank": self.dt_rank_value,
            "use_bias": self.bias,
            "use_conv_bias": self.conv_bias,
        })


def _dt_rank(value, d_model):
    return "auto" if value == "auto" or value == math.ceil(d_model / 16) else value


_SS_SSM_FIELDS = {"layer", "d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias", "dt_min", "dt_max",
                  "dt_init", "dt_scale", "dt_init_floor", "use_fast_path"}


def from_state_spaces_json(raw: dict[str, Any]) -> MambaConfig:
    ssm = check_state_spaces(raw, _SS_SSM_FIELDS)
    lm = lm_from_state_spaces(raw, "state-spaces", pad_multiple_default=8)
    return MambaConfig(
        **lm,
        d_state=ssm.get("d_state", 16),
        d_conv=ssm.get("d_conv", 4),
        expand=ssm.get("expand", 2),
        dt_rank=_dt_rank(ssm.get("dt_rank", "auto"), lm["d_model"]),
        conv_bias=ssm.get("conv_bias", True),
        bias=ssm.get("bias", False),
    )


def from_hf_json(raw: dict[str, Any]) -> MambaConfig:
    if raw.get("hidden_act", "silu") != "silu":
        raise UserError(f"hidden_act '{raw['hidden_act']}' is not supported (Mamba-1 uses silu)")
    d_model = require(raw, "hidden_size", "Hugging Face")
    expand = raw.get("expand", 2)
    if "intermediate_size" in raw and raw["intermediate_size"] != expand * d_model:
        raise UserError(f"intermediate_size {raw['intermediate_size']} != expand*hidden_size {expand * d_model}")
    return MambaConfig(
        **lm_from_hf(raw, "Hugging Face", tie_default=True),
        d_state=raw.get("state_size", 16),
        d_conv=raw.get("conv_kernel", 4),
        expand=expand,
        dt_rank=_dt_rank(raw.get("time_step_rank", "auto"), d_model),
        conv_bias=raw.get("use_conv_bias", True),
        bias=raw.get("use_bias", False),
    )


def from_json(raw: dict[str, Any], dialect: str) -> MambaConfig:
    return from_state_spaces_json(raw) if dialect == STATE_SPACES else from_hf_json(raw)


def same_dt_rank(name: str, back: MambaConfig, config: MambaConfig) -> bool:
    """dt_rank "auto" and the integer it stands for are the same field value."""
    return name == "dt_rank" and back.dt_rank_value == config.dt_rank_value


# Named sizes of the released Mamba-1 models (random weights of these shapes are used for benchmarks).
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(d_model=64, n_layer=2, vocab_size=256),
    **released_sizes(("130m", "370m", "790m", "1.4b", "2.8b")),
}


def config_for_size(name: str, **overrides) -> MambaConfig:
    if name not in SIZES:
        raise UserError(f"unknown model size '{name}'; choose one of {', '.join(SIZES)}")
    return MambaConfig(**{**SIZES[name], **overrides})


def to_json(config: MambaConfig, dialect: str) -> dict[str, Any]:
    """config.json of ``dialect``; checked to read back to ``config`` (a field lost would be a UserError)."""
    return to_json_checked(config, dialect, from_json, alike=same_dt_rank)
