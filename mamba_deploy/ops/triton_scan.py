"""Selective scan (Mamba-1 S6) in Triton: forward and backward kernels and their autograd wrapper.

Same function as :func:`mamba_deploy.ops.selective_scan.selective_scan_ref` (the ground truth, pure torch, right
next door; its float64 autograd gives the reference gradients the tests compare against). Notation (Gu & Dao 2023,
Alg. 2), per channel d, state index n and time step t:

    δ_t = softplus(δ_raw_t + δ_bias)            a_t = exp(δ_t A)           b_t = δ_t u_t B_t
    h_t = a_t ⊙ h_{t−1} + b_t                   y_t = ⟨h_t, C_t⟩ + D u_t    out_t = y_t · SiLU(z_t)

Forward. One program per (batch, block of BD channels); it walks the sequence in chunks of T steps, the state
h [N, BD] (fp32) carried in registers. The tile of a chunk is a 5-D tensor [T, NS, DS, DLW, NL]:

    time t = t0 + i (i < T)      state n = ns·NL + nl      channel d = d0 + ds·DLW + dl

Triton's default layout gives each thread all T steps and NS×DS elements (the in-thread axes), and spreads NL
state lanes × (32/NL) channel lanes over a warp, the warps over channels. So the recurrence along time
(``tl.associative_scan`` on (a, b) pairs) is a sequential in-register loop, and the sums over n (for y) cost
log2(NL) shuffles per NS elements. The state entering a chunk is folded into its first b (b_0 += a_0 h_prev), so
the scan yields h_t directly. Padded steps (t ≥ L) have δ = 0, i.e. a = 1, b = 0: they leave the state unchanged.
When a backward will follow, the state entering every chunk is saved ([batch, L/T, D, N] fp32) — nothing of size
[batch, D, L, N] is ever written.

Backward (reverse-mode, chunks in reverse order). With g_t = ∂ℓ/∂h_t (the adjoint) and dy_t = ∂ℓ/∂y_t:

    g_t = a_{t+1} ⊙ g_{t+1} + C_t dy_t        (a reverse scan on the unshifted a_t: see _adjoint_combine)
    ∂ℓ/∂δ_t = Σ_n g_t (u_t B_t + A (h_t − b_t))     [h_t − b_t = a_t h_{t−1}, as upstream]
    ∂ℓ/∂u_t = δ_t Σ_n g_t B_t + D dy_t          ∂ℓ/∂A = Σ_t δ_t g_t (h_t − b_t)
    ∂ℓ/∂B_t = Σ_d g_t δ_t u_t                   ∂ℓ/∂C_t = Σ_d dy_t h_t          ∂ℓ/∂h_0 = a_1 g_1
The chunk's states h_t are recomputed from its saved start state. ∂ℓ/∂B and ∂ℓ/∂C (sums over channels) are
reduced within the program and added across channel blocks with fp32 atomics; ∂A, ∂D, ∂δ_bias are written per
batch row and summed in torch.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .triton_common import interpreting, loop_bound, silu, softplus


# ----------------------------------------------------------------------------------------------- device helpers

@triton.jit
def _affine_combine(a1, b1, a2, b2):
    """(a1, b1) then (a2, b2): x ↦ a2 (a1 x + b1) + b2."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _adjoint_combine(a_r, p_r, s_r, a_l, p_l, s_l):
    """Reverse-scan monoid for the adjoint g_t = c_t + a_{t+1} g_{t+1} with the UNshifted a_t: a segment [t..s] is
    (a_t, a_{t+1}···a_s, its g_t); (r)ight = the later segment (the running value of a reverse scan), (l)eft =
    the earlier one: concatenation l·r = (a_l, p_l a_r p_r, s_l + p_l a_r s_r). A lone element is (a_t, 1, c_t),
    so in the sequential in-thread scan p stays 1 (folded) and each step costs one FFMA: s = c_t + a_{t+1} s."""
    return a_l, p_l * a_r * p_r, s_l + p_l * a_r * s_r


