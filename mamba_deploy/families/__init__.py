"""Model families: one package per family (``mamba1``, ``mamba2``, ``falcon_mamba``), found through this registry.

``detect(raw)`` tells the config.json dialect (state-spaces: has ``d_model``; Hugging Face: has ``hidden_size`` or a
``model_type``) and the family (state-spaces: ``ssm_cfg.layer``; Hugging Face: ``model_type``). ``family_of(config)``
gives the family of a config object. base.py says what a family provides.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from .base import DIALECTS, HF, STATE_SPACES, Family, Weight, WeightSpec, weight_table
from .falcon_mamba import FAMILY as FALCON_MAMBA
from .mamba1 import FAMILY as MAMBA1
from .mamba2 import FAMILY as MAMBA2

FAMILIES: dict[str, Family] = {f.name: f for f in (MAMBA1, MAMBA2, FALCON_MAMBA)}

__all__ = ["DIALECTS", "FAMILIES", "SIZES", "config_for_size", "HF", "STATE_SPACES", "Family", "Weight", "WeightSpec", "detect", "family_of",
           "read_config", "config_from_json", "config_from_manifest", "weight_table"]


def detect_dialect(raw: dict[str, Any]) -> str:
    if "d_model" in raw:
        return STATE_SPACES
    if "hidden_size" in raw or "model_type" in raw:
        return HF
    raise UserError("config.json is neither a state-spaces Mamba config (no 'd_model') "
                    "nor a Hugging Face Mamba config (no 'hidden_size')")


def detect(raw: dict[str, Any]) -> tuple[Family, str]:
    """(family, dialect) of a parsed config.json; an unknown family is a one-line UserError naming the known ones."""
    dialect = detect_dialect(raw)
    if dialect == STATE_SPACES:
        layer = (raw.get("ssm_cfg") or {}).get("layer", "Mamba1")
        found = [f for f in FAMILIES.values() if layer in f.ss_layers]
        known = sorted(s for f in FAMILIES.values() for s in f.ss_layers)
        what = f"{layer} layers (ssm_cfg.layer)"
    else:
        layer = raw.get("model_type", "mamba")
        found = [f for f in FAMILIES.values() if layer in f.hf_model_types]
        known = sorted(s for f in FAMILIES.values() for s in f.hf_model_types)
        what = f"model_type '{layer}'"
    if not found:
        raise UserError(f"this checkpoint has {what}; mamba-deploy supports {', '.join(known)} so far")
    return found[0], dialect


def config_from_json(raw: dict[str, Any]):
    """Config of a parsed config.json of any family and dialect. Returns (config, dialect)."""
    family, dialect = detect(raw)
    return family.config_from_json(raw, dialect), dialect


def read_config(path: Path):
    """Read ``config.json`` of any family and dialect. Returns (config, dialect)."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a JSON object")
    return config_from_json(raw)


def config_from_manifest(manifest: dict):
    """The config an artifact was exported from (manifest "family" and "config")."""
    family = FAMILIES.get(manifest.get("family"))
    if family is None:
        raise UserError(f"the artifact's model family {manifest.get('family')!r} is not one of "
                        f"{', '.join(FAMILIES)}; export it again with this mamba-deploy")
    return family.config_class.from_dict(manifest["config"])


def family_of(config) -> Family:
    try:
        return FAMILIES[config.family]
    except (AttributeError, KeyError):
        raise UserError(f"{type(config).__name__} names no registered model family") from None


def _named_sizes() -> dict[str, tuple[Family, dict]]:
    from .falcon_mamba.config import SIZES as falcon_sizes
    from .mamba1.config import SIZES as mamba1_sizes
    from .mamba2.config import SIZES as mamba2_sizes
    return {**{n: (MAMBA1, kw) for n, kw in mamba1_sizes.items()}, **{n: (MAMBA2, kw) for n, kw in mamba2_sizes.items()},
            **{n: (FALCON_MAMBA, kw) for n, kw in falcon_sizes.items()}}


SIZES: dict[str, tuple[Family, dict]] = _named_sizes()   # name → (family, config fields), every family's shapes


def config_for_size(name: str, **overrides):
    """The config of a named shape of any family (``random --size``, ``bench --random``)."""
    if name not in SIZES:
        raise UserError(f"unknown model size '{name}'; choose one of {', '.join(SIZES)}")
    family, fields = SIZES[name]
    return family.config_class(**{**fields, **overrides})
