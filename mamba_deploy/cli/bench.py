"""``mamba-deploy bench``: prefill and decode speed of several backends side by side (and the HBM floor on a GPU)."""
from __future__ import annotations

import click

from ..config import SIZES
from .options import (artifact_option, backend_option, decode_len_option, device_option, dtype_option, int_list,
                      model_option, threads_option)


@click.command(name="bench")
@artifact_option(required=False, help="An exported artifact directory (onnxruntime runs it; torch backends load "
                                      "its source checkpoint).")
@model_option(required=False, help="A checkpoint: local directory or hub id (onnxruntime gets a temporary export "
                                   "of it).")
@click.option("--random", "random_size", type=click.Choice(list(SIZES)), default=None,
              help="Random weights of a released model's shape (no hub needed), e.g. 370m.")
@backend_option(help="Comma-separated backends: torch, torch-fast (CUDA), onnxruntime, tensorrt "
                    "[default: torch,torch-fast on a GPU, torch on the CPU].")
@click.option("--batch", "batches", default="1", callback=int_list, show_default=True, metavar="N[,N…]",
              help="Comma-separated batch sizes.")
@click.option("--prompt-len", type=click.IntRange(min=1), default=128, show_default=True,
              help="Prompt tokens per sequence for the prefill timing (and before decoding).")
@decode_len_option(default=64, help="Decode steps per timed repetition (at least 1).")
@dtype_option(help="Weight precision [default: fp16 on a GPU, fp32 on the CPU].")
@device_option(help="cpu, cuda or cuda:N [default: cuda when a GPU is visible].")
@click.option("--reps", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed repetitions (medians are reported).")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed repetitions.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights and token ids.")
@click.option("--budget-s", type=click.FloatRange(min=0), default=None,
              help="Seconds one backend x batch may take, roughly: fewer repetitions (at least one) when the "
                   "first call shows that --reps would not fit.")
@click.option("--ort-tf32/--no-ort-tf32", default=False, show_default=True,
              help="Let onnxruntime's CUDA provider use TF32 matrix math.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the report here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a bar chart of decode ms/step (PNG/SVG/PDF by extension).")
@threads_option
def command(artifact, model_ref, random_size, backends, batches, prompt_len, max_new_tokens, dtype, device, reps,
            warmup, seed, budget_s, ort_tf32, json_path, plot_path, threads):
    """Time prefill (ms, tokens/s) and decode (ms/step, tokens/s) of each backend at each batch size, with peak
    device memory; on a GPU also the decode floor (weight bytes + state traffic over the HBM bandwidth measured
    in the same run) and the ratio to it.

    \b
    Examples:
      mamba-deploy bench --random tiny --backend torch,onnxruntime --batch 1,4
      mamba-deploy bench --random 370m --backend torch-fast,torch --batch 1,8,64 --prompt-len 2048 \\
          --max-new-tokens 128 --json bench.json --plot bench.png
    """
    import torch
    from tqdm.auto import tqdm

    from ..artifact import parse_dtype
    from ..bench import format_table, load_source, plot_decode, run_bench
    from ..io import refuse_existing_file, write_json
    from ..errors import UserError

    refuse_existing_file(json_path, "--json")
    refuse_existing_file(plot_path, "--plot")
    gen_len = max_new_tokens
    if gen_len < 1:
        raise UserError(f"--max-new-tokens must be >= 1 to time decoding, got {gen_len}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = backends or (["torch", "torch-fast"] if dev.type == "cuda" else ["torch"])
    if "torch-fast" in names and dev.type != "cuda":
        raise UserError("backend torch-fast needs a CUDA GPU; drop it from --backend on the CPU")
    torch_dtype = parse_dtype(dtype or ("fp16" if dev.type == "cuda" else "fp32"))
    if dev.type == "cpu" and torch_dtype == torch.float16 and "torch" in names:
        click.echo("note: fp16 on the CPU is slow in PyTorch; fp32 is the usual CPU precision", err=True)

    ort_options = ({"use_tf32": ort_tf32} if dev.type == "cuda" else {"threads": threads}) \
        if "onnxruntime" in names else None
    source = load_source(artifact, model_ref, random_size, torch_dtype, dev, seed)
    click.echo(f"benchmarking {source.label} ({str(torch_dtype).replace('torch.', '')}) on {dev}: "
               f"backends {', '.join(names)}, batch {','.join(map(str, batches))}, prompt {prompt_len}, "
               f"{gen_len} decode steps, {reps} reps", err=True)
    report = run_bench(source, names, batches, prompt_len, gen_len, dev, torch_dtype, reps=reps, warmup=warmup,
                       seed=seed, ort_options=ort_options,
                       progress=lambda it: tqdm(it, desc="batches", leave=False, unit="batch"), budget_s=budget_s,
                       on_row=(lambda rep: write_json(json_path, rep)) if json_path else None)
    click.echo(format_table(report))
    if json_path:
        click.echo(f"wrote {write_json(json_path, report)}", err=True)
    if plot_path:
        click.echo(f"wrote {plot_decode(report, plot_path)}", err=True)
