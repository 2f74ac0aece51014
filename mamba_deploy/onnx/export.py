"""Build the ONNX artifact of a model: step.onnx, prefill.onnx, one shared weights file, manifest.json.

The graphs are written directly with ``onnx.helper``, node by node, following the PyTorch reference line by line:
``LMGraphs`` here writes the shared language model (model.py: embedding, residual stream, RMSNorm, lm_head, state
I/O) and the family's emitter (``Family.graph_emitter()``, e.g. families/mamba1/graph.py) subclasses it with the
block's nodes. File names, dtype names and the manifest come from artifact.py, the initializers (names, dtype
rules) from the family's weight table. Every cast sits where PyTorch has it:

* embedding, linear layers and the conv state in the export dtype (fp32/fp16/bf16);
* the residual stream in fp32 when ``residual_in_fp32``; RMSNorm in fp32, result cast to the export dtype;
* the causal conv in fp32 (conv weight/bias upcast), SiLU, cast back; the selective scan (custom node, body in
  ``functions.py``) in fp32 with an fp32 SSM state; logits computed in the export dtype and cast to fp32.

Linear layers are ``Gemm(x, W, transB=1)`` on the checkpoint's own [out, in] weights, so the tied lm_head reads
the embedding table itself. Tensors that PyTorch upcasts before use (norm weights, conv weight/bias, D, δ bias)
are stored in fp32 (the upcast is exact), and A = −exp(A_log) is stored precomputed (same torch op, same bits):
the weight table's ``artifact`` column and ``to_artifact`` transform say so per tensor.
All initializers live in one external-data file that both graphs reference (no 2 GB protobuf limit, no copy).
"""
from __future__ import annotations

import collections
import re
import shutil
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper

from .. import __version__, artifact
from ..errors import UserError
from ..families import family_of, weight_table
from ..model import MambaLM
from . import contract
from . import standard_ops
from .functions import SCAN_ALGORITHMS, functions, ssd_functions
from .quantize import QDQ_MIN_OPSET, QuantSpec, is_quantized, linear_op, quantize_weight

ALIGN = 4096                       # page-aligned offsets let runtimes memory-map the weights
INT_MAX = 2**62
F32 = TensorProto.FLOAT


def max_opset() -> int:
    """Newest default-domain opset the contract's IR version allows (opsets above it are standard-op forms)."""
    return max(row[2] for row in helper.VERSION_TABLE if row[1] <= contract.IR_VERSION)


MIN_OPSET = 18                     # ReduceMean/ReduceSum take axes as an input, Split takes sizes as an input


def check_opset(opset: int) -> int:
    """Opsets MIN_OPSET…max_opset() (custom-op form) and standard_ops.MIN_OPSET (the standard-op form)."""
    defined = onnx.defs.onnx_opset_version() >= standard_ops.MIN_OPSET
    if not (MIN_OPSET <= opset <= max_opset() or (opset == standard_ops.MIN_OPSET and defined)):
        extra = f" or {standard_ops.MIN_OPSET} (standard-op form)" if defined else \
            f" ({standard_ops.MIN_OPSET}, the standard-op form, needs onnx >= 1.23)"
        raise UserError(f"--opset {opset} is not supported; choose {MIN_OPSET}…{max_opset()}{extra}")
    return opset


def check_prefill_scan(name: str) -> str:
    if name not in SCAN_ALGORITHMS:
        raise UserError(f"unknown prefill scan {name!r}; choose one of {', '.join(SCAN_ALGORITHMS)}")
    return name


def check_quant(quant: QuantSpec | None, act_dtype: torch.dtype, opset: int) -> None:
    if quant is None:
        return
    if act_dtype != torch.float32:
        raise UserError("--quantize quantizes fp32 weights (activations and scales stay fp32); export with "
                        "--dtype fp32")
    if quant.fmt == "qdq" and opset < QDQ_MIN_OPSET:
        raise UserError(f"--quant-format qdq needs --opset {QDQ_MIN_OPSET} or newer (int4 tensors, blocked "
                        f"DequantizeLinear); got {opset}")


