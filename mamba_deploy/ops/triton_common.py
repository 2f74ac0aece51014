"""Device helpers shared by the Triton kernels of ops/triton_scan.py, ops/triton_decode.py and ops/triton_ssd.py.

Each is a ``@triton.jit`` function (inlined into the calling kernel, so sharing costs nothing at run time), in fp32:

    softplus(x)   = log(1 + eˣ), torch's threshold 20 (x above it is returned as is)
    silu(x)       = x · σ(x)
    conv_shift_taps(...)  one step of a causal depthwise conv: the conv state shifted by one tap in place, the new
                  input appended, and Σ_j s'_j · w_j returned (Gu & Dao 2023, §3.4: the conv before the SSM)

``softplus`` keeps its relative precision for small eˣ (δ near 0): ``log(1 + e)`` in fp32 rounds ``w = 1 + e`` to
a multiple of 2⁻²³, which for δ ∈ [1e-3, 0.1] is a relative error up to ~6e-5. The rounding error of w is known
exactly, ``e − (w − 1)``, and log(1 + e) = log(w) + (e − (w − 1)) / w to second order in it, so adding that term
gives fp32 precision (~3e-7; tests/test_fast_session_gpu.py checks it against float64). The correction is tiny, so
an approximate division serves (no IEEE division slow path in the kernels).
"""
from __future__ import annotations

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, the CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def loop_bound(n: int):
    """An int kernel argument used as a ``range()`` bound. Under the interpreter it goes in as a constexpr: Triton
    3.6's interpreter wraps int arguments as 1-element arrays, which ``range()`` cannot take with numpy >= 2.5."""
    return tl.constexpr(n) if interpreting() else n


@triton.jit
def softplus(x):
    """log(1 + exp(x)) in fp32 with torch's threshold 20; log1p written out (the rounding of 1 + exp(x) added
    back) so small exp(x) keeps its precision."""
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    log1p = tl.log(w) + tl.fdiv(e - (w - 1.0), w, ieee_rounding=False)
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def silu(x):
    """x · sigmoid(x) (fp32 in, fp32 out)."""
    return x * tl.sigmoid(x)


@triton.jit
def conv_shift_taps(s_ptrs, x_new, w_ptrs, mask, w_mask, KCONV: tl.constexpr):
    """One causal-conv step over KCONV taps, the conv state shifted in place: s'[j] = s[j + 1] (j < KCONV − 1),
    s'[KCONV − 1] = x_new; returns Σ_j s'[j] · w[j] in fp32 (the bias and SiLU are the caller's).

    ``s_ptrs``: pointers to tap 0 of the state (taps contiguous, stride 1), any tile shape; ``x_new``: the new
    input, that shape; ``w_ptrs``: pointers to tap 0 of the weights (taps contiguous), broadcastable to it;
    ``mask`` / ``w_mask``: masks of the state and the weight loads (``None``: unmasked).

    A barrier separates each tap's load from its store: where the tile is smaller than the program's threads,
    several warps hold copies of an element, and without it one warp could store s[j + 1] (the next tap's shift)
    before another has loaded it for tap j — that warp's copy of the conv output (which may feed a later
    reduction, e.g. the fused x_proj) would then be off by one tap."""
    acc = tl.zeros(x_new.shape, dtype=tl.float32)
    for j in tl.static_range(KCONV):
        if j < KCONV - 1:
            if mask is None:
                s = tl.load(s_ptrs + (j + 1))
            else:
                s = tl.load(s_ptrs + (j + 1), mask=mask, other=0.0)
            tl.debug_barrier()
        else:
            s = x_new.to(s_ptrs.dtype.element_ty)
        tl.store(s_ptrs + j, s, mask=mask)
        if w_mask is None:
            w = tl.load(w_ptrs + j)
        else:
            w = tl.load(w_ptrs + j, mask=w_mask, other=0.0)
        acc += s.to(tl.float32) * w.to(tl.float32)
    return acc
