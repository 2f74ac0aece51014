"""Mamba-1 language model in PyTorch, readable in one file.

    h⁰ = Embedding(ids)
    for each layer ℓ:  r ← r + hˡ  (fp32 when residual_in_fp32);  hˡ⁺¹ = Mixer(RMSNorm(r))
    logits = lm_head(RMSNorm_f(r + hᴸ))          (lm_head tied to the embedding)

Mixer (one Mamba-1 block; see ops/selective_scan.py for the scan itself):
    [x, z] = W_in · h                           x, z ∈ R^{d_inner}
    x = SiLU(causal depthwise conv1d(x) + b)    kernel d_conv; the conv state is the last d_conv inputs (pre-conv)
    [δ_raw, B, C] = W_x · x                     (dt_rank, N, N);  δ_raw ← W_dt · δ_raw  (bias added in the scan)
    y = S6(x, δ_raw, A = −exp(A_log), B, C, D, z)
    out = W_out · y

Module and parameter names follow the state-spaces checkpoint keys (``backbone.layers.N.mixer.in_proj.weight`` …),
so a state dict in that format loads directly.

State (DESIGN §3): per layer a conv state [batch, d_inner, d_conv] in the activation dtype and an SSM state
[batch, d_inner, d_state] in fp32 — the layout of upstream ``allocate_inference_cache`` and HF's MambaCache.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MambaConfig
from .ops.selective_scan import selective_scan, selective_state_update


@dataclasses.dataclass
class MambaState:
    """Recurrent state of every layer: ``conv[i]`` [b, d_inner, d_conv], ``ssm[i]`` [b, d_inner, d_state] fp32."""

    conv: list[torch.Tensor]
    ssm: list[torch.Tensor]

    @property
    def batch(self) -> int:
        return self.ssm[0].shape[0]

    def clone(self) -> "MambaState":
        return MambaState([c.clone() for c in self.conv], [s.clone() for s in self.ssm])

    def select(self, index) -> "MambaState":
        """Rows ``index`` of the batch (an int keeps the batch axis)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return MambaState([c[index] for c in self.conv], [s[index] for s in self.ssm])

    @staticmethod
    def cat(states: list["MambaState"]) -> "MambaState":
        n = len(states[0].ssm)
        return MambaState([torch.cat([s.conv[i] for s in states]) for i in range(n)],
                          [torch.cat([s.ssm[i] for s in states]) for i in range(n)])


