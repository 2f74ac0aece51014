"""Chunked SSD scan == sequential reference (float64 ground truth), with and without an initial state."""
from __future__ import annotations

import math

import pytest
import torch

from mamba_deploy.ops.ssd import (discretize_dt, segment_sums, ssd_scan_chunked, ssd_scan_ref,
                                  ssd_state_update)


def realistic_inputs(batch, L, H=4, P=16, G=2, N=16, seed=0, initial=True):
    """δ from upstream Mamba-2's init (softplus(dt_bias) log-uniform in [1e-3, 0.1]) plus noise in δ_raw;
    A = −exp(A_log) with A_log = log(U(1, 16)) (upstream ``A_init_range``)."""
    g = torch.Generator().manual_seed(seed)
    dt0 = torch.exp(torch.rand(H, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    dt_bias = dt0 + torch.log(-torch.expm1(-dt0))
    dt = discretize_dt(0.5 * torch.randn(batch, L, H, generator=g), dt_bias)
    return dict(
        x=torch.randn(batch, L, H, P, generator=g),
        dt=dt,
        A=-(1 + 15 * torch.rand(H, generator=g)),
        B=torch.randn(batch, L, G, N, generator=g),
        C=torch.randn(batch, L, G, N, generator=g),
        D=torch.randn(H, generator=g),
        initial_state=torch.randn(batch, H, P, N, generator=g) if initial else None,
    )


def f64(args):
    return {k: (v.double() if v is not None else None) for k, v in args.items()}


def rel(a, b):
    """max abs error relative to the reference's max abs value."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("initial", [False, True])
@pytest.mark.parametrize("L", [1, 7, 257, 4096, 16384])
def test_chunked_fp32_matches_float64_sequential(L, initial):
    args = realistic_inputs(1 if L > 4096 else 2, L, seed=L, initial=initial)
    y_ref, h_ref = ssd_scan_ref(**f64(args))
    assert h_ref.dtype == torch.float64
    y, h = ssd_scan_chunked(**args)
    assert y.dtype == torch.float32 and h.dtype == torch.float32
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    assert rel(y, y_ref) <= 1e-5, rel(y, y_ref)
    assert rel(h, h_ref) <= 1e-5, rel(h, h_ref)


@pytest.mark.parametrize("chunk_size", [1, 8, 13, 64])
def test_chunk_size_does_not_change_result_float64(chunk_size):
    args = f64(realistic_inputs(2, 77, seed=chunk_size))
    y_ref, h_ref = ssd_scan_ref(**args)
    y, h = ssd_scan_chunked(**args, chunk_size=chunk_size)
    assert rel(y, y_ref) <= 1e-12 and rel(h, h_ref) <= 1e-12


def test_large_total_decay_stays_finite():
    """Σδ·A reaches about −3e5 over the sequence: any exp of a positive cumulative sum would overflow."""
    args = realistic_inputs(1, 4096, seed=3)
    args["dt"] = torch.full_like(args["dt"], 5.0)
    y_ref, h_ref = ssd_scan_ref(**f64(args))
    y, h = ssd_scan_chunked(**args)
    assert torch.isfinite(y).all() and rel(y, y_ref) <= 1e-5 and rel(h, h_ref) <= 1e-5


def test_segment_sums_are_sums_of_their_own_terms():
    """S[i, j] = Σ_{j<k≤i} a_k to rounding of ITS terms: a huge a_1 that later segments exclude would leave an error
    of ~1e-8 in them under cumsum-and-subtract; here each entry is within 1e-14·Σ|terms| (order of summation only)."""
    a = -torch.rand(3, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a[:, 1] = -1e8
    S = segment_sums(a)
    for i in range(9):
        for j in range(9):
            if j > i:
                assert torch.equal(S[:, i, j], torch.full((3,), float("-inf"), dtype=a.dtype))
                continue
            terms = a[:, j + 1:i + 1]
            bound = 1e-14 * terms.abs().sum(-1)
            assert ((S[:, i, j] - terms.sum(-1)).abs() <= bound).all(), (i, j)


def test_scan_in_two_pieces_equals_one_scan():
    """The final state of a prefix, passed as the initial state of the rest, continues the scan exactly."""
    args = f64(realistic_inputs(2, 50, seed=5))
    y, h = ssd_scan_chunked(**args, chunk_size=8)
    first = {k: (v[:, :21] if k in ("x", "dt", "B", "C") else v) for k, v in args.items()}
    rest = {k: (v[:, 21:] if k in ("x", "dt", "B", "C") else v) for k, v in args.items()}
    y1, h1 = ssd_scan_chunked(**first, chunk_size=8)
    y2, h2 = ssd_scan_chunked(**{**rest, "initial_state": h1}, chunk_size=8)
    assert rel(torch.cat([y1, y2], 1), y) <= 1e-12 and rel(h2, h) <= 1e-12


def test_per_channel_D_and_decode_step():
    """D of shape [H, P] (upstream D_has_hdim) and one decode step against the explicit formula."""
    args = f64(realistic_inputs(2, 1, H=4, P=3, G=1, N=5, seed=7))
    D = torch.randn(4, 3, dtype=torch.float64)
    h0 = args["initial_state"]
    y, h1 = ssd_state_update(h0, args["x"][:, 0], args["dt"][:, 0], args["A"], args["B"][:, 0],
                             args["C"][:, 0], D)
    dt, x, B, C = args["dt"][:, 0], args["x"][:, 0], args["B"][:, 0, 0], args["C"][:, 0, 0]
    want_h = (torch.exp(dt * args["A"])[:, :, None, None] * h0
              + (dt[:, :, None] * x)[..., None] * B[:, None, None, :])
    want_y = torch.einsum("bhpn,bn->bhp", want_h, C) + D * x
    assert torch.allclose(h1, want_h, rtol=1e-12, atol=1e-12) and torch.allclose(y, want_y, rtol=1e-12, atol=1e-12)
    y_scan, h_scan = ssd_scan_chunked(**{**args, "D": D})
    assert torch.allclose(y_scan[:, 0], y, rtol=1e-12, atol=1e-12) and torch.allclose(h_scan, h1, rtol=1e-12)


def test_dt_limit_clamps():
    raw = torch.tensor([[-30.0, 0.0, 30.0]])
    dt = discretize_dt(raw, torch.zeros(3), (0.01, 0.5))
    assert dt[0, 0].item() == pytest.approx(0.01) and dt[0, 2].item() == pytest.approx(0.5)
    assert discretize_dt(raw, torch.zeros(3))[0, 2].item() == pytest.approx(30.0)
