"""Bodies of the custom ops as ONNX model-local functions (standard ops only).

Each custom node of the artifact (domain ``mamba_deploy``) is backed by a FunctionProto of the same domain and
name, so ONNX Runtime runs the body, TensorRT's parser inlines it, or, with our plugin registered and
ENABLE_PLUGIN_OVERRIDE set, maps the node to the plugin. Ports and attributes come from ``contract.py``.

The math is that of ``ops/selective_scan.py`` (paper notation), all in fp32 whatever the activation dtype:

    δ_t = softplus(δ_raw_t + δ_bias)          threshold τ as torch: δ_raw + bias > τ → identity
    h_t = exp(δ_t ⊗ A) ⊙ h_{t−1} + (δ_t·x_t) ⊗ B_t
    y_t = (⟨h_t, C_t⟩ + D ⊙ x_t) ⊙ SiLU(z_t)   cast back to the dtype of x (CastLike)

``SelectiveScan`` runs the recurrence with ONNX ``Scan`` loops, so the graph does not grow with the sequence
length: by default chunked (≈ 3·√L loop iterations, ``_chunked_scan``), or one iteration per time step
(``_sequential_scan``); ``SelectiveScanStep`` is one step of it.
"""
from __future__ import annotations

import onnx
from onnx import AttributeProto, TensorProto, helper

from . import contract

INT_END = 2**62   # Slice end meaning "to the end"
_SOFTPLUS_LINEAR = 20.0   # softplus(v) == v in fp32 for v > 20 (e^−20 < ulp(20)/2)


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


def _softplus(b: _Body, v: str, keep: str) -> str:
    """Where(keep, v, log(1 + e^v)) — log1p(e) from log(u), u = 1 + e, corrected by the exact rounding error of u:
    log1p(e) = log(u) + log1p(c/u) ≈ log(u) + c with c = e − (u − 1) (exact in floating point; |c| ≤ ulp(1)/2, so
    the approximation errs by ≤ |c|·e, below fp32's resolution). The exp argument is capped at 20, above which
    softplus(v) = v in fp32, so the unselected branch never overflows. Vectorised ops instead of ONNX Runtime's
    scalar Softplus kernel (≈ 20× slower on [256, 1536])."""
    one = b.op("Constant", [], "one", value=helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]))
    e = b.op("Exp", [b.op("Min", [v, _softplus_cap(b)], "v_capped")], "e")
    u = b.op("Add", [e, one], "u")
    c = b.op("Sub", [e, b.op("Sub", [u, one], "u_1")], "round_err")
    return b.op("Where", [keep, v, b.op("Add", [b.op("Log", [u], "log_u"), c], "log1p")], "dt")


def _softplus_cap(b: _Body) -> str:
    return b.op("Constant", [], "cap", value=helper.make_tensor("cap", TensorProto.FLOAT, [], [_SOFTPLUS_LINEAR]))


def _delta(b: _Body, delta_raw: str, delta_bias: str, bias_axes: list[int] | None) -> str:
    """δ = softplus_τ(δ_raw + δ_bias) in fp32 when the attribute delta_softplus is 1, else δ_raw + δ_bias.
    softplus_τ(v) = v if v > τ else log(1 + e^v) — torch's F.softplus(v, beta=1, threshold=τ)."""
    bias = delta_bias if bias_axes is None else b.op("Unsqueeze", [delta_bias, b.const_ints(bias_axes)], "bias")
    v = b.op("Add", [b.f32(delta_raw), bias], "dt_biased")
    tau = b.attr_ref("softplus_threshold", "value_float", "tau")
    use_softplus = b.op("Cast", [b.attr_ref("delta_softplus", "value_int", "use_sp")], "use_sp_b",
                        to=TensorProto.BOOL)
    # v > min(τ, 20) → v: torch's rule for v > τ; for τ ≥ v > 20, torch's log1p(e^v) rounds to v in fp32 anyway
    linear = b.op("Greater", [v, b.op("Min", [tau, _softplus_cap(b)], "tau_capped")], "linear")
    return _softplus(b, v, b.op("Or", [b.op("Not", [use_softplus]), linear], "keep"))


