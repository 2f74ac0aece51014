"""The standard-op form (ONNX opset ≥ 27): the scans as the standard ``LinearAttention`` and the conv as the standard
``CausalConvWithState``, instead of our custom nodes and their function bodies.

``LinearAttention(update_rule="gated")`` computes, per head, S_t = exp(g_t)·S_{t−1} + k_t ⊗ v_t and o_t = scale·q_tᵀS_t
with S [b, H, d_k, d_v] and q, k [b, T, H·d_k], v [b, T, H·d_v], g [b, T, H] (per head) or [b, T, H·d_k] (per key).

* Mamba-2 (SSD, ops/ssd.py): q = C, k = B (expanded from G groups to H heads), v = δ·x, g = δ·A per head, scale 1;
  S = our SSM state transposed ([b, H, P, N] ↔ [b, H, N, P]); y = o + D·x.
* Mamba-1 (S6, ops/selective_scan.py): one head per channel d, d_k = N, d_v = 1: q = C and k = B broadcast over the
  channels, v = δ·x, per-key decay g = δ ⊗ A [b, T, d·N]; S = our state [b, d, N] with a unit axis;
  y = (o + D·x) ⊙ SiLU(z).
* ``CausalConvWithState`` carries the last d_conv − 1 inputs; our conv state keeps the last d_conv (upstream's
  layout), so the op reads its trailing d_conv − 1 columns and the new state is sliced from [state, inputs] as in
  the opset-18 graphs.

Every helper takes a ``GraphBuilder`` (onnx/export.py) and tensor names, and works in fp32 (the callers cast).
"""
from __future__ import annotations

from onnx import TensorProto, helper

MIN_OPSET = 27          # the opset that defines LinearAttention and CausalConvWithState
INT_MAX = 2**62
F32 = TensorProto.FLOAT


def f32_scalar(g, value: float, hint: str = "f") -> str:
    name = f"{g.scope}{hint}_{len(g.nodes)}"
    return g.op("Constant", [], out=name, value=helper.make_tensor(name, F32, [], [float(value)]))


def discretize(g, dt_raw32: str, bias: str, threshold: float = 20.0, limit: tuple[float, float] | None = None) -> str:
    """δ = clip(softplus_τ(δ_raw + bias), *limit) in fp32; softplus_τ(v) = v above τ, as torch's F.softplus."""
    v = g.op("Add", [dt_raw32, bias], "dt_biased")
    dt = g.op("Where", [g.op("Greater", [v, f32_scalar(g, threshold, "tau")], "above"), v,
                        g.op("Softplus", [v], "softplus")], "dt")
    if limit is not None and (limit[0] > 0.0 or limit[1] != float("inf")):
        dt = g.op("Clip", [dt, f32_scalar(g, limit[0], "dt_min"), f32_scalar(g, limit[1], "dt_max")], "dt_clip")
    return dt


def causal_conv(g, u: str, u32: str, state: str, state_out: str, weight: str, bias: str | None, d_conv: int) -> str:
    """SiLU(causal depthwise conv) of u [b, c, L] from ``state`` [b, c, d_conv] (u's dtype); ``u32`` is u in fp32,
    weight [c, 1, d_conv] and bias [c] are fp32. Writes ``state_out`` (the last d_conv inputs); returns fp32 [b, c, L]."""
    g.op("Slice", [g.op("Concat", [state, u], "history", axis=2), g.ints([-d_conv]), g.ints([INT_MAX]), g.ints([2])],
         out=state_out)
    past = g.op("Slice", [state, g.ints([1]), g.ints([INT_MAX]), g.ints([2])], "past")
    past32 = past if u == u32 else g.cast(past, F32, "past_f32")
    y, _ = g.op("CausalConvWithState", [u32, weight, bias or "", past32], "conv", n_out=2, activation="silu")
    return y


def _linear_attention(g, q, k, v, past, decay, heads: int):
    return g.op("LinearAttention", [q, k, v, past, decay], "linattn", n_out=2, update_rule="gated",
                q_num_heads=heads, kv_num_heads=heads, scale=1.0)


def ssd(g, x32: str, dt: str, A: str, B32: str, C32: str, D: str, state: str, state_out: str,
        nheads: int, headdim: int, ngroups: int, d_state: int) -> str:
    """Mamba-2 SSD: x [b, L, H, P], δ [b, L, H], B, C [b, L, G, N] (fp32), A [H], D [H, P|1]; ``state`` [b, H, P, N]
    → y [b, L, H, P] fp32 (= C·h + D·x), writes ``state_out``."""
    H, P, G, N = nheads, headdim, ngroups, d_state

    def per_head(t):   # [b, L, G, N] → [b, L, H·N], head h reads group h // (H/G)
        t = g.op("Expand", [g.op("Unsqueeze", [t, g.ints([3])], "grp5"), g.ints([1, 1, G, H // G, N])], "grp_exp")
        return g.op("Reshape", [t, g.ints([0, 0, H * N])], "heads")

    v = g.op("Reshape", [g.op("Mul", [g.op("Unsqueeze", [dt, g.ints([3])], "dt4"), x32], "dtx"),
                         g.ints([0, 0, H * P])], "v")
    past = g.op("Transpose", [state], "past_state", perm=[0, 1, 3, 2])                        # [b, H, N, P]
    out, present = _linear_attention(g, per_head(C32), per_head(B32), v, past, g.op("Mul", [dt, A], "decay"), H)
    g.op("Transpose", [present], perm=[0, 1, 3, 2], out=state_out)
    y = g.op("Reshape", [out, g.ints([0, 0, H, P])], "y_heads")
    return g.op("Add", [y, g.op("Mul", [x32, D], "xD")], "y_skip")


def selective_scan(g, x32: str, dt: str, A: str, B32: str, C32: str, D: str, z32: str, state: str, state_out: str,
                   d_inner: int, d_state: int) -> str:
    """Mamba-1 S6: x, δ, z [b, L, d] (fp32), B, C [b, L, N] (fp32), A [d, N], D [d]; ``state`` [b, d, N]
    → y [b, L, d] fp32 (= (C·h + D·x)·SiLU(z)), writes ``state_out``."""
    d, N = d_inner, d_state

    def per_channel(t):   # [b, L, N] → [b, L, d·N]
        t = g.op("Expand", [g.op("Unsqueeze", [t, g.ints([2])], "bc4"), g.ints([1, 1, d, N])], "bc_exp")
        return g.op("Reshape", [t, g.ints([0, 0, d * N])], "per_channel")

    decay = g.op("Reshape", [g.op("Mul", [g.op("Unsqueeze", [dt, g.ints([3])], "dt4"), A], "dtA"),
                             g.ints([0, 0, d * N])], "decay")                                 # δ ⊗ A
    past = g.op("Unsqueeze", [state, g.ints([3])], "past_state")                              # [b, d, N, 1]
    out, present = _linear_attention(g, per_channel(C32), per_channel(B32), g.op("Mul", [dt, x32], "v"), past,
                                     decay, d)
    g.op("Squeeze", [present, g.ints([3])], out=state_out)
    y = g.op("Add", [out, g.op("Mul", [x32, D], "xD")], "y_skip")
    return g.op("Mul", [y, g.op("Mul", [z32, g.op("Sigmoid", [z32], "sig_z")], "silu_z")], "y_gated")
