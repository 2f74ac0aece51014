"""SSD scan (Mamba-2 state space duality) in pure PyTorch: the sequential reference and the chunked matrix form.

Notation (Dao & Gu 2024, arXiv 2405.21060 §6–7; upstream ``mamba_ssm/modules/ssd_minimal.py``), per head h of
``headdim`` P channels, with G groups of B/C shared by H/G consecutive heads (head h reads group h·G/H):

    δ_t   = clamp(softplus(δ_raw_t + δ_bias), dt_min, dt_max)        one scalar per head and step
    h_t   = exp(δ_t·A)·h_{t−1} + (δ_t·x_t) ⊗ B_t                      h: [batch, H, P, N] fp32, A < 0 per head
    y_t   = h_t·C_t + D ⊙ x_t                                         D per head [H] or per channel [H, P]

Shapes (upstream's ``mamba_chunk_scan_combined`` layout): x [b, L, H, P]; δ [b, L, H] (already discretized, see
:func:`discretize_dt`); A [H] fp32; B, C [b, L, G, N]; D [H] or [H, P]; initial/final state [b, H, P, N] fp32.
y has x's dtype; all arithmetic is fp32, or fp64 if any input is fp64.

``ssd_scan_ref`` is the ground truth (one step at a time). ``ssd_scan_chunked`` computes the same thing as upstream's
chunked algorithm: within a chunk of Q steps, y = (L ∘ C·Bᵀ)·(δ·x) with L[i, j] = exp(Σ_{j<k≤i} δ_k·A); chunk end
states from a zero start; the states passed from chunk to chunk sequentially; plus each chunk's start state read out
through C_i·exp(Σ_{k≤i} δ_k·A). Every segment sum is formed by adding the terms of its own segment (never as a
difference of two long cumulative sums) and is ≤ 0, so every exp is ≤ 1: exact at any length, nothing overflows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .auto_backend import resolve_auto

DEFAULT_CHUNK = 256
NO_DT_LIMIT = (0.0, float("inf"))


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def discretize_dt(dt_raw: torch.Tensor, dt_bias: torch.Tensor | None, dt_limit: tuple[float, float] = NO_DT_LIMIT,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """δ = clamp(softplus(δ_raw + δ_bias), *dt_limit) in ``dtype``; δ_raw [..., H], δ_bias [H].

    softplus is torch's (β 1, threshold 20). The clamp is skipped for the default limit (0, ∞), where it is a no-op.
    """
    dt = F.softplus(dt_raw.to(dtype) + (dt_bias.to(dtype) if dt_bias is not None else 0.0))
    lo, hi = dt_limit
    if lo > 0.0 or hi != float("inf"):
        dt = dt.clamp(min=lo, max=hi)
    return dt


def _heads(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """B or C [..., G, N] → [..., H, N]: head h reads group h // (H/G)."""
    return t.repeat_interleave(nheads // t.shape[-2], dim=-2)


def _skip(D: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """D ⊙ x with D [H] or [H, P] against x [..., H, P]."""
    if D is None:
        return None
    D = D.to(x.dtype)
    return x * (D[:, None] if D.dim() == 1 else D)


def _check(x, dt, A, B, C):
    b, L, H, P = x.shape
    G, N = B.shape[-2:]
    if dt.shape != (b, L, H) or A.shape != (H,) or B.shape != (b, L, G, N) or C.shape != B.shape or H % G:
        raise ValueError(f"SSD shapes: x {tuple(x.shape)} dt {tuple(dt.shape)} A {tuple(A.shape)} "
                         f"B {tuple(B.shape)} C {tuple(C.shape)} (nheads must be a multiple of ngroups)")
    return b, L, H, P, G, N


def ssd_state_update(state, x, dt, A, B, C, D=None):
    """One decode step. state [b, H, P, N] fp32; x [b, H, P]; δ [b, H] (discretized); A [H]; B, C [b, G, N].

    Returns (y [b, H, P] in x's dtype, new state in the state's dtype); the input state is not modified.
    """
    cd = _compute_dtype(state, x, dt, A, B, C)
    H = x.shape[1]
    xf, dtf = x.to(cd), dt.to(cd)
    Bh, Ch = _heads(B.to(cd), H), _heads(C.to(cd), H)                            # [b, H, N]
    decay = torch.exp(dtf * A.to(cd))[..., None, None]                          # [b, H, 1, 1]
    h = decay * state.to(cd) + (dtf[..., None] * xf)[..., None] * Bh[:, :, None, :]
    y = (h * Ch[:, :, None, :]).sum(-1)
    skip = _skip(D, xf)
    if skip is not None:
        y = y + skip
    return y.to(x.dtype), h.to(state.dtype)


def ssd_scan_ref(x, dt, A, B, C, D=None, initial_state=None):
    """Sequential reference: exactly the recurrence in the module docstring. Returns (y, final_state)."""
    cd = _compute_dtype(x, dt, A, B, C, initial_state)
    b, L, H, P, G, N = _check(x, dt, A, B, C)
    h = (initial_state.to(cd) if initial_state is not None
         else torch.zeros(b, H, P, N, dtype=cd, device=x.device))
    ys = []
    for t in range(L):
        y_t, h = ssd_state_update(h, x[:, t].to(cd), dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y_t)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, H, P, dtype=cd)
    return y.to(x.dtype), h.to(torch.float64 if cd == torch.float64 else torch.float32)


def segment_sums(a: torch.Tensor) -> torch.Tensor:
    """a [..., Q] → S [..., Q, Q] with S[i, j] = Σ_{j<k≤i} a_k for j ≤ i and −∞ above the diagonal.

    Each entry is summed from its own terms (a cumulative sum down the rows of a masked copy), not as
    cumsum[i] − cumsum[j], so no cancellation between two large partial sums."""
    Q = a.shape[-1]
    below = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=a.device), diagonal=-1)
    terms = a[..., :, None].expand(*a.shape, Q).masked_fill(~below, 0.0)       # terms[i, j] = a_i if i > j
    S = torch.cumsum(terms, dim=-2)
    on_or_below = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=a.device))
    return S.masked_fill(~on_or_below, float("-inf"))