def _gate(b: _Body, y: str, x32: str, D: str, z: str, d_axes: list[int] | None, like: str, out: str | None = None):
    """CastLike((y + x·D) · SiLU(z), like), written to ``out`` (or a fresh name); returns the name."""
    Dv = D if d_axes is None else b.op("Unsqueeze", [D, b.const_ints(d_axes)], "D")
    y = b.op("Add", [y, b.op("Mul", [x32, Dv], "xD")], "yD")
    z32 = b.f32(z)
    silu = b.op("Mul", [z32, b.op("Sigmoid", [z32])], "silu_z")
    y = b.op("Mul", [y, silu], "y_gated")
    out = out or b.fresh("y_out")
    b.nodes.append(helper.make_node("CastLike", [y, like], [out]))
    return out


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


def _scan_body(emit_y: bool = True) -> onnx.GraphProto:
    """One time step inside a Scan: state h [b, d, (nc,) N]; scanned δ_t, δ_t·x_t [b, d, (nc)], B_t, C_t
    [b, (nc,) N] (fp32). ``A_f32`` ([d, N], or [d, 1, N] with a chunk axis) comes from the enclosing scope.
    Emits y_t = ⟨h_t, C_t⟩ [b, d, (nc)] when ``emit_y``; the same body serves the sequential scan (no chunk
    axis) and the chunked scan's local scans (all chunks at once)."""
    b = _Body("t/")
    last, one = b.const_ints([-1], "last"), b.const_ints([1], "one")
    dA = b.op("Exp", [b.op("Mul", [b.op("Unsqueeze", ["h_dt", last]), "A_f32"], "dtA")], "dA")
    dBx = b.op("Mul", [b.op("Unsqueeze", ["h_dtx", last]), b.op("Unsqueeze", ["h_B", one])], "dBx")
    b.nodes.append(helper.make_node("Add", [b.op("Mul", [dA, "h_prev"], "dAh"), dBx], ["h_next"]))
    f = TensorProto.FLOAT
    outputs = [helper.make_tensor_value_info("h_next", f, None)]
    if emit_y:
        b.nodes.append(helper.make_node("ReduceSum", [b.op("Mul", ["h_next", b.op("Unsqueeze", ["h_C", one])],
                                                           "hC"), last], ["y_t"], keepdims=0))
        outputs.append(helper.make_tensor_value_info("y_t", f, None))
    names = ["h_prev", "h_dt", "h_dtx", "h_B"] + (["h_C"] if emit_y else [])
    return helper.make_graph(b.nodes, "selective_scan_step_body" if emit_y else "selective_scan_state_body",
                             [helper.make_tensor_value_info(n, f, None) for n in names], outputs)


def _chunk_scan_body(emit_y: bool) -> onnx.GraphProto:
    """One time step of all chunks at once, channels innermost: state h [b, nc, N, d]; scanned δ_t, δ_t·x_t
    [b, nc, d], B_t, C_t [b, nc, N] (fp32); ``A_nd`` [N, d] from the enclosing scope. Emits y_t = ⟨h_t, C_t⟩
    [b, nc, 1, d] when ``emit_y``. (With d innermost every broadcast runs over contiguous rows of d elements,
    which ONNX Runtime's CPU kernels do far faster than a broadcast over the last axis.)"""
    b = _Body("t/")
    m1, m2 = b.const_ints([-1], "m1"), b.const_ints([-2], "m2")
    dA = b.op("Exp", [b.op("Mul", [b.op("Unsqueeze", ["h_dt", m2]), "A_nd"], "dtA")], "dA")
    dBx = b.op("Mul", [b.op("Unsqueeze", ["h_dtx", m2]), b.op("Unsqueeze", ["h_B", m1])], "dBx")
    b.nodes.append(helper.make_node("Add", [b.op("Mul", [dA, "h_prev"], "dAh"), dBx], ["h_next"]))
    f = TensorProto.FLOAT
    outputs = [helper.make_tensor_value_info("h_next", f, None)]
    if emit_y:   # ⟨h_t, C_t⟩ as a batched [1, N] × [N, d] product → [b, nc, 1, d]
        b.nodes.append(helper.make_node("MatMul", [b.op("Unsqueeze", ["h_C", m2]), "h_next"], ["y_t"]))
        outputs.append(helper.make_tensor_value_info("y_t", f, None))
    names = ["h_prev", "h_dt", "h_dtx", "h_B"] + (["h_C"] if emit_y else [])
    return helper.make_graph(b.nodes, "chunk_scan_step" if emit_y else "chunk_scan_state",
                             [helper.make_tensor_value_info(n, f, None) for n in names], outputs)


