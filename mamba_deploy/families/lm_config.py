"""The language-model fields every family's config shares, read from and written to both config.json dialects.

Shared LM fields (see ``families/base.py``): ``d_model, n_layer, vocab_size`` (tokenizer vocabulary),
``pad_vocab_size_multiple, norm_eps, residual_in_fp32, tie_embeddings``.

* state-spaces (upstream ``mamba_ssm/models/config_mamba.py``): ``d_model, n_layer, vocab_size`` (unpadded),
  ``rms_norm, residual_in_fp32, fused_add_norm, pad_vocab_size_multiple, tie_embeddings`` around the family's
  ``ssm_cfg``. It has no field for the norm ε (upstream uses 1e-5): we write ``norm_epsilon`` only when ε differs,
  and read it back. Hybrids (attention or MLP layers) and LayerNorm models are refused with one-line errors.
* Hugging Face (transformers ``MambaConfig`` / ``Mamba2Config`` / ``FalconMambaConfig``): ``hidden_size,
  num_hidden_layers, vocab_size`` (padded), ``residual_in_fp32, layer_norm_epsilon, tie_word_embeddings`` around the
  family's mixer fields. We also write the tokenizer vocabulary as ``tokenizer_vocab_size`` (and
  ``pad_vocab_size_multiple``) and read them back, so a model saved in either format samples from the same ids;
  without that key the padded size is the vocabulary.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from ..errors import UserError
from .base import STATE_SPACES

DEFAULT_NORM_EPS = 1e-5
TOKENIZER_VOCAB_KEY = "tokenizer_vocab_size"   # our extra key in the HF config.json


def require(raw: dict[str, Any], key: str, where: str):
    """``raw[key]``; a one-line UserError naming ``where`` (e.g. "state-spaces") when the field is missing."""
    if key not in raw:
        raise UserError(f"{where} config.json lacks the required field '{key}'")
    return raw[key]


def refuse_hybrid(raw: dict[str, Any]) -> None:
    """One-line error for a state-spaces config with attention or MLP layers (a hybrid model)."""
    if raw.get("attn_layer_idx"):
        raise UserError(f"this checkpoint is a hybrid with attention layers (attn_layer_idx "
                        f"{raw['attn_layer_idx']}); mamba-deploy supports pure Mamba models only")
    if raw.get("d_intermediate", 0):
        raise UserError(f"this checkpoint is a hybrid with MLP blocks (d_intermediate {raw['d_intermediate']} > 0); "
                        "mamba-deploy supports pure Mamba models only")


def check_state_spaces(raw: dict[str, Any], ssm_fields: set[str]) -> dict[str, Any]:
    """Refuse hybrids, LayerNorm models and ``ssm_cfg`` fields outside ``ssm_fields``; returns a copy of ssm_cfg."""
    refuse_hybrid(raw)
    ssm = dict(raw.get("ssm_cfg") or {})
    if not raw.get("rms_norm", True):
        raise UserError("this checkpoint uses LayerNorm (rms_norm: false); mamba-deploy supports RMSNorm only")
    unknown = set(ssm) - ssm_fields
    if unknown:
        raise UserError(f"ssm_cfg has fields mamba-deploy does not support: {sorted(unknown)}")
    return ssm


def lm_from_state_spaces(raw: dict[str, Any], where: str, pad_multiple_default: int) -> dict[str, Any]:
    """The shared LM fields of a state-spaces config.json, as config constructor arguments."""
    return dict(
        d_model=require(raw, "d_model", where),
        n_layer=require(raw, "n_layer", where),
        vocab_size=require(raw, "vocab_size", where),
        residual_in_fp32=raw.get("residual_in_fp32", True),
        norm_eps=raw.get("norm_epsilon", DEFAULT_NORM_EPS),
        pad_vocab_size_multiple=raw.get("pad_vocab_size_multiple", pad_multiple_default),
        tie_embeddings=raw.get("tie_embeddings", True),
    )


def hf_vocab(raw: dict[str, Any], where: str) -> tuple[int, int]:
    """(tokenizer vocabulary, padding multiple) of an HF config, whose vocab_size is the padded size."""
    padded = require(raw, "vocab_size", where)
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


def lm_from_hf(raw: dict[str, Any], where: str, tie_default: bool) -> dict[str, Any]:
    """The shared LM fields of a Hugging Face config.json, as config constructor arguments."""
    vocab, pad_multiple = hf_vocab(raw, where)
    return dict(
        d_model=require(raw, "hidden_size", where),
        n_layer=require(raw, "num_hidden_layers", where),
        vocab_size=vocab,
        residual_in_fp32=raw.get("residual_in_fp32", True),
        norm_eps=raw.get("layer_norm_epsilon", DEFAULT_NORM_EPS),
        pad_vocab_size_multiple=pad_multiple,
        tie_embeddings=raw.get("tie_word_embeddings", tie_default),
    )


def state_spaces_json(config, ssm_cfg: dict[str, Any]) -> dict[str, Any]:
    """A state-spaces config.json: the shared LM fields of ``config`` around the family's ``ssm_cfg``."""
    out = {
        "d_model": config.d_model,
        "n_layer": config.n_layer,
        "d_intermediate": 0,
        "vocab_size": config.vocab_size,
        "ssm_cfg": ssm_cfg,
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": config.residual_in_fp32,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": config.pad_vocab_size_multiple,
        "tie_embeddings": config.tie_embeddings,
    }
    if config.norm_eps != DEFAULT_NORM_EPS:  # upstream's config has no such field: written only when needed
        out["norm_epsilon"] = config.norm_eps
    return out


