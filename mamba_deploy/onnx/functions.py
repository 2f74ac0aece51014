"""Bodies of the custom ops as ONNX model-local functions (standard ops only).

Each custom node of the artifact (domain ``mamba_deploy``) is backed by a FunctionProto of the same domain and
name, so ONNX Runtime runs the body, TensorRT's parser inlines it, or, with our plugin registered and
ENABLE_PLUGIN_OVERRIDE set, maps the node to the plugin. Ports and attributes come from ``contract.py``.

The math is that of ``ops/selective_scan.py`` (paper notation), all in fp32 whatever the activation dtype:

    δ_t = softplus(δ_raw_t + δ_bias)          threshold τ as torch: δ_raw + bias > τ → identity
    h_t = exp(δ_t ⊗ A) ⊙ h_{t−1} + (δ_t·x_t) ⊗ B_t
    y_t = (⟨h_t, C_t⟩ + D ⊙ x_t) ⊙ SiLU(z_t)   cast back to the dtype of x (CastLike)

``SelectiveScan`` runs the recurrence with an ONNX ``Scan`` over the time axis, so the graph does not grow with
the sequence length; ``SelectiveScanStep`` is one step of it.
"""
from __future__ import annotations

import onnx
from onnx import AttributeProto, TensorProto, helper

from . import contract