def _carry_body() -> onnx.GraphProto:
    """One chunk of the chunk-start Scan: H_c [b, N, d] (start state of chunk c) → H_{c+1} =
    exp(A·Σ_{t∈c} δ_t) ⊙ H_c + h_end_c, where h_end_c [b, N, d] is chunk c's end state from a zero start and
    Σδ [b, 1, d] its δ sum; emits H_c. ``A_nd`` [N, d] comes from the enclosing scope."""
    b = _Body("c/")
    decay = b.op("Exp", [b.op("Mul", ["c_dtsum", "A_nd"], "sA")], "decay")
    b.nodes.append(helper.make_node("Add", [b.op("Mul", [decay, "c_prev"], "decayH"), "c_hend"], ["c_next"]))
    b.nodes.append(helper.make_node("Identity", ["c_prev"], ["c_start"]))
    f = TensorProto.FLOAT
    return helper.make_graph(
        b.nodes, "chunk_carry",
        [helper.make_tensor_value_info(n, f, None) for n in ("c_prev", "c_dtsum", "c_hend")],
        [helper.make_tensor_value_info(n, f, None) for n in ("c_next", "c_start")])


def _sequential_scan(b: _Body, dt: str, dtx: str, B32: str, C32: str, A: str, h0: str, h_out: str) -> str:
    """h_t = exp(δ_t A) h_{t−1} + δ_t x_t B_t, one ONNX Scan iteration per time step (L iterations).
    Returns y = ⟨h_t, C_t⟩ [b, d, L]; writes the final state to ``h_out``."""
    tm = lambda v, hint: b.op("Transpose", [v], hint, perm=[2, 0, 1])       # noqa: E731  [b, ·, L] → [L, b, ·]
    b.nodes.append(helper.make_node("Identity", [A], ["A_f32"]))              # name the body's outer-scope input
    b.nodes.append(helper.make_node("Scan", [h0, tm(dt, "dt_t"), tm(dtx, "dtx_t"), tm(B32, "B_t"), tm(C32, "C_t")],
                                    [h_out, "ss/y_lbd"], num_scan_inputs=4, body=_scan_body()))
    return b.op("Transpose", ["ss/y_lbd"], "y", perm=[1, 2, 0])                # [b, d, L]


