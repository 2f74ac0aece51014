"""``mamba-deploy export``: a checkpoint → an ONNX artifact (step.onnx, prefill.onnx, weights, manifest.json)."""
from __future__ import annotations

import time

import click

from .options import allow_nonfinite_option, dtype_option, model_option


@click.command(name="export")
@model_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Artifact directory to write [default: export/<model-name>].")
@dtype_option(help="Precision of weights and activations (the SSM state and logits stay fp32) "
                   "[default: as stored].")
@click.option("--opset", type=int, default=None, metavar="N",
              help="Default-domain ONNX opset (18 or newer that the artifact's IR version allows) [default: 18].")
@click.option("--all-logits", is_flag=True,
              help="prefill.onnx returns the logits of every position [batch, seq, vocab] instead of the last one.")
@click.option("--prefill-scan", type=click.Choice(["chunked", "sequential"]), default="chunked", show_default=True,
              help="The prefill scan's algorithm in prefill.onnx: chunked (≈ 3·√L loop iterations, all chunks at "
                   "once) or sequential (one loop iteration per token).")
@click.option("--quantize", "scheme", type=click.Choice(["none", "int8", "int4"]), default="none", show_default=True,
              help="Weight-only quantization of in_proj, out_proj and the LM head (the SSM, its state and the "
                   "scan stay fp32); needs fp32 weights.")
@click.option("--quant-format", type=click.Choice(["matmulnbits", "qdq"]), default="matmulnbits", show_default=True,
              help="matmulnbits: ONNX Runtime's MatMulNBits kernel (CPU: int8 dot products); qdq: "
                   "DequantizeLinear + MatMul, standard ONNX that TensorRT also builds (opset 21).")
@click.option("--quant-block", type=int, default=None, metavar="N",
              help="Input channels per scale: int4 32 or 128 [default: 32]; int8 matmulnbits 16…256 [128]; "
                   "int8 qdq is per output channel (0).")
@click.option("--force", is_flag=True, help="Replace --out if it exists and is an artifact mamba-deploy wrote (the "
                                            "old one stays until the new one is complete).")
@allow_nonfinite_option
def command(model_ref, out_dir, dtype, opset, all_logits, prefill_scan, scheme, quant_format, quant_block, force,
            allow_nonfinite):
    """Export a Mamba-1, Mamba-2 or FalconMamba checkpoint to an ONNX artifact that ONNX Runtime and TensorRT run.

    \b
    The artifact directory holds
      step.onnx          one token:   input_ids [batch] + per-layer states → logits [batch, vocab] + states
      prefill.onnx       a sequence:  input_ids [batch, seq] + states → last logits (or all) + final states
      weights.onnx.data  the weights, shared by both graphs (external data)
      manifest.json      dims, dtypes, I/O names and shapes, ops, checksums, source checkpoint
    The scan is one node per layer (mamba_deploy::SelectiveScanStep / SelectiveScan; SSDScanStep / SSDScan for
    Mamba-2), defined as an ONNX function of standard ops (--opset 27: standard LinearAttention
    instead). It is written to a temporary directory and renamed when complete.

    \b
    Examples:
      mamba-deploy export --model state-spaces/mamba-370m --dtype fp16 --out export/mamba-370m-fp16
      mamba-deploy export --model ckpt/m130 --quantize int4 --quant-block 32 --out export/m130-int4
      mamba-deploy export --model ckpt/m130 --quantize int8 --quant-format qdq --out export/m130-int8-qdq
    """
    from ..onnx.export import export
    from ..onnx.quantize import parse_quant_spec

    start = time.perf_counter()

    def progress(message):
        click.echo(f"[{time.perf_counter() - start:6.1f}s] {message}", err=True)

    quant = parse_quant_spec(scheme, quant_format, quant_block)
    out = export(model_ref, out_dir, dtype=dtype, opset=opset, all_logits=all_logits, force=force, progress=progress,
                 allow_nonfinite=allow_nonfinite, prefill_scan=prefill_scan, quant=quant)
    from ..artifact import read_manifest
    m = read_manifest(out)
    size = sum(f["bytes"] for f in m["files"].values())
    q = m.get("quantization")
    kind = m["dtype"] + (f", {q['scheme']} {q['format']} block {q['block_size']}" if q else "")
    click.echo(f"wrote {out} ({kind}, {m['dims']['n_layer']} layers, opset {m['onnx']['opset']}, "
               f"{size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f}s")
