"""Build the ONNX artifact of a Mamba-1 model: step.onnx, prefill.onnx, one shared weights file, manifest.json.

The graphs are written directly with ``onnx.helper``, node by node, following ``model.py`` (the reference) line
by line, so every cast sits where PyTorch has it:

* embedding, linear layers and the conv state in the export dtype (fp32/fp16/bf16);
* the residual stream in fp32 when ``residual_in_fp32``; RMSNorm in fp32, result cast to the export dtype;
* the causal conv in fp32 (conv weight/bias upcast), SiLU, cast back; the selective scan (custom node, body in
  ``functions.py``) in fp32 with an fp32 SSM state; logits computed in the export dtype and cast to fp32.

Linear layers are ``Gemm(x, W, transB=1)`` on the checkpoint's own [out, in] weights, so the tied lm_head reads
the embedding table itself. Tensors that PyTorch upcasts before use (norm weights, conv weight/bias, D, δ bias)
are stored in fp32 (the upcast is exact), and A = −exp(A_log) is stored precomputed (same torch op, same bits).
All initializers live in one external-data file that both graphs reference (no 2 GB protobuf limit, no copy).
"""
from __future__ import annotations

import datetime
import re
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper

from .. import __version__
from ..errors import UserError
from ..model import MambaLM
from . import contract
from .functions import functions

WEIGHTS_FILE = "weights.onnx.data"
ALIGN = 4096                       # page-aligned offsets let runtimes memory-map the weights
INT_MAX = 2**62
_ONNX_DTYPE = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
               torch.bfloat16: TensorProto.BFLOAT16}
_DTYPE_NAME = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16",
               TensorProto.INT64: "int64"}
F32 = TensorProto.FLOAT


def max_opset() -> int:
    """Newest default-domain opset the contract's IR version allows."""
    return max(row[2] for row in helper.VERSION_TABLE if row[1] <= contract.IR_VERSION)


MIN_OPSET = 18                     # ReduceMean/ReduceSum take axes as an input, Split takes sizes as an input


def check_opset(opset: int) -> int:
    if not MIN_OPSET <= opset <= max_opset():
        raise UserError(f"--opset {opset} is not supported; choose {MIN_OPSET}…{max_opset()} (IR version "
                        f"{contract.IR_VERSION})")
    return opset


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
        proto.data_type = _ONNX_DTYPE[t.dtype]
        proto.dims.extend(t.shape)
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", offset), ("length", t.numel() * t.element_size())):
            entry = proto.external_data.add()
            entry.key, entry.value = key, str(value)
        self.tensors[name] = proto
        return name

    def close(self):
        self.file.close()


# ---- graph building --------------------------------------------------------------------------------------------
class GraphBuilder:
    """Nodes of one graph; ``op`` appends a node and returns its output name(s)."""

    def __init__(self, weights: WeightStore):
        self.weights = weights
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
        return helper.make_model(
            graph, ir_version=contract.IR_VERSION, producer_name=contract.EXPORTER_NAME, producer_version=__version__,
            opset_imports=[helper.make_opsetid("", opset),
                           helper.make_opsetid(contract.DOMAIN, contract.DOMAIN_VERSION)],
            functions=[f for f in functions(opset) if f.name in used_ops])


