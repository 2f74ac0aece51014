"""Triton selective scan vs the float64 sequential reference (values and every gradient).

CPU: the same kernels under TRITON_INTERPRET=1 (numpy), tiny shapes, in ONE subprocess (the interpreter flag must
be set before Triton decorates the kernels, and another test may already have imported them); its per-case errors
come back as JSON and each case is asserted here.
GPU: the compiled kernels, fp32 and bf16, L up to 8192, N in {16, 32, 64}; skipped without CUDA.

Error measures. fp32: normwise max relative error  max|ours − ref| / max|ref|  <= 1e-4, per output and gradient.
bf16 (inputs rounded to bf16, reference = float64 on those same rounded values): upstream's elementwise test
|ours − ref| <= atol + rtol·|ref| with rtol 3e-2, atol 5e-2, where each tensor is first divided by
max(1, max|ref|) (gradients such as ∂A sum over batch × L terms; an absolute 5e-2 means nothing at their scale).
"""
from __future__ import annotations

import textwrap

import pytest
import torch

from helpers import max_rel, run_interpreter_worker, run_with_grads, scan_inputs
from mamba_deploy.ops.selective_scan import selective_scan_chunked, selective_scan_ref

FP32_REL = 1e-4
BF16_RTOL, BF16_ATOL = 3e-2, 5e-2


def make_inputs(batch, d, L, N, *, has_d, has_z, has_bias, has_h0, act_dtype, device, seed):
    """Upstream's test distributions (tests/helpers.py ``scan_inputs``, dist="upstream"): δ = 0.5·U(0,1) (+ bias
    0.5·U), A = −0.5·U, u, B, C, z, D ~ N(0,1)."""
    return scan_inputs(batch, d, N, L, seed=seed, dtype=act_dtype, device=device, dist="upstream", D=has_d,
                       z=has_z, delta_bias=has_bias, initial_state=has_h0)


def to64(inputs):
    return {k: (v.double() if v is not None else None) for k, v in inputs.items()}


normwise_rel = max_rel   # max|ours − ref| / max|ref| (a zero reference, e.g. ∂A at L = 1 with h_0 = 0, absolutely)


def bf16_excess(ours, ref):
    """max over elements of |ours − ref| / (atol + rtol·|ref|) after scaling by max(1, max|ref|); <= 1 passes."""
    ref = ref.double()
    s = max(1.0, ref.abs().max().item())
    ours, ref = ours.double() / s, ref / s
    return ((ours - ref).abs() / (BF16_ATOL + BF16_RTOL * ref.abs())).max().item()


# ------------------------------------------------------------------------------------------ CPU: interpreter

INTERP_CASES = [
    # (L, N, has_d, has_z, has_bias, has_h0, softplus)
    (L, N, *flags)
    for L in (1, 7, 33)
    for N, flags in ((6, (True, True, True, True, True)), (4, (False, False, False, False, True)),
                     (8, (False, True, True, False, False)), (5, (True, False, False, True, True)))
]

_WORKER = textwrap.dedent("""
    import json, os, sys
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    sys.path.insert(0, sys.argv[1])
    import test_triton_scan as t
    from mamba_deploy.ops.selective_scan import selective_scan_ref
    from mamba_deploy.ops.triton_scan import selective_scan_triton
    torch.set_num_threads(2)
    results = []
    for i, (L, N, has_d, has_z, has_bias, has_h0, softplus) in enumerate(t.INTERP_CASES):
        inp = t.make_inputs(2, 5, L, N, has_d=has_d, has_z=has_z, has_bias=has_bias, has_h0=has_h0,
                            act_dtype=torch.float32, device="cpu", seed=100 + i)
        ref = t.run_with_grads(selective_scan_ref, t.to64(inp), delta_softplus=softplus)
        ours = t.run_with_grads(selective_scan_triton, inp, delta_softplus=softplus)
        results.append({k: t.normwise_rel(ours[k], ref[k]) for k in ref})
    # other tiles, given as arguments: backward chunks shorter than the forward's, two channels per thread
    from mamba_deploy.ops.triton_scan import ScanConfig
    variants = []
    for fwd, bwd in t.INTERP_VARIANTS:
        for i, (L, N, has_d, has_z, has_bias, has_h0, softplus) in enumerate(t.INTERP_CASES):
            if N != 6:
                continue
            inp = t.make_inputs(2, 5, L, N, has_d=has_d, has_z=has_z, has_bias=has_bias, has_h0=has_h0,
                                act_dtype=torch.float32, device="cpu", seed=200 + i)
            ref = t.run_with_grads(selective_scan_ref, t.to64(inp), delta_softplus=softplus)
            ours = t.run_with_grads(selective_scan_triton, inp, delta_softplus=softplus,
                                    config=ScanConfig(*fwd), bwd_config=ScanConfig(*bwd))
            variants.append({k: t.normwise_rel(ours[k], ref[k]) for k in ref})
    print("RESULTS" + json.dumps({"default": results, "variants": variants}))
""")

