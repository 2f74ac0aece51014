"""Mamba2Config: one description of a Mamba-2 (SSD) language model, read from and written to both config.json dialects.

* state-spaces (``state-spaces/mamba2-370m``, upstream ``mamba_ssm/models/config_mamba.py`` with
  ``ssm_cfg.layer = "Mamba2"``; the ssm_cfg fields are the arguments of upstream ``mamba_ssm/modules/mamba2.py``):
  ``d_state`` (default 128), ``d_conv``, ``expand``, ``headdim`` (64), ``ngroups`` (1), ``chunk_size`` (256),
  ``D_has_hdim``, ``rmsnorm``, ``norm_before_gate``, ``dt_limit``, ``bias``, ``conv_bias``, ``d_ssm``; the top level as
  for Mamba-1 (``vocab_size`` unpadded, ``pad_vocab_size_multiple`` 16 for the released models).
* Hugging Face (transformers ``Mamba2Config``, e.g. ``mistralai/Mamba-Codestral-7B-v0.1``): ``hidden_size,
  state_size, num_hidden_layers, expand, conv_kernel, head_dim, num_heads, n_groups, chunk_size, time_step_limit,
  use_bias, use_conv_bias, residual_in_fp32, layer_norm_epsilon, tie_word_embeddings, vocab_size`` (padded).
  transformers always gates before the norm (upstream ``norm_before_gate=False``) and older versions wrote a
  meaningless ``norm_before_gate: true`` default into config.json, so that key is ignored when read; a model with
  ``norm_before_gate=True`` or a per-channel D (``D_has_hdim``) cannot be written in this dialect.

Derived dims: ``d_inner = expand · d_model``, ``nheads = d_inner / headdim``, ``conv_dim = d_inner + 2·ngroups·d_state``
(the conv runs over [x, B, C]), in_proj width ``2·d_inner + 2·ngroups·d_state + nheads`` ([z, xBC, δ]).
Not supported (one-line errors): attention or MLP layers (hybrids), ``d_ssm ≠ d_inner``, ``rmsnorm: false``, a
non-SiLU activation.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from ...errors import UserError
from ..base import STATE_SPACES
from ..lm_config import (DEFAULT_NORM_EPS, LMConfig, check_state_spaces, hf_json, lm_from_hf,
                         lm_from_state_spaces, released_sizes, require, state_spaces_json, to_json_checked)
INF = float("inf")


def _number(v) -> float:
    """A JSON number; also ``Infinity`` as a string or as transformers 5 writes it, ``{"__float__": "Infinity"}``."""
    if isinstance(v, dict):
        v = v["__float__"]
    if isinstance(v, bool):
        raise TypeError(v)
    return float(v)


@dataclasses.dataclass(frozen=True)
class Mamba2Config(LMConfig):
    """The shared LM fields (``LMConfig``: d_model, n_layer, vocab_size, residual_in_fp32, norm_eps — also the gated
    RMSNorm's inside the mixer —, pad_vocab_size_multiple 16 as the released models, tie_embeddings) and the Mamba-2
    block's."""
    family: ClassVar[str] = "mamba2"

    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    D_has_hdim: bool = False           # D per (head, channel) [d_inner] instead of per head [nheads]
    norm_before_gate: bool = False     # False: RMSNorm(y ⊙ SiLU(z)); True: RMSNorm(y) ⊙ SiLU(z)
    dt_limit: tuple[float, float] = (0.0, INF)
    conv_bias: bool = True
    bias: bool = False                 # in_proj / out_proj bias
    pad_vocab_size_multiple: int = 16

    def __post_init__(self):
        self.check_positive_ints(("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "headdim",
                                  "ngroups", "chunk_size", "pad_vocab_size_multiple"))
        try:
            lo, hi = (_number(v) for v in self.dt_limit)
        except (TypeError, ValueError, KeyError):
            raise UserError(f"config field dt_limit must be two numbers (min, max), got {self.dt_limit!r}") from None
        if not 0.0 <= lo < hi:
            raise UserError(f"config field dt_limit must satisfy 0 <= min < max, got {self.dt_limit!r}")
        object.__setattr__(self, "dt_limit", (lo, hi))
        if self.d_inner % self.headdim:
            raise UserError(f"Mamba-2 config: d_inner {self.d_inner} (expand {self.expand} · d_model {self.d_model}) "
                            f"is not a multiple of headdim {self.headdim}")
        if self.nheads % self.ngroups:
            raise UserError(f"Mamba-2 config: nheads {self.nheads} (d_inner / headdim) is not a multiple of "
                            f"ngroups {self.ngroups}")

    # ---- derived dims -------------------------------------------------------------------------------------
    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def d_in_proj(self) -> int:
        return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(family=self.family, d_inner=self.d_inner, nheads=self.nheads, conv_dim=self.conv_dim,
                 padded_vocab_size=self.padded_vocab_size, dt_limit=list(self.dt_limit))
        return d

    # ---- the two dialects ---------------------------------------------------------------------------------
    def to_state_spaces_json(self) -> dict[str, Any]:
        return state_spaces_json(self, {
            "layer": "Mamba2", "d_state": self.d_state, "d_conv": self.d_conv, "expand": self.expand,
            "headdim": self.headdim, "ngroups": self.ngroups, "chunk_size": self.chunk_size,
            "D_has_hdim": self.D_has_hdim, "rmsnorm": True, "norm_before_gate": self.norm_before_gate,
            "dt_limit": list(self.dt_limit), "conv_bias": self.conv_bias, "bias": self.bias})

    def to_hf_json(self) -> dict[str, Any]:
        return hf_json(self, "Mamba2ForCausalLM", "mamba2", {
            "state_size": self.d_state,
            "expand": self.expand,
            "conv_kernel": self.d_conv,
            "head_dim": self.headdim,
            "num_heads": self.nheads,
            "n_groups": self.ngroups,
            "chunk_size": self.chunk_size,
            "time_step_limit": list(self.dt_limit),
            "use_bias": self.bias,
            "use_conv_bias": self.conv_bias,
        })


_SS_SSM_FIELDS = {"layer", "d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "D_has_hdim", "rmsnorm",
                  "norm_before_gate", "dt_limit", "bias", "conv_bias", "d_ssm", "A_init_range", "dt_min", "dt_max",
                  "dt_init_floor", "conv_init", "activation", "use_mem_eff_path", "learnable_init_states"}
_SS, _HF = "state-spaces Mamba-2", "Hugging Face Mamba-2"   # the names in a missing-field error


def from_state_spaces_json(raw: dict[str, Any]) -> Mamba2Config:
    ssm = check_state_spaces(raw, _SS_SSM_FIELDS)
    if not ssm.get("rmsnorm", True):
        raise UserError("this Mamba-2 checkpoint has no gated RMSNorm (ssm_cfg.rmsnorm: false); not supported")
    if ssm.get("activation", "silu") not in ("silu", "swish"):
        raise UserError(f"ssm_cfg.activation '{ssm['activation']}' is not supported (Mamba-2 uses silu)")
    if ssm.get("learnable_init_states"):
        raise UserError("ssm_cfg.learnable_init_states is not supported")
    d_model = require(raw, "d_model", _SS)
    expand = ssm.get("expand", 2)
    if ssm.get("d_ssm") not in (None, expand * d_model):
        raise UserError(f"ssm_cfg.d_ssm {ssm['d_ssm']} != d_inner {expand * d_model}: Mamba-2 blocks with a gated MLP "
                        "part are not supported")
    return Mamba2Config(
        **lm_from_state_spaces(raw, _SS, pad_multiple_default=16),
        d_state=ssm.get("d_state", 128),
        d_conv=ssm.get("d_conv", 4),
        expand=expand,
        headdim=ssm.get("headdim", 64),
        ngroups=ssm.get("ngroups", 1),
        chunk_size=ssm.get("chunk_size", 256),
        D_has_hdim=bool(ssm.get("D_has_hdim", False)),
        norm_before_gate=bool(ssm.get("norm_before_gate", False)),
        dt_limit=tuple(ssm.get("dt_limit", (0.0, INF))),
        conv_bias=ssm.get("conv_bias", True),
        bias=ssm.get("bias", False),
    )


def from_hf_json(raw: dict[str, Any]) -> Mamba2Config:
    if raw.get("hidden_act", "silu") not in ("silu", "swish"):
        raise UserError(f"hidden_act '{raw['hidden_act']}' is not supported (Mamba-2 uses silu)")
    d_model = require(raw, "hidden_size", _HF)
    expand = raw.get("expand", 2)
    headdim = raw.get("head_dim", 64)
    if "num_heads" in raw and raw["num_heads"] * headdim != expand * d_model:
        raise UserError(f"Mamba-2 config: num_heads {raw['num_heads']} · head_dim {headdim} != d_inner "
                        f"{expand * d_model} (expand {expand} · hidden_size {d_model})")
    return Mamba2Config(
        **lm_from_hf(raw, _HF, tie_default=False),
        d_state=raw.get("state_size", 128),
        d_conv=raw.get("conv_kernel", 4),
        expand=expand,
        headdim=headdim,
        ngroups=raw.get("n_groups", 8),
        chunk_size=raw.get("chunk_size", 256),
        dt_limit=tuple(raw.get("time_step_limit", (0.0, INF))),
        conv_bias=raw.get("use_conv_bias", True),
        bias=raw.get("use_bias", False),
    )


def from_json(raw: dict[str, Any], dialect: str) -> Mamba2Config:
    return from_state_spaces_json(raw) if dialect == STATE_SPACES else from_hf_json(raw)


def to_json(config: Mamba2Config, dialect: str) -> dict[str, Any]:
    """config.json of ``dialect``; checked to read back to ``config`` (a field lost would be a UserError)."""
    return to_json_checked(config, dialect, from_json)


# Named sizes of the released Mamba-2 models (upstream state-spaces/mamba2-*: d_state 128, headdim 64, ngroups 1,
# vocabulary padded to a multiple of 16); random weights of these shapes are used for benchmarks.
SIZES: dict[str, dict[str, int]] = {
    "mamba2-tiny": dict(d_model=64, n_layer=2, vocab_size=256, d_state=16, headdim=16, ngroups=2, chunk_size=8),
    **released_sizes(("mamba2-130m", "mamba2-370m", "mamba2-780m", "mamba2-1.3b", "mamba2-2.7b")),
}


def config_for_size(name: str, **overrides) -> Mamba2Config:
    if name not in SIZES:
        raise UserError(f"unknown Mamba-2 size '{name}'; choose one of {', '.join(SIZES)}")
    return Mamba2Config(**{**SIZES[name], **overrides})

