"""Find, read and write checkpoints of any registered family in both formats.

* state-spaces: ``config.json`` (d_model …) + ``pytorch_model.bin`` (or ``model.safetensors``), keys
  ``backbone.embedding.weight``, ``backbone.layers.N.{norm,mixer.*}``, ``backbone.norm_f.weight``, ``lm_head.weight``.
* hf ("-hf"): ``config.json`` (hidden_size …) + ``model.safetensors`` (or sharded with
  ``model.safetensors.index.json``), ``backbone.embeddings.weight``, lm_head tied and usually absent.

Names, shapes and the renaming between the two formats come from the family's weight table
(``families.weight_table``); config.json of either dialect from the family (``Family.config_to_json``, which refuses
a field the dialect cannot hold).

Loading builds the model on the meta device and *assigns* each tensor as it is read (cast one tensor at a time),
so at no point are two full copies of the weights in memory.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Iterator

import torch

from .artifact import DTYPES, dtype_name, parse_dtype
from .errors import UserError
from .families import HF, STATE_SPACES, family_of, read_config, weight_table
from .families.base import HF_EMBEDDING
from .finite import NonFinite, find_nonfinite, nonfinite_error
from .io import atomic_directory
from .model import MambaLM

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")


@dataclasses.dataclass
class CheckpointInfo:
    ref: str              # what the user gave (hub id or path)
    path: Path            # local directory holding it
    config: object        # the family's config (MambaConfig for Mamba-1)
    config_format: str    # dialect of config.json: "state-spaces" or "hf"
    weights_file: str     # which file of WEIGHT_FILES was found
    weight_format: str    # key naming of the weights: "state-spaces" or "hf"
    stored_shapes: dict[str, tuple[int, ...]]  # every stored tensor name → shape, read from the file headers


# ---- locating ------------------------------------------------------------------------------------------------
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(ref: str | os.PathLike) -> Path:
    """A local directory, or a hub id fetched through huggingface_hub (honours HF_HUB_OFFLINE and the cache)."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path} is a file; --model takes a checkpoint directory (holding config.json)")
        return path
    ref = str(ref)
    if not _HUB_ID.match(ref):
        raise UserError(f"{ref} is neither an existing directory nor a hub id of the form owner/name")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise UserError(f"{ref} is not a local directory, and huggingface_hub is not installed to fetch it "
                        "from the hub (pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    except LocalEntryNotFoundError:
        raise UserError(f"cannot fetch {ref}: the hub cannot be reached (or HF_HUB_OFFLINE is set) and it is not "
                        "in the local Hugging Face cache; download it on a connected machine or pass a local "
                        "directory") from None
    except RepositoryNotFoundError:
        raise UserError(f"{ref} is not a model on the hub (or it is private: log in with `hf auth login`)") from None
    except OSError as e:
        raise UserError(f"cannot fetch {ref} from the hub: {e}") from None


def inspect(ref: str | os.PathLike) -> CheckpointInfo:
    """Find config and weights of a checkpoint and tell its format, without reading any weights."""
    path = resolve(ref)
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        contents = ", ".join(sorted(p.name for p in path.iterdir())[:6]) or "it is empty"
        raise UserError(f"{path} is not a Mamba checkpoint: it has no config.json ({contents})")
    config, dialect = read_config(cfg_path)
    weights_file = next((f for f in WEIGHT_FILES if (path / f).exists()), None)
    if weights_file is None:
        raise UserError(f"{path} has a config.json but no weights (expected one of {', '.join(WEIGHT_FILES)})")
    shapes = dict(_iter_tensors(path / weights_file, shapes_only=True))
    weight_format = HF if HF_EMBEDDING in shapes else STATE_SPACES
    return CheckpointInfo(str(ref), path, config, dialect, weights_file, weight_format, shapes)


# ---- reading tensors -------------------------------------------------------------------------------------------
def _corrupt(file: Path, e: Exception) -> UserError:
    return UserError(f"weight file {file} is truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0]}); "
                     "download or save it again")


def _shards(file: Path) -> list[Path]:
    if file.name.endswith(".index.json"):
        try:
            weight_map = json.loads(file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise _corrupt(file, e) from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (file.parent / s).exists()]
        if missing:
            raise UserError(f"{file} names shards that are not there: {', '.join(missing)}")
        return [file.parent / s for s in shards]
    return [file]


def _iter_tensors(file: Path, shapes_only: bool = False) -> Iterator[tuple[str, torch.Tensor | tuple]]:
    """Yield (name, tensor) — or (name, shape) with ``shapes_only`` — from a weight file or sharded index, one
    tensor at a time (memory-mapped)."""
    for shard in _shards(file):
        try:
            if shard.suffix == ".safetensors":
                from safetensors import safe_open
                with safe_open(str(shard), framework="pt") as f:
                    for k in f.keys():
                        yield k, tuple(f.get_slice(k).get_shape()) if shapes_only else f.get_tensor(k)
            else:
                try:
                    sd = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:
                    if "mmap" not in str(e):  # legacy (non-zip) files cannot be memory-mapped
                        raise
                    sd = torch.load(shard, map_location="cpu", weights_only=True)
                if not isinstance(sd, dict):
                    raise UserError(f"{shard} does not hold a state dict")
                for k in list(sd):
                    t = sd.pop(k)
                    yield k, tuple(t.shape) if shapes_only else t
        except UserError:
            raise
        except Exception as e:  # safetensors/pickle/zip errors all mean the same to a user
            raise _corrupt(shard, e) from None


def _model_keys(config) -> dict[str, str]:
    """Stored name (either format) → parameter name, for every name that differs between the formats."""
    return {w.hf_name: w.name for w in weight_table(config) if w.hf_name != w.name}


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every parameter the config needs, by state-spaces name (lm_head omitted when tied)."""
    return {w.name: w.shape for w in weight_table(config)}


def _listing(label: str, items: list[str]) -> str:
    more = f" … ({len(items)} in all)" if len(items) > 8 else ""
    return f"{label}: " + ", ".join(items[:8]) + more


def verify_weights(info: CheckpointInfo) -> None:
    """Compare the stored names and shapes (read once by ``inspect``) with what the config needs. Raises a
    UserError listing every missing, unexpected or mis-shaped key."""
    want = expected_shapes(info.config)
    rename = _model_keys(info.config)
    found = {rename.get(k, k): (k, shape) for k, shape in info.stored_shapes.items()}
    tied_head = found.pop("lm_head.weight", None) if info.config.tie_embeddings else None
    missing = [k for k in want if k not in found]
    unexpected = [name for k, (name, _) in found.items() if k not in want]
    misshaped = [f"{name} {shape} (config needs {want[k]})" for k, (name, shape) in found.items()
                 if k in want and shape != want[k]]
    embedding = weight_table(info.config)[0].name
    if tied_head is not None and tied_head[1] != want[embedding]:
        misshaped.append(f"lm_head.weight {tied_head[1]} (tied to the embedding {want[embedding]})")
    problems = [_listing(label, items) for label, items in
                (("mis-shaped", misshaped), ("missing", missing), ("unexpected", unexpected)) if items]
    if problems:
        raise UserError(f"weights in {info.path / info.weights_file} do not match its config.json "
                        f"(d_model={info.config.d_model}, n_layer={info.config.n_layer}): " + " | ".join(problems))


def load_model(ref: str | os.PathLike, dtype: torch.dtype | str | None = None, device="cpu",
               scan_backend: str = "auto", allow_nonfinite: bool = False) -> MambaLM:
    """Load a checkpoint (local directory or hub id, either format, any registered family). Strict: any missing,
    unexpected or mis-shaped key is an error that lists them. ``dtype`` None keeps the stored dtype. A NaN/Inf
    weight (stored, or from the cast to ``dtype``) is a UserError naming it unless ``allow_nonfinite``; the
    model's ``nonfinite`` lists them either way."""
    info = inspect(ref)
    verify_weights(info)
    dtype = parse_dtype(dtype) if dtype is not None else None
    with torch.device("meta"):
        model = MambaLM(info.config, scan_backend=scan_backend)
    loaded: dict[str, torch.Tensor] = {}
    rename = _model_keys(info.config)
    nonfinite: list[NonFinite] = []
    for name, tensor in _iter_tensors(info.path / info.weights_file):
        key = rename.get(name, name)
        if key == "lm_head.weight" and info.config.tie_embeddings:
            continue
        loaded[key] = tensor.to(device=device, dtype=dtype or tensor.dtype)
        del tensor
        bad = find_nonfinite(name, loaded[key])
        if bad is not None:
            nonfinite.append(bad)
    if nonfinite and not allow_nonfinite:
        cast = f" (after the cast to {dtype_name(dtype)})" if dtype is not None else ""
        raise nonfinite_error(f"checkpoint {info.path}{cast}", nonfinite)
    stored_dtypes = {t.dtype for t in loaded.values()}
    model.load_state_dict(loaded, strict=not info.config.tie_embeddings, assign=True)
    if info.config.tie_embeddings:  # assign=True replaced the shared Parameter: tie the head again
        model.lm_head.weight = model.backbone.embedding.weight
    if len(stored_dtypes) > 1 and dtype is None:  # mixed stored dtypes: unify on the embedding's
        model.to(model.backbone.embedding.weight.dtype)
    model.source = info
    model.nonfinite = nonfinite
    return model


FLOAT_TORCH = {d.torch for d in DTYPES if d.float}


def scan_weights(info: CheckpointInfo) -> tuple[list[str], list[NonFinite]]:
    """Read every weight once (memory-mapped): the stored dtypes (sorted names, e.g. ["fp32"]) and the tensors
    holding NaN/Inf."""
    dtypes, found = set(), []
    for name, tensor in _iter_tensors(info.path / info.weights_file):
        dtypes.add(dtype_name(tensor.dtype) if tensor.is_floating_point() and tensor.dtype in FLOAT_TORCH
                   else str(tensor.dtype).replace("torch.", ""))
        bad = find_nonfinite(name, tensor)
        if bad is not None:
            found.append(bad)
    return sorted(dtypes), found


# ---- writing ---------------------------------------------------------------------------------------------------
def save_model(model: MambaLM, out_dir: str | os.PathLike, fmt: str = STATE_SPACES, safetensors: bool = True,
               force: bool = False) -> Path:
    """Write ``model`` as a checkpoint directory of format ``fmt`` ("state-spaces" or "hf"), atomically. A config
    field that format's config.json cannot hold is a one-line UserError naming it (before anything is written)."""
    if fmt not in (STATE_SPACES, HF):
        raise UserError(f"unknown checkpoint format '{fmt}'; choose state-spaces or hf")
    config = model.config
    cfg = family_of(config).config_to_json(config, fmt)
    out = Path(out_dir)
    with atomic_directory(out, force=force, is_ours=is_our_checkpoint, what="checkpoint", option="--out") as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        if config.tie_embeddings and (fmt == HF or safetensors):
            sd.pop("lm_head.weight")  # torch.save keeps the tie; safetensors cannot share, HF omits the tied head
        if fmt == HF:
            rename = {w.name: w.hf_name for w in weight_table(config)}
            sd = {rename.get(k, k): v for k, v in sd.items()}
        if safetensors:
            from safetensors.torch import save_file
            save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt", MARKER_KEY: MARKER_VALUE})
        else:
            torch.save(sd, tmp / "pytorch_model.bin")
    return out


MARKER_KEY, MARKER_VALUE = "written_by", "mamba-deploy"   # in model.safetensors' metadata


def is_our_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a checkpoint that ``save_model`` wrote (the marker in model.safetensors' metadata), so
    ``--force`` may replace it."""
    file = Path(path) / "model.safetensors"
    if not file.is_file():
        return False
    try:
        from safetensors import safe_open
        with safe_open(str(file), framework="pt") as f:
            return (f.metadata() or {}).get(MARKER_KEY) == MARKER_VALUE
    except Exception:  # unreadable header: not something we can vouch for
        return False
