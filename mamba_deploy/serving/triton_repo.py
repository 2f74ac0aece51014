"""A Triton Inference Server model repository for an artifact: sequence batching with implicit state.

For each graph (``<name>_prefill``: prefill.onnx, a prompt or a continuation of any length, and ``<name>_step``:
step.onnx, one token per request) the repository holds ``config.pbtxt`` and ``1/model.onnx`` with its external
weights (``weights.onnx.data``; hard-linked from the artifact where the file system allows, else copied), or
``1/model.plan`` (the artifact's TensorRT engine) with ``--platform tensorrt``.

Every layer's state pair (``conv_state.{i}`` → ``conv_state_out.{i}``, ``ssm_state.{i}`` → ``ssm_state_out.{i}``)
is declared as a Triton implicit state of the sequence batcher, with a zero initial state. So a client sends only
``input_ids`` with a sequence id (and START on its first request); Triton keeps each sequence's states between
requests and resets them to zero on START. The two models keep separate states per sequence id (Triton's state is
per model): use ``<name>_prefill`` for a whole conversation (prompt, then one token at a time), or ``<name>_step``
when every request is one token. Shapes and names come from the artifact's manifest.

The config is built as a ``ModelConfig`` message of the protobuf schema that ``tritonclient`` ships and written in
protobuf text format. The server itself is not run by this project's tests (no Triton server is available here).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ..artifact import BATCH_ALIASES, ENGINE_FILES, WEIGHTS_FILE, dtype_info, graph_spec, read_manifest
from ..errors import UserError
from ..io import atomic_directory
from ..onnx import contract

_TRITON_TYPE = {"fp32": "TYPE_FP32", "fp16": "TYPE_FP16", "bf16": "TYPE_BF16", "int64": "TYPE_INT64",
                "int32": "TYPE_INT32"}    # artifact.DType short name → Triton's DataType
REPO_MARKER = ".mamba-deploy-triton-repo"
PLATFORMS = {"onnxruntime": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan")}


def model_config_pb2():
    """The ``ModelConfig`` protobuf module that tritonclient ships (needs ``tritonclient[grpc]``)."""
    try:
        from tritonclient.grpc import model_config_pb2 as pb
    except (ImportError, RuntimeError):  # tritonclient without its grpc extra raises RuntimeError
        raise UserError("triton-repo needs the Triton client's model-config schema: "
                        "pip install 'tritonclient[grpc]' (or mamba-deploy[triton])") from None
    return pb


def triton_type(dtype: str) -> str:
    """A manifest dtype (artifact.DTYPES, short or long name) → Triton's DataType name."""
    return _TRITON_TYPE[dtype_info(dtype).name]


def _dims(shape, batched: bool) -> list[int]:
    """Manifest shape → Triton dims: without the leading batch axis, symbolic axes as -1."""
    if batched:
        if not shape or shape[0] not in BATCH_ALIASES:
            raise UserError(f"expected a leading 'batch' axis in the manifest shape {shape}")
        shape = shape[1:]
    return [-1 if isinstance(d, str) else int(d) for d in shape]