def _chunked_scan(b: _Body, dt: str, dtx: str, B32: str, C32: str, A: str, h0: str, h_out: str) -> str:
    """The same recurrence as :func:`_sequential_scan` in ≈ 3·√L Scan iterations instead of L (chunk length
    T = ⌈√L⌉, nc = ⌈L/T⌉ chunks; the tail padded with δ = 0, which leaves the state untouched):

      1. local scans, all chunks at once (T iterations): each chunk's end state h_end_c from a zero start;
      2. chunk start states (nc iterations): H_{c+1} = exp(A·Σ_{t∈c} δ_t) ⊙ H_c + h_end_c, H_0 = h_0;
      3. the local scans again, all chunks at once from their true start states H_c, emitting y (T iterations).

    Every exp is of a non-positive number (A < 0, δ ≥ 0): nothing overflows at any L, no cumsum-and-divide;
    memory O(b·nc·N·d). Inside, channels are the innermost axis (states [b, nc, N, d]). The torch twin is
    ``ops.selective_scan.selective_scan_chunked``. δ, δ·x: [b, L, d]; B, C: [b, L, N]; A [d, N]; h_0 [b, d, N].
    Returns y [b, L, d]; writes the final state [b, d, N] to ``h_out``.
    """
    i64, f32 = TensorProto.INT64, TensorProto.FLOAT
    shape = b.op("Shape", [dt], "shape_bld")                                             # [b, L, d]
    L = b.op("Slice", [shape, b.const_ints([1]), b.const_ints([2])], "L")
    sqrt_l = b.op("Sqrt", [b.op("Cast", [L], "L_f", to=f32)], "sqrtL")             # exact for L < 2^24
    T = b.op("Cast", [b.op("Ceil", [sqrt_l], "ceil")], "T", to=i64)                      # chunk length ⌈√L⌉
    nc = b.op("Div", [b.op("Sub", [b.op("Add", [L, T], "L_T"), b.const_ints([1])], "L_T_1"), T], "nc")
    padded = b.op("Mul", [nc, T], "ncT")
    pads = b.op("Concat", [b.const_ints([0]), b.op("Sub", [padded, L], "pad")], "pads", axis=0)
    zero = b.op("Constant", [], "zero", value=helper.make_tensor("zero", f32, [], [0.0]))
    shape4 = b.op("Concat", [b.const_ints([0]), nc, T, b.const_ints([-1])], "shape4", axis=0)
    axis1 = b.const_ints([1])

    def time_major(v, hint):   # [b, L, f] → [b, nc, T, f] (zero-padded tail) → [T, b, nc, f]
        v = b.op("Reshape", [b.op("Pad", [v, pads, zero, axis1], hint + "_pad"), shape4], hint + "_c")
        return b.op("Transpose", [v], hint + "_t", perm=[2, 0, 1, 3])

    dt_t, dtx_t = time_major(dt, "dt"), time_major(dtx, "dtx")                          # [T, b, nc, d]
    B_t, C_t = time_major(B32, "B"), time_major(C32, "C")                                # [T, b, nc, N]
    b.nodes.append(helper.make_node("Transpose", [A], ["A_nd"], perm=[1, 0]))          # outer-scope input [N, d]
    # 1. end state of every chunk from a zero start
    hw = b.op("Concat", [b.op("Slice", [shape, b.const_ints([0]), axis1], "batch"), nc,
                         b.op("Shape", ["A_nd"], "shape_nd")], "shape_h", axis=0)        # [b, nc, N, d]
    zeros = b.op("ConstantOfShape", [hw], "h_zero", value=helper.make_tensor("z", f32, [1], [0.0]))
    h_end = b.op("Scan", [zeros, dt_t, dtx_t, B_t], "local", num_scan_inputs=3, body=_chunk_scan_body(False))
    # 2. chunk start states
    dtsum = b.op("Transpose", [b.op("ReduceSum", [dt_t, b.const_ints([0])], "dtsum", keepdims=1)], "dtsum_c",
                 perm=[2, 1, 0, 3])                                                       # Σδ [nc, b, 1, d]
    h0_nd = b.op("Transpose", [h0], "h0_nd", perm=[0, 2, 1])                             # [b, N, d]
    h_last, starts = b.op("Scan", [h0_nd, dtsum, b.op("Transpose", [h_end], "h_end_c", perm=[1, 0, 2, 3])],
                          "carry", n_out=2, num_scan_inputs=2, body=_carry_body())       # starts [nc, b, N, d]
    b.nodes.append(helper.make_node("Transpose", [h_last], [h_out], perm=[0, 2, 1]))
    # 3. the local scans from the true start states, emitting y
    starts = b.op("Transpose", [starts], "starts_b", perm=[1, 0, 2, 3])                  # [b, nc, N, d]
    _, y = b.op("Scan", [starts, dt_t, dtx_t, B_t, C_t], "rescan", n_out=2, num_scan_inputs=4,
                body=_chunk_scan_body(True))                                              # y [T, b, nc, 1, d]
    y = b.op("Reshape", [b.op("Transpose", [y], "y_c", perm=[1, 2, 3, 0, 4]),           # [b, nc, 1, T, d]
                         b.op("Concat", [b.const_ints([0]), padded, b.const_ints([-1])], "shape3", axis=0)],
             "y_pad")                                                                     # [b, nc·T, d]
    return b.op("Slice", [y, b.const_ints([0]), L, axis1], "y")                         # [b, L, d]