class _Body:
    """Collects the nodes of one function body; ``op`` appends a node and returns its output name(s)."""

    def __init__(self, prefix: str):
        self.nodes: list[onnx.NodeProto] = []
        self.prefix = prefix
        self.count = 0

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{self.prefix}{hint}_{self.count}"

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, n_out: int = 1, **attrs):
        outs = [self.fresh(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def const_ints(self, values: list[int], hint: str = "c") -> str:
        return self.op("Constant", [], hint, value=helper.make_tensor(self.fresh(hint), TensorProto.INT64,
                                                                      [len(values)], values))

    def attr_ref(self, attr: str, value_key: str, hint: str) -> str:
        """A Constant whose value is the function's attribute ``attr`` (ref_attr_name)."""
        ref = AttributeProto()
        ref.name = value_key
        ref.ref_attr_name = attr
        ref.type = AttributeProto.FLOAT if value_key == "value_float" else AttributeProto.INT
        node = helper.make_node("Constant", [], [self.fresh(hint)])
        node.attribute.append(ref)
        self.nodes.append(node)
        return node.output[0]

    def f32(self, name: str) -> str:
        return self.op("Cast", [name], name.split("/")[-1] + "_f32", to=TensorProto.FLOAT)


def _delta(b: _Body, delta_raw: str, delta_bias: str, bias_axes: list[int] | None) -> str:
    """δ = softplus_τ(δ_raw + δ_bias) in fp32 when the attribute delta_softplus is 1, else δ_raw + δ_bias.
    softplus_τ(v) = v if v > τ else log(1 + e^v) — torch's F.softplus(v, beta=1, threshold=τ)."""
    bias = delta_bias if bias_axes is None else b.op("Unsqueeze", [delta_bias, b.const_ints(bias_axes)], "bias")
    v = b.op("Add", [b.f32(delta_raw), bias], "dt_biased")
    tau = b.attr_ref("softplus_threshold", "value_float", "tau")
    use_softplus = b.op("Cast", [b.attr_ref("delta_softplus", "value_int", "use_sp")], "use_sp_b",
                        to=TensorProto.BOOL)
    keep = b.op("Or", [b.op("Not", [use_softplus]), b.op("Greater", [v, tau])], "keep")
    return b.op("Where", [keep, v, b.op("Softplus", [v])], "dt")


def _gate(b: _Body, y: str, x32: str, D: str, z: str, d_axes: list[int] | None, like: str, out: str):
    """out = CastLike((y + x·D) · SiLU(z), like)."""
    Dv = D if d_axes is None else b.op("Unsqueeze", [D, b.const_ints(d_axes)], "D")
    y = b.op("Add", [y, b.op("Mul", [x32, Dv], "xD")], "yD")
    z32 = b.f32(z)
    silu = b.op("Mul", [z32, b.op("Sigmoid", [z32])], "silu_z")
    y = b.op("Mul", [y, silu], "y_gated")
    b.nodes.append(helper.make_node("CastLike", [y, like], [out]))


def _function(spec: contract.OpSpec, body: _Body, opset: int) -> onnx.FunctionProto:
    attrs = []
    for name, default in spec.attributes.items():
        attrs.append(helper.make_attribute(name, default))
    fn = helper.make_function(
        contract.DOMAIN, spec.op_type, [p.name for p in spec.inputs], [p.name for p in spec.outputs], body.nodes,
        opset_imports=[helper.make_opsetid("", opset)], attributes=[], doc_string=spec.doc)
    fn.attribute_proto.extend(attrs)  # attributes with defaults (IR >= 9)
    return fn


def selective_scan_step_function(opset: int) -> onnx.FunctionProto:
    """SelectiveScanStep: x, δ_raw, z [b, d]; A [d, N]; B, C [b, N]; D, δ_bias [d]; h [b, d, N] fp32."""
    b = _Body("sss/")
    x, delta, A, B, C, D, delta_bias, z, h = (p.name for p in contract.SELECTIVE_SCAN_STEP.inputs)
    y_name, h_out = (p.name for p in contract.SELECTIVE_SCAN_STEP.outputs)
    dt = _delta(b, delta, delta_bias, None)                                   # [b, d]
    x32 = b.f32(x)
    last = b.const_ints([-1])
    dA = b.op("Exp", [b.op("Mul", [b.op("Unsqueeze", [dt, last]), A], "dtA")], "dA")        # [b, d, N]
    dtx = b.op("Mul", [dt, x32], "dtx")                                                      # δ·x [b, d]
    B1 = b.op("Unsqueeze", [b.f32(B), b.const_ints([1])], "B1")                             # [b, 1, N]
    dBx = b.op("Mul", [b.op("Unsqueeze", [dtx, last]), B1], "dBx")                          # [b, d, N]
    b.nodes.append(helper.make_node("Add", [b.op("Mul", [dA, h], "dAh"), dBx], [h_out]))   # h_t
    C1 = b.op("Unsqueeze", [b.f32(C), b.const_ints([1])], "C1")
    y = b.op("ReduceSum", [b.op("Mul", [h_out, C1], "hC"), last], "y", keepdims=0)         # ⟨h_t, C_t⟩
    _gate(b, y, x32, D, z, None, x, y_name)
    return _function(contract.SELECTIVE_SCAN_STEP, b, opset)


def _scan_body() -> onnx.GraphProto:
    """One time step inside the Scan: state h [b, d, N]; scanned δ_t, δ_t·x_t [b, d], B_t, C_t [b, N] (fp32).
    A [d, N] comes from the enclosing scope."""
    b = _Body("t/")
    last, one = b.const_ints([-1], "last"), b.const_ints([1], "one")
    dA = b.op("Exp", [b.op("Mul", [b.op("Unsqueeze", ["h_dt", last]), "A_f32"], "dtA")], "dA")
    dBx = b.op("Mul", [b.op("Unsqueeze", ["h_dtx", last]), b.op("Unsqueeze", ["h_B", one])], "dBx")
    b.nodes.append(helper.make_node("Add", [b.op("Mul", [dA, "h_prev"], "dAh"), dBx], ["h_next"]))
    b.nodes.append(helper.make_node("ReduceSum", [b.op("Mul", ["h_next", b.op("Unsqueeze", ["h_C", one])], "hC"),
                                                  last], ["y_t"], keepdims=0))
    f = TensorProto.FLOAT
    return helper.make_graph(
        b.nodes, "selective_scan_step_body",
        [helper.make_tensor_value_info("h_prev", f, None), helper.make_tensor_value_info("h_dt", f, None),
         helper.make_tensor_value_info("h_dtx", f, None), helper.make_tensor_value_info("h_B", f, None),
         helper.make_tensor_value_info("h_C", f, None)],
        [helper.make_tensor_value_info("h_next", f, None), helper.make_tensor_value_info("y_t", f, None)])


def selective_scan_function(opset: int) -> onnx.FunctionProto:
    """SelectiveScan: x, δ_raw, z [b, d, L]; A [d, N]; B, C [b, N, L]; D, δ_bias [d]; h_0 [b, d, N] fp32."""
    b = _Body("ss/")
    x, delta, A, B, C, D, delta_bias, z, h0 = (p.name for p in contract.SELECTIVE_SCAN.inputs)
    y_name, h_out = (p.name for p in contract.SELECTIVE_SCAN.outputs)
    dt = _delta(b, delta, delta_bias, [-1])                                   # [b, d, L]
    x32 = b.f32(x)
    dtx = b.op("Mul", [dt, x32], "dtx")
    # time-major views for the Scan (iterating over axis 0)
    dt_t = b.op("Transpose", [dt], "dt_t", perm=[2, 0, 1])                    # [L, b, d]
    dtx_t = b.op("Transpose", [dtx], "dtx_t", perm=[2, 0, 1])                 # [L, b, d]
    B_t = b.op("Transpose", [b.f32(B)], "B_t", perm=[2, 0, 1])                # [L, b, N]
    C_t = b.op("Transpose", [b.f32(C)], "C_t", perm=[2, 0, 1])                # [L, b, N]
    b.nodes.append(helper.make_node("Identity", [A], ["A_f32"]))              # name the body's outer-scope input
    b.nodes.append(helper.make_node("Scan", [h0, dt_t, dtx_t, B_t, C_t], [h_out, "ss/y_lbd"], num_scan_inputs=4,
                                    body=_scan_body()))
    y = b.op("Transpose", ["ss/y_lbd"], "y", perm=[1, 2, 0])                  # [b, d, L]
    _gate(b, y, x32, D, z, [-1], x, y_name)
    return _function(contract.SELECTIVE_SCAN, b, opset)


def functions(opset: int) -> list[onnx.FunctionProto]:
    return [selective_scan_step_function(opset), selective_scan_function(opset)]


def is_standard_domain(domain: str) -> bool:
    return domain in ("", "ai.onnx")
