"""The artifact spec: everything a writer and a reader of an exported model directory must agree on, in one place.

* file names — the two graphs, the shared weights file, the manifest, TensorRT engines and build report, and what
  ``mamba-deploy check`` writes;
* symbolic dim names of the graphs' dynamic axes;
* the dtype vocabulary: one table of ``fp16`` ↔ ``float16`` (manifest) ↔ torch ↔ ONNX ↔ TensorRT;
* manifest.json, built (``build_manifest``) and read (``read_manifest``) side by side;
* default parity tolerances per dtype.

The exporter (onnx/export.py), the TensorRT builder, every runtime session, parity and bench import their names from
here; the graph contract (custom ops, their ports, state I/O names) stays in onnx/contract.py. Importing this module
pulls in torch only (no onnx, no TensorRT).

Manifest layout (``format_version`` = ``FORMAT_VERSION``)::

    format_version, exporter {name, version}, created
    source {checkpoint (absolute path of a local dir, or hub id), config_format, weight_format}
    family (e.g. "mamba1"), config (the family config's to_dict())
    dims {n_layer, d_model, vocab_size (tokenizer vocabulary), padded_vocab_size (logits width),
          conv_state [per-row shape], ssm_state [per-row shape], + the family's own dims (d_inner, d_state, …)}
    dtype (fp32|fp16|bf16), dtypes {activations, conv_state, ssm_state, logits, residual}
    onnx {ir_version, opset, domain, domain_version}
    custom_ops [{domain, op_type, version, attributes, plugin {name, version, namespace}, graph, count}]
    graphs {step|prefill: {file, inputs [{name, shape, dtype}], outputs […], all_logits (prefill)}}
    quantization (null, or {scheme int8|int4, bits, format matmulnbits|qdq, block_size, …}: onnx/quantize.py)
    external_data (the weights file both graphs share), files {name: {sha256, bytes}}

Shapes use the symbolic names below for dynamic axes and integers otherwise.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from pathlib import Path

import torch

from .errors import UserError

# ---- files ---------------------------------------------------------------------------------------------------
STEP_GRAPH = "step.onnx"
PREFILL_GRAPH = "prefill.onnx"
GRAPH_FILES = {"step": STEP_GRAPH, "prefill": PREFILL_GRAPH}
WEIGHTS_FILE = "weights.onnx.data"        # external data of both graphs, page-aligned tensors
MANIFEST = "manifest.json"
ENGINE_FILES = {"step": "step.engine", "prefill": "prefill.engine"}   # `mamba-deploy build`
BUILD_REPORT = "build_report.json"
CHECK_DIR = "check"                       # `mamba-deploy check` writes into <artifact>/check by default
CHECK_REPORT = "report.json"
CHECK_PLOT = "errors.png"
TOKENIZER = "tokenizer.json"              # the checkpoint's HF tokenizers file, copied in when it has one
CHECK_STEP0_INPUTS = "step0_inputs.json"  # first decode step's inputs and reference outputs, for `polygraphy run`
CHECK_STEP0_OUTPUTS = "step0_reference_outputs.json"

EXPORTER_NAME = "mamba-deploy"
# bump when the artifact layout changes; runtimes refuse other versions
# (2: dims.vocab_size is the tokenizer vocabulary, dims.padded_vocab_size the logits width; family and state shapes)
FORMAT_VERSION = 2

# ---- symbolic dims -------------------------------------------------------------------------------------------
BATCH = "batch"
SEQ = "seq"
BATCH_ALIASES = (BATCH, "b", "batch_size")                       # accepted when reading a graph's dims
SEQ_ALIASES = (SEQ, "L", "seq_len", "sequence", "sequence_length")


# ---- dtypes --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DType:
    name: str          # short name: CLI --dtype, manifest "dtype", tolerances
    long: str          # name in the manifest's I/O specs and dtypes table
    torch: torch.dtype
    onnx: int          # onnx.TensorProto.DataType value (a test checks them against onnx)
    trt: str           # tensorrt.DataType member name
    float: bool


DTYPES: tuple[DType, ...] = (
    DType("fp32", "float32", torch.float32, 1, "FLOAT", True),
    DType("fp16", "float16", torch.float16, 10, "HALF", True),
    DType("bf16", "bfloat16", torch.bfloat16, 16, "BF16", True),
    DType("int64", "int64", torch.int64, 7, "INT64", False),
    DType("int32", "int32", torch.int32, 6, "INT32", False),
)
FLOAT_DTYPES = tuple(d.name for d in DTYPES if d.float)
_BY_KEY = {k: d for d in DTYPES for k in (d.name, d.long, d.torch, ("onnx", d.onnx), ("trt", d.trt))}
_ALIASES = {"half": "fp16", "float": "fp32"}


def dtype_info(key) -> DType:
    """The table row of ``key``: a short or long name, a torch dtype. Raises KeyError when unknown."""
    if isinstance(key, str):
        key = _ALIASES.get(key.lower(), key.lower())
    return _BY_KEY[key]


def parse_dtype(dtype) -> torch.dtype:
    """A float dtype given as fp32/fp16/bf16 (or float32/float16/bfloat16/half, or a torch dtype) → torch dtype;
    anything else is a one-line UserError."""
    try:
        row = dtype_info(dtype)
    except (KeyError, TypeError):
        row = None
    if row is None or not row.float:
        raise UserError(f"unknown dtype '{dtype}'; choose {', '.join(FLOAT_DTYPES)}")
    return row.torch


def dtype_name(dtype) -> str:
    """Short name (fp16 …) of a torch dtype or long name."""
    return dtype_info(dtype).name


def torch_dtype(name: str) -> torch.dtype:
    """torch dtype of a manifest dtype name (long or short)."""
    return dtype_info(name).torch


def onnx_dtype(dtype) -> int:
    """ONNX TensorProto data type of a torch dtype or name."""
    return dtype_info(dtype).onnx


def from_onnx(elem_type: int) -> DType:
    return _BY_KEY[("onnx", elem_type)]


def from_trt(member_name: str) -> DType:
    return _BY_KEY[("trt", member_name)]


# ---- tolerances ----------------------------------------------------------------------------------------------
# DEFAULT_TOLERANCES[dtype] = (atol, rtol) for an artifact's logits vs the fp32 PyTorch model of its source checkpoint
# over a prefill and an N-step rollout in which the backend feeds back its own state. Two rules use them: ``within``
# below (the tests: an element passes when |actual − reference| ≤ atol + rtol·|reference|) and `mamba-deploy check`,
# which uses Polygraphy's element-wise rule (an element fails only when it exceeds both atol and rtol·|reference|)
# — looser by at most a factor of 2.
# * fp32: same math, different summation orders: tiny random models stay within 3e-7 over 256 steps on CPU
#   (tests/test_ort_session.py); rtol leaves room for large logits (≈ 20) of real models.
# * fp16 (unit roundoff 4.9e-4) and bf16 (3.9e-3): weights, activations and the conv state rounded, SSM state and
#   residual stream fp32; tiny models on ONNX Runtime CPU stay within 5e-4 of fp32 logits (|logit| ≤ 0.7).
# Measured on ONNX Runtime CPU, 370m-shaped random model, 16-token prefill + 4 steps vs fp32 PyTorch
# (|logit| ≤ 9.4): fp32 artifact 3.5e-6, fp16 artifact 3.1e-3 max abs error.
# * int8 / int4: weight-only quantized artifacts (onnx/quantize.py; fp32 activations, SSM and state), keyed by the
#   manifest's ``quantization.scheme`` instead of the dtype (``tolerance_key``). Rounding the weights moves every
#   output by a fraction of its own scale, so their atol is relative (RELATIVE_ATOL): a fraction of max |reference
#   output| of each output in each iteration (check only; an --atol given is absolute). Max error / max |reference|
#   over a 32-token prefill + 32 steps, logits / conv state / SSM state: tiny random model int8 0.02 / 0.011 /
#   0.02, int4 0.13 / 0.10 / 0.18; 130m-shaped random model int8 0.016 / 0.043 / 0.081, int4 0.089 / 0.26 / 0.37.
#   One layer's out_proj weight ×1.5 (int8) or ×3 (int4) in the tiny model moves the logits by 0.22 / 0.52 of
#   their max and fails (tests/test_quantize.py).
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "fp32": (1e-5, 1e-4),
    "fp16": (5e-3, 1e-2),
    "bf16": (4e-2, 5e-2),
    "int8": (0.1, 0.1),
    "int4": (0.4, 0.5),
}
RELATIVE_ATOL = frozenset({"int8", "int4"})   # rows whose atol is a fraction of max |reference output|


def tolerance_key(manifest: dict) -> str:
    """The DEFAULT_TOLERANCES row of an artifact: its quantization scheme if quantized, else its dtype."""
    quant = manifest.get("quantization")
    return quant["scheme"] if quant else manifest["dtype"]


def within(actual, reference, dtype: str, tolerances: dict | None = None) -> bool:
    """True when every element satisfies |actual − reference| ≤ atol + rtol·|reference| (torch tensors)."""
    atol, rtol = (tolerances or DEFAULT_TOLERANCES)[dtype]
    return bool(((actual - reference).abs() <= atol + rtol * reference.abs()).all())


# ---- manifest: built … -----------------------------------------------------------------------------------------
def model_dims(config, family) -> dict:
    """The manifest's ``dims``: what every runtime needs without knowing the family (per-row state shapes)."""
    conv, ssm = family.state_shapes(config)
    return {"n_layer": config.n_layer, "d_model": config.d_model, "vocab_size": config.vocab_size,
            "padded_vocab_size": config.padded_vocab_size, "conv_state": list(conv), "ssm_state": list(ssm),
            **family.dims(config)}


