"""ONNX emitter of the Mamba-1 block: the nodes of ``block.MambaMixer.step`` (step graph) and ``.forward`` (prefill
graph), line by line, with the selective scan as ONE custom node per layer (onnx/contract.py: ``SelectiveScanStep``,
``SelectiveScan``), or, in the standard-op form (opset ≥ 27), the standard ``LinearAttention`` with one head per
channel (onnx/standard_ops.py). The shared language model around it (embedding, residual, RMSNorm, lm_head, state
I/O, the causal conv) is ``onnx.export.LMGraphs``; initializer names are the weight table's (weights.py; A is stored
as ``mixer.A``).
"""
from __future__ import annotations

from ...onnx import contract, standard_ops
from ...onnx.export import GraphBuilder, LMGraphs


class Mamba1Graphs(LMGraphs):
    def scan_attrs(self):
        return dict(contract.SELECTIVE_SCAN.attributes)

    def project_x(self, g: GraphBuilder, xc, p: str):
        """block.MambaMixer._project_x on flat rows: xc [rows, d_inner] → δ_raw [rows, d_inner] (W_dt applied, no
        bias), B, C [rows, N]."""
        c = self.cfg
        dt, B, C = g.op("Split", [self.linear(g, xc, p + "x_proj", False), g.ints([c.dt_rank_value, c.d_state,
                                                                                   c.d_state])],
                        "dbc", n_out=3, axis=-1)
        return self.linear(g, dt, p + "dt_proj", False), B, C

    def _standard_scan(self, g: GraphBuilder, x, dt, B, C, z, i: int, p: str):
        """The standard-op scan on [b, L, ·] tensors (export dtype) → y [b, L, d_inner] (export dtype)."""
        c = self.cfg
        y = standard_ops.selective_scan(
            g, self.to_f32(g, x), self.discretize_dt(g, dt, p + "dt_proj.bias"), p + "A", self.to_f32(g, B),
            self.to_f32(g, C), p + "D", self.to_f32(g, z), contract.ssm_state_name(i),
            contract.ssm_state_name(i, out=True), c.d_inner, c.d_state)
        return self.to_act(g, y)

    # -- step graph ------------------------------------------------------------------------------------------
    def step_mixer(self, g: GraphBuilder, h, i: int):
        c, p = self.cfg, f"backbone.layers.{i}.mixer."
        d = c.d_inner
        x, z = g.op("Split", [self.linear(g, h, p + "in_proj", c.bias, (c.d_model, 2 * d)), g.ints([d, d])], "xz",
                    n_out=2, axis=-1)
        xc = self.conv_step(g, x, i, p, c.conv_bias)
        dt, B, C = self.project_x(g, xc, p)
        if self.standard_ops:
            rows = [g.op("Unsqueeze", [t, g.ints([1])], "T1") for t in (xc, dt, B, C, z)]       # [b, 1, ·]
            y = g.op("Squeeze", [self._standard_scan(g, *rows, i, p), g.ints([1])], "y")
        else:
            y, _ = g.op(contract.SELECTIVE_SCAN_STEP.op_type,
                        [xc, dt, p + "A", B, C, p + "D", p + "dt_proj.bias", z, contract.ssm_state_name(i)],
                        domain=contract.DOMAIN, out=[g.scope + "y", contract.ssm_state_name(i, out=True)],
                        **self.scan_attrs())
        return self.linear(g, y, p + "out_proj", c.bias, (d, c.d_model))

    # -- prefill graph ---------------------------------------------------------------------------------------
    def prefill_mixer(self, g: GraphBuilder, h, i: int, shape_bl):
        """h: [b·L, d_model] → [b·L, d_model]; the conv and the custom scan run on [b, d, L] views, the standard-op
        scan on [b, L, d]."""
        c, p = self.cfg, f"backbone.layers.{i}.mixer."
        d, N = c.d_inner, c.d_state

        def to_blf(v, feat):       # [b·L, f] → [b, L, f]
            return g.op("Reshape", [v, g.op("Concat", [shape_bl, g.ints([feat])], "shape", axis=0)], "bLf")

        def to_bfl(v, feat):       # [b·L, f] → [b, f, L]
            return g.op("Transpose", [to_blf(v, feat)], "bfL", perm=[0, 2, 1])

        def to_flat(v, feat):      # [b, f, L] → [b·L, f]
            return g.op("Reshape", [g.op("Transpose", [v], "bLf", perm=[0, 2, 1]), g.ints([-1, feat])], "flat")

        x, z = g.op("Split", [self.linear(g, h, p + "in_proj", c.bias, (c.d_model, 2 * d)), g.ints([d, d])], "xz",
                    n_out=2, axis=-1)
        xc = self.conv_prefill(g, to_bfl(x, d), i, p, c.conv_bias)                                # [b, d, L]
        xc_flat = to_flat(xc, d)
        dt, B, C = self.project_x(g, xc_flat, p)
        if self.standard_ops:
            y = self._standard_scan(g, to_blf(xc_flat, d), to_blf(dt, d), to_blf(B, N), to_blf(C, N), to_blf(z, d),
                                    i, p)
            y = g.op("Reshape", [y, g.ints([-1, d])], "y_flat")
        else:
            y, _ = g.op(contract.SELECTIVE_SCAN.op_type,
                        [xc, to_bfl(dt, d), p + "A", to_bfl(B, N), to_bfl(C, N), p + "D", p + "dt_proj.bias",
                         to_bfl(z, d), contract.ssm_state_name(i)],
                        domain=contract.DOMAIN, out=[g.scope + "y", contract.ssm_state_name(i, out=True)],
                        **self.scan_attrs())
            y = to_flat(y, d)
        return self.linear(g, y, p + "out_proj", c.bias, (d, c.d_model))
