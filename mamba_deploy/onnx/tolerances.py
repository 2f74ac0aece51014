"""Default parity tolerances per artifact dtype: ``(atol, rtol)`` for logits and states, checked element-wise the
way Polygraphy's ``elemwise`` statistic does (an element fails only if |a − b| > atol AND |a − b| / |ref| > rtol).

The reference is always the fp32 PyTorch model loaded from the artifact's source checkpoint, so fp16/bf16 artifacts
carry their rounding against fp32; fp32 artifacts differ only by summation order (measured ≤ 1e-5 on logits over a
256-step rollout of tiny models). ``mamba-deploy check --atol/--rtol`` override these.
"""
from __future__ import annotations

DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "fp32": (1e-4, 1e-4),
    "fp16": (2e-2, 2e-2),
    "bf16": (1e-1, 1e-1),
}


def default_tolerance(dtype: str) -> tuple[float, float]:
    """(atol, rtol) for an artifact of ``dtype`` ("fp32", "fp16" or "bf16")."""
    from ..errors import UserError
    try:
        return DEFAULT_TOLERANCES[dtype]
    except KeyError:
        raise UserError(f"no default tolerance for dtype '{dtype}' (known: {', '.join(DEFAULT_TOLERANCES)}); "
                        "pass --atol and --rtol") from None