def ssd_scan_chunked(x, dt, A, B, C, D=None, initial_state=None, chunk_size: int = DEFAULT_CHUNK):
    """Chunked SSD (matrix form within chunks, state passing between them); same result as :func:`ssd_scan_ref`.

    The tail is padded with δ = 0, which leaves the state untouched (decay 1, input 0). Returns (y, final_state).
    Memory: O(b·H·L·Q) for the intra-chunk matrices, Q = ``chunk_size``.
    """
    cd = _compute_dtype(x, dt, A, B, C, initial_state)
    b, L, H, P, G, N = _check(x, dt, A, B, C)
    Q = max(1, min(chunk_size, L)) if L else 1
    nc = max(1, -(-L // Q))
    pad = nc * Q - L
    xf, dtf = x.to(cd), dt.to(cd)
    Bh, Ch = _heads(B.to(cd), H), _heads(C.to(cd), H)                            # [b, L, H, N]
    if pad:
        xf, dtf = F.pad(xf, (0, 0, 0, 0, 0, pad)), F.pad(dtf, (0, 0, 0, pad))
        Bh, Ch = F.pad(Bh, (0, 0, 0, 0, 0, pad)), F.pad(Ch, (0, 0, 0, 0, 0, pad))
    # chunk views: [b, nc, Q, H, ·]
    xc = (xf * dtf[..., None]).view(b, nc, Q, H, P)                             # δ·x
    Bc, Cc = Bh.view(b, nc, Q, H, N), Ch.view(b, nc, Q, H, N)
    a = (dtf * A.to(cd)).view(b, nc, Q, H).permute(0, 3, 1, 2)                  # δ·A ≤ 0   [b, H, nc, Q]
    seg = segment_sums(a)                                                       # [b, H, nc, Q, Q]
    # 1. within chunks: y_i = Σ_{j≤i} exp(seg[i, j]) (C_i·B_j) δ_j x_j
    scores = torch.einsum("bcihn,bcjhn->bhcij", Cc, Bc) * torch.exp(seg)
    y = torch.einsum("bhcij,bcjhp->bcihp", scores, xc)
    # 2. each chunk's end state from a zero start: Σ_j exp(seg[Q−1, j]) (δ_j x_j) ⊗ B_j
    to_end = torch.exp(seg[..., -1, :])                                         # [b, H, nc, Q]
    chunk_states = torch.einsum("bhcj,bcjhp,bcjhn->bchpn", to_end, xc, Bc)     # [b, nc, H, P, N]
    # 3. pass states from chunk to chunk: S_{c+1} = exp(Σ_{k∈c} δ_k·A)·S_c + chunk_states_c
    chunk_decay = torch.exp(a.sum(-1))                                          # [b, H, nc]
    S = (initial_state.to(cd) if initial_state is not None
         else torch.zeros(b, H, P, N, dtype=cd, device=x.device))
    starts = []
    for c in range(nc):
        starts.append(S)
        S = chunk_decay[:, :, c, None, None] * S + chunk_states[:, c]
    starts = torch.stack(starts, dim=1)                                         # [b, nc, H, P, N]
    # 4. the start state read out inside each chunk: C_i · S_c · exp(Σ_{k≤i} δ_k·A)
    from_start = torch.exp(torch.cumsum(a, dim=-1))                             # [b, H, nc, Q]
    y = y + torch.einsum("bcihn,bchpn,bhci->bcihp", Cc, starts, from_start)
    y = y.reshape(b, nc * Q, H, P)[:, :L]
    skip = _skip(D, xf[:, :L])
    if skip is not None:
        y = y + skip
    return y.to(x.dtype), S.to(torch.float64 if cd == torch.float64 else torch.float32)


BACKENDS = ("reference", "chunked", "triton")


def resolve_backend(requested: str, device: torch.device | None = None) -> str:
    """``auto`` → ``triton`` (ops/triton_ssd.py) on CUDA when Triton imports, else ``chunked``; others pass through."""
    return resolve_auto(requested, device, "triton_ssd")


def ssd_scan(x, dt_raw, A, B, C, D=None, dt_bias=None, dt_limit: tuple[float, float] = NO_DT_LIMIT,
             initial_state=None, backend: str = "auto", chunk_size: int = DEFAULT_CHUNK):
    """The SSD scan from raw δ: δ = clamp(softplus(δ_raw + dt_bias), *dt_limit), then the backend by name
    (``auto``: see :func:`resolve_backend`). Shapes as in the module docstring. Returns (y, final_state)."""
    backend = resolve_backend(backend, x.device)
    if backend == "triton":
        from .triton_ssd import ssd_scan_triton
        return ssd_scan_triton(x, dt_raw, A, B, C, D=D, dt_bias=dt_bias, initial_state=initial_state,
                               dt_softplus=True, dt_limit=dt_limit, chunk_size=chunk_size)
    dt = discretize_dt(dt_raw, dt_bias, dt_limit, _compute_dtype(x, dt_raw, A, B, C, initial_state))
    if backend == "reference":
        return ssd_scan_ref(x, dt, A, B, C, D=D, initial_state=initial_state)
    if backend == "chunked":
        return ssd_scan_chunked(x, dt, A, B, C, D=D, initial_state=initial_state, chunk_size=chunk_size)
    raise ValueError(f"unknown SSD scan backend {backend!r}; choose one of {BACKENDS} or auto")
