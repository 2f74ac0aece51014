"""Default tolerances for comparing an artifact's logits with the fp32 PyTorch model of its source checkpoint.

``DEFAULT_TOLERANCES[dtype] = (atol, rtol)`` over a prefill and an N-step rollout in which the backend feeds back
its own state. Two rules use them: the tests' ``within`` below (an element passes when
``|actual − reference| ≤ atol + rtol·|reference|``) and ``mamba-deploy check``, which uses Polygraphy's element-wise
rule (an element fails only when it exceeds both atol and rtol·|reference|) — looser by at most a factor of 2.

* fp32: same math, different summation orders: tiny random models stay within 3e-7 over 256 steps on CPU
  (tests/test_ort_session.py); rtol leaves room for large logits (≈ 20) of real models.
* fp16 (unit roundoff 4.9e-4) and bf16 (3.9e-3): weights, activations and the conv state rounded, SSM state
  and residual stream fp32; tiny models on ONNX Runtime CPU stay within 5e-4 of fp32 logits (|logit| ≤ 0.7).

Measured on ONNX Runtime CPU, 370m-shaped random model, 16-token prefill + 4 steps vs fp32 PyTorch
(|logit| ≤ 9.4): fp32 artifact 3.5e-6, fp16 artifact 3.1e-3 max abs error.
"""
from __future__ import annotations

DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "fp32": (1e-5, 1e-4),
    "fp16": (5e-3, 1e-2),
    "bf16": (4e-2, 5e-2),
}


def within(actual, reference, dtype: str, tolerances: dict | None = None) -> bool:
    """True when every element satisfies |actual − reference| ≤ atol + rtol·|reference| (torch tensors)."""
    atol, rtol = (tolerances or DEFAULT_TOLERANCES)[dtype]
    return bool(((actual - reference).abs() <= atol + rtol * reference.abs()).all())
