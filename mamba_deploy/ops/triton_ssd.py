"""Mamba-2 SSD (state-space duality) scan in Triton: forward and backward kernels and their autograd wrapper.

Math (Dao & Gu 2024, arXiv 2405.21060 §6–7; upstream ``mamba_ssm/ops/triton/ssd_combined.py``), per batch b,
head h (group g(h) = h // (H / G)), head channel p and state index n:

    dt_t = clamp(softplus(dt_raw_t + dt_bias_h), dt_min, dt_max)        (softplus threshold 20, as torch's)
    h_t  = exp(dt_t·A_h)·h_{t−1} + dt_t·x_t ⊗ B_t[g]                  state [b, H, P, N], fp32
    y_t  = h_t·C_t[g] + D_h·x_t

Chunked form with chunks of Q positions (positions i, j inside a chunk; a_i = Σ_{k≤i} dt_k·A, the chunk's
cumulative log decay, non-increasing):

    chunk state   S_c   = Σ_j exp(a_{Q−1} − a_j)·dt_j·x_j ⊗ B_j                     (_chunk_state_kernel, MODE 0)
    state passing H_{c+1} = exp(a_{Q−1})·H_c + S_c,   H_0 = initial state            (_state_passing_fwd_kernel)
    chunk scan    y_i   = Σ_{j≤i} (C_i·B_j)·exp(a_i − a_j)·dt_j·x_j + exp(a_i)·H_c·C_i + D·x_i  (_chunk_scan_fwd_kernel)

Every exp is of a non-positive number (segment sums), so nothing overflows at any length. Positions past L are
padded with dt = 0 (decay 1, no input): they change nothing.

Backward (reverse mode; dy = ∂ℓ/∂y, G_c = ∂ℓ/∂H_c, G_{n_chunks} = ∂ℓ/∂(final state)):

    local adjoint  E_c = Σ_i exp(a_i)·dy_i ⊗ C_i                                    (_chunk_state_kernel, MODE 1)
    state passing  G_c = E_c + exp(a_{Q−1})·G_{c+1};  ∂ℓ/∂S_c = G_{c+1};  ∂ℓ/∂h_0 = G_0
                   ∂ℓ/∂a_{Q−1} += exp(a_{Q−1})·⟨G_{c+1}, H_c⟩                       (_state_passing_bwd_kernel)
    chunk          with K_ij = exp(a_i − a_j)·dt_j·(dy_i·x_j) (j ≤ i), W_ij = K_ij·(C_i·B_j), r_j = exp(a_{Q−1} − a_j),
                   S' = ∂ℓ/∂S_c:
                   ∂x_j = dt_j·Σ_i exp(a_i − a_j)(C_i·B_j)·dy_i + r_j·dt_j·S'B_j + D·dy_j
                   ∂C_i = Σ_j K_ij B_j + exp(a_i)·dy_i H_c          ∂B_j = Σ_i K_ij C_i + r_j·dt_j·x_j S'
                   ∂dt_j (direct) = Σ_i W_ij / dt_j + r_j·(x_j·S'B_j)
                   ∂a_i = Σ_j W_ij − Σ_k W_ki + exp(a_i)·dy_i·(H_c C_i) − r_i·dt_i·(x_i·S'B_i)
                          [+ Σ_j r_j·dt_j·(x_j·S'B_j) + the state-passing term at i = Q−1]
                   then through a = cumsum(dt·A): ∂dt_k += A·Σ_{i≥k} ∂a_i, ∂A += Σ_k dt_k·Σ_{i≥k} ∂a_i,
                   and through clamp and softplus to dt_raw and dt_bias        (_chunk_bwd_kernel)

∂B and ∂C are written per head (fp32) and summed over each group's heads in torch; ∂A, ∂D, ∂dt_bias are written
per (batch, chunk) and summed in torch. Matrix products run on tensor cores in the activation dtype (bf16/fp16:
operands rounded to it, fp32 accumulation, as upstream) or in exact fp32 (``input_precision="ieee"``) for fp32
inputs; products with the fp32 states use tf32 for bf16/fp16 inputs (``SSDConfig.lowp_states``: states entering
the chunks kept in x's dtype, products in it, as upstream).

The reference next to it: ``ops/ssd.py`` (``ssd_scan_ref``, sequential, float64-capable; ``ssd_scan_chunked``).
"""
from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_common import interpreting, loop_bound, softplus

# ----------------------------------------------------------------------------------------------- device helpers