def ir_version_for(opset: int) -> int:
    """The contract's IR version, or the lowest IR version that carries ``opset`` if that is higher."""
    return max(contract.IR_VERSION, helper.find_min_ir_version_for([helper.make_opsetid("", opset)]))


# ---- weights ---------------------------------------------------------------------------------------------------
class WeightStore:
    """Initializers of both graphs, written once to one external-data file at page-aligned offsets."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = open(self.path, "wb")
        self.tensors: dict[str, TensorProto] = {}

    def add(self, name: str, tensor: torch.Tensor) -> str:
        t = tensor.detach().to("cpu").contiguous()
        offset = -self.file.tell() % ALIGN
        self.file.write(b"\0" * offset)
        offset = self.file.tell()
        raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        self.file.write(memoryview(raw.numpy()).cast("B"))
        proto = TensorProto()
        proto.name = name
        proto.data_type = artifact.onnx_dtype(t.dtype)
        proto.dims.extend(t.shape)
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", offset), ("length", t.numel() * t.element_size())):
            entry = proto.external_data.add()
            entry.key, entry.value = key, str(value)
        self.tensors[name] = proto
        return name

    def add_quantized(self, tensor) -> str:
        """A quantize.QuantTensor (raw bytes already in ONNX layout)."""
        offset = -self.file.tell() % ALIGN
        self.file.write(b"\0" * offset)
        offset = self.file.tell()
        self.file.write(tensor.raw)
        proto = TensorProto()
        proto.name = tensor.name
        proto.data_type = tensor.data_type
        proto.dims.extend(tensor.dims)
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", offset), ("length", len(tensor.raw))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, str(value)
        self.tensors[tensor.name] = proto
        return tensor.name

    def close(self):
        self.file.close()


# ---- graph building --------------------------------------------------------------------------------------------
class GraphBuilder:
    """Nodes of one graph; ``op`` appends a node and returns its output name(s)."""

    def __init__(self, weights: WeightStore, prefill_scan: str = "chunked"):
        self.weights = weights
        self.prefill_scan = prefill_scan
        self.nodes: list[onnx.NodeProto] = []
        self.used: dict[str, None] = {}
        self.count = 0
        self.scope = ""

    def op(self, op_type, inputs, hint=None, n_out=1, out=None, domain=None, **attrs):
        if out is not None:
            outs = [out] if isinstance(out, str) else list(out)
        else:
            outs = []
            for _ in range(n_out):
                self.count += 1
                outs.append(f"{self.scope}{hint or op_type.lower()}_{self.count}")
        for name in inputs:
            if name in self.weights.tensors:
                self.used[name] = None
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"{self.scope}{op_type}_{len(self.nodes)}",
                                           domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def ints(self, values, hint="c") -> str:
        name = f"{self.scope}{hint}_{len(self.nodes)}"
        return self.op("Constant", [], out=name,
                       value=helper.make_tensor(name, TensorProto.INT64, [len(values)], list(values)))

    def cast(self, x, to, hint="cast"):
        return self.op("Cast", [x], hint, to=to)

    def model(self, name, inputs, outputs, opset) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs,
                                  initializer=[self.weights.tensors[n] for n in self.used])
        used_ops = {n.op_type for n in self.nodes if n.domain == contract.DOMAIN}
        extra = [helper.make_opsetid("com.microsoft", 1)] if any(n.domain == "com.microsoft" for n in self.nodes) else []
        return helper.make_model(
            graph, ir_version=ir_version_for(opset), producer_name=artifact.EXPORTER_NAME, producer_version=__version__,
            opset_imports=[helper.make_opsetid("", opset),
                           helper.make_opsetid(contract.DOMAIN, contract.DOMAIN_VERSION)] + extra,
            functions=[f for f in functions(opset, self.prefill_scan) + ssd_functions(opset) if f.name in used_ops])


class LMGraphs:
    """Emits the shared language model into a GraphBuilder; a family's emitter subclasses it and provides
    ``step_mixer(g, h, i)`` (h: [b, d_model] → [b, d_model], reading/writing ``contract.conv_state_name(i)`` …) and
    ``prefill_mixer(g, h, i, shape_bl)`` (h: [b·L, d_model] flat rows → same). Activations are ``flat``
    [rows, features] (rows = b or b·L); initializer names are the weight table's ``artifact_name``."""

    def __init__(self, model: MambaLM, weights: WeightStore, act: int, quant: QuantSpec | None = None):
        self.cfg = model.config
        self.state_shapes = family_of(model.config).state_shapes(model.config)
        self.quant = quant
        self.act = act
        self.rif32 = model.config.residual_in_fp32
        self.res_dtype = F32 if self.rif32 else act
        self.has_lm_head = not model.config.tie_embeddings
        self.opset = contract.DEFAULT_OPSET

    @property
    def standard_ops(self) -> bool:
        """Emit the standard-op form (LinearAttention, CausalConvWithState) instead of our custom nodes."""
        return self.opset >= standard_ops.MIN_OPSET

    # -- pieces ----------------------------------------------------------------------------------------------
    def linear(self, g: GraphBuilder, x, key: str, bias: bool, features: tuple[int, int] | None = None):
        """x [rows, in] · Wᵀ (+ bias); ``features`` = (in, out), needed for a weight-only quantized layer."""
        if self.quant is not None and is_quantized(key):
            y = linear_op(g, x, key, *features, self.quant, key.split(".")[-1])
            return g.op("Add", [y, f"{key}.bias"], "bias") if bias else y
        ins = [x, f"{key}.weight"] + ([f"{key}.bias"] if bias else [])
        return g.op("Gemm", ins, key.split(".")[-1], transB=1)

    def rmsnorm(self, g: GraphBuilder, x, key: str, x_dtype: int):
        """model.RMSNorm: fp32 x / √(mean(x²) + ε) · w, cast to the export dtype."""
        xf = x if x_dtype == F32 else g.cast(x, F32, "norm_in")
        ms = g.op("ReduceMean", [g.op("Mul", [xf, xf], "sq"), g.ints([-1])], "ms", keepdims=1)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, "norm_eps"], "ms_eps")], "rms")], "inv_rms")
        y = g.op("Mul", [g.op("Mul", [xf, inv], "normed"), f"{key}.weight"], "norm_out")
        return y if self.act == F32 else g.cast(y, self.act, "norm_act")

    def residual(self, g: GraphBuilder, residual, h):
        """model._residual: r ← h (first layer) or r + h; fp32 when residual_in_fp32."""
        if self.rif32 and self.act != F32:
            h = g.cast(h, F32, "h_f32")
        return h if residual is None else g.op("Add", [residual, h], "residual")

    def silu_f32(self, g: GraphBuilder, x):
        return g.op("Mul", [x, g.op("Sigmoid", [x])], "silu")

    def to_act(self, g: GraphBuilder, x):
        return x if self.act == F32 else g.cast(x, self.act, "act")

    def to_f32(self, g: GraphBuilder, x):
        return x if self.act == F32 else g.cast(x, F32, "f32")

    def discretize_dt(self, g: GraphBuilder, dt_raw, bias: str, limit=None):
        """δ = clip(softplus(δ_raw + bias), *limit) in fp32, for the standard-op form (the custom ops do it inside)."""
        return standard_ops.discretize(g, self.to_f32(g, dt_raw), bias, limit=limit)

    def conv_step(self, g: GraphBuilder, u, i: int, p: str, bias: bool):
        """One token of the causal conv + SiLU: u [b, c] (export dtype) → [b, c] (export dtype); conv state
        ``contract.conv_state_name(i)`` [b, c, d_conv] ← [state[..., 1:], u] (the last d_conv inputs, pre-conv)."""
        if self.standard_ops:
            return g.op("Squeeze", [self.conv_prefill(g, g.op("Unsqueeze", [u, g.ints([2])], "u_col"), i, p, bias),
                                    g.ints([2])], "conv_step")
        shifted = g.op("Slice", [contract.conv_state_name(i), g.ints([1]), g.ints([INT_MAX]), g.ints([2])], "shift")
        conv = g.op("Concat", [shifted, g.op("Unsqueeze", [u, g.ints([-1])], "u_col")], axis=2,
                    out=contract.conv_state_name(i, out=True))
        w = g.op("Squeeze", [p + "conv1d.weight", g.ints([1])], "conv_w")                       # [c, k] fp32
        xc = g.op("ReduceSum", [g.op("Mul", [self.to_f32(g, conv), w], "taps"), g.ints([-1])], "conv", keepdims=0)
        if bias:
            xc = g.op("Add", [xc, p + "conv1d.bias"], "conv_b")
        return self.to_act(g, self.silu_f32(g, xc))

    def conv_prefill(self, g: GraphBuilder, u, i: int, p: str, bias: bool):
        """Causal conv + SiLU over a sequence: u [b, c, L] (export dtype) → [b, c, L] (export dtype), from and to the
        conv state of layer i; fp32 math with the fp32 conv weights."""
        k = self.cfg.d_conv
        state, state_out = contract.conv_state_name(i), contract.conv_state_name(i, out=True)
        if self.standard_ops:
            return self.to_act(g, standard_ops.causal_conv(g, u, self.to_f32(g, u), state, state_out,
                                                           p + "conv1d.weight", p + "conv1d.bias" if bias else None, k))
        history = g.op("Concat", [state, u], "history", axis=2)                                 # [b, c, k + L]
        g.op("Slice", [history, g.ints([-k]), g.ints([INT_MAX]), g.ints([2])], out=state_out)
        window = g.op("Slice", [history, g.ints([1]), g.ints([INT_MAX]), g.ints([2])], "window")  # [b, c, k−1+L]
        conv_in = [self.to_f32(g, window), p + "conv1d.weight"] + ([p + "conv1d.bias"] if bias else [])
        channels = self.state_shapes[0][0]
        xc = g.op("Conv", conv_in, "conv", group=channels, kernel_shape=[k])                      # [b, c, L]
        return self.to_act(g, self.silu_f32(g, xc))

    def step_mixer(self, g: GraphBuilder, h, i: int):
        raise NotImplementedError

    def prefill_mixer(self, g: GraphBuilder, h, i: int, shape_bl):
        raise NotImplementedError

    # -- whole graphs ----------------------------------------------------------------------------------------
    def _backbone(self, g: GraphBuilder, h, mixer):
        residual = None
        for i in range(self.cfg.n_layer):
            g.scope = f"layers.{i}/"
            residual = self.residual(g, residual, h)
            h = mixer(g, self.rmsnorm(g, residual, f"backbone.layers.{i}.norm", self.res_dtype), i)
        g.scope = "final/"
        return self.residual(g, residual, h)

    def _head(self, g: GraphBuilder, residual, out_name: str, reshape_to=None):
        hn = self.rmsnorm(g, residual, "backbone.norm_f", self.res_dtype)
        if self.quant is not None:
            logits = self.linear(g, hn, "lm_head", False, (self.cfg.d_model, self.cfg.padded_vocab_size))
        else:
            head = "lm_head.weight" if self.has_lm_head else "backbone.embedding.weight"
            logits = g.op("Gemm", [hn, head], "lm_head", transB=1)
        if reshape_to is not None:
            logits = g.op("Reshape", [logits, reshape_to], "logits_bLV")
        return g.op("Cast", [logits], to=F32, out=out_name)

    def _eps(self, g: GraphBuilder):
        g.op("Constant", [], out="norm_eps", value=helper.make_tensor("norm_eps", F32, [], [self.cfg.norm_eps]))

    def step_graph(self, weights: WeightStore, opset: int) -> onnx.ModelProto:
        self.opset = opset
        g = GraphBuilder(weights)
        self._eps(g)
        h = g.op("Gather", ["backbone.embedding.weight", "input_ids"], "embed", axis=0)          # [b, d_model]
        residual = self._backbone(g, h, self.step_mixer)
        self._head(g, residual, "logits")
        return g.model("mamba_step", self.io("step", False)[0], self.io("step", False)[1], opset)

    def prefill_graph(self, weights: WeightStore, opset: int, all_logits: bool,
                      prefill_scan: str = "chunked") -> onnx.ModelProto:
        self.opset = opset
        c = self.cfg
        g = GraphBuilder(weights, prefill_scan)
        self._eps(g)
        shape_bl = g.op("Shape", ["input_ids"], "shape_bl")                                      # [b, L]
        flat_ids = g.op("Reshape", ["input_ids", g.ints([-1])], "ids_flat")
        h = g.op("Gather", ["backbone.embedding.weight", flat_ids], "embed", axis=0)            # [b·L, d_model]
        residual = self._backbone(g, h, lambda g_, h_, i: self.prefill_mixer(g_, h_, i, shape_bl))
        if all_logits:
            shape = g.op("Concat", [shape_bl, g.ints([c.padded_vocab_size])], "shape_blv", axis=0)
            self._head(g, residual, "logits", reshape_to=shape)
        else:  # only the last position: rows L−1, 2L−1, … of [b·L, D]. (Gathered rather than reshaped to
            # [b, L, D] and sliced: TensorRT-RTX 1.7's Myelin fails to build that Reshape after the Scan in fp32.)
            scalar = lambda v: g.op("Squeeze", [v], "scalar")                                    # noqa: E731
            L = g.op("Slice", [shape_bl, g.ints([1]), g.ints([2])], "L")
            BL = g.op("Mul", [g.op("Slice", [shape_bl, g.ints([0]), g.ints([1])], "B"), L], "BL")
            rows = g.op("Range", [scalar(g.op("Sub", [L, g.ints([1])], "L_1")), scalar(BL), scalar(L)], "rows")
            self._head(g, g.op("Gather", [residual, rows], "last", axis=0), "logits")
        inputs, outputs = self.io("prefill", all_logits)
        return g.model("mamba_prefill", inputs, outputs, opset)

    def io(self, graph: str, all_logits: bool):
        c = self.cfg
        B, L = artifact.BATCH, artifact.SEQ
        seq = [B, L] if graph == "prefill" else [B]
        logits_shape = [B, L, c.padded_vocab_size] if all_logits else [B, c.padded_vocab_size]
        conv_shape, ssm_shape = self.state_shapes
        conv = lambda n: helper.make_tensor_value_info(n, self.act, [B, *conv_shape])  # noqa: E731
        ssm = lambda n: helper.make_tensor_value_info(n, F32, [B, *ssm_shape])         # noqa: E731
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, seq)]
        outputs = [helper.make_tensor_value_info("logits", F32, logits_shape)]
        for i in range(c.n_layer):
            inputs += [conv(contract.conv_state_name(i)), ssm(contract.ssm_state_name(i))]
            outputs += [conv(contract.conv_state_name(i, True)), ssm(contract.ssm_state_name(i, True))]
        return inputs, outputs


