"""``mamba-deploy info``: what a checkpoint is, without building the model."""
from __future__ import annotations

import json
import math

import click

from .options import allow_nonfinite_option, model_option


def describe(info) -> dict:
    """Format, config, parameter count, weight bytes per precision and state bytes per sequence."""
    from ..model import MambaLM
    import torch

    from ..families import family_of

    cfg = info.config
    family = family_of(cfg)
    with torch.device("meta"):
        n_params = MambaLM(cfg).num_parameters()
    conv_shape, ssm_shape = family.state_shapes(cfg)
    conv_elems, ssm_elems = cfg.n_layer * math.prod(conv_shape), cfg.n_layer * math.prod(ssm_shape)
    return {
        "checkpoint": str(info.path),
        "family": family.name,
        "config_format": info.config_format,
        "weights": info.weights_file,
        "weight_names": info.weight_format,
        "config": cfg.to_dict(),
        "dims": family.dims(cfg),
        "parameters": n_params,
        "weight_bytes": {"fp32": 4 * n_params, "fp16": 2 * n_params, "bf16": 2 * n_params},
        "state_bytes_per_sequence": {p: conv_elems * b + ssm_elems * 4 for p, b in
                                     (("fp32", 4), ("fp16", 2), ("bf16", 2))},
    }


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


@click.command(name="info")
@model_option
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
@allow_nonfinite_option
def command(model_ref, as_json, allow_nonfinite):
    """Show a checkpoint's format, config, parameter count, weight bytes per precision and the recurrent state
    bytes per sequence, the stored dtype, and any weight holding NaN or Inf (an error unless --allow-nonfinite;
    the weights are read once, memory-mapped).

    \b
    Examples:
      mamba-deploy info --model ckpt/tiny
      mamba-deploy info --model state-spaces/mamba-370m --json
    """
    from ..checkpoint import inspect, scan_weights, verify_weights
    from ..finite import nonfinite_error

    info = inspect(model_ref)
    verify_weights(info)
    stored, nonfinite = scan_weights(info)
    if nonfinite and not allow_nonfinite:
        raise nonfinite_error(f"checkpoint {info.path}", nonfinite)
    d = describe(info)
    d["stored_dtype"] = stored
    d["nonfinite"] = [{"name": b.name, "nan": b.nan, "inf": b.inf, "first": list(b.first)} for b in nonfinite]
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    c = d["config"]
    click.echo(f"checkpoint   {d['checkpoint']}")
    click.echo(f"family       {d['family']}")
    click.echo(f"format       config: {d['config_format']}, weights: {d['weights']} ({d['weight_names']} names)")
    click.echo(f"shape        d_model={c['d_model']} n_layer={c['n_layer']} "
               + " ".join(f"{k}={v}" for k, v in d["dims"].items()))
    click.echo(f"vocab        {c['vocab_size']} (padded to {c['padded_vocab_size']})")
    click.echo(f"parameters   {d['parameters']:,}")
    click.echo(f"stored as    {', '.join(d['stored_dtype'])}")
    click.echo("non-finite   " + ("; ".join(str(b) for b in nonfinite) if nonfinite
                                 else "none (every weight is finite)"))
    click.echo("weights      " + ", ".join(f"{p} {_human(b)}" for p, b in d["weight_bytes"].items()))
    click.echo("state/seq    " + ", ".join(f"{p} {_human(b)}" for p, b in d["state_bytes_per_sequence"].items())
               + "  (conv state in the activation dtype, SSM state always fp32)")
