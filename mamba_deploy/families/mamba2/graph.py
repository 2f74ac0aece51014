"""ONNX emitter of the Mamba-2 block: the nodes of ``block.Mamba2Mixer.step`` (step graph) and ``.forward`` (prefill
graph), line by line. The SSD scan is ONE custom node per layer (onnx/contract.py: ``SSDScanStep``, ``SSDScan``,
bodies in onnx/functions.py), or, in the standard-op form (opset ≥ 27), the standard ``LinearAttention``
(update_rule "gated": S_t = exp(g_t)·S_{t−1} + k_t ⊗ v_t, o_t = q_t·S_t — SSD with q = C, k = B expanded from groups to
heads, v = δ·x, g = δ·A per head, scale 1; its state [b, H, N, P] is the transpose of ours) plus D·x. The shared
language model around it is ``onnx.export.LMGraphs``; initializer names are the weight table's (weights.py).
"""
from __future__ import annotations

from ...onnx import contract
from ...onnx.export import F32, GraphBuilder, LMGraphs


class Mamba2Graphs(LMGraphs):
    def scan_attrs(self):
        lo, hi = self.cfg.dt_limit
        return {**contract.SSD_SCAN.attributes, "dt_min": lo, "dt_max": hi}

    # -- pieces ----------------------------------------------------------------------------------------------
    def _split_in_proj(self, g: GraphBuilder, h, p: str):
        c = self.cfg
        return g.op("Split", [self.linear(g, h, p + "in_proj", c.bias, (c.d_model, c.d_in_proj)),
                              g.ints([c.d_inner, c.conv_dim, c.nheads])],
                    "zxbcdt", n_out=3, axis=-1)

    def _split_xbc(self, g: GraphBuilder, xbc, lead: list[int]):
        """[..., conv_dim] → x [..., H, P], B, C [..., G, N]; ``lead`` = 0s copying the leading axes."""
        c = self.cfg
        x, B, C = g.op("Split", [xbc, g.ints([c.d_inner, c.ngroups * c.d_state, c.ngroups * c.d_state])], "xBC",
                       n_out=3, axis=-1)
        return (g.op("Reshape", [x, g.ints(lead + [c.nheads, c.headdim])], "x_heads"),
                g.op("Reshape", [B, g.ints(lead + [c.ngroups, c.d_state])], "B_groups"),
                g.op("Reshape", [C, g.ints(lead + [c.ngroups, c.d_state])], "C_groups"))

    def gated_norm(self, g: GraphBuilder, y, z, p: str):
        """block.GatedRMSNorm in fp32 on flat rows: y, z [rows, d_inner] → [rows, d_inner] in the export dtype."""
        c = self.cfg
        y = y if self.act == F32 else g.cast(y, F32, "y_f32")
        gate = self.silu_f32(g, z if self.act == F32 else g.cast(z, F32, "z_f32"))
        if not c.norm_before_gate:
            y = g.op("Mul", [y, gate], "y_gated")
        grouped = g.op("Reshape", [y, g.ints([0, c.ngroups, c.d_inner // c.ngroups])], "y_groups")
        ms = g.op("ReduceMean", [g.op("Mul", [grouped, grouped], "sq"), g.ints([-1])], "ms", keepdims=1)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, "norm_eps"], "ms_eps")], "rms")], "inv_rms")
        y = g.op("Reshape", [g.op("Mul", [grouped, inv], "normed"), g.ints([0, c.d_inner])], "normed_flat")
        y = g.op("Mul", [y, p + "norm.weight"], "norm_w")
        if c.norm_before_gate:
            y = g.op("Mul", [y, gate], "y_gated")
        return self.to_act(g, y)

    def _ssd(self, g: GraphBuilder, op: str, x, dt, B, C, i: int, p: str):
        """The SSD scan node(s) of layer i; x [b, (L,) H, P] → y of the same shape (export dtype)."""
        if self.standard_ops:
            return self._ssd_linear_attention(g, x, dt, B, C, i, p, step=op == contract.SSD_SCAN_STEP.op_type)
        D = p + "D"
        y, _ = g.op(op, [x, dt, p + "A", B, C, D, p + "dt_bias", contract.ssm_state_name(i)], domain=contract.DOMAIN,
                    out=[g.scope + "y", contract.ssm_state_name(i, out=True)], **self.scan_attrs())
        return y

    def _ssd_linear_attention(self, g: GraphBuilder, x, dt_raw, B, C, i: int, p: str, step: bool):
        """Standard-op form: x [b, L, H, P], δ_raw [b, L, H], B, C [b, L, G, N] (a step is L = 1)."""
        c = self.cfg
        H, P, G, N = c.nheads, c.headdim, c.ngroups, c.d_state
        if step:
            x, dt_raw, B, C = (g.op("Unsqueeze", [t, g.ints([1])], "T1") for t in (x, dt_raw, B, C))
        x32 = x if self.act == F32 else g.cast(x, F32, "x_f32")
        dt = self.discretize_dt(g, dt_raw, p + "dt_bias", c.dt_limit)                         # [b, L, H] fp32

        def heads(t):   # [b, L, G, N] → [b, L, H·N] fp32, head h reads group h // (H/G)
            t = t if self.act == F32 else g.cast(t, F32, "t_f32")
            t = g.op("Expand", [g.op("Unsqueeze", [t, g.ints([3])], "t5"), g.ints([1, 1, G, H // G, N])], "t_exp")
            return g.op("Reshape", [t, g.ints([0, 0, H * N])], "t_heads")

        v = g.op("Reshape", [g.op("Mul", [g.op("Unsqueeze", [dt, g.ints([-1])], "dt4"), x32], "dtx"),
                             g.ints([0, 0, H * P])], "v")
        past = g.op("Transpose", [contract.ssm_state_name(i)], "past", perm=[0, 1, 3, 2])      # [b, H, N, P]
        out, present = g.op("LinearAttention", [heads(C), heads(B), v, past, g.op("Mul", [dt, p + "A"], "decay")],
                            "la", n_out=2, update_rule="gated", q_num_heads=H, kv_num_heads=H, scale=1.0)
        g.op("Transpose", [present], perm=[0, 1, 3, 2], out=contract.ssm_state_name(i, out=True))
        y = g.op("Add", [g.op("Reshape", [out, g.ints([0, 0, H, P])], "y_heads"),
                         g.op("Mul", [x32, p + "D"], "xD")], "y_skip")
        if step:
            y = g.op("Squeeze", [y, g.ints([1])], "y_step")
        return self.to_act(g, y)

    # -- step graph ------------------------------------------------------------------------------------------
    def step_mixer(self, g: GraphBuilder, h, i: int):
        c, p = self.cfg, f"backbone.layers.{i}.mixer."
        z, xbc, dt = self._split_in_proj(g, h, p)
        xbc = self.conv_step(g, xbc, i, p, c.conv_bias)                                           # [b, conv_dim]
        x, B, C = self._split_xbc(g, xbc, [0])
        y = self._ssd(g, contract.SSD_SCAN_STEP.op_type, x, dt, B, C, i, p)                         # [b, H, P]
        y = g.op("Reshape", [y, g.ints([0, c.d_inner])], "y_flat")
        return self.linear(g, self.gated_norm(g, y, z, p), p + "out_proj", c.bias, (c.d_inner, c.d_model))

    # -- prefill graph ---------------------------------------------------------------------------------------
    def prefill_mixer(self, g: GraphBuilder, h, i: int, shape_bl):
        """h: [b·L, d_model] → [b·L, d_model]; the conv runs on [b, conv_dim, L], the scan on [b, L, H, P]."""
        c, p = self.cfg, f"backbone.layers.{i}.mixer."
        z, xbc, dt = self._split_in_proj(g, h, p)
        xbc = g.op("Reshape", [xbc, g.op("Concat", [shape_bl, g.ints([c.conv_dim])], "shape", axis=0)], "bLc")
        xbc = self.conv_prefill(g, g.op("Transpose", [xbc], "bcL", perm=[0, 2, 1]), i, p, c.conv_bias)
        x, B, C = self._split_xbc(g, g.op("Transpose", [xbc], "bLc", perm=[0, 2, 1]), [0, 0])
        dt = g.op("Reshape", [dt, g.op("Concat", [shape_bl, g.ints([c.nheads])], "shape", axis=0)], "dt_bLH")
        y = self._ssd(g, contract.SSD_SCAN.op_type, x, dt, B, C, i, p)                              # [b, L, H, P]
        y = g.op("Reshape", [y, g.ints([-1, c.d_inner])], "y_flat")
        return self.linear(g, self.gated_norm(g, y, z, p), p + "out_proj", c.bias, (c.d_inner, c.d_model))