def build_manifest(*, config, family, act_dtype: torch.dtype, graphs: dict, onnx_info: dict, custom_ops: list,
                   source: dict, exporter_version: str) -> dict:
    """The manifest of an artifact whose graphs (``graphs``: {step|prefill: {file, inputs, outputs, …}}) and
    weights file are written; ``write_manifest`` adds the checksums."""
    act = dtype_info(act_dtype)
    residual = "float32" if config.residual_in_fp32 else act.long
    return {
        "format_version": FORMAT_VERSION,
        "exporter": {"name": EXPORTER_NAME, "version": exporter_version},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "family": family.name,
        "config": config.to_dict(),
        "dims": model_dims(config, family),
        "dtype": act.name,
        "dtypes": {"activations": act.long, "conv_state": act.long, "ssm_state": "float32", "logits": "float32",
                   "residual": residual},
        "onnx": onnx_info,
        "custom_ops": custom_ops,
        "graphs": graphs,
        "external_data": WEIGHTS_FILE,
        "files": [g["file"] for g in graphs.values()] + [WEIGHTS_FILE],
    }


def file_digest(path: Path, chunk: int = 1 << 22) -> dict:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return {"sha256": h.hexdigest(), "bytes": size}


def write_manifest(artifact_dir: Path, manifest: dict) -> Path:
    """Write manifest.json, adding the checksums of the files it lists under ``files`` (names only)."""
    from .io import write_json
    artifact_dir = Path(artifact_dir)
    manifest = dict(manifest)
    manifest["files"] = {name: file_digest(artifact_dir / name) for name in manifest["files"]}
    return write_json(artifact_dir / MANIFEST, manifest)