def _weights(model: MambaLM, act_dtype: torch.dtype):
    """(name, tensor) of every initializer, in the layout and dtype the graphs use (one tensor at a time), from the
    family's weight table."""
    for w in weight_table(model.config):
        yield w.artifact_name, w.artifact_tensor(model.get_parameter(w.name), act_dtype)


def _io_spec(model: onnx.ModelProto) -> dict:
    def spec(vi):
        t = vi.type.tensor_type
        return {"name": vi.name, "dtype": artifact.from_onnx(t.elem_type).long,
                "shape": [d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim]}
    return {"inputs": [spec(v) for v in model.graph.input], "outputs": [spec(v) for v in model.graph.output]}


def source_ref(model: MambaLM, ref=None) -> dict:
    info = getattr(model, "source", None)
    ref = ref if ref is not None else (info.ref if info is not None else None)
    if ref is None:
        return {"checkpoint": None}
    local = Path(ref).expanduser()
    out = {"checkpoint": str(local.resolve()) if local.exists() else str(ref)}
    if info is not None:
        out.update(config_format=info.config_format, weight_format=info.weight_format)
    return out


def model_name(ref: str) -> str:
    """Default artifact name: the checkpoint directory's basename, or the name part of a hub id."""
    name = Path(str(ref).rstrip("/\\")).name or "model"
    return re.sub(r"[^\w.-]", "_", name)


