"""manifest.json: what an artifact holds, read by every runtime (nothing re-derives dims or names).

Layout (``format_version`` = contract.ARTIFACT_FORMAT_VERSION)::

    format_version, exporter {name, version}, created
    source {checkpoint (absolute path of a local dir, or hub id), config_format, weight_format}
    config (MambaConfig.to_dict()), dims {n_layer, d_model, d_inner, d_state, d_conv, dt_rank, vocab_size, …}
    dtype (fp32|fp16|bf16), dtypes {activations, conv_state, ssm_state, logits}
    onnx {ir_version, opset, domain, domain_version}
    custom_ops [{domain, op_type, version, attributes, plugin {name, version, namespace}}]
    graphs {step|prefill: {file, inputs [{name, shape, dtype}], outputs […], all_logits (prefill)}}
    external_data (file shared by both graphs), files {name: {sha256, bytes}}

Shapes use symbolic names for dynamic axes ("batch", "seq") and integers otherwise.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import UserError
from ..io import write_json
from . import contract

_REQUIRED = ("format_version", "exporter", "source", "config", "dims", "dtype", "onnx", "graphs", "files")


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
    artifact_dir = Path(artifact_dir)
    manifest = dict(manifest)
    manifest["files"] = {name: file_digest(artifact_dir / name) for name in manifest["files"]}
    return write_json(artifact_dir / contract.MANIFEST, manifest)


def is_our_artifact(artifact_dir) -> bool:
    """Whether ``artifact_dir`` holds a manifest this exporter wrote (any format version), so ``export --force``
    may replace it."""
    try:
        manifest = json.loads((Path(artifact_dir) / contract.MANIFEST).read_text())
        return manifest["exporter"]["name"] == contract.EXPORTER_NAME
    except (OSError, ValueError, KeyError, TypeError):
        return False


def read_manifest(artifact_dir, verify: bool = False) -> dict:
    """Read and validate ``manifest.json`` of an artifact; ``verify`` also checks every file's size and sha256."""
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / contract.MANIFEST
    if not artifact_dir.is_dir():
        raise UserError(f"{artifact_dir} is not a directory; --artifact takes the directory `mamba-deploy export` "
                        "wrote")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{artifact_dir} is not a mamba-deploy artifact: it has no {contract.MANIFEST} "
                        "(export one with `mamba-deploy export`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); export the artifact again") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path} must hold a JSON object; export the artifact again")
    exporter = manifest.get("exporter") if isinstance(manifest.get("exporter"), dict) else {}
    version = manifest.get("format_version")
    if exporter.get("name") != contract.EXPORTER_NAME or version != contract.ARTIFACT_FORMAT_VERSION:
        raise UserError(f"{artifact_dir} was written by {exporter.get('name', 'an unknown exporter')} "
                        f"{exporter.get('version', '?')} in artifact format {version!r}; this mamba-deploy reads "
                        f"format {contract.ARTIFACT_FORMAT_VERSION} only: export it again")
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
