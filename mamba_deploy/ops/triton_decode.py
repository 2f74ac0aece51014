"""Fused Triton kernels for one decode step of a Mamba-1 layer, each next to its pure-torch reference.

One layer's decode step (DESIGN §2) is done in six launches, three of them cuBLAS matrix products:

    add_rmsnorm   r ← r + h (fp32 residual);  u = RMSNorm(r) · g          (Triton, this file)
    in_proj       [x, z] = W_in · u                                        (cuBLAS)
    conv_step     s ← [s[:, 1:], x];  x = SiLU(⟨s, w_conv⟩ + b_conv)      (Triton; conv state updated in place)
    x_proj        [δ_raw, B, C] = W_x · x                                  (cuBLAS)
    ssm_step      δ = softplus(W_dt·δ_raw + b_dt);  h ← exp(δA)⊙h + δ·B·x;
                  y = (⟨h, C⟩ + D·x) · SiLU(z)                              (Triton; SSM state updated in place)
    out_proj      h = W_out · y                                            (cuBLAS)

Every kernel computes in fp32 and rounds where the reference model rounds (to the activation dtype after the
conv, after W_dt·δ_raw and after the gating), so it matches ``MambaLM.step`` to fp16 rounding. The ``*_ref``
functions are that reference, written with the same signature (they return new tensors; the kernels write into
the given ones). Kernels run on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .triton_common import conv_shift_taps, silu, softplus


# ---------------------------------------------------------------------------------------------------------------
# residual add + RMSNorm
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _add_rmsnorm_kernel(h_ptr, res_ptr, w_ptr, out_ptr, D, stride_h, stride_r, stride_o, eps,
                        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    r = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r += tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    # the residual is stored in its buffer's dtype (fp32 when residual_in_fp32); the norm reads the stored value
    r = r.to(res_ptr.dtype.element_ty)
    tl.store(res_ptr + row * stride_r + cols, r, mask=mask)
    r = r.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(r * r, axis=0) / D + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (r * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


def add_rmsnorm(h: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor,
                has_residual: bool = True) -> None:
    """residual ← residual + h (or ← h when ``has_residual`` is False); out ← RMSNorm(residual) · weight.
    h [M, D] any float dtype; residual [M, D] (fp32 or the activation dtype), out [M, D] in weight's dtype."""
    M, D = h.shape
    _add_rmsnorm_kernel[(M,)](h, residual, weight, out, D, h.stride(0), residual.stride(0), out.stride(0), eps,
                              HAS_RESIDUAL=has_residual, BLOCK=triton.next_power_of_2(D), num_warps=4)