SCAN_ALGORITHMS = {"chunked": _chunked_scan, "sequential": _sequential_scan}


def selective_scan_function(opset: int, algorithm: str = "chunked") -> onnx.FunctionProto:
    """SelectiveScan: x, δ_raw, z [b, d, L]; A [d, N]; B, C [b, N, L]; D, δ_bias [d]; h_0 [b, d, N] fp32.
    ``algorithm``: "chunked" (≈ 3√L Scan iterations, the default) or "sequential" (L iterations).

    The chunked body works on [b, L, features] views (one Transpose per input and for y): the prefill graph
    produces δ_raw, z, B, C and consumes y in that layout, so ONNX Runtime cancels those Transpose pairs once
    it has inlined the function, and the chunk views below it are block copies of whole feature rows."""
    b = _Body("ss/")
    x, delta, A, B, C, D, delta_bias, z, h0 = (p.name for p in contract.SELECTIVE_SCAN.inputs)
    y_name, h_out = (p.name for p in contract.SELECTIVE_SCAN.outputs)
    if algorithm == "sequential":
        dt = _delta(b, delta, delta_bias, [-1])                                   # [b, d, L]
        x32 = b.f32(x)
        y = _sequential_scan(b, dt, b.op("Mul", [dt, x32], "dtx"), b.f32(B), b.f32(C), A, h0, h_out)
        _gate(b, y, x32, D, z, [-1], x, y_name)
    elif algorithm == "chunked":
        bLf = lambda v: b.op("Transpose", [v], v + "_bLf", perm=[0, 2, 1])     # noqa: E731  [b, f, L] → [b, L, f]
        dt = _delta(b, bLf(delta), delta_bias, None)                              # [b, L, d]
        x32 = b.f32(bLf(x))
        y = _chunked_scan(b, dt, b.op("Mul", [dt, x32], "dtx"), b.f32(bLf(B)), b.f32(bLf(C)), A, h0, h_out)
        y = _gate(b, y, x32, D, bLf(z), None, x)
        b.nodes.append(helper.make_node("Transpose", [y], [y_name], perm=[0, 2, 1]))
    else:
        raise ValueError(f"unknown scan algorithm {algorithm!r}; choose one of {SCAN_ALGORITHMS}")
    return _function(contract.SELECTIVE_SCAN, b, opset)


def functions(opset: int, prefill_scan: str = "chunked") -> list[onnx.FunctionProto]:
    """The function of every custom op; ``prefill_scan`` picks SelectiveScan's algorithm (see SCAN_ALGORITHMS)."""
    return [selective_scan_step_function(opset), selective_scan_function(opset, prefill_scan)]


# ---- Mamba-2 (SSD) ---------------------------------------------------------------------------------------------
# The math of ops/ssd.py, in fp32: δ = clip(softplus_τ(δ_raw + dt_bias), dt_min, dt_max) per head;
# h_t = exp(δ_t·A)·h_{t−1} + (δ_t·x_t) ⊗ B_t;  y_t = h_t·C_t + D ⊙ x_t; B, C expanded from G groups to H heads.

def _ssd_dt(b: _Body, dt_raw: str, dt_bias: str) -> str:
    """δ [.., H] fp32 from δ_raw [.., H] (dt_bias [H] broadcasts over the leading axes)."""
    v = b.op("Add", [b.f32(dt_raw), dt_bias], "dt_biased")
    tau = b.attr_ref("softplus_threshold", "value_float", "tau")
    use_softplus = b.op("Cast", [b.attr_ref("dt_softplus", "value_int", "use_sp")], "use_sp_b", to=TensorProto.BOOL)
    keep = b.op("Or", [b.op("Not", [use_softplus]), b.op("Greater", [v, tau])], "keep")
    dt = b.op("Where", [keep, v, b.op("Softplus", [v])], "dt_sp")
    return b.op("Clip", [dt, b.attr_ref("dt_min", "value_float", "dt_min"),
                         b.attr_ref("dt_max", "value_float", "dt_max")], "dt")