def is_our_artifact(artifact_dir) -> bool:
    """Whether ``artifact_dir`` holds a manifest this exporter wrote (any format version), so ``export --force``
    may replace it."""
    try:
        manifest = json.loads((Path(artifact_dir) / MANIFEST).read_text())
        return manifest["exporter"]["name"] == EXPORTER_NAME
    except (OSError, ValueError, KeyError, TypeError):
        return False


# ---- … and read --------------------------------------------------------------------------------------------------
_REQUIRED = ("format_version", "exporter", "source", "family", "config", "dims", "dtype", "onnx", "graphs", "files")


def is_artifact(source) -> bool:
    return isinstance(source, (str, Path)) and (Path(source) / MANIFEST).exists()


def read_manifest(artifact_dir, verify: bool = False) -> dict:
    """Read and validate ``manifest.json`` of an artifact; ``verify`` also checks every file's size and sha256."""
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / MANIFEST
    if not artifact_dir.is_dir():
        raise UserError(f"{artifact_dir} is not a directory; --artifact takes the directory `mamba-deploy export` "
                        "wrote")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{artifact_dir} is not a mamba-deploy artifact: it has no {MANIFEST} "
                        "(export one with `mamba-deploy export`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); export the artifact again") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path} must hold a JSON object; export the artifact again")
    exporter = manifest.get("exporter") if isinstance(manifest.get("exporter"), dict) else {}
    version = manifest.get("format_version")
    if exporter.get("name") != EXPORTER_NAME or version != FORMAT_VERSION:
        raise UserError(f"{artifact_dir} was written by {exporter.get('name', 'an unknown exporter')} "
                        f"{exporter.get('version', '?')} in artifact format {version!r}; this mamba-deploy reads "
                        f"format {FORMAT_VERSION} only: export it again")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; export the artifact again")
    if not isinstance(manifest["source"], dict) or "checkpoint" not in manifest["source"]:
        raise UserError(f"{path} does not name its source checkpoint; export the artifact again")
    for name in manifest["files"]:
        if not (artifact_dir / name).is_file():
            raise UserError(f"{artifact_dir} lacks {name}, which its manifest lists; export the artifact again")
    if verify:
        verify_files(artifact_dir, manifest)
    return manifest


