"""The Mamba-1 block's rows of the weight-layout table (families/base.py ``weight_table`` adds the shared rows).

Names are relative to ``backbone.layers.{i}.mixer.`` and identical in both checkpoint formats. ``artifact`` is the
dtype the ONNX artifact stores: FP32 for tensors the reference upcasts before use (conv weight/bias, δ bias, D; the
upcast is exact) and for A, stored precomputed as A = −exp(A_log) (the same torch op, so the same bits); ACT (the
export dtype) for the projections.
"""
from __future__ import annotations

from ..base import ACT, FP32, WeightSpec
from .block import A_from_log

MIXER_WEIGHTS: tuple[WeightSpec, ...] = (
    WeightSpec("in_proj.weight", lambda c: (2 * c.d_inner, c.d_model), ACT),
    WeightSpec("in_proj.bias", lambda c: (2 * c.d_inner,), ACT, present=lambda c: c.bias),
    WeightSpec("conv1d.weight", lambda c: (c.d_inner, 1, c.d_conv), FP32),
    WeightSpec("conv1d.bias", lambda c: (c.d_inner,), FP32, present=lambda c: c.conv_bias),
    WeightSpec("x_proj.weight", lambda c: (c.dt_rank_value + 2 * c.d_state, c.d_inner), ACT),
    WeightSpec("dt_proj.weight", lambda c: (c.d_inner, c.dt_rank_value), ACT),
    WeightSpec("dt_proj.bias", lambda c: (c.d_inner,), FP32),
    WeightSpec("A_log", lambda c: (c.d_inner, c.d_state), FP32, artifact_name="A", to_artifact=A_from_log),
    WeightSpec("D", lambda c: (c.d_inner,), FP32),
    WeightSpec("out_proj.weight", lambda c: (c.d_model, c.d_inner), ACT),
    WeightSpec("out_proj.bias", lambda c: (c.d_model,), ACT, present=lambda c: c.bias),
)