def add_rmsnorm_ref(h, residual, weight, eps, has_residual=True):
    """Returns (new residual, normed) exactly as MambaLM does it (RMSNorm in fp32, output in weight's dtype)."""
    r = (h.float() + residual.float() if has_residual else h.float()).to(residual.dtype)
    rf = r.float()
    normed = (rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(weight.dtype)
    return r, normed


# ---------------------------------------------------------------------------------------------------------------
# causal depthwise conv1d, one step, + SiLU; conv state shifted in place
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _conv_step_kernel(x_ptr, state_ptr, w_ptr, b_ptr, out_ptr, d_inner, K,
                      stride_x, stride_sb, stride_sd, stride_o,
                      HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_d = tl.program_id(0)
    row = tl.program_id(1)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ks = tl.arange(0, BLOCK_K)
    dmask = ds < d_inner
    x = tl.load(x_ptr + row * stride_x + ds, mask=dmask, other=0.0)
    s_ptrs = state_ptr + row * stride_sb + ds[:, None] * stride_sd + ks[None, :]
    # shifted state: s'[:, j] = s[:, j + 1] (j < K − 1), s'[:, K − 1] = x
    shifted = tl.load(s_ptrs + 1, mask=dmask[:, None] & (ks[None, :] + 1 < K), other=0.0)
    new_s = tl.where(ks[None, :] == K - 1, x.to(shifted.dtype)[:, None], shifted)
    kmask = dmask[:, None] & (ks[None, :] < K)
    tl.store(s_ptrs, new_s, mask=kmask)
    w = tl.load(w_ptr + ds[:, None] * K + ks[None, :], mask=kmask, other=0.0).to(tl.float32)
    acc = tl.sum(new_s.to(tl.float32) * w, axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + ds, mask=dmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + ds, silu(acc).to(out_ptr.dtype.element_ty), mask=dmask)


def conv_step(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              out: torch.Tensor, block_d: int = 256) -> None:
    """x [M, d] (may be a strided view); conv_state [M, d, K] contiguous in its last two dims, updated in place;
    weight [d, K] contiguous; out [M, d] ← SiLU(conv)."""
    M, d = x.shape
    K = conv_state.shape[-1]
    assert conv_state.stride(2) == 1 and conv_state.stride(1) == K and weight.is_contiguous()
    grid = (triton.cdiv(d, block_d), M)
    _conv_step_kernel[grid](x, conv_state, weight, bias if bias is not None else weight, out, d, K,
                            x.stride(0), conv_state.stride(0), conv_state.stride(1), out.stride(0),
                            HAS_BIAS=bias is not None, BLOCK_D=block_d, BLOCK_K=triton.next_power_of_2(K),
                            num_warps=4)


def conv_step_ref(x, conv_state, weight, bias):
    """Returns (xc, new conv state) as MambaMixer.step computes them."""
    s = torch.cat([conv_state[..., 1:], x[..., None].to(conv_state.dtype)], dim=-1)
    acc = (s.float() * weight.float()).sum(-1)
    if bias is not None:
        acc = acc + bias.float()
    return F.silu(acc).to(x.dtype), s


# ---------------------------------------------------------------------------------------------------------------
# δ projection + softplus + selective state update + D skip + SiLU(z) gating; SSM state updated in place
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _ssm_step_kernel(xdbl_ptr, wdt_ptr, dtb_ptr, A_ptr, D_ptr, x_ptr, z_ptr, state_ptr, y_ptr,
                     M, d_inner, R, N,
                     stride_xdbl, stride_x, stride_z, stride_sb, stride_sd, stride_y,
                     ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_d = tl.program_id(0)
    pid_m = tl.program_id(1)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rs = tl.arange(0, BLOCK_R)
    ns = tl.arange(0, BLOCK_N)
    dmask = ds < d_inner
    rmask = rs < R
    nmask = ns < N
    dn_mask = dmask[:, None] & nmask[None, :]
    # per-channel constants, loaded once for ROWS batch rows
    wdt = tl.load(wdt_ptr + ds[:, None] * R + rs[None, :], mask=dmask[:, None] & rmask[None, :],
                  other=0.0).to(tl.float32)                                         # W_dt block [BLOCK_D, R]
    dtb = tl.load(dtb_ptr + ds, mask=dmask, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + ds[:, None] * N + ns[None, :], mask=dn_mask, other=0.0)     # fp32
    Dv = tl.load(D_ptr + ds, mask=dmask, other=0.0).to(tl.float32)
    # rows unrolled (static_range) so the loads of every row can be in flight together; masks stand for bounds
    for i in tl.static_range(ROWS):
        row = pid_m * ROWS + i
        ok = row < M                                  # as vector masks below (the interpreter wants them so)
        dmask_r = ds < tl.where(ok, d_inner, 0)
        rmask_r = rs < tl.where(ok, R, 0)
        nmask_r = ns < tl.where(ok, N, 0)
        dn_r = dmask_r[:, None] & nmask_r[None, :]
        base = xdbl_ptr + row * stride_xdbl
        # xdbl may be an fp32 accumulator (small-batch paths): round as x_proj's output is rounded
        act = y_ptr.dtype.element_ty
        dt_raw = tl.load(base + rs, mask=rmask_r, other=0.0).to(act).to(tl.float32)
        B = tl.load(base + R + ns, mask=nmask_r, other=0.0).to(act).to(tl.float32)
        C = tl.load(base + R + N + ns, mask=nmask_r, other=0.0).to(act).to(tl.float32)
        x = tl.load(x_ptr + row * stride_x + ds, mask=dmask_r, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + row * stride_z + ds, mask=dmask_r, other=0.0).to(tl.float32)
        s_ptrs = state_ptr + row * stride_sb + ds[:, None] * stride_sd + ns[None, :]
        h = tl.load(s_ptrs, mask=dn_r, other=0.0)
        # δ = softplus(round_act(W_dt·δ_raw) + b_dt), torch's threshold 20
        dt = tl.sum(wdt * dt_raw[None, :], axis=1).to(act).to(tl.float32) + dtb
        dt = softplus(dt)
        dA = tl.exp(dt[:, None] * A)
        h = dA * h + (dt * x)[:, None] * B[None, :]
        tl.store(s_ptrs, h, mask=dn_r)
        y = (tl.sum(h * C[None, :], axis=1) + Dv * x) * silu(z)
        tl.store(y_ptr + row * stride_y + ds, y.to(act), mask=dmask_r)


def ssm_step(xdbl: torch.Tensor, dt_weight: torch.Tensor, dt_bias: torch.Tensor, A: torch.Tensor, D: torch.Tensor,
             x: torch.Tensor, z: torch.Tensor, ssm_state: torch.Tensor, out: torch.Tensor,
             block_d: int = 64, rows: int | None = None, num_warps: int = 4) -> None:
    """xdbl [M, R + 2N] = [δ_raw, B, C]; dt_weight [d, R]; dt_bias, D [d]; A [d, N] fp32 (= −exp(A_log));
    x, z [M, d] (strided views allowed); ssm_state [M, d, N] fp32 updated in place; out y [M, d]."""
    M, d = x.shape
    N = A.shape[1]
    R = dt_weight.shape[1]
    assert ssm_state.stride(2) == 1 and dt_weight.is_contiguous() and A.is_contiguous()
    assert xdbl.stride(1) == 1 and x.stride(1) == 1 and z.stride(1) == 1 and out.stride(1) == 1
    rows = rows or (1 if M <= 8 else 4)
    grid = (triton.cdiv(d, block_d), triton.cdiv(M, rows))
    _ssm_step_kernel[grid](xdbl, dt_weight, dt_bias, A, D, x, z, ssm_state, out, M, d, R, N,
                           xdbl.stride(0), x.stride(0), z.stride(0), ssm_state.stride(0), ssm_state.stride(1),
                           out.stride(0), ROWS=rows, BLOCK_D=block_d, BLOCK_R=triton.next_power_of_2(R),
                           BLOCK_N=triton.next_power_of_2(N), num_warps=num_warps)


def ssm_step_ref(xdbl, dt_weight, dt_bias, A, D, x, z, ssm_state):
    """Returns (y, new SSM state) as MambaMixer.step computes them (W_dt·δ_raw rounded to the activation dtype)."""
    from .selective_scan import selective_state_update
    R, N = dt_weight.shape[1], A.shape[1]
    dt_raw, B, C = xdbl.split([R, N, N], dim=-1)
    dt = F.linear(dt_raw.to(dt_weight.dtype), dt_weight).to(x.dtype)
    return selective_state_update(ssm_state, x, dt, A, B, C, D=D.float(), z=z, delta_bias=dt_bias.float(),
                                  delta_softplus=True)


# ---------------------------------------------------------------------------------------------------------------
# small-batch path: three launches per layer
#
#   norm_in_proj   u = RMSNorm(r)·g (recomputed by every program: r is [M, d_model], a few KB);  [x, z] = W_in·u;
#                  for the x half: conv step + SiLU (conv state in place) → x, and the x_proj partial product
#                  W_x[:, block]·x[block] atomically added into xdbl (fp32, zeroed before the step); z stored
#   ssm_step       as above, reading the fp32 xdbl (rounded to the activation dtype, as x_proj's output is)
#   out_proj_add   r ← r + round_act(W_out · y)
# For M ≤ 16 rows the redundant norm and the atomics are cheap next to the launches they save.
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _norm_in_proj_kernel(res_ptr, g_ptr, w_ptr, b_ptr, cw_ptr, cb_ptr, conv_ptr, wx_ptr, xc_ptr, z_ptr, xdbl_ptr,
                         M, d_inner, XD, eps,
                         stride_r, stride_cb, stride_cd, stride_xc, stride_z, stride_xdbl,
                         K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, KCONV: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_X: tl.constexpr):
    pid_n = tl.program_id(0)
    ms = tl.arange(0, BLOCK_M)
    mmask = ms < M
    ks = tl.arange(0, BLOCK_K)
    # pass 1: rstd of every row (the residual is tiny; every program recomputes it instead of a launch)
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        r = tl.load(res_ptr + ms[:, None] * stride_r + kk[None, :], mask=mmask[:, None] & (kk[None, :] < K),
                    other=0.0).to(tl.float32)
        sq += tl.sum(r * r, axis=1)
    rstd = 1.0 / tl.sqrt(sq / K + eps)
    # pass 2: acc = u · W_inᵀ[:, block] with u = round_act(r · rstd · g), exactly the reference's rounding
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        kmask = kk < K
        r = tl.load(res_ptr + ms[:, None] * stride_r + kk[None, :], mask=mmask[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)
        g = tl.load(g_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
        u = (r * rstd[:, None] * g[None, :]).to(w_ptr.dtype.element_ty)
        w = tl.load(w_ptr + ns[None, :] * K + kk[:, None], mask=kmask[:, None], other=0.0)   # [BLOCK_K, BLOCK_N]
        acc += tl.dot(u, w)
    if HAS_BIAS:
        acc += tl.load(b_ptr + ns).to(tl.float32)[None, :]
    xz = acc.to(xc_ptr.dtype.element_ty)                                  # in_proj output, activation dtype
    if pid_n * BLOCK_N < d_inner:
        # x half: conv step over the KCONV taps, state shifted in place: s'[j] = s[j+1], s'[K−1] = x
        cacc = conv_shift_taps(conv_ptr + ms[:, None] * stride_cb + ns[None, :] * stride_cd, xz,
                               cw_ptr + ns[None, :] * KCONV, mmask[:, None], None, KCONV)
        if HAS_CONV_BIAS:
            cacc += tl.load(cb_ptr + ns).to(tl.float32)[None, :]
        xc = silu(cacc).to(xc_ptr.dtype.element_ty)
        tl.store(xc_ptr + ms[:, None] * stride_xc + ns[None, :], xc, mask=mmask[:, None])
        # x_proj partial: xdbl[m, j] += Σ_{c ∈ block} xc[m, c] · W_x[j, c]
        js = tl.arange(0, BLOCK_X)
        wx = tl.load(wx_ptr + js[None, :] * d_inner + ns[:, None], mask=js[None, :] < XD, other=0.0)
        part = tl.dot(xc.to(wx_ptr.dtype.element_ty), wx)                                # [BLOCK_M, BLOCK_X]
        tl.atomic_add(xdbl_ptr + ms[:, None] * stride_xdbl + js[None, :], part,
                      mask=mmask[:, None] & (js[None, :] < XD))
    else:
        nz = ns - d_inner
        tl.store(z_ptr + ms[:, None] * stride_z + nz[None, :], xz, mask=mmask[:, None])


def _front_shapes(residual, in_w, conv_state, conv_w, x_w, xc, z, xdbl, block_n, max_rows):
    """(M, d_model, d_inner, R + 2N) of a fused front-half call, after checking the layouts its kernels assume."""
    M, Kdim = residual.shape
    d = conv_w.shape[0]
    assert M <= max_rows and d % block_n == 0 and in_w.is_contiguous() and x_w.is_contiguous()
    assert conv_state.stride(2) == 1 and conv_state.stride(1) == conv_w.shape[1] and conv_w.is_contiguous()
    assert xdbl.dtype == torch.float32 and xdbl.stride(1) == 1 and xc.stride(1) == 1 and z.stride(1) == 1
    return M, Kdim, d, x_w.shape[0]


def norm_in_proj_conv_xproj(residual, norm_w, eps, in_w, in_b, conv_state, conv_w, conv_b, x_w, xc, z, xdbl,
                            block_n: int = 32, block_k: int = 128, num_warps: int = 4, num_stages: int = 3) -> None:
    """Small-batch fused front half of a layer (see above). residual [M, d_model] (read only); conv_state
    [M, d, K] updated in place; xc, z [M, d] written; xdbl [M, R + 2N] fp32 must be zero on entry (accumulated)."""
    M, Kdim, d, XD = _front_shapes(residual, in_w, conv_state, conv_w, x_w, xc, z, xdbl, block_n, max_rows=64)
    block_m = max(16, triton.next_power_of_2(M))
    grid = (2 * d // block_n,)
    _norm_in_proj_kernel[grid](
        residual, norm_w, in_w, in_b if in_b is not None else in_w, conv_w, conv_b if conv_b is not None else conv_w,
        conv_state, x_w, xc, z, xdbl, M, d, XD, eps,
        residual.stride(0), conv_state.stride(0), conv_state.stride(1), xc.stride(0), z.stride(0), xdbl.stride(0),
        K=Kdim, HAS_BIAS=in_b is not None, HAS_CONV_BIAS=conv_b is not None, KCONV=conv_w.shape[1],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_X=max(16, triton.next_power_of_2(XD)),
        num_warps=num_warps, num_stages=num_stages)


def norm_in_proj_conv_xproj_ref(residual, norm_w, eps, in_w, in_b, conv_state, conv_w, conv_b, x_w):
    """Returns (xc, z, xdbl fp32, new conv state) computed the unfused reference way."""
    _, u = add_rmsnorm_ref(residual, residual, norm_w, eps, has_residual=False)
    d = conv_w.shape[0]
    xz = F.linear(u, in_w, in_b)
    xc, new_state = conv_step_ref(xz[:, :d], conv_state, conv_w, conv_b)
    return xc, xz[:, d:], F.linear(xc, x_w).float(), new_state


@triton.jit
def _out_proj_add_kernel(y_ptr, w_ptr, b_ptr, res_ptr, M, Nout, stride_y, stride_r,
                         K: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    ms = tl.arange(0, BLOCK_M)
    mmask = ms < M
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ns < Nout
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    KS: tl.constexpr = K // SPLIT_K                                       # this program's slice of K
    for k0 in range(0, KS, BLOCK_K):
        kk = pid_k * KS + k0 + ks
        kmask = kk < K
        y = tl.load(y_ptr + ms[:, None] * stride_y + kk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + ns[None, :] * K + kk[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc += tl.dot(y, w)
    rp = res_ptr + ms[:, None] * stride_r + ns[None, :]
    m2 = mmask[:, None] & nmask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + ns, mask=nmask, other=0.0).to(tl.float32)[None, :]
        h = acc.to(y_ptr.dtype.element_ty).to(tl.float32)               # out_proj output, activation dtype
        r = tl.load(rp, mask=m2, other=0.0).to(tl.float32) + h
        tl.store(rp, r.to(res_ptr.dtype.element_ty), mask=m2)
    else:
        # partial sums go straight into the fp32 residual (no rounding of the out_proj output in between)
        if HAS_BIAS:
            if pid_k == 0:
                acc += tl.load(b_ptr + ns, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.atomic_add(rp, acc, mask=m2)


def out_proj_add(y, out_w, out_b, residual, block_n: int = 16, block_k: int = 256, num_warps: int = 4,
                 num_stages: int = 3, split_k: int = 1) -> None:
    """residual ← residual + round_act(y · W_outᵀ + b). y [M, d_inner]; residual [M, d_model] updated in place.
    ``split_k`` > 1 (fp32 residual only) splits the reduction over programs that add into the residual
    atomically, skipping the rounding of the out_proj output."""
    M, K = y.shape
    Nout = out_w.shape[0]
    assert M <= 64 and out_w.is_contiguous() and y.stride(1) == 1 and residual.stride(1) == 1
    if split_k > 1 and (residual.dtype != torch.float32 or K % (split_k * block_k)):
        split_k = 1
    _out_proj_add_kernel[(triton.cdiv(Nout, block_n), split_k)](
        y, out_w, out_b if out_b is not None else out_w, residual, M, Nout, y.stride(0), residual.stride(0),
        K=K, HAS_BIAS=out_b is not None, SPLIT_K=split_k, BLOCK_M=max(16, triton.next_power_of_2(M)),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)


def out_proj_add_ref(y, out_w, out_b, residual):
    return (residual.float() + F.linear(y, out_w, out_b).float()).to(residual.dtype)


# ---------------------------------------------------------------------------------------------------------------
# prefill in the row layout [b·L, channels] that the projections produce (no transposes, no copies)
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _conv_rows_kernel(x_ptr, state_ptr, w_ptr, b_ptr, out_ptr, L, d_inner, stride_x, stride_sb, stride_sd,
                      stride_o, HAS_BIAS: tl.constexpr, KCONV: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """xc[b, t] = SiLU(bias + Σ_j w[:, j] · H[t + 1 + j]),  H = [conv state (KCONV columns), x[b, 0..L−1]]."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2)
    ts = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    tmask = ts < L
    dmask = ds < d_inner
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(KCONV):
        i = ts + 1 + j                                                  # index into H
        from_x = i >= KCONV
        xv = tl.load(x_ptr + (b * L + (i - KCONV))[:, None] * stride_x + ds[None, :],
                     mask=(tmask & from_x)[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        sv = tl.load(state_ptr + b * stride_sb + ds[None, :] * stride_sd + i[:, None],
                     mask=(tmask & (i < KCONV))[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptr + ds * KCONV + j, mask=dmask, other=0.0).to(tl.float32)
        acc += (xv + sv) * w[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + ds, mask=dmask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + (b * L + ts)[:, None] * stride_o + ds[None, :], silu(acc).to(out_ptr.dtype.element_ty),
             mask=tmask[:, None] & dmask[None, :])


def conv_rows(x: torch.Tensor, batch: int, conv_state: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None, out: torch.Tensor, block_t: int = 64, block_d: int = 64,
              num_warps: int = 4) -> None:
    """Causal depthwise conv + SiLU over a prompt. x [b·L, d] rows (strided view allowed); conv_state [b, d, K]
    (the K inputs before the prompt; read only); out [b·L, d] rows."""
    rows, d = x.shape
    L = rows // batch
    K = weight.shape[1]
    assert x.stride(1) == 1 and out.stride(1) == 1 and conv_state.stride(2) == 1 and weight.is_contiguous()
    grid = (triton.cdiv(L, block_t), triton.cdiv(d, block_d), batch)
    _conv_rows_kernel[grid](x, conv_state, weight, bias if bias is not None else weight, out, L, d, x.stride(0),
                            conv_state.stride(0), conv_state.stride(1), out.stride(0), HAS_BIAS=bias is not None,
                            KCONV=K, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps)


def conv_rows_ref(x, batch, conv_state, weight, bias):
    """Returns (xc rows, new conv state) the way MambaMixer.forward computes them."""
    rows, d = x.shape
    L = rows // batch
    xt = x.view(batch, L, d).transpose(1, 2)
    history = torch.cat([conv_state.to(x.dtype), xt], dim=-1)
    xc = F.silu(F.conv1d(history[..., 1:].float(), weight[:, None, :].float(),
                         None if bias is None else bias.float(), groups=d)).to(x.dtype)
    return xc.transpose(1, 2).reshape(rows, d), history[..., -weight.shape[1]:]


# ---------------------------------------------------------------------------------------------------------------
# GEMV path (batch ≤ 8): the same three launches per layer as the small-batch path, written as matrix-vector
# products on CUDA cores. Each program loads its whole [BLOCK_N, K] weight slice at once (every load in flight
# before the first use), then reuses it for the M ≤ 8 rows (unrolled).
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _gemv_front_kernel(res_ptr, g_ptr, w_ptr, b_ptr, cw_ptr, cb_ptr, conv_ptr, wx_ptr, xc_ptr, z_ptr, xdbl_ptr,
                       d_inner, XD, eps, stride_r, stride_cb, stride_cd, stride_xc, stride_z, stride_xdbl,
                       M: tl.constexpr, K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CONV_BIAS: tl.constexpr,
                       KCONV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_X: tl.constexpr):
    pid = tl.program_id(0)
    ns = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K
    w = tl.load(w_ptr + ns[:, None] * K + ks[None, :], mask=kmask[None, :], other=0.0)     # [BLOCK_N, BLOCK_K]
    g = tl.load(g_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
    is_x = pid * BLOCK_N < d_inner
    js = tl.arange(0, BLOCK_X)
    jmask = js < tl.where(is_x, XD, 0)                                  # z-half programs load no W_x
    wx = tl.load(wx_ptr + js[:, None] * d_inner + ns[None, :], mask=jmask[:, None] & (ns[None, :] >= 0),
                 other=0.0)                                             # W_x[:, block]  [BLOCK_X, BLOCK_N]
    for m in tl.static_range(M):
        r = tl.load(res_ptr + m * stride_r + ks, mask=kmask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(r * r, axis=0) / K + eps)
        u = (r * rstd * g).to(w_ptr.dtype.element_ty).to(tl.float32)    # RMSNorm output, activation dtype
        acc = tl.sum(w.to(tl.float32) * u[None, :], axis=1)              # [BLOCK_N]
        if HAS_BIAS:
            acc += tl.load(b_ptr + ns).to(tl.float32)
        xz = acc.to(xc_ptr.dtype.element_ty)
        if is_x:
            cacc = conv_shift_taps(conv_ptr + m * stride_cb + ns * stride_cd, xz, cw_ptr + ns * KCONV, None, None,
                                   KCONV)
            if HAS_CONV_BIAS:
                cacc += tl.load(cb_ptr + ns).to(tl.float32)
            xc = silu(cacc).to(xc_ptr.dtype.element_ty)
            tl.store(xc_ptr + m * stride_xc + ns, xc)
            part = tl.sum(wx.to(tl.float32) * xc.to(tl.float32)[None, :], axis=1)   # x_proj partial [BLOCK_X]
            tl.atomic_add(xdbl_ptr + m * stride_xdbl + js, part, mask=jmask)
        else:
            tl.store(z_ptr + m * stride_z + (ns - d_inner), xz)


def gemv_front(residual, norm_w, eps, in_w, in_b, conv_state, conv_w, conv_b, x_w, xc, z, xdbl,
               block_n: int = 8, num_warps: int = 4) -> None:
    """Same contract as :func:`norm_in_proj_conv_xproj` (reference: ``norm_in_proj_conv_xproj_ref``); M ≤ 8."""
    M, Kdim, d, XD = _front_shapes(residual, in_w, conv_state, conv_w, x_w, xc, z, xdbl, block_n, max_rows=8)
    _gemv_front_kernel[(2 * d // block_n,)](
        residual, norm_w, in_w, in_b if in_b is not None else in_w, conv_w, conv_b if conv_b is not None else conv_w,
        conv_state, x_w, xc, z, xdbl, d, XD, eps,
        residual.stride(0), conv_state.stride(0), conv_state.stride(1), xc.stride(0), z.stride(0), xdbl.stride(0),
        M=M, K=Kdim, HAS_BIAS=in_b is not None, HAS_CONV_BIAS=conv_b is not None, KCONV=conv_w.shape[1],
        BLOCK_N=block_n, BLOCK_K=triton.next_power_of_2(Kdim), BLOCK_X=max(16, triton.next_power_of_2(XD)),
        num_warps=num_warps)


@triton.jit
def _gemv_out_kernel(y_ptr, w_ptr, b_ptr, res_ptr, Nout, stride_y, stride_r, M: tl.constexpr, K: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    ns = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ns < Nout
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K
    w = tl.load(w_ptr + ns[:, None] * K + ks[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
    for m in tl.static_range(M):
        yv = tl.load(y_ptr + m * stride_y + ks, mask=kmask, other=0.0).to(tl.float32)
        acc = tl.sum(w.to(tl.float32) * yv[None, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + ns, mask=nmask, other=0.0).to(tl.float32)
        h = acc.to(y_ptr.dtype.element_ty).to(tl.float32)               # out_proj output, activation dtype
        rp = res_ptr + m * stride_r + ns
        r = tl.load(rp, mask=nmask, other=0.0).to(tl.float32) + h
        tl.store(rp, r.to(res_ptr.dtype.element_ty), mask=nmask)


def gemv_out(y, out_w, out_b, residual, block_n: int = 8, num_warps: int = 8) -> None:
    """Same contract as :func:`out_proj_add` (reference: ``out_proj_add_ref``); M ≤ 8."""
    M, K = y.shape
    Nout = out_w.shape[0]
    assert M <= 8 and out_w.is_contiguous() and y.stride(1) == 1 and residual.stride(1) == 1
    _gemv_out_kernel[(triton.cdiv(Nout, block_n),)](
        y, out_w, out_b if out_b is not None else out_w, residual, Nout, y.stride(0), residual.stride(0),
        M=M, K=K, HAS_BIAS=out_b is not None, BLOCK_N=block_n, BLOCK_K=triton.next_power_of_2(K),
        num_warps=num_warps)


# ---------------------------------------------------------------------------------------------------------------
# conv step + SiLU + x_proj partial products (atomics), for the general path at larger batches: replaces the
# conv_step launch and the x_proj GEMM (which at M = 64, N = R + 2N = 96 is latency-bound in cuBLAS)
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _conv_xproj_kernel(x_ptr, state_ptr, cw_ptr, cb_ptr, wx_ptr, xc_ptr, xdbl_ptr, M, d_inner, XD,
                       stride_x, stride_sb, stride_sd, stride_xc, stride_xdbl,
                       HAS_BIAS: tl.constexpr, KCONV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_X: tl.constexpr):
    pid_d = tl.program_id(0)
    pid_m = tl.program_id(1)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mmask = ms < M
    dmask = ds < d_inner
    m2 = mmask[:, None] & dmask[None, :]
    x = tl.load(x_ptr + ms[:, None] * stride_x + ds[None, :], mask=m2, other=0.0)
    acc = conv_shift_taps(state_ptr + ms[:, None] * stride_sb + ds[None, :] * stride_sd, x,
                          cw_ptr + ds[None, :] * KCONV, m2, dmask[None, :], KCONV)
    if HAS_BIAS:
        acc += tl.load(cb_ptr + ds, mask=dmask, other=0.0).to(tl.float32)[None, :]
    xc = silu(acc).to(xc_ptr.dtype.element_ty)
    tl.store(xc_ptr + ms[:, None] * stride_xc + ds[None, :], xc, mask=m2)
    js = tl.arange(0, BLOCK_X)
    wx = tl.load(wx_ptr + js[None, :] * d_inner + ds[:, None], mask=(js[None, :] < XD) & dmask[:, None], other=0.0)
    part = tl.dot(xc.to(wx_ptr.dtype.element_ty), wx)                                  # [BLOCK_M, BLOCK_X]
    tl.atomic_add(xdbl_ptr + ms[:, None] * stride_xdbl + js[None, :], part, mask=mmask[:, None] & (js[None, :] < XD))


def conv_xproj(x, conv_state, conv_w, conv_b, x_w, xc, xdbl, block_m: int = 64, block_d: int = 32,
               num_warps: int = 4) -> None:
    """conv step + SiLU (state in place, xc written) and xdbl += xc · W_xᵀ (fp32, zero on entry).
    Reference: ``conv_step_ref`` then ``F.linear(xc, x_w)``."""
    M, d = x.shape
    XD = x_w.shape[0]
    assert conv_state.stride(2) == 1 and conv_state.stride(1) == conv_w.shape[1] and conv_w.is_contiguous()
    assert x.stride(1) == 1 and xc.stride(1) == 1 and xdbl.dtype == torch.float32 and x_w.is_contiguous()
    block_m = min(block_m, max(16, triton.next_power_of_2(M)))
    grid = (triton.cdiv(d, block_d), triton.cdiv(M, block_m))
    _conv_xproj_kernel[grid](x, conv_state, conv_w, conv_b if conv_b is not None else conv_w, x_w, xc, xdbl,
                             M, d, XD, x.stride(0), conv_state.stride(0), conv_state.stride(1), xc.stride(0),
                             xdbl.stride(0), HAS_BIAS=conv_b is not None, KCONV=conv_w.shape[1], BLOCK_M=block_m,
                             BLOCK_D=block_d, BLOCK_X=max(16, triton.next_power_of_2(XD)), num_warps=num_warps)