class MambaGraphs:
    """Emits the model's layers into a GraphBuilder; ``flat`` activations are [rows, features] (rows = b or b·L)."""

    def __init__(self, model: MambaLM, weights: WeightStore, act: int):
        self.cfg = model.config
        self.act = act
        self.rif32 = model.config.residual_in_fp32
        self.res_dtype = F32 if self.rif32 else act
        self.has_lm_head = not model.config.tie_embeddings

    # -- pieces ----------------------------------------------------------------------------------------------
    def linear(self, g: GraphBuilder, x, key: str, bias: bool):
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

    def scan_attrs(self):
        return dict(contract.SELECTIVE_SCAN.attributes)

    # -- step graph ------------------------------------------------------------------------------------------
    def step_mixer(self, g: GraphBuilder, h, i: int):
        c, p = self.cfg, f"backbone.layers.{i}.mixer."
        d, N, r = c.d_inner, c.d_state, c.dt_rank_value
        x, z = g.op("Split", [self.linear(g, h, p + "in_proj", c.bias), g.ints([d, d])], "xz", n_out=2, axis=-1)
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
        return self.linear(g, y, p + "out_proj", c.bias)

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

        x, z = g.op("Split", [self.linear(g, h, p + "in_proj", c.bias), g.ints([d, d])], "xz", n_out=2, axis=-1)
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
        return self.linear(g, to_flat(y, d), p + "out_proj", c.bias)

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
        head = "lm_head.weight" if self.has_lm_head else "backbone.embedding.weight"
        logits = g.op("Gemm", [hn, head], "lm_head", transB=1)
        if reshape_to is not None:
            logits = g.op("Reshape", [logits, reshape_to], "logits_bLV")
        return g.op("Cast", [logits], to=F32, out=out_name)

    def _eps(self, g: GraphBuilder):
        g.op("Constant", [], out="norm_eps", value=helper.make_tensor("norm_eps", F32, [], [self.cfg.norm_eps]))

    def step_graph(self, weights: WeightStore, opset: int) -> onnx.ModelProto:
        g = GraphBuilder(weights)
        self._eps(g)
        h = g.op("Gather", ["backbone.embedding.weight", "input_ids"], "embed", axis=0)          # [b, d_model]
        residual = self._backbone(g, h, self.step_mixer)
        self._head(g, residual, "logits")
        return g.model("mamba_step", self.io("step", False)[0], self.io("step", False)[1], opset)

    def prefill_graph(self, weights: WeightStore, opset: int, all_logits: bool) -> onnx.ModelProto:
        c = self.cfg
        g = GraphBuilder(weights)
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
        seq = ["batch", "seq"] if graph == "prefill" else ["batch"]
        logits_shape = ["batch", "seq", c.padded_vocab_size] if all_logits else ["batch", c.padded_vocab_size]
        conv = lambda n: helper.make_tensor_value_info(n, self.act, ["batch", c.d_inner, c.d_conv])  # noqa: E731
        ssm = lambda n: helper.make_tensor_value_info(n, F32, ["batch", c.d_inner, c.d_state])      # noqa: E731
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, seq)]
        outputs = [helper.make_tensor_value_info("logits", F32, logits_shape)]
        for i in range(c.n_layer):
            inputs += [conv(contract.conv_state_name(i)), ssm(contract.ssm_state_name(i))]
            outputs += [conv(contract.conv_state_name(i, True)), ssm(contract.ssm_state_name(i, True))]
        return inputs, outputs


def _weights(model: MambaLM, act_dtype: torch.dtype):
    """(name, tensor) of every initializer, in the layout and dtype the graphs use (one tensor at a time)."""
    f32 = torch.float32
    yield "backbone.embedding.weight", model.backbone.embedding.weight.to(act_dtype)
    for i, layer in enumerate(model.backbone.layers):
        p, m = f"backbone.layers.{i}.", layer.mixer
        yield p + "norm.weight", layer.norm.weight.to(f32)
        yield p + "mixer.in_proj.weight", m.in_proj.weight.to(act_dtype)
        if m.in_proj.bias is not None:
            yield p + "mixer.in_proj.bias", m.in_proj.bias.to(act_dtype)
        yield p + "mixer.conv1d.weight", m.conv1d.weight.to(f32)
        if m.conv1d.bias is not None:
            yield p + "mixer.conv1d.bias", m.conv1d.bias.to(f32)
        yield p + "mixer.x_proj.weight", m.x_proj.weight.to(act_dtype)
        yield p + "mixer.dt_proj.weight", m.dt_proj.weight.to(act_dtype)
        yield p + "mixer.dt_proj.bias", m.dt_proj.bias.to(f32)
        with torch.no_grad():
            yield p + "mixer.A", m.A()                                                 # −exp(A_log), fp32
        yield p + "mixer.D", m.D.to(f32)
        yield p + "mixer.out_proj.weight", m.out_proj.weight.to(act_dtype)
        if m.out_proj.bias is not None:
            yield p + "mixer.out_proj.bias", m.out_proj.bias.to(act_dtype)
    yield "backbone.norm_f.weight", model.backbone.norm_f.weight.to(f32)
    if not model.config.tie_embeddings:
        yield "lm_head.weight", model.lm_head.weight.to(act_dtype)