def copy_tokenizer(model: MambaLM, out_dir: Path) -> list[str]:
    """Copy the checkpoint's tokenizer.json (HF tokenizers format), when it has one, into the artifact, so
    `generate --artifact … --prompt TEXT` finds it. Returns the file names copied."""
    info = getattr(model, "source", None)
    src = Path(info.path) / artifact.TOKENIZER if info is not None else None
    if src is None or not src.is_file():
        return []
    shutil.copyfile(src, Path(out_dir) / artifact.TOKENIZER)
    return [artifact.TOKENIZER]


def write_artifact(model: MambaLM, out_dir: Path, opset: int = contract.DEFAULT_OPSET, all_logits: bool = False,
                   source: dict | None = None, progress=None, prefill_scan: str = "chunked",
                   quant: QuantSpec | None = None) -> dict:
    """Write the artifact of ``model`` (in its own dtype) into the existing, empty directory ``out_dir``.
    ``prefill_scan``: SelectiveScan's function body, "chunked" (≈ 3√L loop iterations) or "sequential" (L).
    ``quant``: weight-only quantization of the large linear layers (``quantize.py``), or None.
    Returns the manifest. ``progress(message)`` is called between stages; tqdm bars show the weights."""
    from tqdm.auto import tqdm

    check_opset(opset)
    check_prefill_scan(prefill_scan)
    say = progress or (lambda msg: None)
    out_dir = Path(out_dir)
    act_dtype = model.dtype
    try:
        act = artifact.dtype_info(act_dtype)
    except KeyError:
        act = None
    if act is None or not act.float:
        raise UserError(f"cannot export weights of dtype {act_dtype}; use fp32, fp16 or bf16")
    cfg = model.config
    check_quant(quant, act_dtype, opset)
    family = family_of(cfg)
    weights = WeightStore(out_dir / artifact.WEIGHTS_FILE)
    try:
        for name, tensor in tqdm(_weights(model, act_dtype), total=len(weight_table(cfg, family)),
                                 desc="writing weights", unit="tensor", disable=progress is None, leave=False):
            if quant is not None and name == "backbone.embedding.weight" and cfg.tie_embeddings:
                for q in quantize_weight("lm_head", tensor, quant):       # the tied head, quantized
                    weights.add_quantized(q)
            if quant is not None and name.endswith(".weight") and is_quantized(name[:-len(".weight")]):
                for q in quantize_weight(name[:-len(".weight")], tensor, quant):
                    weights.add_quantized(q)
            else:
                weights.add(name, tensor)
    finally:
        weights.close()
    builder = family.graph_emitter()(model, weights, act.onnx, quant)
    graphs, used, attributes = {}, {}, {}
    for graph, build in (("step", lambda: builder.step_graph(weights, opset)),
                         ("prefill", lambda: builder.prefill_graph(weights, opset, all_logits, prefill_scan))):
        say(f"building {graph} graph")
        proto = build()
        file = artifact.GRAPH_FILES[graph]
        (out_dir / file).write_bytes(proto.SerializeToString())
        graphs[graph] = {"file": file, **_io_spec(proto)}
        custom = [n for n in proto.graph.node if n.domain == contract.DOMAIN]
        used[graph] = collections.Counter(n.op_type for n in custom)
        attributes.update({n.op_type: {a.name: helper.get_attribute_value(a) for a in n.attribute} for n in custom})
    graphs["prefill"]["all_logits"] = bool(all_logits)
    say("checking graphs")
    for graph in graphs.values():
        try:
            onnx.checker.check_model(str(out_dir / graph["file"]))
        except onnx.checker.ValidationError as e:  # a bug of ours, not the user's: keep the details
            raise RuntimeError(f"exported {graph['file']} fails onnx.checker: {e}") from e
    custom_ops = [   # every custom op the family's emitter used (none in the standard-op form), per graph, with
        # its node count and attributes; ``plugin`` names our TensorRT plugin where one exists (contract.OPS)
        {"domain": contract.DOMAIN, "op_type": op, "version": contract.DOMAIN_VERSION,
         "attributes": attributes[op], "function": True,
         "plugin": ({"name": op, "version": contract.PLUGIN_VERSION, "namespace": contract.PLUGIN_NAMESPACE}
                    if op in contract.OPS else None),
         "graph": graph, "count": count,
         **({"algorithm": prefill_scan} if op == contract.SELECTIVE_SCAN.op_type else {})}
        for graph, counts in used.items() for op, count in counts.items()]
    manifest = artifact.build_manifest(
        config=cfg, family=family, act_dtype=act_dtype, graphs=graphs, custom_ops=custom_ops,
        onnx_info={"ir_version": ir_version_for(opset), "opset": opset, "domain": contract.DOMAIN,
                   "domain_version": contract.DOMAIN_VERSION},
        source=source or source_ref(model), exporter_version=__version__)
    manifest["files"] += copy_tokenizer(model, out_dir)
    manifest["quantization"] = quant.manifest() if quant is not None else None
    say("checksums")
    artifact.write_manifest(out_dir, manifest)
    return artifact.read_manifest(out_dir)