def _groups_to_heads(b: _Body, t: str, x: str, g_axis: int) -> str:
    """t [..., G, N] (G at ``g_axis``) → [..., H, N] fp32, head h reading group h // (H/G); H = x.shape[g_axis]."""
    t = b.f32(t)
    shape = b.op("Shape", [t], "shape_t")
    lead = b.op("Slice", [shape, b.const_ints([0]), b.const_ints([g_axis])], "lead")
    G = b.op("Slice", [shape, b.const_ints([g_axis]), b.const_ints([g_axis + 1])], "G")
    N = b.op("Slice", [shape, b.const_ints([g_axis + 1]), b.const_ints([g_axis + 2])], "N")
    H = b.op("Slice", [b.op("Shape", [x], "shape_x"), b.const_ints([g_axis]), b.const_ints([g_axis + 1])], "H")
    per_group = b.op("Div", [H, G], "heads_per_group")
    expanded = b.op("Expand", [b.op("Unsqueeze", [t, b.const_ints([g_axis + 1])], "t1"),
                               b.op("Concat", [lead, G, per_group, N], "exp_shape", axis=0)], "t_exp")
    return b.op("Reshape", [expanded, b.op("Concat", [lead, H, N], "head_shape", axis=0)], "t_heads")


def _ssd_skip(b: _Body, y: str, x32: str, D: str, like: str, out: str):
    """out = CastLike(y + D ⊙ x, like); D [H, P] or [H, 1] broadcasts over the leading axes."""
    b.nodes.append(helper.make_node("CastLike", [b.op("Add", [y, b.op("Mul", [x32, D], "xD")], "yD"), like], [out]))


def ssd_scan_step_function(opset: int) -> onnx.FunctionProto:
    """SSDScanStep: x [b, H, P]; δ_raw [b, H]; A, dt_bias [H]; B, C [b, G, N]; D [H, P|1]; h [b, H, P, N] fp32."""
    b = _Body("ssds/")
    x, dt_raw, A, B, C, D, dt_bias, h = (p.name for p in contract.SSD_SCAN_STEP.inputs)
    y_name, h_out = (p.name for p in contract.SSD_SCAN_STEP.outputs)
    dt = _ssd_dt(b, dt_raw, dt_bias)                                                          # [b, H]
    x32 = b.f32(x)
    decay = b.op("Unsqueeze", [b.op("Exp", [b.op("Mul", [dt, A], "dtA")], "dA"), b.const_ints([2, 3])], "dA4")
    dtx = b.op("Mul", [b.op("Unsqueeze", [dt, b.const_ints([2])], "dt3"), x32], "dtx")        # [b, H, P]
    Bh = b.op("Unsqueeze", [_groups_to_heads(b, B, x, 1), b.const_ints([2])], "B4")          # [b, H, 1, N]
    dBx = b.op("Mul", [b.op("Unsqueeze", [dtx, b.const_ints([3])], "dtx4"), Bh], "dBx")       # [b, H, P, N]
    b.nodes.append(helper.make_node("Add", [b.op("Mul", [decay, h], "dAh"), dBx], [h_out]))
    Ch = b.op("Unsqueeze", [_groups_to_heads(b, C, x, 1), b.const_ints([2])], "C4")
    y = b.op("ReduceSum", [b.op("Mul", [h_out, Ch], "hC"), b.const_ints([-1])], "y", keepdims=0)
    _ssd_skip(b, y, x32, D, x, y_name)
    return _function(contract.SSD_SCAN_STEP, b, opset)


SSD_CHUNK = 64   # chunk length of the SSDScan body (shorter sequences: one chunk of their length)


