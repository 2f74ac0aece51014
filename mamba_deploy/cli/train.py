"""``mamba-deploy train``: train a model of any family from a TOML config or a shipped preset."""
from __future__ import annotations

from pathlib import Path

import click

from .options import device_option, threads_option


def _presets_help() -> str:
    from ..training.config import preset_names
    return ", ".join(preset_names()) or "none found"


@click.command(name="train")
@click.option("--config", "config_ref", required=True, metavar="NAME_OR_FILE",
              help="A preset name (see --list-presets) or a TOML file.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Run directory for checkpoints, metrics, curves  [default: runs/<config name>]")
@click.option("--max-steps", type=int, default=None, help="Override train.max_steps.")
@device_option(help="Override train.device: cpu or cuda [default: the config's; auto = cuda when available].")
@click.option("--batch-size", type=int, default=None, help="Override train.batch_size (per process).")
@click.option("--lr", type=float, default=None, help="Override optimizer.lr.")
@click.option("--seq-len", type=int, default=None, help="Override data.seq_len.")
@click.option("--seed", type=int, default=None, help="Override train.seed.")
@click.option("--data", "data_path", type=click.Path(dir_okay=False), default=None,
              help="Override data.path (text data).")
@click.option("--scan-backend", type=click.Choice(["auto", "chunked", "triton", "reference"]), default=None,
              help="Override train.scan_backend.")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override any config key, e.g. --set model.d_model=128 --set eval.step_lengths=[4096]. "
                   "Repeatable; values are TOML.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --out.")
@click.option("--force", is_flag=True, help="Delete a previous run in --out and start over.")
@click.option("--no-progress", is_flag=True, help="No progress bar (log lines only).")
@click.option("--print-config", is_flag=True, help="Print the resolved config as TOML and exit.")
@click.option("--list-presets", is_flag=True, is_eager=True, expose_value=False,
              callback=lambda ctx, _, v: (click.echo(_presets_help()), ctx.exit()) if v else None,
              help="List the shipped presets and exit.")
@threads_option
def command(config_ref, out_dir, max_steps, device, batch_size, lr, seq_len, seed, data_path, scan_backend, sets,
            resume, force, no_progress, print_config, threads):
    """Train a model of any family ([model] family = mamba1 | mamba2 | falcon_mamba): AdamW with warmup + cosine,
    gradient clipping, bf16 autocast on GPU (fp32 master weights), checkpoints in the state-spaces format (each a
    valid --model) and --resume, metrics.jsonl and curves.png, accuracy on the paper's synthetic tasks (selective
    copying, induction heads) through the parallel forward and through model.step.

    \b
    Examples:
      mamba-deploy train --config induction-tiny --max-steps 300 --device cpu
      mamba-deploy train --config my_run.toml --out runs/mine --set model.n_layer=4
      mamba-deploy train --config induction-tiny --out runs/induction-tiny --resume
    Data parallel on several GPUs (one process per GPU, torchrun sets the ranks):
      torchrun --nproc_per_node 2 -m mamba_deploy.cli train --config copying
    """
    from ..training.config import load_config, parse_override

    overrides = [parse_override(s) for s in sets]
    for key, value in (("train.max_steps", max_steps), ("train.device", device), ("train.batch_size", batch_size),
                       ("optimizer.lr", lr), ("data.seq_len", seq_len), ("train.seed", seed),
                       ("data.path", data_path), ("train.scan_backend", scan_backend)):
        if value is not None:
            overrides.append((key.split("."), value))
    if data_path is not None:
        overrides.append((["data", "kind"], "text"))
    cfg = load_config(config_ref, overrides)
    if print_config:
        click.echo(cfg.to_toml(), nl=False)
        return
    from ..training.trainer import train

    out = Path(out_dir) if out_dir else Path("runs") / cfg.name
    summary = train(cfg, out, resume=resume, force=force, progress=not no_progress,
                    log=lambda m: click.echo(m, err=True))
    if summary.get("checkpoint"):
        acc = ", ".join(f"{k} {100 * v['accuracy']:.2f}%" for k, v in summary.get("eval", {}).items())
        click.echo(f"trained {summary['steps']} steps in {summary['train_seconds']} s -> {summary['checkpoint']}"
                   + (f" ({acc})" if acc else ""))