def verify_files(artifact_dir, manifest: dict, names=None) -> None:
    """Check size and sha256 of the artifact's files (all, or ``names``) against the manifest."""
    artifact_dir = Path(artifact_dir)
    for name in names or manifest["files"]:
        want = manifest["files"][name]
        path = artifact_dir / name
        if not path.is_file():
            raise UserError(f"{path} is missing; export the artifact again")
        if path.stat().st_size != want["bytes"]:
            raise UserError(f"{path} has {path.stat().st_size} bytes, the manifest says {want['bytes']}: the "
                            "artifact is truncated or was modified; export it again")
        if file_digest(path)["sha256"] != want["sha256"]:
            raise UserError(f"{path} does not match its sha256 in the manifest: the artifact was modified or is "
                            "corrupt; export it again")


def graph_spec(manifest: dict, graph: str) -> dict:
    try:
        return manifest["graphs"][graph]
    except (KeyError, TypeError):
        raise UserError(f"the artifact's manifest has no '{graph}' graph; export it again") from None


@dataclasses.dataclass(frozen=True)
class ArtifactDims:
    """What a runtime session takes from ``dims``: layer count, vocabulary sizes, per-row state shapes, dtypes."""

    n_layer: int
    vocab_size: int                  # tokenizer vocabulary (ids ≥ this are padding and never sampled)
    padded_vocab_size: int           # logits width
    conv_state: tuple[int, ...]      # per-row conv state shape
    ssm_state: tuple[int, ...]       # per-row SSM state shape (fp32)
    state_dtype: torch.dtype         # conv state dtype

    @classmethod
    def of(cls, manifest: dict) -> "ArtifactDims":
        d = manifest["dims"]
        return cls(int(d["n_layer"]), int(d["vocab_size"]), int(d["padded_vocab_size"]),
                   tuple(int(v) for v in d["conv_state"]), tuple(int(v) for v in d["ssm_state"]),
                   torch_dtype(manifest["dtypes"]["conv_state"]))


