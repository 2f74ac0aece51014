"""ONNX emitter of the Mamba-1 block: the nodes of ``block.MambaMixer.step`` (step graph) and ``.forward`` (prefill
graph), line by line, with the selective scan as ONE custom node per layer (onnx/contract.py: ``SelectiveScanStep``,
``SelectiveScan``). The shared language model around it (embedding, residual, RMSNorm, lm_head, state I/O) is
``onnx.export.LMGraphs``; initializer names are the weight table's (weights.py; A is stored as ``mixer.A``).
"""
from __future__ import annotations

from ...onnx import contract
from ...onnx.export import F32, INT_MAX, GraphBuilder, LMGraphs


class Mamba1Graphs(LMGraphs):
    def scan_attrs(self):
        return dict(contract.SELECTIVE_SCAN.attributes)

    # -- step graph ------------------------------------------------------------------------------------------
    def step_mixer(self, g: GraphBuilder, h, i: int):
        c, p = self.cfg, f"backbone.layers.{i}.mixer."
        d, N, r = c.d_inner, c.d_state, c.dt_rank_value
        x, z = g.op("Split", [self.linear(g, h, p + "in_proj", c.bias, (c.d_model, 2 * d)), g.ints([d, d])], "xz",
                    n_out=2, axis=-1)
        # conv state ← [conv_state[..., 1:], x]   (the last d_conv inputs, pre-conv)
        shifted = g.op("Slice", [contract.conv_state_name(i), g.ints([1]), g.ints([INT_MAX]), g.ints([2])], "shift")
        conv = g.op("Concat", [shifted, g.op("Unsqueeze", [x, g.ints([-1])], "x_col")], axis=2,
                    out=contract.conv_state_name(i, out=True))
        w = g.op("Squeeze", [p + "conv1d.weight", g.ints([1])], "conv_w")                       # [d, k] fp32
        conv_f = conv if self.act == F32 else g.cast(conv, F32, "conv_f32")
        xc = g.op("ReduceSum", [g.op("Mul", [conv_f, w], "taps"), g.ints([-1])], "conv", keepdims=0)
        if c.conv_bias:
            xc = g.op("Add", [xc, p + "conv1d.bias"], "conv_b")
        xc = self.to_act(g, self.silu_f32(g, xc))
        dt, B, C = g.op("Split", [self.linear(g, xc, p + "x_proj", False), g.ints([r, N, N])], "dbc", n_out=3,
                        axis=-1)
        dt = self.linear(g, dt, p + "dt_proj", False)                                            # δ_raw = W_dt·dt
        y, _ = g.op(contract.SELECTIVE_SCAN_STEP.op_type,
                    [xc, dt, p + "A", B, C, p + "D", p + "dt_proj.bias", z, contract.ssm_state_name(i)],
                    domain=contract.DOMAIN, out=[g.scope + "y", contract.ssm_state_name(i, out=True)],
                    **self.scan_attrs())
        return self.linear(g, y, p + "out_proj", c.bias, (d, c.d_model))

    # -- prefill graph ---------------------------------------------------------------------------------------
    def prefill_mixer(self, g: GraphBuilder, h, i: int, shape_bl):
        """h: [b·L, d_model] → [b·L, d_model]; conv and scan run on [b, d, L] views."""
        c, p = self.cfg, f"backbone.layers.{i}.mixer."
        d, N, r, k = c.d_inner, c.d_state, c.dt_rank_value, c.d_conv

        def to_bfl(v, feat):       # [b·L, f] → [b, f, L]
            v = g.op("Reshape", [v, g.op("Concat", [shape_bl, g.ints([feat])], "shape", axis=0)], "bLf")
            return g.op("Transpose", [v], "bfL", perm=[0, 2, 1])

        def to_flat(v, feat):      # [b, f, L] → [b·L, f]
            return g.op("Reshape", [g.op("Transpose", [v], "bLf", perm=[0, 2, 1]), g.ints([-1, feat])], "flat")

        x, z = g.op("Split", [self.linear(g, h, p + "in_proj", c.bias, (c.d_model, 2 * d)), g.ints([d, d])], "xz",
                    n_out=2, axis=-1)
        x, z = to_bfl(x, d), to_bfl(z, d)
        history = g.op("Concat", [contract.conv_state_name(i), x], "history", axis=2)            # [b, d, k + L]
        g.op("Slice", [history, g.ints([-k]), g.ints([INT_MAX]), g.ints([2])],
             out=contract.conv_state_name(i, out=True))
        window = g.op("Slice", [history, g.ints([1]), g.ints([INT_MAX]), g.ints([2])], "window")  # [b, d, k−1+L]
        window = window if self.act == F32 else g.cast(window, F32, "window_f32")
        conv_in = [window, p + "conv1d.weight"] + ([p + "conv1d.bias"] if c.conv_bias else [])
        xc = g.op("Conv", conv_in, "conv", group=d, kernel_shape=[k])                             # [b, d, L]
        xc = self.to_act(g, self.silu_f32(g, xc))
        dt, B, C = g.op("Split", [self.linear(g, to_flat(xc, d), p + "x_proj", False), g.ints([r, N, N])], "dbc",
                        n_out=3, axis=-1)
        dt = self.linear(g, dt, p + "dt_proj", False)
        y, _ = g.op(contract.SELECTIVE_SCAN.op_type,
                    [xc, to_bfl(dt, d), p + "A", to_bfl(B, N), to_bfl(C, N), p + "D", p + "dt_proj.bias", z,
                     contract.ssm_state_name(i)],
                    domain=contract.DOMAIN, out=[g.scope + "y", contract.ssm_state_name(i, out=True)],
                    **self.scan_attrs())
        return self.linear(g, to_flat(y, d), p + "out_proj", c.bias, (d, c.d_model))

