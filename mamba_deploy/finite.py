"""Non-finite numbers (NaN, ±Inf) found in weights or in what a model computes, reported instead of passed on:
a NaN weight otherwise turns greedy decoding into a run of token 0 and sampling into a crash."""
from __future__ import annotations

import dataclasses
import math

import torch

from .errors import UserError

ALLOW_HINT = "pass --allow-nonfinite to proceed anyway"


@dataclasses.dataclass(frozen=True)
class NonFinite:
    """NaN and Inf counts of one tensor and the index of its first non-finite element."""

    name: str
    nan: int
    inf: int
    first: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.name}: {self.nan} NaN, {self.inf} Inf (first at {list(self.first)})"


def find_nonfinite(name: str, tensor: torch.Tensor) -> NonFinite | None:
    """None when every element of ``tensor`` is finite (or it is not floating point). One float64 sum decides the
    common all-finite case without a mask the size of the tensor."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    if math.isfinite(float(tensor.sum(dtype=torch.float64))):
        return None
    bad = ~torch.isfinite(tensor)
    if not bool(bad.any()):
        return None
    nan = int(torch.isnan(tensor).sum())
    first = tuple(int(i) for i in bad.reshape(tensor.shape).nonzero()[0])
    return NonFinite(name, nan, int(bad.sum()) - nan, first)


def nonfinite_error(where: str, found: list[NonFinite], hint: str = ALLOW_HINT) -> UserError:
    """One line naming up to three tensors with NaN/Inf."""
    listing = "; ".join(str(f) for f in found[:3])
    if len(found) > 3:
        listing += f"; and {len(found) - 3} more tensors"
    return UserError(f"{where} has non-finite weights ({listing}); {hint}")


def check_step_finite(logits: torch.Tensor, state, where: str) -> None:
    """Raise a one-line UserError when ``logits`` (or, where they are finite, the state) hold NaN/Inf, naming
    ``where`` (e.g. "decode step 7") and the first layer whose conv or SSM state is non-finite."""
    if math.isfinite(float(logits.float().sum(dtype=torch.float64))) and (state is None or _state_ok(state)):
        return
    found = find_nonfinite("logits", logits)
    layer = None
    if state is not None:
        for i, (c, s) in enumerate(zip(state.conv, state.ssm)):
            bad = [what for what, t in (("conv state", c), ("SSM state", s)) if find_nonfinite(what, t)]
            if bad:
                layer = f"layer {i} ({' and '.join(bad)})"
                break
    parts = []
    if found:
        parts.append(f"{found.nan} NaN and {found.inf} Inf logits")
    if layer:
        parts.append(f"first non-finite state in {layer}")
    raise UserError(f"the model produced non-finite values at {where}: {', '.join(parts)}; the weights or the "
                    f"precision overflow (check the checkpoint with `mamba-deploy info`)")


def _state_ok(state) -> bool:
    return all(math.isfinite(float(t.float().sum(dtype=torch.float64))) for t in (*state.conv, *state.ssm))
