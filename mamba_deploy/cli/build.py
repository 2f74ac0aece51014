"""``mamba-deploy build``: TensorRT engines (step + prefill) for an exported artifact."""
from __future__ import annotations

import click

from .options import artifact_option, dtype_option


@click.command(name="build")
@artifact_option(help="Artifact directory written by `mamba-deploy export` (engines and build_report.json go "
                      "there).")
@dtype_option(name="--precision", dest="precision",
              help="Activation precision [default: the artifact's]. TensorRT-RTX builds typed networks, so it must "
                   "match the artifact; full TensorRT can lower an fp32 artifact to fp16/bf16.")
@click.option("--max-batch", type=click.IntRange(1), default=8, show_default=True,
              help="Largest batch the engines accept (optimization profile max; opt = half of it).")
@click.option("--max-prefill-len", type=click.IntRange(1), default=2048, show_default=True,
              help="Longest prompt chunk the prefill engine accepts (longer prompts are fed in chunks).")
@click.option("--no-plugin", is_flag=True,
              help="Do not use the selective-scan plugin: TensorRT inlines each custom node's ONNX function body "
                   "(plain layers; the prefill scan becomes a loop).")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=str), default=None, metavar="FILE",
              help="Read and update this TensorRT timing cache (speeds up rebuilds).")
@click.option("--graph", "graphs", type=click.Choice(["step", "prefill"]), multiple=True,
              help="Build only this graph (repeatable; default: both).")
@click.option("--verbose", is_flag=True, help="Print TensorRT's warnings and info.")
def command(artifact, precision, max_batch, max_prefill_len, no_plugin, timing_cache, graphs, verbose):
    """Parse the artifact's step.onnx and prefill.onnx with TensorRT and save step.engine / prefill.engine.

    \b
    With the plugin (default) every SelectiveScanStep / SelectiveScan node becomes one PLUGIN_V3 layer running
    the CUDA kernels of plugins/ (enable with the parser flag ENABLE_PLUGIN_OVERRIDE). build_report.json lists
    every layer of every network with its type, the profiles, plan sizes and build times.

    \b
    Works with TensorRT >= 10 or TensorRT-RTX (pip install 'mamba-deploy[tensorrt]'); TensorRT-RTX builds
    without a GPU. Running the engines needs a GPU that flavor supports (see README).

    \b
    Examples:
      mamba-deploy build --artifact export/tiny-fp16 --max-batch 8 --max-prefill-len 2048
      mamba-deploy build --artifact export/tiny-fp16 --no-plugin
    """
    from ..artifact import BUILD_REPORT
    from ..trt.builder import build

    report = build(artifact, precision=precision, max_batch=max_batch, max_prefill_len=max_prefill_len,
                   use_plugin=not no_plugin, timing_cache_file=timing_cache, graphs=graphs or ("step", "prefill"),
                   verbose=verbose, progress=lambda msg: click.echo(msg, err=True))
    click.echo(f"{report['tensorrt']}, precision {report['precision']}, "
               f"{'plugin' if report['plugin'] else 'no plugin (inlined ONNX functions)'}")
    for graph, e in report["engines"].items():
        click.echo(f"{graph:8s} {e['file']:15s} {e['plan_bytes'] / 2**20:8.2f} MiB  build {e['build_seconds']:.1f} s  "
                   f"{e['num_layers']} layers, {e['plugin_layers']} PLUGIN_V3")
    click.echo(f"report   {BUILD_REPORT}")
