"""FalconMamba (transformers ``FalconMambaForCausalLM``): Mamba-1 with weight-less RMSNorms on δ, B and C after
x_proj. Config (config.py) and block (block.py) extend Mamba-1's; the weight table and state layout are Mamba-1's."""
from __future__ import annotations

from ..mamba1 import Mamba1Family
from .config import FalconMambaConfig, from_json, to_json


class FalconMambaFamily(Mamba1Family):
    name = "falcon_mamba"
    ss_layers = ("FalconMamba",)
    hf_model_types = ("falcon_mamba",)
    config_class = FalconMambaConfig

    def config_from_json(self, raw, dialect):
        return from_json(raw, dialect)

    def config_to_json(self, config, dialect):
        return to_json(config, dialect)

    def mixer(self, config, device=None, dtype=None):
        from .block import FalconMambaMixer
        return FalconMambaMixer(config, device=device, dtype=dtype)

    def dims(self, config):
        return {**super().dims(config), "mixer_rms_eps": config.mixer_rms_eps}

    def graph_emitter(self):
        from .graph import FalconMambaGraphs
        return FalconMambaGraphs


FAMILY = FalconMambaFamily()
