"""Selective scan (Mamba-1 S6) in pure PyTorch: the sequential reference and a chunked two-pass scan.

Notation (Gu & Dao 2023, Alg. 2), per channel d and state index n:

    δ_t   = softplus(δ_raw_t + δ_bias)                        (threshold 20, as torch's softplus)
    Ā_t   = exp(δ_t · A)                                      (zero-order hold; A = −exp(A_log) < 0)
    B̄_t x_t = δ_t · B_t · x_t                                 (Euler for B, as upstream)
    h_t   = Ā_t ⊙ h_{t−1} + B̄_t x_t                           (h: [batch, d_inner, N], fp32)
    y_t   = ⟨h_t, C_t⟩ + D ⊙ x_t ;   y_t ← y_t ⊙ SiLU(z_t)

Shapes: u (= x), δ_raw, z: [batch, d_inner, L]; A: [d_inner, N] fp32; B, C: [batch, N, L]; D, δ_bias: [d_inner];
initial/final state: [batch, d_inner, N] fp32. y has u's dtype; all arithmetic is fp32 (fp64 if any input is).

``selective_scan_ref`` is the ground truth every fast backend is tested against. ``selective_scan_chunked`` does
the same recurrence in ≈ 2·√L + L/√L sequential steps instead of L, without any cumulative-sum-and-divide trick:
every factor it multiplies is an exp of a non-positive number, so nothing overflows at any L.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def discretize_delta(delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool,
                     dtype: torch.dtype) -> torch.Tensor:
    """δ = softplus(δ_raw + δ_bias) in ``dtype`` (bias broadcast over the trailing time axis if present)."""
    delta = delta.to(dtype)
    if delta_bias is not None:
        bias = delta_bias.to(dtype)
        delta = delta + (bias[..., None] if delta.dim() == 3 else bias)
    return F.softplus(delta) if delta_softplus else delta  # torch's softplus: threshold 20, beta 1


def _finish(y: torch.Tensor, u: torch.Tensor, D, z, out_dtype) -> torch.Tensor:
    """y ← (y + D ⊙ u) ⊙ SiLU(z), then cast to the activation dtype."""
    if D is not None:
        y = y + u * (D.to(y.dtype)[:, None] if y.dim() == 3 else D.to(y.dtype))
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                       initial_state=None):
    """Sequential reference: one time step at a time, exactly the recurrence above. Returns (y, final_state)."""
    cd = _compute_dtype(u, delta, A, B, C, initial_state)
    batch, d_inner, L = u.shape
    N = A.shape[1]
    x = u.to(cd)
    dt = discretize_delta(delta, delta_bias, delta_softplus, cd)
    A, B, C = A.to(cd), B.to(cd), C.to(cd)
    h = (initial_state.to(cd) if initial_state is not None
         else torch.zeros(batch, d_inner, N, dtype=cd, device=u.device))
    ys = []
    for t in range(L):
        dA = torch.exp(dt[:, :, t, None] * A)                                # Ā_t        [b, d, N]
        dBx = (dt[:, :, t] * x[:, :, t])[:, :, None] * B[:, None, :, t]     # B̄_t x_t    [b, d, N]
        h = dA * h + dBx
        ys.append((h * C[:, None, :, t]).sum(-1))                            # ⟨h_t, C_t⟩ [b, d]
    y = torch.stack(ys, dim=-1) if ys else x.new_zeros(batch, d_inner, 0)
    return _finish(y, x, D, z, u.dtype), h.to(torch.float64 if cd == torch.float64 else torch.float32)


def default_chunk_len(L: int) -> int:
    return max(1, min(256, math.isqrt(max(L - 1, 0)) + 1))


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                           initial_state=None, chunk_len: int | None = None):
    """Two-pass chunked scan; the same function as :func:`selective_scan_ref`, with far fewer Python steps.

    The sequence is cut into ``nc`` chunks of ``T`` steps (T ≈ √L), all processed in parallel:
      1. each chunk's end state from a zero start (T steps, all chunks at once);
      2. chunk start states carried across chunks: H_{c+1} = exp(A·Σ_{t∈c} δ_t) ⊙ H_c + h_end_c (nc steps);
      3. each chunk re-scanned from its true start state, emitting y (T steps, all chunks at once).
    The tail is padded with δ = 0, which leaves the state untouched (Ā = 1, B̄x = 0).
    """
    cd = _compute_dtype(u, delta, A, B, C, initial_state)
    batch, d_inner, L = u.shape
    N = A.shape[1]
    T = chunk_len or default_chunk_len(L)
    nc = max(1, -(-L // T))
    pad = nc * T - L
    x = u.to(cd)
    dt = discretize_delta(delta, delta_bias, delta_softplus, cd)
    A, Bm, Cm = A.to(cd), B.to(cd), C.to(cd)
    if pad:
        x, dt = F.pad(x, (0, pad)), F.pad(dt, (0, pad))
        Bm, Cm = F.pad(Bm, (0, pad)), F.pad(Cm, (0, pad))
    # chunk views: x, dt → [b, d, nc, T]; B, C → [b, 1, nc, N, T] (broadcast over d)
    xc, dtc = x.view(batch, d_inner, nc, T), dt.view(batch, d_inner, nc, T)
    Bc = Bm.view(batch, N, nc, T).permute(0, 2, 1, 3).unsqueeze(1)
    Cc = Cm.view(batch, N, nc, T).permute(0, 2, 1, 3).unsqueeze(1)
    Ac = A[:, None, :]                                                        # [d, 1, N]
    dtx = dtc * xc

    def step(h, t):
        return torch.exp(dtc[..., t, None] * Ac) * h + dtx[..., t, None] * Bc[..., t]

    # pass 1: end state of every chunk from a zero start
    h = torch.zeros(batch, d_inner, nc, N, dtype=cd, device=u.device)
    for t in range(T):
        h = step(h, t)
    # pass 2: carry start states across chunks
    chunk_decay = torch.exp(dtc.sum(-1)[..., None] * Ac)                      # [b, d, nc, N]
    H = (initial_state.to(cd) if initial_state is not None
         else torch.zeros(batch, d_inner, N, dtype=cd, device=u.device))
    starts = []
    for c in range(nc):
        starts.append(H)
        H = chunk_decay[:, :, c] * H + h[:, :, c]
    # pass 3: re-scan each chunk from its true start, emitting y
    h = torch.stack(starts, dim=2)
    ys = []
    for t in range(T):
        h = step(h, t)
        ys.append((h * Cc[..., t]).sum(-1))                                  # [b, d, nc]
    y = torch.stack(ys, dim=-1).reshape(batch, d_inner, nc * T)[..., :L]
    return _finish(y, x[..., :L], D, z, u.dtype), H.to(torch.float64 if cd == torch.float64 else torch.float32)


def selective_state_update(state, x, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True):
    """One recurrent step (decode). x, δ_raw, z: [b, d]; B, C: [b, N]; state: [b, d, N] fp32.

    Returns (y [b, d] in x's dtype, new_state fp32); the input state is not modified.
    """
    cd = _compute_dtype(x, delta, A, B, C, state)
    xf = x.to(cd)
    dt = discretize_delta(delta, delta_bias, delta_softplus, cd)
    h = torch.exp(dt[..., None] * A.to(cd)) * state.to(cd) + (dt * xf)[..., None] * B.to(cd)[:, None, :]
    y = (h * C.to(cd)[:, None, :]).sum(-1)
    return _finish(y, xf, D, z, x.dtype), h.to(state.dtype)


BACKENDS = ("reference", "chunked", "triton")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                   initial_state=None, backend: str = "chunked"):
    """Dispatch to a scan backend by name; all return (y, final_state)."""
    if backend == "reference":
        fn = selective_scan_ref
    elif backend == "chunked":
        fn = selective_scan_chunked
    elif backend == "triton":
        from .triton_scan import selective_scan_triton as fn
    else:
        raise ValueError(f"unknown scan backend {backend!r}; choose one of {BACKENDS}")
    return fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
              initial_state=initial_state)
