"""ONNX emitter of the FalconMamba block: Mamba-1's (families/mamba1/graph.py) with the weight-less RMSNorms on
δ_r, B and C after x_proj (fp32, ε = mixer_rms_eps, cast back to the export dtype), as block.FalconMambaMixer."""
from __future__ import annotations

from onnx import helper

from ...onnx.export import F32, GraphBuilder
from ..mamba1.graph import Mamba1Graphs


class FalconMambaGraphs(Mamba1Graphs):
    def _rms(self, g: GraphBuilder, v):
        vf = self.to_f32(g, v)
        ms = g.op("ReduceMean", [g.op("Mul", [vf, vf], "sq"), g.ints([-1])], "ms", keepdims=1)
        eps = f"{g.scope}mixer_rms_eps_{len(g.nodes)}"
        g.op("Constant", [], out=eps, value=helper.make_tensor(eps, F32, [], [self.cfg.mixer_rms_eps]))
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, eps], "ms_eps")], "rms")], "inv_rms")
        return self.to_act(g, g.op("Mul", [vf, inv], "normed"))

    def project_x(self, g: GraphBuilder, xc, p: str):
        c = self.cfg
        dt, B, C = g.op("Split", [self.linear(g, xc, p + "x_proj", False), g.ints([c.dt_rank_value, c.d_state,
                                                                                   c.d_state])],
                        "dbc", n_out=3, axis=-1)
        return self.linear(g, self._rms(g, dt), p + "dt_proj", False), self._rms(g, B), self._rms(g, C)