def _ssd_chunk_body() -> onnx.GraphProto:
    """One chunk inside the Scan (the matrix form of ops/ssd.py ``ssd_scan_chunked``): state S [b, H, P, N];
    scanned per chunk of Q positions: δ·x [b, Q, H, P], a = δ·A [b, Q, H], B, C [b, Q, H, N] (fp32, per head)."""
    b = _Body("ck/")
    f = TensorProto.FLOAT
    a = b.op("Transpose", ["c_a"], "aT", perm=[0, 2, 1])                                     # [b, H, Q]
    X = b.op("Transpose", ["c_dtx"], "X", perm=[0, 2, 1, 3])                                 # [b, H, Q, P]
    Bh = b.op("Transpose", ["c_B"], "Bh", perm=[0, 2, 1, 3])                                 # [b, H, Q, N]
    Ch = b.op("Transpose", ["c_C"], "Ch", perm=[0, 2, 1, 3])
    Q = b.op("Slice", [b.op("Shape", [a], "shape_a"), b.const_ints([2]), b.const_ints([3])], "Q")
    ones = b.op("ConstantOfShape", [b.op("Concat", [Q, Q], "QQ", axis=0)], "ones",
                value=helper.make_tensor("one", f, [1], [1.0]))
    below = b.op("Trilu", [ones, b.const_ints([-1])], "below", upper=0)                      # i > j
    on_or_below = b.op("Cast", [b.op("Trilu", [ones], "tril", upper=0)], "incl", to=TensorProto.BOOL)
    # segment sums S[i, j] = Σ_{j<k≤i} a_k, each summed from its own terms (cumsum down a masked copy)
    seg = b.op("CumSum", [b.op("Mul", [b.op("Unsqueeze", [a, b.const_ints([-1])], "a_col"), below], "terms"),
                          b.const_ints([2])], "seg")
    neg_inf = b.op("Constant", [], "neg_inf", value=helper.make_tensor("neg_inf", f, [], [float("-inf")]))
    decay = b.op("Exp", [b.op("Where", [on_or_below, seg, neg_inf], "seg_masked")], "L")    # [b, H, Q, Q]
    # within the chunk: y_i = Σ_{j≤i} exp(S[i, j]) (C_i·B_j) δ_j x_j
    scores = b.op("Mul", [b.op("MatMul", [Ch, b.op("Transpose", [Bh], "BhT", perm=[0, 1, 3, 2])], "CB"), decay],
                  "scores")
    y = b.op("MatMul", [scores, X], "y_diag")
    # the start state read out: C_i·S_start·exp(Σ_{k≤i} a_k)
    from_start = b.op("Exp", [b.op("CumSum", [a, b.const_ints([2])], "a_cum")], "from_start")
    y_off = b.op("MatMul", [Ch, b.op("Transpose", ["c_prev"], "SprevT", perm=[0, 1, 3, 2])], "CS")
    y = b.op("Add", [y, b.op("Mul", [y_off, b.op("Unsqueeze", [from_start, b.const_ints([-1])], "fs4")], "y_off")],
             "y_chunk")
    b.nodes.append(helper.make_node("Transpose", [y], ["c_y"], perm=[0, 2, 1, 3]))            # [b, Q, H, P]
    # next state: exp(Σ_chunk a)·S + Σ_j exp(S[Q−1, j]) (δ_j x_j) ⊗ B_j
    last = b.op("Sub", [Q, b.const_ints([1])], "Q_1")
    to_end = b.op("Gather", [decay, b.op("Squeeze", [last], "q_last")], "to_end", axis=2)   # [b, H, Q]
    weighted = b.op("Mul", [X, b.op("Unsqueeze", [to_end, b.const_ints([-1])], "te4")], "X_w")
    inflow = b.op("MatMul", [b.op("Transpose", [weighted], "XwT", perm=[0, 1, 3, 2]), Bh], "inflow")  # [b,H,P,N]
    total = b.op("Exp", [b.op("ReduceSum", [a, b.const_ints([2])], "a_sum", keepdims=1)], "chunk_decay")  # [b,H,1]
    carried = b.op("Mul", [b.op("Unsqueeze", [total, b.const_ints([-1])], "cd4"), "c_prev"], "carried")
    b.nodes.append(helper.make_node("Add", [carried, inflow], ["c_next"]))
    return helper.make_graph(
        b.nodes, "ssd_chunk_body",
        [helper.make_tensor_value_info(n, f, None) for n in ("c_prev", "c_dtx", "c_a", "c_B", "c_C")],
        [helper.make_tensor_value_info("c_next", f, None), helper.make_tensor_value_info("c_y", f, None)])


