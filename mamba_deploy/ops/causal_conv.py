"""Causal depthwise conv1d with a carried state (the short convolution in front of every Mamba scan).

The state holds the last ``d_conv`` inputs before the conv (upstream ``allocate_inference_cache`` and transformers'
cache layout, [batch, channels, d_conv]); output t is Σ_k w[c, k]·u[c, t − d_conv + 1 + k] + bias, then SiLU.
Arithmetic is fp32; outputs have the input's dtype, the new state the state's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(u: torch.Tensor, conv_state: torch.Tensor | None, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """u [b, c, L]; conv_state [b, c, k] or None (zeros); weight [c, 1, k]; bias [c] → (SiLU(conv) [b, c, L],
    new conv_state [b, c, k] = the last k inputs of state ++ u)."""
    b, c, _ = u.shape
    k = weight.shape[-1]
    if conv_state is None:
        conv_state = u.new_zeros(b, c, k)
    history = torch.cat([conv_state.to(u.dtype), u], dim=-1)                     # [b, c, k + L]
    out = F.conv1d(history[..., 1:].float(), weight.float(), None if bias is None else bias.float(), groups=c)
    return F.silu(out).to(u.dtype), history[..., -k:].to(conv_state.dtype)


def causal_conv1d_step(u: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: u [b, c] → (SiLU(conv) [b, c], new conv_state [b, c, k]); the input state is not modified."""
    conv_state = torch.cat([conv_state[..., 1:], u[..., None].to(conv_state.dtype)], dim=-1)
    out = (conv_state.float() * weight[:, 0, :].float()).sum(-1)
    if bias is not None:
        out = out + bias.float()
    return F.silu(out).to(u.dtype), conv_state
