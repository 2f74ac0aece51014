"""Mamba-2 (Dao & Gu 2024, SSD): config (config.py), block (block.py), weight table (weights.py), ONNX emitter
(graph.py). The SSD scans it uses live in ``mamba_deploy/ops/ssd.py`` (sequential reference + chunked)."""
from __future__ import annotations

from ..base import Family
from .config import Mamba2Config, from_json, to_json


class Mamba2Family(Family):
    name = "mamba2"
    ss_layers = ("Mamba2",)
    hf_model_types = ("mamba2",)
    config_class = Mamba2Config

    def config_from_json(self, raw, dialect):
        return from_json(raw, dialect)

    def config_to_json(self, config, dialect):
        return to_json(config, dialect)

    def mixer(self, config, device=None, dtype=None):
        from .block import Mamba2Mixer
        return Mamba2Mixer(config, device=device, dtype=dtype)

    def init_mixer(self, mixer, config, generator):
        from .block import init_mixer
        init_mixer(mixer, config, generator)

    def mixer_weights(self, config):
        from .weights import mixer_weights
        return mixer_weights(config)

    def state_shapes(self, config):
        return (config.conv_dim, config.d_conv), (config.nheads, config.headdim, config.d_state)

    def dims(self, config):
        return {"d_inner": config.d_inner, "d_state": config.d_state, "d_conv": config.d_conv,
                "nheads": config.nheads, "headdim": config.headdim, "ngroups": config.ngroups,
                "conv_dim": config.conv_dim}

    def graph_emitter(self):
        from .graph import Mamba2Graphs
        return Mamba2Graphs


FAMILY = Mamba2Family()