def ssd_scan_function(opset: int) -> onnx.FunctionProto:
    """SSDScan: x [b, L, H, P]; δ_raw [b, L, H]; A, dt_bias [H]; B, C [b, L, G, N]; D [H, P|1]; h_0 [b, H, P, N].

    The chunked SSD (chunks of Q = min(SSD_CHUNK, L) positions, the tail padded with δ = 0, which leaves the state
    untouched) runs as an ONNX ``Scan`` over chunks, so the graph does not grow with L and the state is passed once
    per chunk, not once per position."""
    b = _Body("ssd/")
    x, dt_raw, A, B, C, D, dt_bias, h0 = (p.name for p in contract.SSD_SCAN.inputs)
    y_name, h_out = (p.name for p in contract.SSD_SCAN.outputs)
    dt = _ssd_dt(b, dt_raw, dt_bias)                                                          # [b, L, H]
    x32 = b.f32(x)
    dtx = b.op("Mul", [b.op("Unsqueeze", [dt, b.const_ints([3])], "dt4"), x32], "dtx")        # [b, L, H, P]
    a = b.op("Mul", [dt, A], "a")                                                             # δ·A [b, L, H]
    Bh, Ch = _groups_to_heads(b, B, x, 2), _groups_to_heads(b, C, x, 2)                       # [b, L, H, N]
    # chunking: L → nc·Q (zero padding), [b, nc·Q, ...] → [nc, b, Q, ...]
    L = b.op("Slice", [b.op("Shape", [x], "shape_x"), b.const_ints([1]), b.const_ints([2])], "L")
    Q = b.op("Max", [b.op("Min", [L, b.const_ints([SSD_CHUNK])], "Q0"), b.const_ints([1])], "Q")
    nc = b.op("Div", [b.op("Sub", [b.op("Add", [L, Q], "LQ"), b.const_ints([1])], "LQ1"), Q], "nc")
    pad = b.op("Sub", [b.op("Mul", [nc, Q], "ncQ"), L], "pad")
    zero = b.const_ints([0])

    def chunked(t, rank):   # pad axis 1, then [b, nc·Q, *rest] → [nc, b, Q, *rest]
        pads = b.op("Concat", [zero, zero] + [zero] * (rank - 2) + [zero, pad] + [zero] * (rank - 2), "pads", axis=0)
        t = b.op("Pad", [t, pads], "padded")
        dims = b.op("Shape", [t], "shape_t")
        shape = b.op("Concat", [b.op("Slice", [dims, b.const_ints([0]), b.const_ints([1])], "batch"), nc, Q,
                                b.op("Slice", [dims, b.const_ints([2]), b.const_ints([rank])], "rest")],
                     "chunk_shape", axis=0)
        t = b.op("Reshape", [t, shape], "chunks")
        return b.op("Transpose", [t], "chunk_major", perm=[1, 0] + list(range(2, rank + 1)))

    scanned = [chunked(dtx, 4), chunked(a, 3), chunked(Bh, 4), chunked(Ch, 4)]
    b.nodes.append(helper.make_node("Scan", [h0] + scanned, [h_out, "ssd/y_chunks"], num_scan_inputs=4,
                                    body=_ssd_chunk_body()))
    y = b.op("Transpose", ["ssd/y_chunks"], "y_bc", perm=[1, 0, 2, 3, 4])                   # [b, nc, Q, H, P]
    dims = b.op("Shape", [y], "shape_y")
    y = b.op("Reshape", [y, b.op("Concat", [b.op("Slice", [dims, zero, b.const_ints([1])], "batch"),
                                            b.const_ints([-1]),
                                            b.op("Slice", [dims, b.const_ints([3]), b.const_ints([5])], "HP")],
                                 "flat_shape", axis=0)], "y_padded")                          # [b, nc·Q, H, P]
    y = b.op("Slice", [y, zero, L, b.const_ints([1])], "y")                                   # [b, L, H, P]
    _ssd_skip(b, y, x32, D, x, y_name)
    return _function(contract.SSD_SCAN, b, opset)




def ssd_functions(opset: int) -> list[onnx.FunctionProto]:
    return [ssd_scan_step_function(opset), ssd_scan_function(opset)]


def is_standard_domain(domain: str) -> bool:
    return domain in ("", "ai.onnx")
