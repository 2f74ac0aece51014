"""Options shared by several subcommands."""
from __future__ import annotations

import click

model_option = click.option(
    "--model", "model_ref", required=True, metavar="REF",
    help="Checkpoint: a local directory (state-spaces or HF '-hf' format) or a hub id such as "
         "state-spaces/mamba-370m.")

dtype_option = click.option(
    "--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
    help="Cast the weights to this precision (default: as stored).")
