"""The language model shared by every family, readable in one file.

    h⁰ = Embedding(ids)
    for each layer ℓ:  r ← r + hˡ  (fp32 when residual_in_fp32);  hˡ⁺¹ = Mixer(RMSNorm(r))
    logits = lm_head(RMSNorm_f(r + hᴸ))          (lm_head tied to the embedding unless tie_embeddings is off)

The mixer is the family's block (``mamba_deploy/families/<family>/block.py``; Mamba-1's is the selective SSM of
Gu & Dao 2023), picked by the config's family. Module and parameter names follow the state-spaces checkpoint keys
(``backbone.layers.N.mixer.in_proj.weight`` …) — the family's weight table (families/base.py ``weight_table``)
lists them — so a state dict in that format loads directly.

State: per layer a conv state and an SSM state (fp32) whose per-row shapes the family gives (Mamba-1: conv
[batch, d_inner, d_conv], SSM [batch, d_inner, d_state] — the layout of upstream ``allocate_inference_cache`` and
HF's MambaCache).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from .families import family_of


@dataclasses.dataclass
class MambaState:
    """Recurrent state of every layer: ``conv[i]`` [b, *conv shape], ``ssm[i]`` [b, *SSM shape] fp32 (the family's
    ``state_shapes``; Mamba-1: [b, d_inner, d_conv] and [b, d_inner, d_state])."""

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


class MambaLayer(nn.Module):
    def __init__(self, cfg, device=None, dtype=None):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, device=device, dtype=dtype)
        self.mixer = family_of(cfg).mixer(cfg, device=device, dtype=dtype)


class MambaBackbone(nn.Module):
    def __init__(self, cfg, device=None, dtype=None):
        super().__init__()
        self.embedding = nn.Embedding(cfg.padded_vocab_size, cfg.d_model, device=device, dtype=dtype)
        self.layers = nn.ModuleList(MambaLayer(cfg, device=device, dtype=dtype) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps, device=device, dtype=dtype)


class MambaLM(nn.Module):
    """``model(ids[b, T], state=None) -> (logits[b, T, V], state)``; ``model.step(ids[b], state) -> (logits[b, V],
    state)``. Logits are in the model's dtype; V is the padded vocabulary (``config.padded_vocab_size``); ids from
    ``config.vocab_size`` on are padding. ``config`` is any registered family's config (MambaConfig: Mamba-1)."""

    def __init__(self, config, device=None, dtype=None, scan_backend: str = "auto"):
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
        return zero_state(self.config, batch, device or self.device, dtype or self.dtype)

    def scan_backend_for(self, device: torch.device) -> str:
        """The scan backend this model's blocks run on ``device`` ("auto" resolved by the family's block)."""
        return self.backbone.layers[0].mixer.resolve_scan_backend(self.scan_backend, device)

    def _residual(self, residual, h):
        residual = h if residual is None else residual + h
        return residual.float() if self.config.residual_in_fp32 else residual

    def forward(self, input_ids: torch.Tensor, state: MambaState | None = None, num_logits: int | None = None):
        """ids [b, L] (+ the state before them) → (logits [b, L, V], state after them); ``num_logits`` n: the
        logits of the last n positions only ([b, n, V]; prefill needs 1, so the others are never computed)."""
        backend = self.scan_backend
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
        if num_logits is not None:
            h = h[:, h.shape[1] - num_logits:]
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
def init_weights(model: MambaLM, seed: int = 0) -> MambaLM:
    """Upstream's initialisation: embeddings (and an untied head) N(0, 0.02), norms 1, each block by its family's
    ``init_mixer`` (Mamba-1: realistic δ, S4D-real A, D = 1, out_proj rescaled by 1/√n_layer)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    family = family_of(cfg)

    def normal_(p, std):
        p.copy_(torch.randn(p.shape, generator=g) * std)

    normal_(model.backbone.embedding.weight, 0.02)
    if not cfg.tie_embeddings:
        normal_(model.lm_head.weight, 0.02)
    for layer in model.backbone.layers:
        family.init_mixer(layer.mixer, cfg, g)
        layer.norm.weight.fill_(1.0)
    model.backbone.norm_f.weight.fill_(1.0)
    return model


def zero_state(config, batch: int, device, dtype: torch.dtype) -> MambaState:
    """A zero ``MambaState`` of ``batch`` rows: conv states in ``dtype``, SSM states fp32, shapes from the family."""
    conv, ssm = family_of(config).state_shapes(config)
    return MambaState([torch.zeros(batch, *conv, device=device, dtype=dtype) for _ in range(config.n_layer)],
                      [torch.zeros(batch, *ssm, device=device, dtype=torch.float32) for _ in range(config.n_layer)])


def random_model(config, seed: int = 0, dtype=None, device="cpu", scan_backend="auto") -> MambaLM:
    """A model of ``config``'s shape with upstream-style random weights (initialised in fp32, then cast)."""
    model = MambaLM(config, device="cpu", dtype=torch.float32, scan_backend=scan_backend)
    init_weights(model, seed)
    return model.to(device=device, dtype=dtype or torch.float32)