# (forward ScanConfig args, backward ScanConfig args) also run under the interpreter, on the N=6 cases
INTERP_VARIANTS = [((8, 2, 1, 1), (4, 2, 1, 1)), ((8, 2, 1, 1), (2, 2, 1, 1)), ((4, 2, 2, 1), (4, 1, 2, 1))]


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreter_worker(_WORKER)


@pytest.mark.parametrize("case", range(len(INTERP_CASES)),
                         ids=[f"L{c[0]}-N{c[1]}-D{int(c[2])}z{int(c[3])}b{int(c[4])}h{int(c[5])}sp{int(c[6])}"
                              for c in INTERP_CASES])
def test_interpreter_matches_reference(interpreter_results, case):
    errs = interpreter_results["default"][case]
    expected = {"y", "final_state", "d_u", "d_delta", "d_A", "d_B", "d_C"}
    assert expected <= set(errs), f"missing outputs/gradients: {expected - set(errs)}"
    bad = {k: v for k, v in errs.items() if not v <= FP32_REL}
    assert not bad, f"normwise relative error above {FP32_REL}: {bad}"


def test_interpreter_other_tiles_match_reference(interpreter_results):
    res = interpreter_results["variants"]
    assert len(res) == len(INTERP_VARIANTS) * sum(c[1] == 6 for c in INTERP_CASES)
    for i, errs in enumerate(res):
        bad = {k: v for k, v in errs.items() if not v <= FP32_REL}
        assert not bad, f"variant {INTERP_VARIANTS[i // 3]} case {i % 3}: error above {FP32_REL}: {bad}"


def test_rejects_bad_shapes_and_tiles():
    from mamba_deploy.ops.triton_scan import ScanConfig, selective_scan_triton
    u = torch.zeros(1, 4, 8)
    with pytest.raises(ValueError, match="B must be"):
        selective_scan_triton(u, u, torch.zeros(4, 2), torch.zeros(1, 3, 8), torch.zeros(1, 2, 8))
    with pytest.raises(ValueError, match="does not divide"):
        selective_scan_triton(u, u, torch.zeros(4, 2), torch.zeros(1, 2, 8), torch.zeros(1, 2, 8),
                              config=ScanConfig(8, 2, 1, 1), bwd_config=ScanConfig(3, 2, 1, 1))


# ------------------------------------------------------------------------------------------ GPU

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (Triton compiled kernels)")
GPU_LS = (1, 7, 64, 511, 2048, 8192)
GPU_FLAGS = {"all": (True, True, True, True), "bare": (False, False, False, False)}


def _reference(inputs, L):
    """float64 sequential reference; for L >= 2048 the float64 chunked scan (equal to it: see test below)."""
    fn = selective_scan_ref if L < 2048 else selective_scan_chunked
    return run_with_grads(fn, to64(inputs))


@cuda
@pytest.mark.gpu
def test_chunked_float64_equals_sequential_reference_gpu():
    inp = make_inputs(2, 48, 777, 16, has_d=True, has_z=True, has_bias=True, has_h0=True,
                      act_dtype=torch.float64, device="cuda", seed=7)
    inp["A"] = inp["A"].double()
    ref = run_with_grads(selective_scan_ref, inp)
    chk = run_with_grads(selective_scan_chunked, inp)
    for k in ref:
        assert normwise_rel(chk[k], ref[k]) <= 1e-10, k


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("flags", list(GPU_FLAGS))
@pytest.mark.parametrize("N", (16, 32, 64))
@pytest.mark.parametrize("L", GPU_LS)
def test_gpu_matches_float64_reference(L, N, flags, dtype):
    from mamba_deploy.ops.triton_scan import selective_scan_triton
    has_d, has_z, has_bias, has_h0 = GPU_FLAGS[flags]
    act = torch.float32 if dtype == "fp32" else torch.bfloat16
    batch, d = (2, 40) if L <= 2048 else (1, 40)
    inp = make_inputs(batch, d, L, N, has_d=has_d, has_z=has_z, has_bias=has_bias, has_h0=has_h0,
                      act_dtype=act, device="cuda", seed=L * 7 + N)
    ref = _reference(inp, L)
    ours = run_with_grads(selective_scan_triton, inp)
    assert set(ours) == set(ref)
    assert ours["y"].dtype == act and ours["final_state"].dtype == torch.float32
    assert_matches(ours, ref, act)