def _io_spec(model: onnx.ModelProto) -> dict:
    def spec(vi):
        t = vi.type.tensor_type
        return {"name": vi.name, "dtype": _DTYPE_NAME[t.elem_type],
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


def write_artifact(model: MambaLM, out_dir: Path, opset: int = contract.DEFAULT_OPSET, all_logits: bool = False,
                   source: dict | None = None, progress=None) -> dict:
    """Write the artifact of ``model`` (in its own dtype) into the existing, empty directory ``out_dir``.
    Returns the manifest. ``progress(message)`` is called between stages; tqdm bars show the weights."""
    from tqdm.auto import tqdm

    from ..checkpoint import dtype_name
    from .manifest import write_manifest

    check_opset(opset)
    say = progress or (lambda msg: None)
    out_dir = Path(out_dir)
    act_dtype = model.dtype
    if act_dtype not in _ONNX_DTYPE:
        raise UserError(f"cannot export weights of dtype {act_dtype}; use fp32, fp16 or bf16")
    act = _ONNX_DTYPE[act_dtype]
    cfg = model.config
    weights = WeightStore(out_dir / WEIGHTS_FILE)
    try:
        n_tensors = 1 + cfg.n_layer * (9 + 2 * cfg.bias + cfg.conv_bias) + 1 + (not cfg.tie_embeddings)
        for name, tensor in tqdm(_weights(model, act_dtype), total=n_tensors, desc="writing weights", unit="tensor",
                                 disable=progress is None, leave=False):
            weights.add(name, tensor)
    finally:
        weights.close()
    builder = MambaGraphs(model, weights, act)
    graphs = {}
    for graph, build in (("step", lambda: builder.step_graph(weights, opset)),
                         ("prefill", lambda: builder.prefill_graph(weights, opset, all_logits))):
        say(f"building {graph} graph")
        proto = build()
        file = contract.STEP_GRAPH if graph == "step" else contract.PREFILL_GRAPH
        (out_dir / file).write_bytes(proto.SerializeToString())
        graphs[graph] = {"file": file, **_io_spec(proto)}
    graphs["prefill"]["all_logits"] = bool(all_logits)
    say("checking graphs")
    for graph in graphs.values():
        try:
            onnx.checker.check_model(str(out_dir / graph["file"]))
        except onnx.checker.ValidationError as e:  # a bug of ours, not the user's: keep the details
            raise RuntimeError(f"exported {graph['file']} fails onnx.checker: {e}") from e
    dt = dtype_name(act_dtype)
    manifest = {
        "format_version": contract.ARTIFACT_FORMAT_VERSION,
        "exporter": {"name": contract.EXPORTER_NAME, "version": __version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source or source_ref(model),
        "config": cfg.to_dict(),
        "dims": {"n_layer": cfg.n_layer, "d_model": cfg.d_model, "d_inner": cfg.d_inner, "d_state": cfg.d_state,
                 "d_conv": cfg.d_conv, "dt_rank": cfg.dt_rank_value, "vocab_size": cfg.padded_vocab_size,
                 "tokenizer_vocab_size": cfg.vocab_size},
        "dtype": dt,
        "dtypes": {"activations": _DTYPE_NAME[act], "conv_state": _DTYPE_NAME[act], "ssm_state": "float32",
                   "logits": "float32", "residual": _DTYPE_NAME[F32 if cfg.residual_in_fp32 else act]},
        "onnx": {"ir_version": contract.IR_VERSION, "opset": opset, "domain": contract.DOMAIN,
                 "domain_version": contract.DOMAIN_VERSION},
        "custom_ops": [
            {"domain": contract.DOMAIN, "op_type": spec.op_type, "version": contract.DOMAIN_VERSION,
             "attributes": dict(spec.attributes), "function": True,
             "plugin": {"name": spec.op_type, "version": contract.PLUGIN_VERSION,
                        "namespace": contract.PLUGIN_NAMESPACE},
             "graph": "step" if spec is contract.SELECTIVE_SCAN_STEP else "prefill", "count": cfg.n_layer}
            for spec in contract.OPS.values()],
        "graphs": graphs,
        "external_data": WEIGHTS_FILE,
        "files": [contract.STEP_GRAPH, contract.PREFILL_GRAPH, WEIGHTS_FILE],
    }
    say("checksums")
    write_manifest(out_dir, manifest)
    from .manifest import read_manifest
    return read_manifest(out_dir)


def export(ref, out_dir=None, dtype=None, opset: int = contract.DEFAULT_OPSET, all_logits: bool = False,
           force: bool = False, progress=None) -> Path:
    """Load checkpoint ``ref`` (a local dir or hub id) and write its artifact to ``out_dir`` atomically
    (default ``export/<model-name>``). Refuses an existing ``out_dir`` unless ``force``."""
    from ..checkpoint import load_model, parse_dtype
    from ..io import atomic_directory
    from .manifest import is_our_artifact

    check_opset(opset)
    out = Path(out_dir) if out_dir is not None else Path("export") / model_name(str(ref))
    say = progress or (lambda msg: None)
    say(f"loading {ref}")
    model = load_model(ref, dtype=parse_dtype(dtype) if dtype else None, scan_backend="reference")
    target = atomic_directory(out, force=force, is_ours=is_our_artifact, what="artifact", option="--out",
                              inputs=[model.source.path])
    target.check()  # before the long work
    source = source_ref(model, ref)
    with target as tmp:
        write_artifact(model, tmp, opset=opset, all_logits=all_logits, source=source, progress=progress)
    return out
