"""The Mamba-2 block (PyTorch reference), after upstream ``mamba_ssm/modules/mamba2.py`` (Dao & Gu 2024, §7).

    [z, xBC, δ_raw] = W_in · h                         z: d_inner, xBC: conv_dim = d_inner + 2·G·N, δ_raw: H
    xBC = SiLU(causal depthwise conv1d(xBC) + b)       kernel d_conv; conv state = the last d_conv inputs (pre-conv)
    [x, B, C] = xBC                                    x: [H, P] (P = headdim), B, C: [G, N]
    δ = clamp(softplus(δ_raw + dt_bias), dt_limit);  A = −exp(A_log)       one scalar per head
    y = SSD(x, δ, A, B, C, D)                          ops/ssd.py; D per head or per (head, channel)
    y = RMSNorm_grouped(y ⊙ SiLU(z)) · w               G norm groups of d_inner/G (norm_before_gate=False);
        RMSNorm_grouped(y) · w ⊙ SiLU(z)               when norm_before_gate=True
    out = W_out · y

Parameter names are upstream's and transformers' (``in_proj, conv1d, dt_bias, A_log, D, norm.weight, out_proj``).
State per layer: conv [b, conv_dim, d_conv] (activation dtype), SSM [b, nheads, headdim, d_state] fp32 — the layout of
upstream ``allocate_inference_cache`` and of transformers' Mamba2 cache, so states interchange with both.
The decode step clamps δ to dt_limit as the sequence path does (upstream's step skips the clamp; with the default
limit (0, ∞) the two agree).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...ops.causal_conv import causal_conv1d, causal_conv1d_step
from ...ops.ssd import discretize_dt, resolve_backend, ssd_scan, ssd_state_update
from ..mixer_init import depthwise_conv1d, dt_bias_init, init_linears_and_conv
from .config import Mamba2Config


class GatedRMSNorm(nn.Module):
    """Grouped RMSNorm with a SiLU gate (upstream ``RMSNormGated``), in fp32, returned in the input's dtype.

    x, z [..., d]; ``group_size`` = d / ngroups; each group normalised on its own."""

    def __init__(self, d: int, group_size: int, eps: float, norm_before_gate: bool, device=None, dtype=None):
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        xf, gate = x.float(), F.silu(z.float())
        if not self.norm_before_gate:
            xf = xf * gate
        g = xf.unflatten(-1, (-1, self.group_size))
        xf = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2) * self.weight.float()
        if self.norm_before_gate:
            xf = xf * gate
        return xf.to(x.dtype)


class Mamba2Mixer(nn.Module):
    resolve_scan_backend = staticmethod(resolve_backend)

    def __init__(self, cfg: Mamba2Config, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.cfg = cfg
        H = cfg.nheads
        self.in_proj = nn.Linear(cfg.d_model, cfg.d_in_proj, bias=cfg.bias, **kw)
        self.conv1d = depthwise_conv1d(cfg.conv_dim, cfg.d_conv, cfg.conv_bias, **kw)
        self.dt_bias = nn.Parameter(torch.empty(H, **kw))
        self.A_log = nn.Parameter(torch.empty(H, **kw))
        self.D = nn.Parameter(torch.empty(cfg.d_inner if cfg.D_has_hdim else H, **kw))
        self.norm = GatedRMSNorm(cfg.d_inner, cfg.d_inner // cfg.ngroups, cfg.norm_eps, cfg.norm_before_gate, **kw)
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=cfg.bias, **kw)

    # -- pieces shared by forward and step --------------------------------------------------------------------
    def A(self) -> torch.Tensor:
        return -torch.exp(self.A_log.float())                                   # A = −exp(A_log) [H], fp32

    def D_heads(self) -> torch.Tensor:
        """D in fp32 as [H] or [H, P]."""
        D = self.D.float()
        return D.view(self.cfg.nheads, self.cfg.headdim) if self.cfg.D_has_hdim else D

    def _split(self, zxbcdt: torch.Tensor):
        c = self.cfg
        return zxbcdt.split([c.d_inner, c.conv_dim, c.nheads], dim=-1)

    def _split_xbc(self, xbc: torch.Tensor):
        """[..., conv_dim] → x [..., H, P], B, C [..., G, N]."""
        c = self.cfg
        x, B, C = xbc.split([c.d_inner, c.ngroups * c.d_state, c.ngroups * c.d_state], dim=-1)
        return (x.unflatten(-1, (c.nheads, c.headdim)), B.unflatten(-1, (c.ngroups, c.d_state)),
                C.unflatten(-1, (c.ngroups, c.d_state)))

    def _dt(self, dt_raw: torch.Tensor) -> torch.Tensor:
        return discretize_dt(dt_raw, self.dt_bias, self.cfg.dt_limit)

    def _out(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.norm(y.flatten(-2), z))

    # -- full sequence (training, prefill) -----------------------------------------------------------------------
    def forward(self, h: torch.Tensor, conv_state=None, ssm_state=None, scan_backend: str = "auto"):
        """h: [b, L, d_model] → (out [b, L, d_model], conv_state, ssm_state). States may be None (zeros)."""
        z, xbc, dt_raw = self._split(self.in_proj(h))
        xbc, conv_state = causal_conv1d(xbc.transpose(1, 2), conv_state, self.conv1d.weight, self.conv1d.bias)
        x, B, C = self._split_xbc(xbc.transpose(1, 2))
        y, ssm_state = ssd_scan(x, dt_raw, self.A(), B, C, D=self.D_heads(), dt_bias=self.dt_bias.float(),
                                dt_limit=self.cfg.dt_limit, initial_state=ssm_state,
                                backend=resolve_backend(scan_backend, h.device), chunk_size=self.cfg.chunk_size)
        return self._out(y, z), conv_state, ssm_state

    # -- one token (decode) --------------------------------------------------------------------------------------
    def step(self, h: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor):
        """h: [b, d_model] → (out [b, d_model], new conv_state, new ssm_state); inputs are not modified."""
        z, xbc, dt_raw = self._split(self.in_proj(h))
        xbc, conv_state = causal_conv1d_step(xbc, conv_state, self.conv1d.weight, self.conv1d.bias)
        x, B, C = self._split_xbc(xbc)
        y, ssm_state = ssd_state_update(ssm_state, x, self._dt(dt_raw), self.A(), B, C, D=self.D_heads())
        return self._out(y, z), conv_state, ssm_state


def init_mixer(m: Mamba2Mixer, cfg: Mamba2Config, g: torch.Generator, dt_min: float = 1e-3, dt_max: float = 0.1,
               A_init_range: tuple[float, float] = (1.0, 16.0)) -> None:
    """Upstream's initialisation (``mamba_ssm/modules/mamba2.py``): softplus(dt_bias) log-uniform in [dt_min, dt_max]
    (floor 1e-4), A_log = log U(A_init_range), D = 1, norm weight 1, PyTorch's default Linear/Conv1d init, out_proj
    rescaled by 1/√n_layer (upstream ``_init_weights`` with ``rescale_prenorm_residual``)."""
    init_linears_and_conv(m, cfg, g, (m.in_proj, m.out_proj))
    m.dt_bias.copy_(dt_bias_init(cfg.nheads, g, dt_min, dt_max))
    lo, hi = A_init_range
    m.A_log.copy_(torch.log(lo + (hi - lo) * torch.rand(cfg.nheads, generator=g)))
    m.D.fill_(1.0)
    m.norm.weight.fill_(1.0)
