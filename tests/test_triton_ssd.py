"""Triton SSD (Mamba-2) scan vs a float64 sequential reference: outputs, final state and every gradient.

CPU: the kernels under TRITON_INTERPRET=1 (numpy), tiny shapes, in ONE subprocess (the interpreter flag must be set
before Triton decorates the kernels, and another test may already have imported them); per-case errors come back
as JSON and each case is asserted here. GPU (tests/test_triton_ssd_gpu.py): compiled kernels at real shapes.

Reference (``ssd_reference``): ``mamba_deploy.ops.ssd.ssd_scan_ref``, the recurrence itself step by step, in
float64 autograd: h_t = exp(dt_t·A)·h_{t−1} + dt_t·x_t ⊗ B_t, y_t = C_t·h_t + D·x_t per head, with
dt = clamp(softplus(dt + bias)) discretized here, on the same (already rounded) inputs. Error measures: fp32 —
normwise max relative error max|ours − ref| / max|ref| <= 1e-4 per output and gradient; fp16 / bf16 — the same
measure <= 1e-2 / 3e-2 (products run on the operands rounded to the activation dtype, as upstream's kernels do;
bf16 keeps 8 mantissa bits, unit roundoff 3.9e-3).
"""
from __future__ import annotations

import math
import textwrap

import pytest
import torch
import torch.nn.functional as F

from helpers import max_rel, run_interpreter_worker, run_with_grads  # noqa: F401  (run_with_grads: also used by test_triton_ssd_gpu.py)

from mamba_deploy.ops.ssd import ssd_scan_ref

TOL = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 3e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def ssd_reference(x, dt, A, B, C, D=None, dt_bias=None, initial_state=None, dt_softplus=True,
                  dt_limit=(0.0, math.inf)):
    """The reference next to the kernels, in float64: dt discretized here as the kernels do (bias, softplus if
    asked, clamp), then ``ops.ssd.ssd_scan_ref`` (the recurrence one step at a time). Shapes as ``ssd_scan_triton``."""
    f = torch.float64
    dt = dt.to(f) + (dt_bias.to(f) if dt_bias is not None else 0.0)
    if dt_softplus:
        dt = F.softplus(dt)
    dt = dt.clamp(dt_limit[0], dt_limit[1])
    return ssd_scan_ref(x.to(f), dt, A.to(f), B.to(f), C.to(f), D=D.to(f) if D is not None else None,
                        initial_state=initial_state.to(f) if initial_state is not None else None)


def make_inputs(batch, L, H, P, G, N, *, D_kind, has_bias, has_h0, act_dtype, device, seed):
    """Mamba-2-like ranges: dt_raw ~ N(0,1)·0.5 − 1 (+ bias U(−1, 0)), A = −U(0.5, 4), x, B, C, D, h0 ~ N(0,1)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, dtype=act_dtype, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dtype)

    D = {"none": None, "head": rnd(H, dtype=torch.float32), "head1": rnd(H, 1, dtype=torch.float32),
         "channel": rnd(H, P, dtype=torch.float32)}[D_kind]
    return dict(
        x=rnd(batch, L, H, P), dt=rnd(batch, L, H, scale=0.5, shift=-1.0),
        A=(-(0.5 + 3.5 * torch.rand(H, generator=g))).to(device),
        B=rnd(batch, L, G, N), C=rnd(batch, L, G, N), D=D,
        dt_bias=(-torch.rand(H, generator=g)).to(device) if has_bias else None,
        initial_state=rnd(batch, H, P, N, dtype=torch.float32) if has_h0 else None,
    )


normwise_rel = max_rel   # max|ours − ref| / max|ref| (tests/helpers.py)


def compare(ours, ref):
    """{name: normwise relative error}; a NaN (unwritten or poisoned output) counts as infinite."""
    out = {}
    for k in ref:
        e = normwise_rel(ours[k], ref[k])
        out[k] = e if math.isfinite(e) else float("inf")
    return out


# ------------------------------------------------------------------------------------------ CPU: interpreter

# (L, H, P, G, N, D_kind, has_bias, has_h0, softplus, dt_limit, chunk, dtype)
INTERP_CASES = [
    (1, 2, 4, 1, 6, "head", True, True, True, (0.0, math.inf), 16, "fp32"),
    (13, 4, 5, 2, 6, "channel", True, True, True, (0.0, math.inf), 16, "fp32"),
    (40, 4, 16, 1, 16, "head", True, True, True, (0.0, math.inf), 16, "fp32"),       # 3 chunks, last partial
    (33, 2, 3, 2, 7, "none", False, False, True, (0.0, math.inf), 16, "fp32"),
    (37, 4, 8, 4, 5, "channel", True, False, True, (0.15, 0.45), 16, "fp32"),        # clamp binds both sides
    (32, 2, 4, 1, 8, "head1", False, True, False, (0.0, math.inf), 16, "fp32"),      # no softplus; D [H, 1]
    (70, 2, 4, 1, 6, "head", True, True, True, (0.0, math.inf), 32, "fp32"),         # chunk 32
    (70, 2, 4, 1, 6, "head", True, True, True, (0.0, math.inf), 256, "fp32"),        # a model's 256 → 64
    (45, 2, 20, 1, 40, "head", True, True, True, (0.0, math.inf), 16, "fp32"),       # 2 d_state blocks of 32
    (29, 4, 8, 2, 16, "head", True, True, True, (0.0, math.inf), 16, "bf16"),
    (29, 4, 8, 2, 16, "channel", True, True, True, (0.0, math.inf), 16, "fp16"),
    (29, 4, 8, 2, 16, "head", True, True, True, (0.0, math.inf), "lowp", "bf16"),       # states in bf16
]


def case_inputs(case, seed, device="cpu"):
    L, H, P, G, N, D_kind, has_bias, has_h0, softplus, dt_limit, chunk, dtype = case
    inp = make_inputs(2, L, H, P, G, N, D_kind=D_kind, has_bias=has_bias, has_h0=has_h0,
                      act_dtype=DTYPES[dtype], device=device, seed=seed)
    if not softplus:
        inp["dt"] = (inp["dt"].float().abs() * 0.3).to(inp["dt"].dtype)     # dt used as is: keep it positive
    return inp, dict(dt_softplus=softplus, dt_limit=dt_limit), chunk


_WORKER = textwrap.dedent("""
    import json, os, sys
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    sys.path.insert(0, sys.argv[1])
    import test_triton_ssd as t
    from mamba_deploy.ops.triton_ssd import SSDConfig, ssd_scan_triton
    torch.set_num_threads(2)
    results = []
    for i, case in enumerate(t.INTERP_CASES):
        inp, kw, chunk = t.case_inputs(case, seed=100 + i)
        ref = t.run_with_grads(t.ssd_reference, inp, **kw)
        cfg = dict(config=SSDConfig(16, lowp_states=True)) if chunk == "lowp" else dict(chunk_size=chunk)
        ours = t.run_with_grads(ssd_scan_triton, inp, **cfg, **kw)
        results.append(t.compare(ours, ref))
    print("RESULTS" + json.dumps(results))
