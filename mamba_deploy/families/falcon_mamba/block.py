"""The FalconMamba block (PyTorch reference), after transformers ``models/falcon_mamba/modeling_falcon_mamba.py``.

A Mamba-1 block (families/mamba1) with one change: after x_proj, the three projections δ_raw (rank r, before
dt_proj), B and C each pass through a weight-less RMSNorm, ε = ``mixer_rms_eps``:

    [δ_r, B, C] = W_x · x;   δ_r, B, C ← v / √(mean(v²) + ε)   (each over its own last axis, fp32, back to x's dtype)
    δ_raw = W_dt · δ_r      (bias added in the scan), then the selective scan as Mamba-1.

Parameters and state are exactly Mamba-1's, so the weight table and state layout are shared.
"""
from __future__ import annotations

import torch

from ..mamba1.block import MambaMixer


def weightless_rms_norm(v: torch.Tensor, eps: float) -> torch.Tensor:
    vf = v.float()
    return (vf * torch.rsqrt(vf.pow(2).mean(-1, keepdim=True) + eps)).to(v.dtype)


class FalconMambaMixer(MambaMixer):
    def _project_x(self, x: torch.Tensor):
        r, N, eps = self.cfg.dt_rank_value, self.cfg.d_state, self.cfg.mixer_rms_eps
        dt, B, C = (weightless_rms_norm(v, eps) for v in self.x_proj(x).split([r, N, N], dim=-1))
        return torch.nn.functional.linear(dt, self.dt_proj.weight), B, C