def assert_matches(ours, ref, act, what=""):
    """fp32: normwise relative error <= FP32_REL per output and gradient; bf16: bf16_excess <= 1."""
    if act == torch.float32:
        errs = {k: normwise_rel(ours[k], ref[k]) for k in ref}
        bad = {k: v for k, v in errs.items() if not v <= FP32_REL}
        assert not bad, f"{what} normwise relative error above {FP32_REL}: {bad}"
    else:
        errs = {k: bf16_excess(ours[k], ref[k]) for k in ref}
        bad = {k: v for k, v in errs.items() if not v <= 1.0}
        assert not bad, f"{what} outside rtol {BF16_RTOL} / atol {BF16_ATOL} (ratio > 1): {bad}"


@cuda
@pytest.mark.gpu
def test_gpu_poisoned_outputs_are_overwritten_and_autocast_works():
    """Outputs are fully written (NaN-filled caching allocator blocks would show) and bf16 autocast is accepted."""
    from mamba_deploy.ops.selective_scan import selective_scan
    inp = make_inputs(2, 72, 300, 16, has_d=True, has_z=True, has_bias=True, has_h0=False,
                      act_dtype=torch.bfloat16, device="cuda", seed=3)
    torch.empty(64 << 20, device="cuda").fill_(float("nan"))           # poison the allocator's free blocks
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = run_with_grads(lambda **kw: selective_scan(**kw, backend="triton"), inp)
    ref = run_with_grads(selective_scan_ref, to64(inp))
    for k in ref:
        assert torch.isfinite(ours[k]).all(), k
        assert bf16_excess(ours[k], ref[k]) <= 1.0, k


# (forward, backward) tiles besides the default, given as arguments: the contenders of bench/bench_scan.py's sweep
# and backward variants (backward T below the forward's, two channels per thread, register caps)
GPU_TILES = [((8, 8, 1, 2), (8, 4, 1, 1)), ((4, 16, 1, 1), (4, 4, 2, 1)), ((4, 8, 2, 1), (4, 8, 1, 1)),
             ((8, 8, 1, 1), (8, 4, 1, 1, 192)), ((8, 8, 1, 1), (4, 4, 1, 1)), ((8, 8, 1, 1), (4, 4, 2, 1, 168))]


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("fwd,bwd", GPU_TILES, ids=[f"{f}-{b}" for f, b in GPU_TILES])
def test_gpu_other_tiles_match_reference(fwd, bwd):
    """Tiles other than the default (as the benchmark times them): fp32 and bf16, all options, L not a multiple
    of T."""
    from mamba_deploy.ops.triton_scan import ScanConfig, selective_scan_triton
    for act, L in ((torch.float32, 301), (torch.bfloat16, 299)):
        inp = make_inputs(2, 72, L, 16, has_d=True, has_z=True, has_bias=True, has_h0=True,
                          act_dtype=act, device="cuda", seed=13 + L)
        ref = run_with_grads(selective_scan_ref, to64(inp))
        ours = run_with_grads(selective_scan_triton, inp, config=ScanConfig(*fwd), bwd_config=ScanConfig(*bwd))
        assert_matches(ours, ref, act, f"tiles fwd={fwd} bwd={bwd} ({act}):")


@cuda
@pytest.mark.gpu
def test_gpu_forward_only_on_row_layout_views():
    """selective_scan_triton_fwd reads transposed views of [b·L, d] rows without a copy and writes y in that
    layout (the torch-fast prefill); equal to the autograd entry point on contiguous copies."""
    from mamba_deploy.ops.triton_scan import selective_scan_triton, selective_scan_triton_fwd
    b, L, d, N = 2, 333, 96, 16
    g = torch.Generator(device="cpu").manual_seed(5)
    rows = torch.randn(b * L, 3 * d + 2 * N, generator=g).to("cuda", torch.float16)

    def t(v):
        return v.view(b, L, -1).transpose(1, 2)
    x, dt, z = t(rows[:, :d].contiguous()), t(rows[:, d:2 * d] * 0.5), t(rows[:, 2 * d:3 * d])
    B, C = t(rows[:, 3 * d:3 * d + N]), t(rows[:, 3 * d + N:])
    A = -torch.rand(d, N, generator=g).cuda()
    D, bias = torch.randn(d, generator=g).cuda(), torch.rand(d, generator=g).cuda()
    h0 = torch.randn(b, d, N, generator=g).cuda()
    y, hT = selective_scan_triton_fwd(x, dt, A, B, C, D, z, bias, True, h0)
    assert y.stride() == x.stride()
    y2, h2 = selective_scan_triton(*(v.contiguous() for v in (x, dt, A, B, C, D, z, bias)), True, h0)
    assert torch.equal(y, y2) and torch.equal(hT, h2)
