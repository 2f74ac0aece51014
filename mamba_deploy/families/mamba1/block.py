"""The Mamba-1 block (Gu & Dao 2023, §3.4 and Alg. 2), the PyTorch reference every runtime is compared with.

    [x, z] = W_in · h                           x, z ∈ R^{d_inner}
    x = SiLU(causal depthwise conv1d(x) + b)    kernel d_conv; the conv state is the last d_conv inputs (pre-conv)
    [δ_raw, B, C] = W_x · x                     (dt_rank, N, N);  δ_raw ← W_dt · δ_raw  (bias added in the scan)
    y = S6(x, δ_raw, A = −exp(A_log), B, C, D, z)    (ops/selective_scan.py)
    out = W_out · y

Parameter names follow the checkpoint keys (``in_proj.weight`` …, under ``backbone.layers.N.mixer.``) and
weights.py lists them. The scan kernel is chosen inside the block, as upstream does: ``scan_backend="auto"`` takes
the Triton scan on CUDA when Triton imports, else the chunked pure-torch scan (``reference`` is the sequential
ground truth).

State per layer: conv state [batch, d_inner, d_conv] in the activation dtype and SSM state [batch, d_inner, d_state]
fp32 — the layout of upstream ``allocate_inference_cache`` and HF's MambaCache.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...ops.auto_backend import resolve_auto
from ...ops.selective_scan import selective_scan, selective_state_update
from ..mixer_init import depthwise_conv1d, dt_bias_init, init_linears_and_conv, uniform_
from .config import MambaConfig


def resolve_scan_backend(requested: str, device: torch.device) -> str:
    """``auto`` → ``triton`` (ops/triton_scan.py) on CUDA when Triton is importable, else ``chunked``; other names
    pass through."""
    return resolve_auto(requested, device, "triton_scan")


class MambaMixer(nn.Module):
    resolve_scan_backend = staticmethod(resolve_scan_backend)

    def __init__(self, cfg: MambaConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.cfg = cfg
        d_inner, N, r = cfg.d_inner, cfg.d_state, cfg.dt_rank_value
        self.in_proj = nn.Linear(cfg.d_model, 2 * d_inner, bias=cfg.bias, **kw)
        self.conv1d = depthwise_conv1d(d_inner, cfg.d_conv, cfg.conv_bias, **kw)
        self.x_proj = nn.Linear(d_inner, r + 2 * N, bias=False, **kw)
        self.dt_proj = nn.Linear(r, d_inner, bias=True, **kw)
        self.A_log = nn.Parameter(torch.empty(d_inner, N, device=device, dtype=dtype))
        self.D = nn.Parameter(torch.empty(d_inner, device=device, dtype=dtype))
        self.out_proj = nn.Linear(d_inner, cfg.d_model, bias=cfg.bias, **kw)

    # -- pieces shared by forward and step --------------------------------------------------------------------
    def A(self) -> torch.Tensor:
        return A_from_log(self.A_log)                                            # A = −exp(A_log), fp32

    def _conv_bias(self):
        return self.conv1d.bias.float() if self.conv1d.bias is not None else None

    def _project_x(self, x: torch.Tensor):
        """x [..., d_inner] → δ_raw (W_dt applied, no bias) [..., d_inner], B, C [..., N]."""
        r, N = self.cfg.dt_rank_value, self.cfg.d_state
        dt, B, C = self.x_proj(x).split([r, N, N], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C

    # -- full sequence (training, prefill) -----------------------------------------------------------------------
    def forward(self, h: torch.Tensor, conv_state=None, ssm_state=None, scan_backend: str = "auto"):
        """h: [b, L, d_model] → (out [b, L, d_model], conv_state, ssm_state). States may be None (zeros)."""
        b, L, _ = h.shape
        k = self.cfg.d_conv
        x, z = self.in_proj(h).chunk(2, dim=-1)
        x, z = x.transpose(1, 2), z.transpose(1, 2)                                # [b, d_inner, L]
        if conv_state is None:
            conv_state = x.new_zeros(b, self.cfg.d_inner, k)
        history = torch.cat([conv_state.to(x.dtype), x], dim=-1)                 # [b, d_inner, k + L]
        new_conv_state = history[..., -k:]
        w = self.conv1d.weight.float()
        xc = F.silu(F.conv1d(history[..., 1:].float(), w, self._conv_bias(), groups=self.cfg.d_inner)).to(x.dtype)
        dt, B, C = self._project_x(xc.transpose(1, 2))
        y, new_ssm_state = selective_scan(
            xc, dt.transpose(1, 2), self.A(), B.transpose(1, 2), C.transpose(1, 2), D=self.D.float(), z=z,
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True, initial_state=ssm_state,
            backend=resolve_scan_backend(scan_backend, h.device))
        return self.out_proj(y.transpose(1, 2)), new_conv_state, new_ssm_state

    # -- one token (decode) --------------------------------------------------------------------------------------
    def step(self, h: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor):
        """h: [b, d_model] → (out [b, d_model], new conv_state, new ssm_state); inputs are not modified."""
        x, z = self.in_proj(h).chunk(2, dim=-1)                                    # [b, d_inner]
        conv_state = torch.cat([conv_state[..., 1:], x[..., None].to(conv_state.dtype)], dim=-1)
        xc = (conv_state.float() * self.conv1d.weight[:, 0, :].float()).sum(-1)
        if self.conv1d.bias is not None:
            xc = xc + self._conv_bias()
        xc = F.silu(xc).to(x.dtype)
        dt, B, C = self._project_x(xc)
        y, ssm_state = selective_state_update(ssm_state, xc, dt, self.A(), B, C, D=self.D.float(), z=z,
                                              delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        return self.out_proj(y), conv_state, ssm_state


def A_from_log(A_log: torch.Tensor) -> torch.Tensor:
    """A = −exp(A_log) in fp32 (S4D-real parametrisation keeps A < 0); the artifact stores this tensor."""
    return -torch.exp(A_log.float())


@torch.no_grad()
def init_mixer(m: MambaMixer, cfg: MambaConfig, g: torch.Generator, dt_min: float = 1e-3,
               dt_max: float = 0.1) -> None:
    """Upstream's initialisation (``mamba_ssm/modules/mamba_simple.py``): realistic δ (softplus(dt bias)
    log-uniform in [dt_min, dt_max]), A_log = log(1..N) (S4D-real), D = 1, out_proj rescaled by 1/√n_layer."""
    init_linears_and_conv(m, cfg, g, (m.in_proj, m.x_proj, m.out_proj))
    uniform_(m.dt_proj.weight, cfg.dt_rank_value ** -0.5, g)
    m.dt_proj.bias.copy_(dt_bias_init(cfg.d_inner, g, dt_min, dt_max))
    m.A_log.copy_(torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.float32)).repeat(cfg.d_inner, 1))
    m.D.fill_(1.0)