def export(ref, out_dir=None, dtype=None, opset: int | None = None, all_logits: bool = False,
           force: bool = False, progress=None, allow_nonfinite: bool = False, prefill_scan: str = "chunked",
           quant: QuantSpec | None = None) -> Path:
    """Load checkpoint ``ref`` (a local dir or hub id) and write its artifact to ``out_dir`` atomically
    (default ``export/<model-name>``). Refuses an existing ``out_dir`` unless ``force``."""
    from ..artifact import is_our_artifact, parse_dtype
    from ..checkpoint import load_model
    from ..io import atomic_directory

    if opset is None:   # the QDQ form needs opset 21 (int4 tensors, blocked DequantizeLinear)
        opset = QDQ_MIN_OPSET if quant is not None and quant.fmt == "qdq" else contract.DEFAULT_OPSET
    check_opset(opset)
    check_prefill_scan(prefill_scan)
    out = Path(out_dir) if out_dir is not None else Path("export") / model_name(str(ref))
    say = progress or (lambda msg: None)
    say(f"loading {ref}")
    model = load_model(ref, dtype=parse_dtype(dtype) if dtype else None, scan_backend="reference",
                       allow_nonfinite=allow_nonfinite)
    for bad in model.nonfinite:
        say(f"warning: non-finite weights exported as they are: {bad}")
    target = atomic_directory(out, force=force, is_ours=is_our_artifact, what="artifact", option="--out",
                              inputs=[model.source.path])
    target.check()  # before the long work
    if model.dtype == torch.bfloat16:
        say("warning: a bf16 artifact runs on TensorRT or ONNX Runtime's CUDA provider; ONNX Runtime on CPU has no "
            "bf16 kernels and cannot run it (--dtype fp16 or fp32 for CPU)")
    source = source_ref(model, ref)
    with target as tmp:
        write_artifact(model, tmp, opset=opset, all_logits=all_logits, source=source, progress=progress,
                       prefill_scan=prefill_scan, quant=quant)
    return out