""")


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreter_worker(_WORKER)


def _case_id(c):
    L, H, P, G, N, D_kind, has_bias, has_h0, softplus, lim, chunk, dtype = c
    return (f"L{L}-H{H}P{P}G{G}N{N}-D{D_kind}-b{int(has_bias)}h{int(has_h0)}sp{int(softplus)}"
            f"{'-clamp' if lim != (0.0, math.inf) else ''}-Q{chunk}-{dtype}")


@pytest.mark.parametrize("case", range(len(INTERP_CASES)), ids=[_case_id(c) for c in INTERP_CASES])
def test_interpreter_matches_float64_reference(interpreter_results, case):
    errs = interpreter_results[case]
    c = INTERP_CASES[case]
    expected = {"y", "final_state", "d_x", "d_dt", "d_A", "d_B", "d_C"}
    expected |= {"d_D"} if c[5] != "none" else set()
    expected |= {"d_dt_bias"} if c[6] else set()
    expected |= {"d_initial_state"} if c[7] else set()
    assert set(errs) == expected, f"outputs/gradients: {sorted(errs)} != {sorted(expected)}"
    tol = TOL[c[-1]]
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"normwise relative error above {tol}: {bad}"


def test_reference_matches_closed_form_chunk():
    """The reference itself against the quadratic (attention-like) form of SSD, y = (L ⊙ C·Bᵀ)·(dt·x) + C·exp(a)·h0
    (Dao & Gu 2024, §6), float64, no D: guards the ground truth against a shared misreading of the recurrence."""
    inp = make_inputs(1, 9, 2, 3, 1, 4, D_kind="none", has_bias=False, has_h0=True, act_dtype=torch.float64,
                      device="cpu", seed=5)
    inp = {k: (v.double() if v is not None else None) for k, v in inp.items()}
    y, _ = ssd_reference(**inp)
    dt = F.softplus(inp["dt"][0])                                   # [L, H]
    a = torch.cumsum(dt * inp["A"], 0)                      # [L, H]
    Bm, Cm, x, h0 = inp["B"][0, :, 0], inp["C"][0, :, 0], inp["x"][0], inp["initial_state"][0]
    for hd in range(2):
        seg = a[:, None, hd] - a[None, :, hd]
        Lm = torch.where(torch.ones(9, 9, dtype=torch.bool).tril(), seg.exp(), torch.zeros(()).double())
        yq = (Lm * (Cm @ Bm.T)) @ (dt[:, hd, None] * x[:, hd]) + a[:, hd].exp()[:, None] * (Cm @ h0[hd].T)
        assert torch.allclose(y[0, :, hd], yq, rtol=1e-12, atol=1e-12)


def test_rejects_bad_shapes():
    from mamba_deploy.ops.triton_ssd import ssd_scan_triton
    inp = make_inputs(1, 8, 4, 4, 2, 8, D_kind="head", has_bias=True, has_h0=False, act_dtype=torch.float32,
                      device="cpu", seed=0)
    with pytest.raises(ValueError, match="ngroups"):
        three = inp["B"][:, :, :1].expand(1, 8, 3, 8)
        ssd_scan_triton(**{**inp, "B": three, "C": three})
    with pytest.raises(ValueError, match="dt must be"):
        ssd_scan_triton(**{**inp, "dt": inp["dt"][:, :4]})
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_scan_triton(**inp, chunk_size=24)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_scan_triton(**inp, chunk_size=8)
    with pytest.raises(ValueError, match="initial_state"):
        ssd_scan_triton(**{**inp, "initial_state": torch.zeros(1, 4, 4, 7)})
