"""Helpers shared by the tests: one selective-scan input generator, the error measures, tolerance checks from the
artifact spec, and state comparison. (Fixtures live in conftest.py.)"""
from __future__ import annotations

import math

import torch

from mamba_deploy.artifact import DEFAULT_TOLERANCES, within  # noqa: F401  (re-exported: one source of tolerances)

SCAN_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normwise relative error ‖a − b‖₂ / ‖b‖₂ in float64 (a zero reference counts as norm 1e-30)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def max_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out − ref| / max|ref| in float64; a reference that is exactly zero is compared absolutely. NaN anywhere
    in ``out`` (a poisoned element left unwritten) gives NaN, which fails every ``<=`` check."""
    ref = ref.double()
    scale = ref.abs().max().item()
    err = (out.double() - ref).abs().max().item()
    if torch.isnan(out).any():
        return math.nan
    return err / (scale if scale > 0 else 1.0)


def scan_inputs(batch: int, d: int, N: int, L: int | None, *, seed: int = 0, dtype=torch.float32, device="cpu",
                dist: str = "realistic", D: bool = True, z: bool = True, delta_bias: bool = True,
                initial_state: bool = True, large_delta: bool = False) -> dict[str, torch.Tensor | None]:
    """Inputs of ``ops.selective_scan`` (names as there; ``L=None``: one decode step, no time axis).

    ``dist="realistic"``: δ bias from upstream's init (softplus(bias) log-uniform in [1e-3, 0.1]), δ_raw = 0.5·N(0,1),
    A = −(1…N) per channel scaled by U(0.5, 1.5) (S4D-real), the rest N(0,1). ``dist="upstream"``: upstream's test
    distributions (δ_raw = 0.5·U, bias 0.5·U, A = −0.5·U). ``large_delta`` sets every 11th δ_raw to 25 (past the
    softplus threshold). u, δ, B, C, z are in ``dtype``; A, D, δ bias and the state fp32.
    """
    g = torch.Generator().manual_seed(seed)
    seq = () if L is None else (L,)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def rand(*shape, scale=1.0):
        return torch.rand(*shape, generator=g) * scale

    if dist == "realistic":
        dt = torch.exp(rand(d) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        bias = dt + torch.log(-torch.expm1(-dt))                                  # inverse softplus
        delta = randn(batch, d, *seq, scale=0.5)
        A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(d, 1) * (0.5 + rand(d, 1))
    elif dist == "upstream":
        bias = rand(d, scale=0.5)
        delta = rand(batch, d, *seq, scale=0.5)
        A = -rand(d, N, scale=0.5)
    else:
        raise ValueError(f"unknown dist {dist!r}")
    if large_delta:
        delta.view(-1)[::11] = 25.0
    out = dict(u=randn(batch, d, *seq), delta=delta, A=A, B=randn(batch, N, *seq), C=randn(batch, N, *seq),
               D=randn(d), z=randn(batch, d, *seq), delta_bias=bias, initial_state=randn(batch, d, N))
    keep = dict(D=D, z=z, delta_bias=delta_bias, initial_state=initial_state)
    act = ("u", "delta", "B", "C", "z")
    return {k: None if not keep.get(k, True) else v.to(device=device, dtype=dtype if k in act else torch.float32)
            .contiguous() for k, v in out.items()}


def assert_states_close(a, b, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Every layer's SSM and conv state of two MambaStates agree."""
    assert len(a.ssm) == len(b.ssm) and len(a.conv) == len(b.conv)
    for x, y in zip(a.ssm + a.conv, b.ssm + b.conv):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol)


def assert_one_line_error(code: int, output: str, needle: str) -> None:
    """A CLI run failed with exactly one line ``mamba-deploy: error: …`` containing ``needle`` and no traceback."""
    assert code != 0
    assert "Traceback" not in output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mamba-deploy: error:"), output
    assert needle in lines[0], output
