"""Options shared by several subcommands, each declared once: the same name, aliases, metavar, validation and
wording in every command that takes it.

    artifact_option   --artifact DIR
    model_option      --model REF
    dtype_option      --dtype fp32|fp16|bf16
    device_option     --device cpu|cuda|cuda:N  (validated by mamba_deploy.devices.check_device)
    backend_option    --backend NAME[,NAME…]  (alias --backends; names checked against the registry)
    decode_len_option --max-new-tokens N  (aliases -n, --gen-len, --steps)
    int_list / name_list   callbacks for other comma-separated lists
"""
from __future__ import annotations

import click

from ..errors import UserError

DTYPES = ("fp32", "fp16", "bf16")


def _opt(names: tuple[str, ...], dest: str, kw: dict):
    if kw.get("required"):
        kw.pop("default", None)  # an explicit default (even None) satisfies `required` in click 8.5
    return click.option(*names, dest, **kw)


def model_option(fn=None, *, required: bool = True, help: str | None = None):
    """``--model REF``: a checkpoint directory or hub id."""
    deco = _opt(("--model",), "model_ref", dict(
        required=required, default=None, metavar="REF",
        help=help or "Checkpoint: a local directory (state-spaces or HF '-hf' format) or a hub id such as "
                     "state-spaces/mamba-370m."))
    return deco(fn) if fn is not None else deco


def artifact_option(fn=None, *, required: bool = True, help: str | None = None):
    """``--artifact DIR``: a directory ``mamba-deploy export`` wrote."""
    deco = _opt(("--artifact",), "artifact", dict(
        required=required, default=None, metavar="DIR", type=click.Path(file_okay=False, path_type=str),
        help=help or "Artifact directory written by `mamba-deploy export` (manifest.json, step.onnx, "
                     "prefill.onnx)."))
    return deco(fn) if fn is not None else deco


def dtype_option(fn=None, *, default: str | None = None, help: str | None = None, name: str = "--dtype",
                 dest: str = "dtype"):
    """``--dtype fp32|fp16|bf16``."""
    deco = _opt((name,), dest, dict(
        type=click.Choice(DTYPES), default=default, show_default=default is not None,
        help=help or "Cast the weights to this precision [default: as stored]."))
    return deco(fn) if fn is not None else deco


def _device(ctx, param, value):
    if value is None or value.strip().lower() == "auto":
        return None
    from ..devices import check_device
    return str(check_device(value))


def device_option(fn=None, *, help: str | None = None):
    """``--device cpu|cuda|cuda:N`` ("auto" = the default), checked once here (unknown names, no GPU, a GPU index
    that is not there)."""
    deco = _opt(("--device",), "device", dict(
        default=None, metavar="cpu|cuda[:N]", callback=_device,
        help=help or "Device: cpu, cuda or cuda:N [default: each backend's own; cpu for torch and onnxruntime]."))
    return deco(fn) if fn is not None else deco


def name_list(ctx, param, value):
    """Callback: 'a,b' → ['a', 'b'] (None stays None); an empty list is an error."""
    if value is None:
        return None
    names = [v.strip() for v in str(value).split(",") if v.strip()]
    if not names:
        raise click.BadParameter(f"is empty; give comma-separated names, got {value!r}")
    return names


def int_list(ctx, param, value):
    """Callback: '1,8,64' → [1, 8, 64]; positive integers only."""
    if value is None:
        return None
    try:
        out = [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 1,8,64, got {value!r}") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"expected positive integers such as 1,8,64, got {value!r}")
    return out


def _backends(ctx, param, value):
    names = name_list(ctx, param, value)
    if names is not None:
        from ..runtime.session import check_backend_name
        for name in names:
            check_backend_name(name)
    return names


def backend_option(fn=None, *, default: str | None = None, help: str | None = None):
    """``--backend NAME[,NAME…]`` (alias ``--backends``): a list of registered backend names."""
    deco = _opt(("--backend", "--backends"), "backends", dict(
        default=default, show_default=default is not None, metavar="NAME[,NAME…]", callback=_backends,
        help=help or "Backend(s): torch, onnxruntime, torch-fast (CUDA), tensorrt; comma-separated where a "
                     "command takes several."))
    return deco(fn) if fn is not None else deco


def single_backend(backends: list[str] | None, default: str) -> str:
    """The one backend of a command that runs one."""
    if not backends:
        return default
    if len(backends) > 1:
        raise UserError(f"--backend takes one backend here, got {','.join(backends)}")
    return backends[0]


def allow_nonfinite_option(fn):
    """``--allow-nonfinite``: load weights that hold NaN/Inf instead of stopping with an error."""
    return click.option("--allow-nonfinite", is_flag=True,
                        help="Proceed with weights that hold NaN or Inf (reported, not refused).")(fn)


def _threads(ctx, param, value):
    from ..devices import cpu_threads
    return cpu_threads(value)


def threads_option(fn):
    """``--threads N``: CPU threads for PyTorch and ONNX Runtime, set once here for every command."""
    return click.option("--threads", type=int, default=None, metavar="N", callback=_threads,
                        help="CPU threads for PyTorch and ONNX Runtime [default: the CPUs this process may use]; "
                             "on a machine busy with other jobs 1 is often fastest.")(fn)


def decode_len_option(fn=None, *, default: int, help: str):
    """``--max-new-tokens N`` (aliases ``-n``, ``--gen-len``, ``--steps``): how many tokens to decode."""
    deco = _opt(("--max-new-tokens", "-n", "--gen-len", "--steps"), "max_new_tokens", dict(
        type=click.IntRange(min=0), default=default, show_default=True, metavar="N", help=help))
    return deco(fn) if fn is not None else deco
