"""The Mamba-2 block's rows of the weight-layout table (families/base.py ``weight_table`` adds the shared rows).

Names are relative to ``backbone.layers.{i}.mixer.`` and identical in both checkpoint formats (upstream
``mamba_ssm/modules/mamba2.py`` and transformers ``Mamba2Mixer``). In the ONNX artifact, tensors the reference upcasts
before use (conv weight/bias, dt_bias, D, the gated-norm weight) are FP32, A is stored precomputed as A = −exp(A_log)
[H], and D as [H, P] (per channel) or [H, 1] (per head), the contract ops' broadcastable layout.
"""
from __future__ import annotations

from ..base import ACT, FP32, WeightSpec
from .config import Mamba2Config


def _A_from_log(A_log):
    return -A_log.float().exp()


def mixer_weights(c: Mamba2Config) -> list[WeightSpec]:
    H = c.nheads
    return [
        WeightSpec("in_proj.weight", lambda c: (c.d_in_proj, c.d_model), ACT),
        WeightSpec("in_proj.bias", lambda c: (c.d_in_proj,), ACT, present=lambda c: c.bias),
        WeightSpec("conv1d.weight", lambda c: (c.conv_dim, 1, c.d_conv), FP32),
        WeightSpec("conv1d.bias", lambda c: (c.conv_dim,), FP32, present=lambda c: c.conv_bias),
        WeightSpec("dt_bias", lambda c: (c.nheads,), FP32),
        WeightSpec("A_log", lambda c: (c.nheads,), FP32, artifact_name="A", to_artifact=_A_from_log),
        WeightSpec("D", lambda c: (c.d_inner if c.D_has_hdim else c.nheads,), FP32,
                   to_artifact=lambda D: D.float().reshape(H, -1)),
        WeightSpec("norm.weight", lambda c: (c.d_inner,), FP32),
        WeightSpec("out_proj.weight", lambda c: (c.d_model, c.d_inner), ACT),
        WeightSpec("out_proj.bias", lambda c: (c.d_model,), ACT, present=lambda c: c.bias),
    ]
