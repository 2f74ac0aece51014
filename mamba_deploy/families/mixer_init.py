"""What the Mamba-1 and Mamba-2 blocks build and initialise the same way: the depthwise causal conv1d and
upstream's initialisation of the projections, the conv and the δ bias (``mamba_ssm/modules/mamba_simple.py`` and
``mamba_ssm/modules/mamba2.py``; PyTorch's default Linear/Conv1d init, out_proj rescaled by 1/√n_layer as upstream's
``_init_weights`` with ``rescale_prenorm_residual``). Every draw comes from the caller's generator, in a fixed order.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def depthwise_conv1d(channels: int, d_conv: int, bias: bool, device=None, dtype=None) -> nn.Conv1d:
    """The block's causal depthwise conv over ``channels`` (weight [channels, 1, d_conv]), padded by d_conv − 1."""
    return nn.Conv1d(channels, channels, d_conv, groups=channels, bias=bias, padding=d_conv - 1,
                     device=device, dtype=dtype)


def uniform_(p: torch.Tensor, bound: float, g: torch.Generator) -> None:
    """p ← U(−bound, bound), drawn from ``g``."""
    p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)


@torch.no_grad()
def init_linears_and_conv(m: nn.Module, cfg, g: torch.Generator, linears) -> None:
    """``linears`` (in order): weight U(±1/√in_features), bias 0; then out_proj ÷ √n_layer; then the conv's weight and
    bias U(±1/√d_conv)."""
    for lin in linears:
        uniform_(lin.weight, 1 / math.sqrt(lin.in_features), g)
        if lin.bias is not None:
            lin.bias.zero_()
    m.out_proj.weight.div_(math.sqrt(cfg.n_layer))
    uniform_(m.conv1d.weight, 1 / math.sqrt(cfg.d_conv), g)
    if m.conv1d.bias is not None:
        uniform_(m.conv1d.bias, 1 / math.sqrt(cfg.d_conv), g)


def dt_bias_init(n: int, g: torch.Generator, dt_min: float, dt_max: float) -> torch.Tensor:
    """[n] δ biases whose softplus is log-uniform in [dt_min, dt_max] (floor 1e-4): the inverse softplus of the draw."""
    dt = torch.exp(torch.rand(n, generator=g) * (math.log(dt_max) - math.log(dt_min))
                   + math.log(dt_min)).clamp(min=1e-4)
    return dt + torch.log(-torch.expm1(-dt))
