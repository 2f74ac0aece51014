"""``mamba-deploy random``: a checkpoint of a named size with random (upstream-style) weights."""
from __future__ import annotations

import click

from ..config import SIZES
from .options import dtype_option


@click.command(name="random")
@click.option("--size", type=click.Choice(list(SIZES)), default="tiny", show_default=True,
              help="Shape of a released model: Mamba-1 (tiny: d_model 64, 2 layers, byte vocabulary; 130m … 2.8b), "
                   "Mamba-2 (mamba2-tiny, mamba2-130m … mamba2-2.7b) or FalconMamba (falcon-mamba-tiny).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Directory to write.")
@click.option("--format", "fmt", type=click.Choice(["state-spaces", "hf"]), default="state-spaces",
              show_default=True, help="Checkpoint format.")
@dtype_option(default="fp32", help="Precision of the weights written.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--force", is_flag=True, help="Replace --out if it exists and is a checkpoint mamba-deploy wrote.")
def command(size, out_dir, fmt, dtype, seed, force):
    """Write a checkpoint of a named size with random weights, for trying the tool and for benchmarks
    without the hub. The weights follow upstream's initialisation (realistic δ and A ranges).

    \b
    Examples:
      mamba-deploy random --size tiny --out ckpt/tiny
      mamba-deploy random --size 370m --format hf --dtype fp16 --out ckpt/370m-hf
    """
    from ..artifact import parse_dtype
    from ..checkpoint import save_model
    from ..config import config_for_size
    from ..model import random_model

    model = random_model(config_for_size(size), seed=seed, dtype=parse_dtype(dtype))
    out = save_model(model, out_dir, fmt=fmt, force=force)
    click.echo(f"wrote {out} ({size}, {fmt} format, {dtype}, {model.num_parameters():,} parameters)")