@triton.jit
def _delta_from_raw(raw, bias, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """δ = softplus(δ_raw + bias) in fp32 (0 where masked), and δ_raw + bias (for the backward)."""
    raw = raw.to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias
    if SOFTPLUS:
        dt = softplus(raw)
    else:
        dt = raw
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _tile(pid_d, pid_b, A_ptr, D_ptr, bias_ptr, Dm, N, s_Ad, s_An, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
          T: tl.constexpr, NS: tl.constexpr, NL: tl.constexpr, DS: tl.constexpr, DLW: tl.constexpr):
    """The index tiles of one program (see the layout note below) and its per-channel constants:
    ti [T,1,1,1,1]; t3 [T,1,1], d3 [1,DS,DLW] (per-channel tiles); n3 [1,NS,NL] (per-state tiles);
    n4, d4 [NS,DS,DLW,NL] (per-(channel, state) tiles) and their masks; A [1,NS,DS,DLW,NL] fp32; D, δ_bias
    [1,DS,DLW] fp32 (0 when absent); the offsets of this program's block in a [batch, D, N] state tensor."""
    BD: tl.constexpr = DS * DLW
    ti = tl.arange(0, T)[:, None, None, None, None]
    t3 = tl.arange(0, T)[:, None, None]
    d3 = pid_d * BD + tl.arange(0, DS)[None, :, None] * DLW + tl.arange(0, DLW)[None, None, :]
    n3 = tl.arange(0, NS)[None, :, None] * NL + tl.arange(0, NL)[None, None, :]
    n4 = tl.arange(0, NS)[:, None, None, None] * NL + tl.arange(0, NL)[None, None, None, :]
    d4 = pid_d * BD + tl.arange(0, DS)[None, :, None, None] * DLW + tl.arange(0, DLW)[None, None, :, None]
    dn_ok = (n4 < N) & (d4 < Dm)
    d_ok = d3 < Dm
    A = tl.load(A_ptr + d4 * s_Ad + n4 * s_An, mask=dn_ok, other=0.0).to(tl.float32)[None]
    if HAS_D:
        Dv = tl.load(D_ptr + d3, mask=d_ok, other=0.0).to(tl.float32)
    else:
        Dv = tl.zeros([1, DS, DLW], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d3, mask=d_ok, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([1, DS, DLW], dtype=tl.float32)
    state_offs = pid_b * Dm * N + d4 * N + n4
    return ti, t3, d3, n3, n4, d4, dn_ok, d_ok, A, Dv, bias, state_offs


@triton.jit
def _load_chunk(u_ptr, delta_ptr, B_ptr, C_ptr, pid_b, d3, n3, tn, m_d, m_n,
                s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl):
    """δ_raw, u [T, DS, DLW] and B, C [T, NS, NL] of the chunk at times ``tn`` (masked loads, input dtypes)."""
    raw = tl.load(delta_ptr + pid_b * s_db + d3 * s_dd + tn * s_dl, mask=m_d, other=0.0)
    u = tl.load(u_ptr + pid_b * s_ub + d3 * s_ud + tn * s_ul, mask=m_d, other=0.0)
    B = tl.load(B_ptr + pid_b * s_Bb + n3 * s_Bn + tn * s_Bl, mask=m_n, other=0.0)
    C = tl.load(C_ptr + pid_b * s_Cb + n3 * s_Cn + tn * s_Cl, mask=m_n, other=0.0)
    return raw, u, B, C


# ----------------------------------------------------------------------------------------------- forward kernel
#
# Layout discipline: every load and store is done at its natural rank (per-channel tiles [T, DS, DLW], per-state
# tiles [T, NS, NL], per-(channel, state) tiles [NS, DS, DLW, NL]) and only then expanded to the 5-D tile. Loading
# at 5-D would make a load an "anchor" whose layout Triton propagates into the whole computation (seen: time spread
# over lanes and warps, i.e. a cross-warp scan); expand_dims stops that propagation, so the 5-D math keeps the
# default layout (time and NS/DS in-thread, NL × channel lanes, warps over channels).

_NO_SPEC = ["Dm", "L", "N", "n_chunks", "s_ub", "s_ud", "s_db", "s_dd", "s_zb", "s_zd", "s_ob", "s_od", "s_gb",
            "s_gd", "s_Ad", "s_Bb", "s_Bn", "s_Cb", "s_Cn"]   # one compiled variant per tile/dtype, whatever L


@triton.jit(do_not_specialize=[] if interpreting() else [a for a in _NO_SPEC if a not in ("s_gb", "s_gd")])
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
    out_ptr, hT_ptr, hs_ptr,
    Dm, L, N, n_chunks,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_ob, s_od, s_ol,
    s_Ad, s_An, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, SAVE_STATES: tl.constexpr, SAVE_T: tl.constexpr,
    T: tl.constexpr, NS: tl.constexpr, NL: tl.constexpr, DS: tl.constexpr, DLW: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    ti, t3, d3, n3, n4, d4, dn_ok, d_ok, A, Dv, bias, state_offs = _tile(
        pid_d, pid_b, A_ptr, D_ptr, bias_ptr, Dm, N, s_Ad, s_An, HAS_D, HAS_BIAS, T, NS, NL, DS, DLW)
    A2 = A * 1.4426950408889634                                       # A in log2 units: a = exp2(δ · A·log2 e)
    if HAS_H0:
        h = tl.load(h0_ptr + state_offs, mask=dn_ok, other=0.0)
    else:
        h = tl.zeros([NS, DS, DLW, NL], dtype=tl.float32)

    # software pipelining by hand: chunk c+1's loads are in flight while chunk c is computed
    m_d = d_ok & (t3 < L)
    m_n = (n3 < N) & (t3 < L)
    nx_raw, nx_u, nx_B, nx_C = _load_chunk(u_ptr, delta_ptr, B_ptr, C_ptr, pid_b, d3, n3, t3, m_d, m_n, s_ub, s_ud,
                                           s_ul, s_db, s_dd, s_dl, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl)
    if HAS_Z:
        nx_z = tl.load(z_ptr + pid_b * s_zb + d3 * s_zd + t3 * s_zl, mask=m_d, other=0.0)
    for c in range(0, n_chunks):
        raw_in, u_in, B_in, C_in = nx_raw, nx_u, nx_B, nx_C
        if HAS_Z:
            z_in = nx_z
        tn = (c + 1) * T + t3
        mn_d = d_ok & (tn < L)
        mn_n = (n3 < N) & (tn < L)
        nx_raw, nx_u, nx_B, nx_C = _load_chunk(u_ptr, delta_ptr, B_ptr, C_ptr, pid_b, d3, n3, tn, mn_d, mn_n, s_ub,
                                               s_ud, s_ul, s_db, s_dd, s_dl, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl)
        if HAS_Z:
            nx_z = tl.load(z_ptr + pid_b * s_zb + d3 * s_zd + tn * s_zl, mask=mn_d, other=0.0)

        SUB: tl.constexpr = T // SAVE_T                               # saved states per chunk (backward's T)
        if SAVE_STATES:
            tl.store(hs_ptr + ((pid_b * n_chunks + c) * SUB) * Dm * N + d4 * N + n4, h, mask=dn_ok)
        t = c * T + t3
        m_d = d_ok & (t < L)                                          # [T, DS, DLW]
        dt, _ = _delta_from_raw(raw_in, bias, m_d, HAS_BIAS, SOFTPLUS)
        u = u_in.to(tl.float32)
        Bt = B_in.to(tl.float32)
        Ct = C_in.to(tl.float32)

        a = tl.exp2(dt[:, None, :, :, None] * A2)                     # Ā_t          [T, NS, DS, DLW, NL]
        b = (dt * u)[:, None, :, :, None] * Bt[:, :, None, None, :]   # B̄_t u_t
        b = tl.where(ti == 0, a * h[None] + b, b)                     # fold in the state entering the chunk
        _, hh = tl.associative_scan((a, b), 0, _affine_combine)       # h_t, t in chunk
        # Σ_n: the in-thread axis NS first, then the NL lanes (the other order costs a layout conversion)
        y = tl.sum(tl.sum(hh * Ct[:, :, None, None, :], axis=1), axis=3)           # ⟨h_t, C_t⟩  [T, DS, DLW]
        h = tl.sum(tl.where(ti == T - 1, hh, -0.0), axis=0)     # −0.0: x + (−0.0) = x folds away
        if SAVE_STATES:
            for k in tl.static_range(1, SUB):                         # states entering the later sub-chunks
                hk = tl.sum(tl.where(ti == k * SAVE_T - 1, hh, -0.0), axis=0)
                tl.store(hs_ptr + ((pid_b * n_chunks + c) * SUB + k) * Dm * N + d4 * N + n4, hk, mask=dn_ok)

        if HAS_D:
            y += Dv * u
        if HAS_Z:
            y = y * silu(z_in.to(tl.float32))
        tl.store(out_ptr + pid_b * s_ob + d3 * s_od + t * s_ol, y.to(out_ptr.dtype.element_ty), mask=m_d)

    tl.store(hT_ptr + state_offs, h, mask=dn_ok)


# ----------------------------------------------------------------------------------------------- backward kernel

@triton.jit(do_not_specialize=[] if interpreting() else [a for a in _NO_SPEC if a not in ("s_ob", "s_od")])
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, hs_ptr, dout_ptr, dhT_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    Dm, L, N, n_chunks,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_gb, s_gd, s_gl,
    s_Ad, s_An, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DHT: tl.constexpr,
    T: tl.constexpr, NS: tl.constexpr, NL: tl.constexpr, DS: tl.constexpr, DLW: tl.constexpr,
):
    """Gradients; du, dδ, dz have the layout of u ([batch, D, L], contiguous); dB, dC are fp32 [batch, N, L]
    accumulated with atomics (zeroed by the caller); dA [batch, D, N], dD and dδ_bias [batch, D] are per-row."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    BD: tl.constexpr = DS * DLW
    ti, t3, d3, n3, n4, d4, dn_ok, d_ok, A, Dv, bias, state_offs = _tile(
        pid_d, pid_b, A_ptr, D_ptr, bias_ptr, Dm, N, s_Ad, s_An, HAS_D, HAS_BIAS, T, NS, NL, DS, DLW)
    A2 = A * 1.4426950408889634
    if HAS_DHT:
        carry = tl.load(dhT_ptr + state_offs, mask=dn_ok, other=0.0)   # ∂ℓ/∂h at the chunk's end, from later
    else:
        carry = tl.zeros([NS, DS, DLW, NL], dtype=tl.float32)
    dA_acc = tl.zeros([NS, DS, DLW, NL], dtype=tl.float32)
    dD_acc = tl.zeros([T, DS, DLW], dtype=tl.float32)
    dbias_acc = tl.zeros([T, DS, DLW], dtype=tl.float32)

    # chunks in reverse; chunk c−1's loads are in flight while chunk c is computed
    c = n_chunks - 1
    tn = c * T + t3
    m_d = d_ok & (tn < L)
    m_n = (n3 < N) & (tn < L)
    nx_raw, nx_u, nx_B, nx_C = _load_chunk(u_ptr, delta_ptr, B_ptr, C_ptr, pid_b, d3, n3, tn, m_d, m_n, s_ub, s_ud,
                                           s_ul, s_db, s_dd, s_dl, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl)
    nx_g = tl.load(dout_ptr + pid_b * s_gb + d3 * s_gd + tn * s_gl, mask=m_d, other=0.0)
    nx_h = tl.load(hs_ptr + (pid_b * n_chunks + c) * Dm * N + d4 * N + n4, mask=dn_ok, other=0.0)
    if HAS_Z:
        nx_z = tl.load(z_ptr + pid_b * s_zb + d3 * s_zd + tn * s_zl, mask=m_d, other=0.0)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        raw_in, u_in, B_in, C_in, g_in, h_start = nx_raw, nx_u, nx_B, nx_C, nx_g, nx_h
        if HAS_Z:
            z_in = nx_z
        cp = c - 1                                                    # the next chunk to load (none when c = 0)
        tn = cp * T + t3
        mn_d = d_ok & (tn < L) & (tn >= 0)
        mn_n = (n3 < N) & (tn < L) & (tn >= 0)
        nx_raw, nx_u, nx_B, nx_C = _load_chunk(u_ptr, delta_ptr, B_ptr, C_ptr, pid_b, d3, n3, tn, mn_d, mn_n, s_ub,
                                               s_ud, s_ul, s_db, s_dd, s_dl, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl)
        nx_g = tl.load(dout_ptr + pid_b * s_gb + d3 * s_gd + tn * s_gl, mask=mn_d, other=0.0)
        nx_h = tl.load(hs_ptr + (pid_b * n_chunks + cp) * Dm * N + d4 * N + n4, mask=dn_ok & (d4 * 0 + cp >= 0), other=0.0)
        if HAS_Z:
            nx_z = tl.load(z_ptr + pid_b * s_zb + d3 * s_zd + tn * s_zl, mask=mn_d, other=0.0)

        t = c * T + t3
        m_d = d_ok & (t < L)
        m_n = (n3 < N) & (t < L)
        io_offs = d3 * s_ud + t * s_ul
        dt, draw = _delta_from_raw(raw_in, bias, m_d, HAS_BIAS, SOFTPLUS)
        u = u_in.to(tl.float32)
        Bt = B_in.to(tl.float32)
        Ct = C_in.to(tl.float32)
        dout = g_in.to(tl.float32)
        B5 = Bt[:, :, None, None, :]
        C5 = Ct[:, :, None, None, :]

        # recompute the chunk's states from its saved start state
        a = tl.exp2(dt[:, None, :, :, None] * A2)
        dtu = dt * u
        b = dtu[:, None, :, :, None] * B5
        b0 = tl.where(ti == 0, a * h_start[None] + b, b)
        _, hh = tl.associative_scan((a, b0), 0, _affine_combine)

        # undo the output gate: dy = ∂ℓ/∂y (pre-gate), dz
        if HAS_Z:
            zv = z_in.to(tl.float32)
            sz = tl.sigmoid(zv)
            y = tl.sum(tl.sum(hh * C5, axis=1), axis=3)
            if HAS_D:
                y += Dv * u
            dz = dout * y * sz * (1.0 + zv * (1.0 - sz))
            tl.store(dz_ptr + pid_b * s_ub + io_offs, dz.to(dz_ptr.dtype.element_ty), mask=m_d)
            dy = dout * zv * sz
        else:
            dy = dout

        # adjoint: g_t = a_{t+1} g_{t+1} + C_t dy_t, the carry folded into the chunk's last step
        cdy = C5 * dy[:, None, :, :, None]
        cdy = tl.where(ti == T - 1, cdy + carry[None], cdy)
        # the recurrence on the unshifted a_t (segment monoid): no second exp2, no δ look-ahead load
        _, _, g = tl.associative_scan((a, tl.full(a.shape, 1.0, tl.float32), cdy), 0, _adjoint_combine,
                                      reverse=True)
        carry = tl.sum(tl.where(ti == 0, a * g, -0.0), axis=0)       # ∂ℓ/∂h_{t0−1} (−0.0 folds away)

        hb = hh - b                                                   # a_t h_{t−1}
        gB = tl.sum(tl.sum(g * B5, axis=1), axis=3)                   # Σ_n g B         [T, DS, DLW]
        ghb = g * hb                                                  # g_t a_t h_{t−1}
        gAhb = tl.sum(tl.sum(ghb * A, axis=1), axis=3)                # Σ_n g A a h
        dA_acc += tl.sum(dt[:, None, :, :, None] * ghb, axis=0)
        ddt = u * gB + gAhb
        du = dt * gB
        if HAS_D:
            du += Dv * dy
            dD_acc += dy * u
        if SOFTPLUS:
            ddraw = tl.where(draw > 20.0, ddt, ddt * tl.sigmoid(draw))
        else:
            ddraw = ddt
        ddraw = tl.where(m_d, ddraw, 0.0)
        if HAS_BIAS:
            dbias_acc += ddraw
        tl.store(du_ptr + pid_b * s_ub + io_offs, du.to(du_ptr.dtype.element_ty), mask=m_d)
        tl.store(ddelta_ptr + pid_b * s_ub + io_offs, ddraw.to(ddelta_ptr.dtype.element_ty), mask=m_d)

        # channel sums for ∂B, ∂C: within the program, then across channel blocks by atomics
        dBc = tl.sum(tl.sum(g * dtu[:, None, :, :, None], axis=2), axis=2)      # [T, NS, NL]
        dCc = tl.sum(tl.sum(hh * dy[:, None, :, :, None], axis=2), axis=2)
        bc_offs = pid_b * N * L + n3 * L + t
        tl.atomic_add(dB_ptr + bc_offs, dBc, mask=m_n, sem="relaxed")
        tl.atomic_add(dC_ptr + bc_offs, dCc, mask=m_n, sem="relaxed")

    tl.store(dh0_ptr + state_offs, carry, mask=dn_ok)
    tl.store(dA_ptr + state_offs, dA_acc, mask=dn_ok)
    d1 = pid_d * BD + tl.arange(0, DS)[:, None] * DLW + tl.arange(0, DLW)[None, :]
    if HAS_D:
        tl.store(dD_ptr + pid_b * Dm + d1, tl.sum(dD_acc, axis=0), mask=d1 < Dm)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid_b * Dm + d1, tl.sum(dbias_acc, axis=0), mask=d1 < Dm)


# ----------------------------------------------------------------------------------------------- launch configs

@dataclasses.dataclass(frozen=True)
class ScanConfig:
    """Tile of one program of either kernel: T steps per chunk; N = NS (in-thread) × NL (lanes); a block of
    BD = DS (in-thread) × DLW (lanes × warps) channels; ``maxnreg`` caps the registers per thread (None: the
    compiler's choice). Passed to :func:`selective_scan_triton` / :func:`selective_scan_triton_fwd` as
    ``config`` (forward) and ``bwd_config`` (backward); None there means :func:`default_configs`."""

    T: int
    NS: int
    DS: int
    num_warps: int
    maxnreg: int | None = None

    def launch_options(self) -> dict:
        return {"maxnreg": self.maxnreg} if self.maxnreg and not interpreting() else {}

    def meta(self, N: int, Dm: int) -> dict:
        NP = triton.next_power_of_2(N)
        NS = min(self.NS, NP)
        NL = NP // NS
        if interpreting():
            # layouts mean nothing to the interpreter: keep the tile small (it runs numpy, element by element scans)
            DLW = min(4, triton.next_power_of_2(Dm))
        else:
            DLW = max(1, 32 // NL) * self.num_warps
        return dict(T=self.T, NS=NS, NL=NL, DS=self.DS, DLW=DLW)


def default_configs(N: int) -> tuple[ScanConfig, ScanConfig]:
    """(forward, backward) tiles; both use the same T (the backward restarts from the states saved per chunk)."""
    if interpreting():
        return ScanConfig(8, 2, 1, 1), ScanConfig(8, 2, 1, 1)
    # measured on an H100 (bench/bench_scan.py --sweep, 8×2048×2048×16 bf16): one-warp programs avoid the cross-warp
    # steps of the channel sums and of the layout conversions; the forward likes NS=8 (one shuffle level for y).
    # With these: forward 0.514 ms, forward+backward 3.11 ms (upstream CUDA: 0.595 / 3.03 ms). A backward with
    # T=4, DS=2 (the forward then saves twice the states; bench_scan.py --bwd-variants) measured 3.04 ms (forward
    # 0.571 ms) in the same run — not the default: 2x the saved-state memory for 2%.
    return ScanConfig(8, 8, 1, 1), ScanConfig(8, 4, 1, 1)


# ----------------------------------------------------------------------------------------------- launchers

def _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state):
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be [batch, d_inner, L]; got {tuple(u.shape)}, {tuple(delta.shape)}")
    batch, Dm, L = u.shape
    if A.dim() != 2 or A.shape[0] != Dm:
        raise ValueError(f"A must be [d_inner, N] = [{Dm}, N]; got {tuple(A.shape)}")
    N = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.shape != (batch, N, L):
            raise ValueError(f"{name} must be [batch, N, L] = {(batch, N, L)}; got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}; got {tuple(z.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (Dm,):
            raise ValueError(f"{name} must be [d_inner] = [{Dm}]; got {tuple(t.shape)}")
    if initial_state is not None and initial_state.shape != (batch, Dm, N):
        raise ValueError(f"initial_state must be [batch, d_inner, N] = {(batch, Dm, N)}; "
                         f"got {tuple(initial_state.shape)}")
    if N > 256:
        raise ValueError(f"the Triton scan supports N <= 256 (got {N})")
    if u.dtype == torch.float64:
        raise ValueError("the Triton scan computes in fp32; use selective_scan_ref for float64")
    return batch, Dm, L, N


def _fwd(u, delta, A, B, C, D, z, delta_bias, softplus, h0, cfg: ScanConfig, save_T: int | None):
    """Forward launch. ``save_T``: save the state entering every ``save_T`` steps (for a backward of that T; it
    must divide the forward's T), or None (inference: nothing saved). Returns (y in u's layout, h_T fp32, saved
    states [batch, n_saved, D, N] or None)."""
    batch, Dm, L, N = u.shape[0], u.shape[1], u.shape[2], A.shape[1]
    meta = cfg.meta(N, Dm)
    T = meta["T"]
    save_states = save_T is not None
    save_T = save_T or T
    if T % save_T:
        raise ValueError(f"backward tile T={save_T} does not divide the forward's T={T}")
    n_chunks = max(1, triton.cdiv(L, T))
    out = torch.empty_like(u)
    hT = torch.empty(batch, Dm, N, device=u.device, dtype=torch.float32)
    hs = (torch.empty(batch, n_chunks * (T // save_T), Dm, N, device=u.device, dtype=torch.float32)
          if save_states else hT)
    zz = z if z is not None else u
    grid = (triton.cdiv(Dm, meta["DS"] * meta["DLW"]), batch)
    _scan_fwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else A, zz, delta_bias if delta_bias is not None else A,
        h0 if h0 is not None else hT, out, hT, hs,
        Dm, L, N, loop_bound(n_chunks),
        *u.stride(), *delta.stride(), *zz.stride(), *out.stride(),
        *A.stride(), *B.stride(), *C.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus),
        HAS_H0=h0 is not None, SAVE_STATES=save_states, SAVE_T=save_T, num_warps=cfg.num_warps,
        **cfg.launch_options(), **meta)
    return out, hT, (hs if save_states else None)


def _bwd(u, delta, A, B, C, D, z, delta_bias, softplus, hs, cfg: ScanConfig, dout, dhT):
    batch, Dm, L, N = u.shape[0], u.shape[1], u.shape[2], A.shape[1]
    meta = cfg.meta(N, Dm)
    n_chunks = hs.shape[1]
    dout = dout.contiguous()
    du = torch.empty_like(u)
    ddelta = torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else None
    dA = torch.empty(batch, Dm, N, device=u.device, dtype=torch.float32)
    dB = torch.zeros(batch, N, L, device=u.device, dtype=torch.float32)
    dC = torch.zeros(batch, N, L, device=u.device, dtype=torch.float32)
    dD = torch.empty(batch, Dm, device=u.device, dtype=torch.float32) if D is not None else None
    dbias = torch.empty(batch, Dm, device=u.device, dtype=torch.float32) if delta_bias is not None else None
    dh0 = torch.empty(batch, Dm, N, device=u.device, dtype=torch.float32)
    zz = z if z is not None else u
    grid = (triton.cdiv(Dm, meta["DS"] * meta["DLW"]), batch)
    _scan_bwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else A, zz, delta_bias if delta_bias is not None else A, hs, dout,
        dhT if dhT is not None else dh0,
        du, ddelta, dz if dz is not None else du, dA, dB, dC,
        dD if dD is not None else dA, dbias if dbias is not None else dA, dh0,
        Dm, L, N, loop_bound(n_chunks),
        *u.stride(), *delta.stride(), *zz.stride(), *dout.stride(),
        *A.stride(), *B.stride(), *C.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus),
        HAS_DHT=dhT is not None, num_warps=cfg.num_warps, **cfg.launch_options(), **meta)
    return du, ddelta, dA.sum(0), dB, dC, (dD.sum(0) if dD is not None else None), dz, \
        (dbias.sum(0) if dbias is not None else None), dh0


class SelectiveScanTriton(torch.autograd.Function):
    """Autograd wrapper: forward saves the per-chunk start states; backward recomputes everything else."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, config, bwd_config):
        u, delta, B, C = u.contiguous(), delta.contiguous(), B.contiguous(), C.contiguous()
        z = z.contiguous() if z is not None else None
        A = A.contiguous()
        D = D.contiguous() if D is not None else None
        delta_bias = delta_bias.contiguous() if delta_bias is not None else None
        h0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else None
        save = any(ctx.needs_input_grad)
        out, hT, hs = _fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, config,
                           bwd_config.T if save else None)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, hs)
            ctx.softplus, ctx.bwd_config = delta_softplus, bwd_config
            ctx.has_h0 = initial_state is not None
            ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
        return out, hT

    @staticmethod
    def backward(ctx, dout, dhT):
        u, delta, A, B, C, D, z, delta_bias, hs = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(u)
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = _bwd(
            u, delta, A, B, C, D, z, delta_bias, ctx.softplus, hs, ctx.bwd_config, dout,
            dhT.to(torch.float32).contiguous() if dhT is not None else None)
        return (du, ddelta, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
                dD.to(D.dtype) if dD is not None else None, dz,
                dbias.to(delta_bias.dtype) if dbias is not None else None, None,
                dh0.to(ctx.h0_dtype) if ctx.has_h0 else None, None, None)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                          initial_state=None, config: ScanConfig | None = None,
                          bwd_config: ScanConfig | None = None):
    """Triton selective scan; same contract as ``selective_scan_ref``. Returns (y in u's dtype, final state fp32).

    u, δ, z: [batch, d_inner, L] (fp32/fp16/bf16); A: [d_inner, N] fp32; B, C: [batch, N, L]; D, δ_bias:
    [d_inner]; initial_state: [batch, d_inner, N]. Differentiable in every tensor argument. ``config`` /
    ``bwd_config``: the forward / backward tiles (default :func:`default_configs`); the backward's T must divide
    the forward's. Raises ValueError on shapes that do not match, N > 256 or float64 inputs.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    f, b = default_configs(A.shape[1])
    config, bwd_config = config or f, bwd_config or b
    if config.T % bwd_config.T:
        raise ValueError(f"backward tile T={bwd_config.T} does not divide the forward's T={config.T}")
    return SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, config,
                                     bwd_config)


@torch.no_grad()
def selective_scan_triton_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                              initial_state=None, config: ScanConfig | None = None):
    """The forward kernel alone (inference: no autograd, no saved states), on tensors of ANY strides: e.g.
    ``[batch, d, L]`` transposed views of the ``[batch·L, d]`` rows that the projections produce, read without a
    copy; y is allocated with u's strides (so y is then in the row layout too). Same arguments and checks as
    :func:`selective_scan_triton` (A, D, δ_bias, initial_state must be contiguous); returns (y, final state fp32
    [batch, d_inner, N])."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    for name, t in (("A", A), ("D", D), ("delta_bias", delta_bias), ("initial_state", initial_state)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    h0 = initial_state.to(torch.float32) if initial_state is not None else None
    out, hT, _ = _fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0,
                      config or default_configs(A.shape[1])[0], None)
    return out, hT