def read_build_report(artifact) -> dict:
    """build_report.json of an artifact that `mamba-deploy build` compiled (one-line error if there is none)."""
    path = Path(artifact) / BUILD_REPORT
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{artifact} has no TensorRT engines ({BUILD_REPORT} missing); run "
                        f"`mamba-deploy build --artifact {artifact}` first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); run `mamba-deploy build` again") from None


# ---- the manifest against the graphs ---------------------------------------------------------------------------
def _graph_facts(path: Path) -> tuple[dict[str, list], list | None]:
    """(input/output name → shape with symbolic dims as names, the embedding table's dims) of an ONNX file, read
    without its external data. The embedding is the initializer the graph gathers token rows from."""
    import onnx
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and friends for a damaged file
        first = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise UserError(f"{path} is not a readable ONNX model ({first}); export the artifact again") from None
    ports = {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
             for vi in (*proto.graph.input, *proto.graph.output)}
    inits = {t.name: list(t.dims) for t in proto.graph.initializer}
    embed = next((inits[n.input[0]] for n in proto.graph.node if n.op_type == "Gather" and n.input[0] in inits),
                 None)
    return ports, embed


def check_against_graphs(artifact_dir, manifest: dict) -> None:
    """Cross-check the manifest with the graphs' own inputs, outputs and embedding table, and with its own config:
    every port it lists has the shape it says; its dims (layers, per-row state shapes, logits width, d_model) are
    the graphs'; its config gives those dims. A hand-edited or mismatched manifest is a one-line UserError, not an
    ONNX Runtime traceback or a silently wrong session."""
    from .families import FAMILIES, config_from_manifest

    artifact_dir = Path(artifact_dir)
    seen: dict[str, tuple] = {}
    for graph in GRAPH_FILES:
        spec = graph_spec(manifest, graph)
        path = artifact_dir / spec["file"]
        ports, embed = _graph_facts(path)
        for port in (*spec["inputs"], *spec["outputs"]):
            got = ports.get(port["name"])
            if got is None:
                raise UserError(f"{artifact_dir}: the manifest lists {graph} port {port['name']}, which {path.name} "
                                "does not have; export the artifact again")
            if got != list(port["shape"]):
                raise UserError(f"{artifact_dir}: the manifest says {port['name']} has shape {port['shape']}, "
                                f"{path.name} has {got}; export the artifact again")
        facts = {"n_layer": sum(1 for n in ports if n.startswith("conv_state.") and n[11:].isdigit()),
                 "conv_state": ports.get("conv_state.0", [None])[1:], "ssm_state": ports.get("ssm_state.0", [None])[1:],
                 "padded_vocab_size": ports.get("logits", [None])[-1], "d_model": (embed or [None, None])[1]}
        for key, value in facts.items():
            if value not in (None, []):
                seen.setdefault(key, (value, path.name))
    dims = manifest.get("dims") if isinstance(manifest.get("dims"), dict) else {}
    for key, (value, where) in seen.items():
        if key in dims and dims[key] != value:
            raise UserError(f"{artifact_dir}: manifest.json dims.{key} is {dims[key]} but {where} has {value}; the "
                            "manifest was edited or belongs to another export: export it again")
    try:
        want = model_dims(config_from_manifest(manifest), FAMILIES[manifest["family"]])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{artifact_dir}: manifest.json's config is not valid ({e}); export it again") from None
    for key, value in want.items():
        if key in dims and dims[key] != value:
            raise UserError(f"{artifact_dir}: manifest.json dims.{key} is {dims[key]} but its config gives {value}: "
                            "the manifest was edited or belongs to another export; export it again")