# Triton's interpreter multiplies bf16 operands of tl.dot as raw integers; it gets them as fp32 instead (the same
# products: bf16 × bf16 is exact in fp32).
_BF16_DOT_AS_FP32 = tl.constexpr(interpreting())


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation; exact fp32 products when IEEE (else tensor-core precision of the operands)."""
    if _BF16_DOT_AS_FP32:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _dt_from_raw(raw, bias, dt_min, dt_max, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(dt, dt_raw + bias, ∂dt/∂dt_raw): dt = clamp(softplus(dt_raw + bias), dt_min, dt_max), all fp32."""
    v = raw.to(tl.float32)
    if HAS_BIAS:
        v = v + bias
    if SOFTPLUS:
        sp = softplus(v)
        deriv = tl.where(v > 20.0, 1.0, tl.sigmoid(v))
    else:
        sp = v
        deriv = tl.full(v.shape, 1.0, tl.float32)
    inside = (sp >= dt_min) & (sp <= dt_max)                 # torch.clamp passes the gradient at the bounds
    return tl.minimum(tl.maximum(sp, dt_min), dt_max), v, tl.where(inside, deriv, 0.0)


def _no_spec(*names):
    """Size arguments compiled as runtime values (one compiled variant per tile/dtype/flags, whatever the sizes);
    the interpreter takes no such list."""
    return dict(do_not_specialize=[] if interpreting() else list(names))


# ----------------------------------------------------------------------------------------------- forward kernels

@triton.jit(**_no_spec("L", "H", "n_chunks"))
def _dt_cumsum_kernel(dt_ptr, A_ptr, bias_ptr, dt_out_ptr, acs_ptr, L, H, n_chunks, dt_min, dt_max,
                      HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, Q: tl.constexpr, BH: tl.constexpr):
    """dt (after bias, softplus, clamp; 0 past L) and a = cumsum(dt·A) within each chunk, both [b, H, n_chunks, Q]."""
    pid_bc = tl.program_id(0)
    b = (pid_bc // n_chunks).to(tl.int64)
    c = pid_bc % n_chunks
    i = tl.arange(0, Q)[:, None]
    h = tl.program_id(1) * BH + tl.arange(0, BH)[None, :]
    t = c * Q + i
    h_ok = h < H
    m = (t < L) & h_ok
    raw = tl.load(dt_ptr + (b * L + t) * H + h, mask=m, other=0.0)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + h, mask=h_ok, other=0.0).to(tl.float32)
    dt, _, _ = _dt_from_raw(raw, bias, dt_min, dt_max, HAS_BIAS, SOFTPLUS)
    dt = tl.where(m, dt, 0.0)
    A = tl.load(A_ptr + h, mask=h_ok, other=0.0).to(tl.float32)
    acs = tl.cumsum(dt * A, axis=0)
    offs = ((b * H + h) * n_chunks + c) * Q + i
    tl.store(dt_out_ptr + offs, dt, mask=h_ok)
    tl.store(acs_ptr + offs, acs, mask=h_ok)