def model_config(manifest: dict, graph: str, name: str, platform: str = "onnxruntime", max_batch: int = 8,
                 max_queue_delay_us: int = 1000, idle_us: int = 60_000_000, kind: str = "KIND_AUTO"):
    """The ``ModelConfig`` message for ``graph`` ("step" or "prefill") of an artifact's manifest."""
    pb = model_config_pb2()
    spec = graph_spec(manifest, graph)
    n_layer = manifest["dims"]["n_layer"]
    states_in = set(contract.state_inputs(n_layer))
    cfg = pb.ModelConfig(name=name, platform=PLATFORMS[platform][0], max_batch_size=max_batch)
    for port in spec["inputs"]:
        if port["name"] in states_in:
            continue
        dims = _dims(port["shape"], True)
        inp = cfg.input.add(name=port["name"], data_type=triton_type(port["dtype"]))
        if dims:
            inp.dims.extend(dims)
        else:                       # [batch] → one element per request, reshaped to a scalar for the model
            inp.dims.append(1)
            inp.reshape.SetInParent()
    for port in spec["outputs"]:
        if port["name"] == "logits":
            cfg.output.add(name="logits", data_type=triton_type(port["dtype"]), dims=_dims(port["shape"], True))
    sb = cfg.sequence_batching
    sb.max_sequence_idle_microseconds = idle_us
    sb.oldest.max_candidate_sequences = max_batch
    sb.oldest.max_queue_delay_microseconds = max_queue_delay_us
    ports = {p["name"]: p for p in spec["inputs"]}
    for i in range(n_layer):
        for state_in, state_out in ((contract.conv_state_name(i), contract.conv_state_name(i, True)),
                                    (contract.ssm_state_name(i), contract.ssm_state_name(i, True))):
            port = ports[state_in]
            dtype, dims = triton_type(port["dtype"]), _dims(port["shape"], True)
            st = sb.state.add(input_name=state_in, output_name=state_out, data_type=dtype, dims=dims)
            st.initial_state.add(data_type=dtype, dims=dims, zero_data=True, name=f"zero {state_in}")
    cfg.instance_group.add(count=1, kind=getattr(pb.ModelInstanceGroup, kind))
    return cfg


def config_text(cfg) -> str:
    from google.protobuf import text_format
    return text_format.MessageToString(cfg)


def parse_config(text: str):
    """Parse config.pbtxt text with the real ``ModelConfig`` schema (unknown fields and bad values raise)."""
    from google.protobuf import text_format
    pb = model_config_pb2()
    return text_format.Parse(text, pb.ModelConfig())


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_triton_repo(artifact, out, name: str | None = None, platform: str = "onnxruntime", max_batch: int = 8,
                      force: bool = False) -> list[Path]:
    """Write the repository to ``out`` (atomically, io.atomic_directory; --force replaces only a repository this
    command wrote) → the config paths."""
    if platform not in PLATFORMS:
        raise UserError(f"unknown platform '{platform}'; choose one of {', '.join(PLATFORMS)}")
    if max_batch < 1:
        raise UserError(f"--max-batch must be >= 1, got {max_batch}")
    artifact = Path(artifact)
    manifest = read_manifest(artifact, verify=True)
    name = name or re.sub(r"[^A-Za-z0-9_.-]", "_", artifact.resolve().name)
    model_config_pb2()  # fail early with the install hint
    out = Path(out)
    written = []
    with atomic_directory(out, force=force, is_ours=is_triton_repo, what="Triton model repository",
                          inputs=[artifact], option="--out") as tmp:
        for graph in ("prefill", "step"):
            model = f"{name}_{graph}"
            version = tmp / model / "1"
            version.mkdir(parents=True)
            if platform == "onnxruntime":
                _link_or_copy(artifact / graph_spec(manifest, graph)["file"], version / "model.onnx")
                data = manifest.get("external_data", WEIGHTS_FILE)
                _link_or_copy(artifact / data, version / data)
            else:
                engine = artifact / ENGINE_FILES[graph]
                if not engine.is_file():
                    raise UserError(f"{engine} does not exist; build engines with `mamba-deploy build --artifact "
                                    f"{artifact} --no-plugin` (Triton's TensorRT backend cannot load our Python "
                                    "plugin) or use --platform onnxruntime")
                _link_or_copy(engine, version / "model.plan")
            text = config_text(model_config(manifest, graph, model, platform, max_batch))
            parse_config(text)          # what Triton will read must parse with its schema
            (tmp / model / "config.pbtxt").write_text(text)
            written.append(out / model / "config.pbtxt")
        (tmp / REPO_MARKER).write_text(f"written by mamba-deploy triton-repo from {artifact.resolve()}\n")
    return written


def is_triton_repo(path: Path) -> bool:
    """A repository this command wrote (so --force may replace it)."""
    return (Path(path) / REPO_MARKER).is_file()
