"""MambaConfig: one description of a Mamba-1 language model, read from either checkpoint format.

Two config dialects exist in the wild:

* state-spaces (``state-spaces/mamba-370m``): ``d_model, n_layer, vocab_size, ssm_cfg{d_state, d_conv, expand,
  dt_rank, conv_bias, bias, layer}, rms_norm, residual_in_fp32, fused_add_norm, pad_vocab_size_multiple,
  tie_embeddings``; ``vocab_size`` is the *unpadded* tokenizer size (50277) and the weights are padded up to a
  multiple of ``pad_vocab_size_multiple`` (50280).
* Hugging Face (``state-spaces/mamba-370m-hf``): ``hidden_size, state_size, num_hidden_layers, expand,
  conv_kernel, time_step_rank, use_bias, use_conv_bias, residual_in_fp32, layer_norm_epsilon, vocab_size``;
  ``vocab_size`` is already the padded size.

Derived dims: ``d_inner = expand * d_model``; ``dt_rank = ceil(d_model / 16)`` when "auto".
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .errors import UserError

STATE_SPACES = "state-spaces"
HF = "hf"
FORMATS = (STATE_SPACES, HF)


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    d_model: int
    n_layer: int
    vocab_size: int  # unpadded tokenizer vocabulary
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    conv_bias: bool = True
    bias: bool = False  # in_proj / out_proj bias
    residual_in_fp32: bool = True
    norm_eps: float = 1e-5
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"config field {name} must be a positive integer, got {value!r}")
        if self.dt_rank != "auto" and (not isinstance(self.dt_rank, int) or self.dt_rank < 1):
            raise UserError(f"config field dt_rank must be 'auto' or a positive integer, got {self.dt_rank!r}")

    # ---- derived dims -------------------------------------------------------------------------------------
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def dt_rank_value(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return ((self.vocab_size + m - 1) // m) * m

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(d_inner=self.d_inner, dt_rank_value=self.dt_rank_value, padded_vocab_size=self.padded_vocab_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MambaConfig":
        """Inverse of :meth:`to_dict` (derived keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    # ---- the two dialects ---------------------------------------------------------------------------------
    def to_state_spaces_json(self) -> dict[str, Any]:
        return {
            "d_model": self.d_model,
            "n_layer": self.n_layer,
            "d_intermediate": 0,
            "vocab_size": self.vocab_size,
            "ssm_cfg": {"layer": "Mamba1", "d_state": self.d_state, "d_conv": self.d_conv, "expand": self.expand,
                        "dt_rank": self.dt_rank, "conv_bias": self.conv_bias, "bias": self.bias},
            "attn_layer_idx": [],
            "attn_cfg": {},
            "rms_norm": True,
            "residual_in_fp32": self.residual_in_fp32,
            "fused_add_norm": True,
            "pad_vocab_size_multiple": self.pad_vocab_size_multiple,
            "tie_embeddings": self.tie_embeddings,
        }

    def to_hf_json(self) -> dict[str, Any]:
        return {
            "architectures": ["MambaForCausalLM"],
            "model_type": "mamba",
            "vocab_size": self.padded_vocab_size,
            "hidden_size": self.d_model,
            "state_size": self.d_state,
            "num_hidden_layers": self.n_layer,
            "expand": self.expand,
            "conv_kernel": self.d_conv,
            "intermediate_size": self.d_inner,
            "time_step_rank": self.dt_rank_value,
            "use_bias": self.bias,
            "use_conv_bias": self.conv_bias,
            "residual_in_fp32": self.residual_in_fp32,
            "layer_norm_epsilon": self.norm_eps,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_embeddings,
            "pad_vocab_size_multiple": self.pad_vocab_size_multiple,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "pad_token_id": 0,
        }


def detect_dialect(raw: dict[str, Any]) -> str:
    if "d_model" in raw:
        return STATE_SPACES
    if "hidden_size" in raw or raw.get("model_type") in ("mamba", "mamba2", "falcon_mamba"):
        return HF
    raise UserError("config.json is neither a state-spaces Mamba config (no 'd_model') "
                    "nor a Hugging Face Mamba config (no 'hidden_size')")


def _require(raw: dict[str, Any], key: str, where: str):
    if key not in raw:
        raise UserError(f"{where} config.json lacks the required field '{key}'")
    return raw[key]


def from_state_spaces_json(raw: dict[str, Any]) -> MambaConfig:
    ssm = dict(raw.get("ssm_cfg") or {})
    layer = ssm.pop("layer", "Mamba1")
    if layer != "Mamba1":
        raise UserError(f"this checkpoint uses {layer} layers; mamba-deploy supports Mamba-1 only so far")
    if raw.get("attn_layer_idx"):
        raise UserError("this checkpoint has attention layers (attn_layer_idx); mamba-deploy supports "
                        "pure Mamba-1 models only so far")
    if raw.get("d_intermediate", 0):
        raise UserError("this checkpoint has MLP blocks (d_intermediate > 0); mamba-deploy supports pure "
                        "Mamba-1 models only so far")
    if not raw.get("rms_norm", True):
        raise UserError("this checkpoint uses LayerNorm (rms_norm: false); mamba-deploy supports RMSNorm only")
    unknown = set(ssm) - {"d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias", "dt_min", "dt_max",
                          "dt_init", "dt_scale", "dt_init_floor", "use_fast_path"}
    if unknown:
        raise UserError(f"ssm_cfg has fields mamba-deploy does not support: {sorted(unknown)}")
    return MambaConfig(
        d_model=_require(raw, "d_model", "state-spaces"),
        n_layer=_require(raw, "n_layer", "state-spaces"),
        vocab_size=_require(raw, "vocab_size", "state-spaces"),
        d_state=ssm.get("d_state", 16),
        d_conv=ssm.get("d_conv", 4),
        expand=ssm.get("expand", 2),
        dt_rank=ssm.get("dt_rank", "auto"),
        conv_bias=ssm.get("conv_bias", True),
        bias=ssm.get("bias", False),
        residual_in_fp32=raw.get("residual_in_fp32", True),
        norm_eps=raw.get("norm_epsilon", 1e-5),
        pad_vocab_size_multiple=raw.get("pad_vocab_size_multiple", 8),
        tie_embeddings=raw.get("tie_embeddings", True),
    )


def from_hf_json(raw: dict[str, Any]) -> MambaConfig:
    model_type = raw.get("model_type", "mamba")
    if model_type != "mamba":
        raise UserError(f"model_type '{model_type}' is not supported; mamba-deploy supports Mamba-1 ('mamba') only")
    if raw.get("hidden_act", "silu") != "silu":
        raise UserError(f"hidden_act '{raw['hidden_act']}' is not supported (Mamba-1 uses silu)")
    d_model = _require(raw, "hidden_size", "Hugging Face")
    expand = raw.get("expand", 2)
    if "intermediate_size" in raw and raw["intermediate_size"] != expand * d_model:
        raise UserError(f"intermediate_size {raw['intermediate_size']} != expand*hidden_size {expand * d_model}")
    dt_rank = raw.get("time_step_rank", "auto")
    if dt_rank == math.ceil(d_model / 16):
        dt_rank = "auto"
    vocab = _require(raw, "vocab_size", "Hugging Face")
    # HF stores the padded size: keep it as the vocabulary, with a padding multiple that it already satisfies.
    pad_multiple = raw.get("pad_vocab_size_multiple", 1)
    if not isinstance(pad_multiple, int) or pad_multiple < 1 or vocab % pad_multiple:
        pad_multiple = 1
    return MambaConfig(
        d_model=d_model,
        n_layer=_require(raw, "num_hidden_layers", "Hugging Face"),
        vocab_size=vocab,
        d_state=raw.get("state_size", 16),
        d_conv=raw.get("conv_kernel", 4),
        expand=expand,
        dt_rank=dt_rank,
        conv_bias=raw.get("use_conv_bias", True),
        bias=raw.get("use_bias", False),
        residual_in_fp32=raw.get("residual_in_fp32", True),
        norm_eps=raw.get("layer_norm_epsilon", 1e-5),
        pad_vocab_size_multiple=pad_multiple,
        tie_embeddings=raw.get("tie_word_embeddings", True),
    )


def read_config(path: Path) -> tuple[MambaConfig, str]:
    """Read ``config.json`` of either dialect. Returns (config, dialect)."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a JSON object")
    dialect = detect_dialect(raw)
    cfg = from_state_spaces_json(raw) if dialect == STATE_SPACES else from_hf_json(raw)
    return cfg, dialect


# Named sizes of the released Mamba-1 models (random weights of these shapes are used for benchmarks).
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(d_model=64, n_layer=2, vocab_size=256),
    "130m": dict(d_model=768, n_layer=24, vocab_size=50277),
    "370m": dict(d_model=1024, n_layer=48, vocab_size=50277),
    "790m": dict(d_model=1536, n_layer=48, vocab_size=50277),
    "1.4b": dict(d_model=2048, n_layer=48, vocab_size=50277),
    "2.8b": dict(d_model=2560, n_layer=64, vocab_size=50277),
}


def config_for_size(name: str, **overrides) -> MambaConfig:
    if name not in SIZES:
        raise UserError(f"unknown model size '{name}'; choose one of {', '.join(SIZES)}")
    return MambaConfig(**{**SIZES[name], **overrides})
