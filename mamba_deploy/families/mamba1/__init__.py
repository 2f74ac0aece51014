"""Mamba-1 (Gu & Dao 2023): config (config.py), block (block.py), weight table (weights.py), ONNX emitter
(graph.py). The selective-scan kernels it uses live in ``mamba_deploy/ops/`` next to their reference."""
from __future__ import annotations

from ..base import Family
from .config import MambaConfig, from_hf_json, from_state_spaces_json, to_json
from .weights import MIXER_WEIGHTS


class Mamba1Family(Family):
    name = "mamba1"
    ss_layers = ("Mamba1",)
    hf_model_types = ("mamba",)
    config_class = MambaConfig

    def config_from_json(self, raw, dialect):
        from ..base import STATE_SPACES
        return from_state_spaces_json(raw) if dialect == STATE_SPACES else from_hf_json(raw)

    def config_to_json(self, config, dialect):
        return to_json(config, dialect)

    def mixer(self, config, device=None, dtype=None):
        from .block import MambaMixer
        return MambaMixer(config, device=device, dtype=dtype)

    def init_mixer(self, mixer, config, generator):
        from .block import init_mixer
        init_mixer(mixer, config, generator)

    def mixer_weights(self, config):
        return list(MIXER_WEIGHTS)

    def state_shapes(self, config):
        return (config.d_inner, config.d_conv), (config.d_inner, config.d_state)

    def dims(self, config):
        return {"d_inner": config.d_inner, "d_state": config.d_state, "d_conv": config.d_conv,
                "dt_rank": config.dt_rank_value}

    def graph_emitter(self):
        from .graph import Mamba1Graphs
        return Mamba1Graphs


FAMILY = Mamba1Family()