def hf_json(config, architecture: str, model_type: str, mixer: dict[str, Any]) -> dict[str, Any]:
    """A Hugging Face config.json: the shared LM fields of ``config`` around the family's ``mixer`` fields
    (``state_size, expand, conv_kernel, use_bias, use_conv_bias`` and the family's own)."""
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": config.padded_vocab_size,
        TOKENIZER_VOCAB_KEY: config.vocab_size,
        "pad_vocab_size_multiple": config.pad_vocab_size_multiple,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        **mixer,
        "residual_in_fp32": config.residual_in_fp32,
        "layer_norm_epsilon": config.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
    }


def to_json_checked(config, dialect: str, from_json: Callable[[dict, str], Any],
                    alike: Callable[[str, Any, Any], bool] = lambda name, back, config: False) -> dict[str, Any]:
    """config.json of ``dialect``; checked to read back (through ``from_json``) to ``config``: a field lost is a
    one-line UserError naming it. ``alike(name, back, config)`` says when two different values mean the same."""
    raw = config.to_state_spaces_json() if dialect == STATE_SPACES else config.to_hf_json()
    back = from_json(raw, dialect)
    lost = [f.name for f in dataclasses.fields(config) if getattr(back, f.name) != getattr(config, f.name)
            and not alike(f.name, back, config)]
    if lost:
        raise UserError(f"the {dialect} config.json cannot hold {', '.join(f'{n}={getattr(config, n)!r}' for n in lost)}"
                        f"; save in the other format")
    return raw


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """The shared LM fields, the base of every family's config dataclass (which adds its block's fields, all with
    defaults, and may re-declare ``pad_vocab_size_multiple`` with its own default), and what is derived from them."""

    d_model: int
    n_layer: int
    vocab_size: int  # tokenizer vocabulary (ids ≥ it are padding rows of the embedding and are never sampled)
    residual_in_fp32: bool = True
    norm_eps: float = DEFAULT_NORM_EPS  # block and final RMSNorm (and any norm inside the family's mixer)
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True

    def check_positive_ints(self, names) -> None:
        """One-line UserError for a field of ``names`` that is not a positive integer."""
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"config field {name} must be a positive integer, got {value!r}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows = logits width: vocab_size rounded up to a multiple of pad_vocab_size_multiple."""
        m = self.pad_vocab_size_multiple
        return ((self.vocab_size + m - 1) // m) * m

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Inverse of ``to_dict`` (derived keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# Layer count and width of the released state-spaces models of each size (Mamba-1 and Mamba-2 alike); the size
# names differ a little between the two (790m / 780m, 1.4b / 1.3b, 2.8b / 2.7b).
RELEASED_SHAPES: tuple[tuple[int, int], ...] = ((768, 24), (1024, 48), (1536, 48), (2048, 48), (2560, 64))
RELEASED_VOCAB = 50277


def released_sizes(names) -> dict[str, dict[str, int]]:
    """{size name: dict(d_model, n_layer, vocab_size)} for the released sizes, named by ``names`` in order."""
    return {name: dict(d_model=d, n_layer=n, vocab_size=RELEASED_VOCAB) for name, (d, n) in zip(names, RELEASED_SHAPES)}
