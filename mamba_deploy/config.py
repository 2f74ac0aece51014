"""Model configs: the public names, kept here for callers; each family's config lives in its package.

``MambaConfig`` is the Mamba-1 config (families/mamba1/config.py, which documents both config.json dialects);
``SIZES`` / ``config_for_size`` name the released shapes of every family;
``read_config`` reads a config.json of any registered family and dialect (families/__init__.py detects them).
"""
from __future__ import annotations

from .families import DIALECTS as FORMATS
from .families import HF, SIZES, STATE_SPACES, config_for_size, config_from_json, read_config
from .families.mamba1.config import MambaConfig, from_hf_json, from_state_spaces_json

__all__ = ["FORMATS", "HF", "SIZES", "STATE_SPACES", "MambaConfig", "config_for_size", "config_from_json",
           "from_hf_json", "from_state_spaces_json", "read_config"]
