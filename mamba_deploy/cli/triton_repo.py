"""``mamba-deploy triton-repo``: a Triton Inference Server model repository with implicit per-layer state."""
from __future__ import annotations

import click

from .options import artifact_option


@click.command(name="triton-repo")
@artifact_option
@click.option("--out", type=click.Path(), required=True, metavar="REPO", help="The model repository to write.")
@click.option("--name", default=None, help="Model name prefix (default: the artifact directory's name); the "
              "repository gets NAME_prefill and NAME_step.")
@click.option("--platform", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime",
              show_default=True, help="onnxruntime: the ONNX graphs; tensorrt: the artifact's engines (built "
              "with `build --no-plugin`).")
@click.option("--max-batch", type=int, default=8, show_default=True,
              help="max_batch_size and the sequence batcher's candidate sequences.")
@click.option("--force", is_flag=True, help="Replace REPO if it exists and is a repository triton-repo wrote.")
def command(artifact, out, name, platform, max_batch, force):
    """Write a Triton Inference Server model repository for an artifact.

    \b
    Both graphs are declared with sequence batching and implicit state: each layer's conv and SSM state
    input/output pair is a Triton state with a zero initial state, so the server keeps the states per sequence id
    and clients send only input_ids (with sequence_id, and sequence_start on the first request).
    \b
    Examples:
      mamba-deploy triton-repo --artifact export/tiny --out triton-models
      docker run --rm -p 8000:8000 -v $PWD/triton-models:/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 \\
          tritonserver --model-repository=/models
    """
    from ..serving.triton_repo import write_triton_repo

    for path in write_triton_repo(artifact, out, name=name, platform=platform, max_batch=max_batch, force=force):
        click.echo(f"wrote {path}")