class RMSNorm(nn.Module):
    """y = x / √(mean(x²) + ε) · w, computed in fp32 and returned in the weight's dtype."""

    def __init__(self, d: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(self.weight.dtype)


class MambaMixer(nn.Module):
    def __init__(self, cfg: MambaConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.cfg = cfg
        d_inner, N, r = cfg.d_inner, cfg.d_state, cfg.dt_rank_value
        self.in_proj = nn.Linear(cfg.d_model, 2 * d_inner, bias=cfg.bias, **kw)
        self.conv1d = nn.Conv1d(d_inner, d_inner, cfg.d_conv, groups=d_inner, bias=cfg.conv_bias,
                                padding=cfg.d_conv - 1, **kw)
        self.x_proj = nn.Linear(d_inner, r + 2 * N, bias=False, **kw)
        self.dt_proj = nn.Linear(r, d_inner, bias=True, **kw)
        self.A_log = nn.Parameter(torch.empty(d_inner, N, device=device, dtype=dtype))
        self.D = nn.Parameter(torch.empty(d_inner, device=device, dtype=dtype))
        self.out_proj = nn.Linear(d_inner, cfg.d_model, bias=cfg.bias, **kw)

    # -- pieces shared by forward and step --------------------------------------------------------------------
    def A(self) -> torch.Tensor:
        return -torch.exp(self.A_log.float())                                   # A = −exp(A_log), fp32

    def _conv_bias(self):
        return self.conv1d.bias.float() if self.conv1d.bias is not None else None

    def _project_x(self, x: torch.Tensor):
        """x [..., d_inner] → δ_raw (W_dt applied, no bias) [..., d_inner], B, C [..., N]."""
        r, N = self.cfg.dt_rank_value, self.cfg.d_state
        dt, B, C = self.x_proj(x).split([r, N, N], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C

    # -- full sequence (training, prefill) -----------------------------------------------------------------------
    def forward(self, h: torch.Tensor, conv_state=None, ssm_state=None, scan_backend: str = "chunked"):
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
            backend=scan_backend)
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


class MambaLayer(nn.Module):
    def __init__(self, cfg: MambaConfig, device=None, dtype=None):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, device=device, dtype=dtype)
        self.mixer = MambaMixer(cfg, device=device, dtype=dtype)


class MambaBackbone(nn.Module):
    def __init__(self, cfg: MambaConfig, device=None, dtype=None):
        super().__init__()
        self.embedding = nn.Embedding(cfg.padded_vocab_size, cfg.d_model, device=device, dtype=dtype)
        self.layers = nn.ModuleList(MambaLayer(cfg, device=device, dtype=dtype) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps, device=device, dtype=dtype)


class MambaLM(nn.Module):
    """``model(ids[b, T], state=None) -> (logits[b, T, V], state)``; ``model.step(ids[b], state) -> (logits[b, V],
    state)``. Logits are in the model's dtype; V is the padded vocabulary."""

    def __init__(self, config: MambaConfig, device=None, dtype=None, scan_backend: str = "auto"):
        super().__init__()
        self.config = config
        self.scan_backend = scan_backend
        self.backbone = MambaBackbone(config, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False, device=device, dtype=dtype)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.backbone.embedding.weight.device

    def allocate_state(self, batch: int, device=None, dtype=None) -> MambaState:
        """Zero state for ``batch`` sequences; conv state in ``dtype`` (default: the model's), SSM state fp32."""
        c = self.config
        device = device or self.device
        dtype = dtype or self.dtype
        return MambaState(
            [torch.zeros(batch, c.d_inner, c.d_conv, device=device, dtype=dtype) for _ in range(c.n_layer)],
            [torch.zeros(batch, c.d_inner, c.d_state, device=device, dtype=torch.float32) for _ in range(c.n_layer)])

    def _resolve_backend(self, device: torch.device) -> str:
        if self.scan_backend != "auto":
            return self.scan_backend
        if device.type == "cuda":
            try:
                import triton  # noqa: F401
                from .ops import triton_scan  # noqa: F401
                return "triton"
            except ImportError:
                pass
        return "chunked"

    def _residual(self, residual, h):
        residual = h if residual is None else residual + h
        return residual.float() if self.config.residual_in_fp32 else residual

    def forward(self, input_ids: torch.Tensor, state: MambaState | None = None):
        backend = self._resolve_backend(input_ids.device)
        h = self.backbone.embedding(input_ids)
        residual = None
        conv, ssm = [], []
        for i, layer in enumerate(self.backbone.layers):
            residual = self._residual(residual, h)
            h, c, s = layer.mixer(layer.norm(residual),
                                  None if state is None else state.conv[i],
                                  None if state is None else state.ssm[i], scan_backend=backend)
            conv.append(c)
            ssm.append(s)
        h = self.backbone.norm_f(self._residual(residual, h))
        return self.lm_head(h), MambaState(conv, ssm)

    def step(self, input_ids: torch.Tensor, state: MambaState):
        h = self.backbone.embedding(input_ids)
        residual = None
        conv, ssm = [], []
        for i, layer in enumerate(self.backbone.layers):
            residual = self._residual(residual, h)
            h, c, s = layer.mixer.step(layer.norm(residual), state.conv[i], state.ssm[i])
            conv.append(c)
            ssm.append(s)
        h = self.backbone.norm_f(self._residual(residual, h))
        return self.lm_head(h), MambaState(conv, ssm)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights counted once (parameters() dedups)


@torch.no_grad()
def init_weights(model: MambaLM, seed: int = 0, dt_min: float = 1e-3, dt_max: float = 0.1) -> MambaLM:
    """Upstream's initialisation: realistic δ (softplus(dt bias) log-uniform in [dt_min, dt_max]),
    A_log = log(1..N) (S4D-real), D = 1, embeddings N(0, 0.02), out_proj rescaled by 1/√n_layer."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config

    def normal_(p, std):
        p.copy_(torch.randn(p.shape, generator=g) * std)

    def uniform_(p, bound):
        p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)

    normal_(model.backbone.embedding.weight, 0.02)
    if not cfg.tie_embeddings:
        normal_(model.lm_head.weight, 0.02)
    for layer in model.backbone.layers:
        m = layer.mixer
        for lin in (m.in_proj, m.x_proj, m.out_proj):
            uniform_(lin.weight, 1 / math.sqrt(lin.in_features))
            if lin.bias is not None:
                lin.bias.zero_()
        m.out_proj.weight.div_(math.sqrt(cfg.n_layer))
        uniform_(m.conv1d.weight, 1 / math.sqrt(cfg.d_conv))
        if m.conv1d.bias is not None:
            uniform_(m.conv1d.bias, 1 / math.sqrt(cfg.d_conv))
        uniform_(m.dt_proj.weight, cfg.dt_rank_value ** -0.5)
        dt = torch.exp(torch.rand(cfg.d_inner, generator=g) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=1e-4)
        m.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))                    # inverse softplus
        m.A_log.copy_(torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.float32)).repeat(cfg.d_inner, 1))
        m.D.fill_(1.0)
        layer.norm.weight.fill_(1.0)
    model.backbone.norm_f.weight.fill_(1.0)
    return model


def random_model(config: MambaConfig, seed: int = 0, dtype=None, device="cpu", scan_backend="auto") -> MambaLM:
    """A model of ``config``'s shape with upstream-style random weights (initialised in fp32, then cast)."""
    model = MambaLM(config, device="cpu", dtype=torch.float32, scan_backend=scan_backend)
    init_weights(model, seed)
    return model.to(device=device, dtype=dtype or torch.float32)