@triton.jit(**_no_spec("L", "H", "G", "P", "N", "n_chunks"))
def _chunk_state_kernel(X_ptr, Y_ptr, dt_ptr, acs_ptr, out_ptr, L, H, G, P, N, n_chunks,
                        MODE: tl.constexpr, IEEE: tl.constexpr, Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    """out[b, c, h] = Σ_i w_i·X_i ⊗ Y_i ([P, N], fp32) over chunk c; X [b, L, H, P], Y [b, L, G, N].

    MODE 0 (chunk state): X = x, Y = B, w_i = dt_i·exp(a_{Q−1} − a_i).
    MODE 1 (local adjoint of the entering state): X = dy, Y = C, w_i = exp(a_i)."""
    pid_pn = tl.program_id(0)
    pid_bc = tl.program_id(1)
    h = tl.program_id(2)
    n_bn = tl.cdiv(N, BN)
    p = (pid_pn // n_bn) * BP + tl.arange(0, BP)
    n = (pid_pn % n_bn) * BN + tl.arange(0, BN)
    b = (pid_bc // n_chunks).to(tl.int64)
    c = pid_bc % n_chunks
    g = h // (H // G)
    i = tl.arange(0, Q)
    t_ok = c * Q + i < L
    row = ((b * H + h) * n_chunks + c) * Q
    acs = tl.load(acs_ptr + row + i)
    if MODE == 0:
        w = tl.load(dt_ptr + row + i) * tl.exp(tl.load(acs_ptr + row + Q - 1) - acs)
    else:
        w = tl.exp(acs)
    # 64-bit scalar bases, 32-bit tile offsets (a 64-bit offset per element would cost registers)
    t0 = b * L + c * Q
    xT = tl.load(X_ptr + (t0 * H + h) * P + (i[None, :] * (H * P) + p[:, None]),
                 mask=t_ok[None, :] & (p[:, None] < P), other=0.0)                          # [BP, Q]
    y = tl.load(Y_ptr + (t0 * G + g) * N + (i[:, None] * (G * N) + n[None, :]),
                mask=t_ok[:, None] & (n[None, :] < N), other=0.0)                            # [Q, BN]
    ys = (y.to(tl.float32) * w[:, None]).to(xT.dtype)
    acc = _dot(xT, ys, IEEE)
    out = out_ptr + ((b * n_chunks + c) * H + h) * P * N + (p[:, None] * N + n[None, :])
    tl.store(out, acc, mask=(p[:, None] < P) & (n[None, :] < N))


@triton.jit(**_no_spec("PN", "H", "n_chunks"))
def _state_passing_fwd_kernel(st_ptr, hin_ptr, acs_ptr, h0_ptr, hT_ptr, PN, H, n_chunks,
                              HAS_H0: tl.constexpr, Q: tl.constexpr, BLOCK: tl.constexpr):
    """st [b, n_chunks, H, P·N] (chunk states S_c, fp32) → hin, same layout (the state entering chunk c, H_c, in
    hin's dtype; hin may be st itself: each element is read before it is written) and the final state (fp32)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    if HAS_H0:
        s = tl.load(h0_ptr + (b * H + h) * PN + offs, mask=m, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(0, n_chunks):
        offs_c = ((b * n_chunks + c) * H + h) * PN + offs
        chunk = tl.load(st_ptr + offs_c, mask=m, other=0.0)
        tl.store(hin_ptr + offs_c, s.to(hin_ptr.dtype.element_ty), mask=m)
        decay = tl.exp(tl.load(acs_ptr + ((b * H + h) * n_chunks + c) * Q + Q - 1))
        s = decay * s + chunk
    tl.store(hT_ptr + (b * H + h) * PN + offs, s, mask=m)


@triton.jit(**_no_spec("L", "H", "G", "P", "N", "n_chunks"))
def _chunk_scan_fwd_kernel(x_ptr, B_ptr, C_ptr, dt_ptr, acs_ptr, D_ptr, hin_ptr, y_ptr, L, H, G, P, N, n_chunks,
                           HAS_D: tl.constexpr, D_PER_P: tl.constexpr, IEEE: tl.constexpr,
                           Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """y for one chunk, one head, BP head channels: intra-chunk (C·Bᵀ ⊙ decay)·(dt·x), entering state, D·x.
    d_state is walked in blocks of BK (C·Bᵀ and exp(a)·C·H_cᵀ accumulate), so few tiles are live at once."""
    p = tl.program_id(0) * BP + tl.arange(0, BP)
    pid_bc = tl.program_id(1)
    h = tl.program_id(2)
    b = (pid_bc // n_chunks).to(tl.int64)
    c = pid_bc % n_chunks
    g = h // (H // G)
    i = tl.arange(0, Q)
    t_ok = c * Q + i < L
    p_ok = p < P
    row = ((b * H + h) * n_chunks + c) * Q
    acs = tl.load(acs_ptr + row + i)
    dt = tl.load(dt_ptr + row + i)
    scale = tl.exp(acs)[:, None]
    # 64-bit scalar bases, 32-bit tile offsets
    t0 = b * L + c * Q
    x_base = (t0 * H + h) * P
    bc_base = (t0 * G + g) * N
    hin_base = ((b * n_chunks + c) * H + h) * P * N
    CB = tl.zeros([Q, Q], dtype=tl.float32)
    acc = tl.zeros([Q, BP], dtype=tl.float32)
    for k0 in range(0, BN, BK):
        n = k0 + tl.arange(0, BK)
        n_ok = n < N
        bc_offs = bc_base + (i[:, None] * (G * N) + n[None, :])
        bc_mask = t_ok[:, None] & n_ok[None, :]
        Ck = tl.load(C_ptr + bc_offs, mask=bc_mask, other=0.0)                               # [Q, BK]
        Bk = tl.load(B_ptr + bc_offs, mask=bc_mask, other=0.0)
        CB += _dot(Ck, tl.trans(Bk), IEEE)
        hinT = tl.load(hin_ptr + hin_base + (p[None, :] * N + n[:, None]),
                       mask=n_ok[:, None] & p_ok[None, :], other=0.0)                        # [BK, BP]
        if hinT.dtype == tl.float32:                                                         # tf32 (or IEEE)
            acc += _dot(Ck.to(tl.float32) * scale, hinT, IEEE)
        else:                                                                                # states in x's dtype
            acc += _dot((Ck.to(tl.float32) * scale).to(hinT.dtype), hinT, IEEE)
    xp_offs = x_base + (i[:, None] * (H * P) + p[None, :])
    xs = tl.load(x_ptr + xp_offs, mask=t_ok[:, None] & p_ok[None, :], other=0.0)             # [Q, BP]
    seg = tl.where(i[:, None] >= i[None, :], acs[:, None] - acs[None, :], float("-inf"))
    M = CB * tl.exp(seg) * dt[None, :]
    acc += _dot(M.to(xs.dtype), xs, IEEE)
    if HAS_D:
        if D_PER_P:
            Dv = tl.load(D_ptr + h * P + p, mask=p_ok, other=0.0).to(tl.float32)
        else:
            Dv = tl.load(D_ptr + h).to(tl.float32)
        acc += Dv * xs.to(tl.float32)
    tl.store(y_ptr + xp_offs, acc.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & p_ok[None, :])


# ----------------------------------------------------------------------------------------------- backward kernels

@triton.jit(**_no_spec("batch", "PN", "H", "n_chunks"))
def _state_passing_bwd_kernel(e_ptr, hin_ptr, acs_ptr, dhT_ptr, dh0_ptr, dlast_ptr, batch, PN, H, n_chunks,
                              HAS_DHT: tl.constexpr, Q: tl.constexpr, BLOCK: tl.constexpr):
    """Reverse pass over chunks, in place over e [b, n_chunks, H, P·N]: local adjoint E_c in, ∂ℓ/∂S_c = G_{c+1}
    out; ∂ℓ/∂h_0 = G_0; per block the partial ∂ℓ/∂a_{Q−1} of every chunk into dlast [blocks, b, H, n_chunks]."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    if HAS_DHT:
        gr = tl.load(dhT_ptr + (b * H + h) * PN + offs, mask=m, other=0.0).to(tl.float32)
    else:
        gr = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, n_chunks):
        c = n_chunks - 1 - k
        base = ((b * n_chunks + c) * H + h) * PN + offs
        local = tl.load(e_ptr + base, mask=m, other=0.0)
        tl.store(e_ptr + base, gr, mask=m)
        hin = tl.load(hin_ptr + base, mask=m, other=0.0).to(tl.float32)
        decay = tl.exp(tl.load(acs_ptr + ((b * H + h) * n_chunks + c) * Q + Q - 1))
        tl.store(dlast_ptr + ((pid * batch + b) * H + h) * n_chunks + c, decay * tl.sum(gr * hin, axis=0))
        gr = local + decay * gr
    tl.store(dh0_ptr + (b * H + h) * PN + offs, gr, mask=m)


@triton.jit(**_no_spec("L", "H", "G", "P", "N", "n_chunks"))
def _chunk_bwd_kernel(x_ptr, dy_ptr, B_ptr, C_ptr, dtraw_ptr, bias_ptr, A_ptr, D_ptr, dt_ptr, acs_ptr,
                      hin_ptr, dst_ptr, dlast_ptr,
                      dx_ptr, ddt_ptr, dB_ptr, dC_ptr, dA_ptr, dbias_ptr, dD_ptr,
                      L, H, G, P, N, n_chunks, dt_min, dt_max,
                      HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                      IEEE: tl.constexpr, Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Every gradient of one chunk and head (whole P; d_state in blocks of BK): ∂x, ∂dt_raw, per-head ∂B and ∂C
    [b, L, H, N] fp32, and the per-(batch, chunk) partial sums of ∂A, ∂dt_bias [b, n_chunks, H] and
    ∂D [b, n_chunks, H(, P)]."""
    pid_bc = tl.program_id(0)
    h = tl.program_id(1)
    b = (pid_bc // n_chunks).to(tl.int64)
    c = pid_bc % n_chunks
    g = h // (H // G)
    i = tl.arange(0, Q)
    t_ok = c * Q + i < L
    p = tl.arange(0, BP)
    p_ok = p < P
    row = ((b * H + h) * n_chunks + c) * Q
    # 64-bit scalar bases, 32-bit tile offsets
    t0 = b * L + c * Q
    bc_base = (t0 * G + g) * N
    bh_base = (t0 * H + h) * N
    acs = tl.load(acs_ptr + row + i)
    dt = tl.load(dt_ptr + row + i)
    last = tl.load(acs_ptr + row + Q - 1)
    r = tl.exp(last - acs)
    rdt = r * dt
    ea = tl.exp(acs)
    state_base = ((b * n_chunks + c) * H + h) * P * N
    bc_rows = i[:, None] * (G * N)

    # pass 1 over d_state: C·Bᵀ
    CB = tl.zeros([Q, Q], dtype=tl.float32)
    for k0 in range(0, BN, BK):
        n = k0 + tl.arange(0, BK)
        bc_offs = bc_base + (bc_rows + n[None, :])
        bc_mask = t_ok[:, None] & (n[None, :] < N)
        CB += _dot(tl.load(C_ptr + bc_offs, mask=bc_mask, other=0.0),
                   tl.trans(tl.load(B_ptr + bc_offs, mask=bc_mask, other=0.0)), IEEE)

    xp_offs = (t0 * H + h) * P + (i[:, None] * (H * P) + p[None, :])
    xp_mask = t_ok[:, None] & p_ok[None, :]
    xs = tl.load(x_ptr + xp_offs, mask=xp_mask, other=0.0)                                  # [Q, BP]
    dys = tl.load(dy_ptr + xp_offs, mask=xp_mask, other=0.0)
    decay = tl.exp(tl.where(i[:, None] >= i[None, :], acs[:, None] - acs[None, :], float("-inf")))
    DYX = _dot(dys, tl.trans(xs), IEEE)                                                       # [Q(i), Q(j)]
    CBd = CB * decay
    W0 = CBd * DYX                                  # W_ij / dt_j
    W = W0 * dt[None, :]
    ddt = tl.sum(W0, axis=0)
    da = tl.sum(W, axis=1) - tl.sum(W, axis=0)
    dx = dt[:, None] * _dot(tl.trans(CBd).to(dys.dtype), dys, IEEE)
    K = (decay * DYX * dt[None, :]).to(dys.dtype)
    xf = xs.to(tl.float32)
    dyf = dys.to(tl.float32)

    # pass 2 over d_state: ∂B, ∂C per block; S'·B_j and H_c·C_i accumulate
    SB = tl.zeros([Q, BP], dtype=tl.float32)
    HC = tl.zeros([Q, BP], dtype=tl.float32)
    for k0 in range(0, BN, BK):
        n = k0 + tl.arange(0, BK)
        n_ok = n < N
        bc_offs = bc_base + (bc_rows + n[None, :])
        bc_mask = t_ok[:, None] & n_ok[None, :]
        Bk = tl.load(B_ptr + bc_offs, mask=bc_mask, other=0.0)                              # [Q, BK]
        Ck = tl.load(C_ptr + bc_offs, mask=bc_mask, other=0.0)
        st_offs = state_base + (p[:, None] * N + n[None, :])
        st_mask = p_ok[:, None] & n_ok[None, :]
        hin = tl.load(hin_ptr + st_offs, mask=st_mask, other=0.0).to(tl.float32)            # [BP, BK]
        dst = tl.load(dst_ptr + st_offs, mask=st_mask, other=0.0)
        SB += _dot(Bk.to(tl.float32), tl.trans(dst), IEEE)
        HC += _dot(Ck.to(tl.float32), tl.trans(hin), IEEE)
        bh_offs = bh_base + (i[:, None] * (H * N) + n[None, :])
        tl.store(dC_ptr + bh_offs, _dot(K, Bk, IEEE) + ea[:, None] * _dot(dyf, hin, IEEE), mask=bc_mask)
        tl.store(dB_ptr + bh_offs, _dot(tl.trans(K), Ck, IEEE) + rdt[:, None] * _dot(xf, dst, IEEE), mask=bc_mask)

    dx += rdt[:, None] * SB
    if HAS_D:
        if D_PER_P:
            Dv = tl.load(D_ptr + h * P + p, mask=p_ok, other=0.0).to(tl.float32)
            dx += Dv[None, :] * dyf
            tl.store(dD_ptr + ((b * n_chunks + c) * H + h) * P + p, tl.sum(dyf * xf, axis=0), mask=p_ok)
        else:
            dx += tl.load(D_ptr + h).to(tl.float32) * dyf
            tl.store(dD_ptr + (b * n_chunks + c) * H + h, tl.sum(tl.sum(dyf * xf, axis=1), axis=0))
    tl.store(dx_ptr + xp_offs, dx.to(dx_ptr.dtype.element_ty), mask=xp_mask)

    xSB = tl.sum(xf * SB, axis=1)                   # x_j·S'B_j
    V = rdt * xSB
    da += ea * tl.sum(dyf * HC, axis=1) - V
    dlast = tl.load(dlast_ptr + (b * H + h) * n_chunks + c)
    da += tl.where(i == Q - 1, tl.sum(V, axis=0) + dlast, 0.0)
    R = tl.cumsum(da, axis=0, reverse=True)         # Σ_{i≥k} ∂a_i
    A = tl.load(A_ptr + h).to(tl.float32)
    ddt += r * xSB + A * R
    tl.store(dA_ptr + (b * n_chunks + c) * H + h, tl.sum(dt * R, axis=0))

    raw = tl.load(dtraw_ptr + t0 * H + h + i * H, mask=t_ok, other=0.0)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + h).to(tl.float32)
    _, _, deriv = _dt_from_raw(raw, bias, dt_min, dt_max, HAS_BIAS, SOFTPLUS)
    draw = tl.where(t_ok, ddt * deriv, 0.0)
    tl.store(ddt_ptr + t0 * H + h + i * H, draw.to(ddt_ptr.dtype.element_ty), mask=t_ok)
    if HAS_BIAS:
        tl.store(dbias_ptr + (b * n_chunks + c) * H + h, tl.sum(draw, axis=0))


# ----------------------------------------------------------------------------------------------- launchers

@dataclass(frozen=True)
class SSDConfig:
    """Launch parameters. ``chunk``: Q positions per chunk (power of two ≥ 16); warps per kernel family;
    ``block_n``: the d_state block the chunk-scan and backward kernels walk (power of two ≥ 16);
    ``lowp_states``: keep the states entering the chunks in x's dtype when that is fp16/bf16 (half the memory and
    traffic of the largest intermediate, bf16/fp16 tensor-core products with them; as upstream does) instead of
    fp32."""
    chunk: int = 64
    warps_state: int = 4
    warps_scan: int = 8
    warps_bwd: int = 8
    block_n: int = 32
    lowp_states: bool = False   # states entering chunks kept in x's dtype when it is fp16/bf16 (as upstream)


DEFAULT_CONFIG = SSDConfig()
MAX_CHUNK = 64          # [Q, Q] tiles in registers: Q = 128 would spill heavily in the backward
# the configurations scripts/bench_ssd.py times side by side (each is also checked by tests/test_triton_ssd_gpu.py)
# (sm_90 ptxas, bf16, 32 heads × 64, d_state 128: the default's chunk-scan kernel needs 164 registers, no spills;
# its backward 255 registers + 192 bytes of spills; with 4 warps each spills more)
BENCH_CONFIGS = {
    "q64": DEFAULT_CONFIG,
    "q64-4w": SSDConfig(64, 4, 4, 4),
    "q64-bn16": SSDConfig(64, 4, 8, 8, 16),
    "q32": SSDConfig(32, 4, 4, 4),
    "q64-lowp-states": SSDConfig(lowp_states=True),
}


def _p2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _check_inputs(x, dt, A, B, C, D, dt_bias, initial_state, chunk_size):
    if x.dim() != 4:
        raise ValueError(f"x must be [batch, L, nheads, headdim]; got {tuple(x.shape)}")
    batch, L, H, P = x.shape
    if dt.shape != (batch, L, H):
        raise ValueError(f"dt must be [batch, L, nheads] = {(batch, L, H)}; got {tuple(dt.shape)}")
    if A.shape != (H,):
        raise ValueError(f"A must be [nheads] = [{H}]; got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (batch, L) or C.shape != B.shape:
        raise ValueError(f"B and C must both be [batch, L, ngroups, d_state] with batch, L = {batch}, {L}; "
                         f"got {tuple(B.shape)}, {tuple(C.shape)}")
    G, N = B.shape[2], B.shape[3]
    if G < 1 or H % G:
        raise ValueError(f"ngroups ({G}) must divide nheads ({H})")
    if D is not None and D.shape not in ((H,), (H, 1), (H, P)):
        raise ValueError(f"D must be [nheads], [nheads, 1] or [nheads, headdim]; got {tuple(D.shape)}")
    if dt_bias is not None and dt_bias.shape != (H,):
        raise ValueError(f"dt_bias must be [nheads] = [{H}]; got {tuple(dt_bias.shape)}")
    if initial_state is not None and initial_state.shape != (batch, H, P, N):
        raise ValueError(f"initial_state must be [batch, nheads, headdim, d_state] = {(batch, H, P, N)}; "
                         f"got {tuple(initial_state.shape)}")
    if P > 256 or N > 256:
        raise ValueError(f"the Triton SSD supports headdim <= 256 and d_state <= 256 (got {P}, {N})")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16 (got {chunk_size})")
    if x.dtype == torch.float64:
        raise ValueError("the Triton SSD computes in fp32; use the float64 reference for float64")
    return batch, L, H, P, G, N


def _fwd(x, dt, A, B, C, D, dt_bias, h0, softplus, dt_limit, cfg: SSDConfig):
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    Q = cfg.chunk
    nc = max(1, triton.cdiv(L, Q))
    dev = x.device
    ieee = x.dtype == torch.float32
    dt_out = torch.empty(batch, H, nc, Q, device=dev, dtype=torch.float32)
    acs = torch.empty_like(dt_out)
    BH = min(16, triton.next_power_of_2(H))
    _dt_cumsum_kernel[(batch * nc, triton.cdiv(H, BH))](
        dt, A, dt_bias if dt_bias is not None else A, dt_out, acs, L, H, nc, float(dt_limit[0]), float(dt_limit[1]),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(softplus), Q=Q, BH=BH)
    # chunk states, then (in place) the states entering every chunk
    states = torch.empty(batch, nc, H, P, N, device=dev, dtype=torch.float32)
    BPs, BNs = min(64, _p2(P)), min(64, _p2(N))
    _chunk_state_kernel[(triton.cdiv(P, BPs) * triton.cdiv(N, BNs), batch * nc, H)](
        x, B, dt_out, acs, states, L, H, G, P, N, nc, MODE=0, IEEE=ieee, Q=Q, BP=BPs, BN=BNs,
        num_warps=cfg.warps_state)
    hT = torch.empty(batch, H, P, N, device=dev, dtype=torch.float32)
    hin = torch.empty_like(states, dtype=x.dtype) if cfg.lowp_states and x.dtype != torch.float32 else states
    BLOCK = min(1024, triton.next_power_of_2(P * N))
    _state_passing_fwd_kernel[(triton.cdiv(P * N, BLOCK), batch, H)](
        states, hin, acs, h0 if h0 is not None else hT, hT, P * N, H, loop_bound(nc),
        HAS_H0=h0 is not None, Q=Q, BLOCK=BLOCK)
    states = hin
    y = torch.empty_like(x)
    BP = min(64, _p2(P))
    _chunk_scan_fwd_kernel[(triton.cdiv(P, BP), batch * nc, H)](
        x, B, C, dt_out, acs, D if D is not None else A, states, y, L, H, G, P, N, nc,
        HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2, IEEE=ieee, Q=Q, BP=BP, BN=_p2(N),
        BK=min(cfg.block_n, _p2(N)), num_warps=cfg.warps_scan)
    return y, hT, dt_out, acs, states


def _bwd(x, dt, A, B, C, D, dt_bias, softplus, dt_limit, dt_out, acs, states, dy, dhT, cfg: SSDConfig):
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    Q = cfg.chunk
    nc = dt_out.shape[2]
    dev = x.device
    ieee = x.dtype == torch.float32
    f32 = dict(device=dev, dtype=torch.float32)
    # local adjoints E_c, then (in place) ∂ℓ/∂S_c; ∂ℓ/∂h_0; ∂ℓ/∂a_{Q−1} per chunk
    adj = torch.empty(batch, nc, H, P, N, **f32)
    BPs, BNs = min(64, _p2(P)), min(64, _p2(N))
    _chunk_state_kernel[(triton.cdiv(P, BPs) * triton.cdiv(N, BNs), batch * nc, H)](
        dy, C, dt_out, acs, adj, L, H, G, P, N, nc, MODE=1, IEEE=ieee, Q=Q, BP=BPs, BN=BNs,
        num_warps=cfg.warps_state)
    BLOCK = min(1024, triton.next_power_of_2(P * N))
    n_blocks = triton.cdiv(P * N, BLOCK)
    dlast = torch.empty(n_blocks, batch, H, nc, **f32)
    dh0 = torch.empty(batch, H, P, N, **f32)
    _state_passing_bwd_kernel[(n_blocks, batch, H)](
        adj, states, acs, dhT if dhT is not None else dh0, dh0, dlast, batch, P * N, H, loop_bound(nc),
        HAS_DHT=dhT is not None, Q=Q, BLOCK=BLOCK)
    dlast = dlast.sum(0)
    dx = torch.empty_like(x)
    ddt = torch.empty_like(dt)
    dB = torch.empty(batch, L, H, N, **f32)
    dC = torch.empty(batch, L, H, N, **f32)
    dA = torch.empty(batch, nc, H, **f32)
    dbias = torch.empty(batch, nc, H, **f32) if dt_bias is not None else None
    dD = torch.empty(batch, nc, *D.shape, **f32) if D is not None else None
    _chunk_bwd_kernel[(batch * nc, H)](
        x, dy, B, C, dt, dt_bias if dt_bias is not None else A, A, D if D is not None else A, dt_out, acs,
        states, adj, dlast, dx, ddt, dB, dC, dA, dbias if dbias is not None else dA, dD if dD is not None else dA,
        L, H, G, P, N, nc, float(dt_limit[0]), float(dt_limit[1]),
        HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=bool(softplus), IEEE=ieee, Q=Q, BP=_p2(P), BN=_p2(N), BK=min(cfg.block_n, _p2(N)),
        num_warps=cfg.warps_bwd)
    dB = dB.view(batch, L, G, H // G, N).sum(3)
    dC = dC.view(batch, L, G, H // G, N).sum(3)
    return (dx, ddt, dA.sum((0, 1)), dB, dC, dD.sum((0, 1)) if dD is not None else None,
            dbias.sum((0, 1)) if dbias is not None else None, dh0)


class SSDScanTriton(torch.autograd.Function):
    """Autograd wrapper: the forward saves dt, the chunk cumsums and the states entering every chunk
    ([batch, n_chunks, H, P, N], fp32 or with ``lowp_states`` x's dtype); the backward recomputes the rest per
    chunk."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, dt_bias, initial_state, dt_softplus, dt_limit, cfg):
        x, dt, A, B, C = (t.contiguous() for t in (x, dt, A, B, C))
        D = D.contiguous() if D is not None else None
        dt_bias = dt_bias.contiguous() if dt_bias is not None else None
        h0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else None
        y, hT, dt_out, acs, states = _fwd(x, dt, A, B, C, D, dt_bias, h0, dt_softplus, dt_limit, cfg)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, dt_out, acs, states)
            ctx.softplus, ctx.dt_limit, ctx.cfg = dt_softplus, dt_limit, cfg
            ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        x, dt, A, B, C, D, dt_bias, dt_out, acs, states = ctx.saved_tensors
        dy = torch.zeros_like(x) if dy is None else dy.to(x.dtype).contiguous()
        dhT = dhT.to(torch.float32).contiguous() if dhT is not None else None
        dx, ddt, dA, dB, dC, dD, dbias, dh0 = _bwd(x, dt, A, B, C, D, dt_bias, ctx.softplus, ctx.dt_limit,
                                                   dt_out, acs, states, dy, dhT, ctx.cfg)
        return (dx, ddt, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
                dD.to(D.dtype) if dD is not None else None,
                dbias.to(dt_bias.dtype) if dbias is not None else None,
                dh0.to(ctx.h0_dtype) if ctx.h0_dtype is not None else None, None, None, None)


def ssd_scan_triton(x, dt, A, B, C, D=None, dt_bias=None, initial_state=None, dt_softplus=True,
                    dt_limit=(0.0, math.inf), chunk_size=None, config: SSDConfig | None = None):
    """Mamba-2 SSD scan (Triton, forward and backward). Returns (y in x's dtype, final state fp32).

    x: [batch, L, nheads, headdim] (fp32/fp16/bf16); dt: [batch, L, nheads] (raw, before dt_bias and softplus);
    A: [nheads] fp32 (A = −exp(A_log)); B, C: [batch, L, ngroups, d_state] (ngroups divides nheads; head h uses
    group h // (nheads/ngroups)); D: [nheads], [nheads, 1] or [nheads, headdim] or None; dt_bias: [nheads] or None;
    initial_state: [batch, nheads, headdim, d_state] or None (zeros); dt_limit: (min, max) clamp after softplus.
    The z gate is left to the caller. Differentiable in every tensor argument; raises ValueError on bad shapes.
    Same arguments as upstream ``mamba_chunk_scan_combined`` (ssd_combined.py) minus z / seq_idx / varlen.

    ``chunk_size``: the chunk length Q of these kernels (a power of two, 16 … 64; the result does not depend on
    it beyond rounding). A larger value — a model config's ``chunk_size`` (upstream's Mamba-2 uses 256, a tiling
    choice of its own kernels) — is taken as the largest these kernels tile well, 64. ``config`` overrides all
    launch parameters (benchmarks).
    """
    cfg = config or DEFAULT_CONFIG
    if chunk_size is not None:
        cfg = dataclasses.replace(cfg, chunk=min(int(chunk_size), MAX_CHUNK))
    _check_inputs(x, dt, A, B, C, D, dt_bias, initial_state, cfg.chunk)
    if D is not None and D.dim() == 2 and D.shape[1] == 1 and x.shape[3] != 1:
        D = D.reshape(-1)                      # the graph contract's per-head [H, 1]; autograd maps ∂D back
    return SSDScanTriton.apply(x, dt, A, B, C, D, dt_bias, initial_state, dt_softplus,
                               (float(dt_limit[0]), float(dt_limit[1])), cfg)
