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
from ..base import HF, STATE_SPACES

DEFAULT_NORM_EPS = 1e-5
TOKENIZER_VOCAB_KEY = "tokenizer_vocab_size"   # our extra key in the HF config.json


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    family: ClassVar[str] = "mamba1"

    d_model: int
    n_layer: int
    vocab_size: int  # tokenizer vocabulary (ids ≥ it are padding rows of the embedding and are never sampled)
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    conv_bias: bool = True
    bias: bool = False  # in_proj / out_proj bias
    residual_in_fp32: bool = True
    norm_eps: float = DEFAULT_NORM_EPS
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
        """Embedding rows = logits width: vocab_size rounded up to a multiple of pad_vocab_size_multiple."""
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
        out = {
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
        if self.norm_eps != DEFAULT_NORM_EPS:  # upstream's config has no such field: written only when needed
            out["norm_epsilon"] = self.norm_eps
        return out

    def to_hf_json(self) -> dict[str, Any]:
        return {
            "architectures": ["MambaForCausalLM"],
            "model_type": "mamba",
            "vocab_size": self.padded_vocab_size,
            TOKENIZER_VOCAB_KEY: self.vocab_size,
            "pad_vocab_size_multiple": self.pad_vocab_size_multiple,
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
            "bos_token_id": 0,
            "eos_token_id": 0,
            "pad_token_id": 0,
        }


def _require(raw: dict[str, Any], key: str, where: str):
    if key not in raw:
        raise UserError(f"{where} config.json lacks the required field '{key}'")
    return raw[key]


def _dt_rank(value, d_model):
    return "auto" if value == "auto" or value == math.ceil(d_model / 16) else value


_SS_SSM_FIELDS = {"layer", "d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias", "dt_min", "dt_max",
                  "dt_init", "dt_scale", "dt_init_floor", "use_fast_path"}


def from_state_spaces_json(raw: dict[str, Any]) -> MambaConfig:
    ssm = dict(raw.get("ssm_cfg") or {})
    if raw.get("attn_layer_idx"):
        raise UserError("this checkpoint has attention layers (attn_layer_idx); mamba-deploy supports "
                        "pure Mamba models only so far")
    if raw.get("d_intermediate", 0):
        raise UserError("this checkpoint has MLP blocks (d_intermediate > 0); mamba-deploy supports pure "
                        "Mamba models only so far")
    if not raw.get("rms_norm", True):
        raise UserError("this checkpoint uses LayerNorm (rms_norm: false); mamba-deploy supports RMSNorm only")
    unknown = set(ssm) - _SS_SSM_FIELDS
    if unknown:
        raise UserError(f"ssm_cfg has fields mamba-deploy does not support: {sorted(unknown)}")
    d_model = _require(raw, "d_model", "state-spaces")
    return MambaConfig(
        d_model=d_model,
        n_layer=_require(raw, "n_layer", "state-spaces"),
        vocab_size=_require(raw, "vocab_size", "state-spaces"),
        d_state=ssm.get("d_state", 16),
        d_conv=ssm.get("d_conv", 4),
        expand=ssm.get("expand", 2),
        dt_rank=_dt_rank(ssm.get("dt_rank", "auto"), d_model),
        conv_bias=ssm.get("conv_bias", True),
        bias=ssm.get("bias", False),
        residual_in_fp32=raw.get("residual_in_fp32", True),
        norm_eps=raw.get("norm_epsilon", DEFAULT_NORM_EPS),
        pad_vocab_size_multiple=raw.get("pad_vocab_size_multiple", 8),
        tie_embeddings=raw.get("tie_embeddings", True),
    )


def _hf_vocab(raw: dict[str, Any]) -> tuple[int, int]:
    """(tokenizer vocabulary, padding multiple) of an HF config, whose vocab_size is the padded size."""
    padded = _require(raw, "vocab_size", "Hugging Face")
    multiple = raw.get("pad_vocab_size_multiple", 1)
    if TOKENIZER_VOCAB_KEY in raw:
        vocab = raw[TOKENIZER_VOCAB_KEY]
        if not isinstance(multiple, int) or multiple < 1 or not isinstance(vocab, int) or vocab < 1 \
                or -(-vocab // multiple) * multiple != padded:
            raise UserError(f"config.json: vocab_size {padded} is not {TOKENIZER_VOCAB_KEY} {vocab!r} padded to a "
                            f"multiple of pad_vocab_size_multiple {multiple!r}")
        return vocab, multiple
    # no tokenizer size stored: the padded size is the vocabulary, with a multiple that it already satisfies
    if not isinstance(multiple, int) or multiple < 1 or padded % multiple:
        multiple = 1
    return padded, multiple


def from_hf_json(raw: dict[str, Any]) -> MambaConfig:
    if raw.get("hidden_act", "silu") != "silu":
        raise UserError(f"hidden_act '{raw['hidden_act']}' is not supported (Mamba-1 uses silu)")
    d_model = _require(raw, "hidden_size", "Hugging Face")
    expand = raw.get("expand", 2)
    if "intermediate_size" in raw and raw["intermediate_size"] != expand * d_model:
        raise UserError(f"intermediate_size {raw['intermediate_size']} != expand*hidden_size {expand * d_model}")
    vocab, pad_multiple = _hf_vocab(raw)
    return MambaConfig(
        d_model=d_model,
        n_layer=_require(raw, "num_hidden_layers", "Hugging Face"),
        vocab_size=vocab,
        d_state=raw.get("state_size", 16),
        d_conv=raw.get("conv_kernel", 4),
        expand=expand,
        dt_rank=_dt_rank(raw.get("time_step_rank", "auto"), d_model),
        conv_bias=raw.get("use_conv_bias", True),
        bias=raw.get("use_bias", False),
        residual_in_fp32=raw.get("residual_in_fp32", True),
        norm_eps=raw.get("layer_norm_epsilon", DEFAULT_NORM_EPS),
        pad_vocab_size_multiple=pad_multiple,
        tie_embeddings=raw.get("tie_word_embeddings", True),
    )


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


def to_json(config: MambaConfig, dialect: str) -> dict[str, Any]:
    """config.json of ``dialect``; checked to read back to ``config`` (a field lost would be a UserError)."""
    raw = config.to_state_spaces_json() if dialect == STATE_SPACES else config.to_hf_json()
    back = (from_state_spaces_json if dialect == STATE_SPACES else from_hf_json)(raw)
    lost = [f.name for f in dataclasses.fields(MambaConfig) if getattr(back, f.name) != getattr(config, f.name)
            and not (f.name == "dt_rank" and back.dt_rank_value == config.dt_rank_value)]
    if lost:
        raise UserError(f"the {dialect} config.json cannot hold {', '.join(f'{n}={getattr(config, n)!r}' for n in lost)}"
                        f"; save in the other format")
    return raw
