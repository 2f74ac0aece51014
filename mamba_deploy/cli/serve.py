"""``mamba-deploy serve``: the OpenAI-compatible HTTP server with continuous batching and a prefix-state cache."""
from __future__ import annotations

import click

from ..errors import UserError
from .options import artifact_option, backend_option, device_option, model_option, single_backend


@click.command(name="serve")
@artifact_option(required=False)
@model_option(required=False, help="A checkpoint instead of an artifact (torch backends).")
@backend_option(default="torch", help="One backend: torch, onnxruntime, torch-fast (CUDA) or tensorrt.")
@device_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to listen on.")
@click.option("--max-batch", type=int, default=8, show_default=True,
              help="State slots: sequences decoded together; more requests wait in a queue.")
@click.option("--block", type=int, default=256, show_default=True,
              help="Prompt block in tokens: prefill chunks end at block boundaries and the prefix cache keeps the "
                   "state after every full block.")
@click.option("--prefix-cache-mb", type=float, default=256, show_default=True,
              help="Memory budget of the prefix-state cache (least recently used snapshots go first; 0 = off).")
@click.option("--tokenizer", type=click.Path(), default=None, metavar="FILE",
              help="tokenizer.json for text prompts (without it, prompts are token-id lists).")
@click.option("--served-model-name", default=None, help="The model id clients send (default: the directory name).")
@click.option("--max-prompt-tokens", type=int, default=1 << 20, show_default=True,
              help="Longest prompt a request may send, in tokens.")
@click.option("--max-tokens-limit", type=int, default=1 << 16, show_default=True,
              help="Largest max_tokens a request may ask for.")
def command(artifact, model_ref, backends, device, host, port, max_batch, block, prefix_cache_mb, tokenizer,
            served_model_name, max_prompt_tokens, max_tokens_limit):
    """Serve a model over an OpenAI-compatible HTTP API.

    \b
    Endpoints: POST /v1/completions (stream=true for server-sent events), GET /v1/models, GET /health,
    GET /metrics (Prometheus). Requests share a fixed pool of --max-batch state slots: prompts are prefilled in
    block-sized chunks between decode steps, join the running decode batch at step boundaries, and free their slot
    as soon as they finish or the client disconnects.
    \b
    Examples:
      mamba-deploy serve --artifact export/tiny --backend onnxruntime --port 8000
      curl -s localhost:8000/v1/completions -H 'content-type: application/json' \\
          -d '{"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0}'
      mamba-deploy serve --model ckpt/mamba-370m --backend torch-fast --max-batch 64 --tokenizer tokenizer.json
    """
    from pathlib import Path

    from .generate import load_tokenizer

    backend = single_backend(backends, "torch")
    if (artifact is None) == (model_ref is None):
        raise UserError("give exactly one of --artifact DIR or --model REF")
    if artifact is not None and not Path(artifact).is_dir():
        raise UserError(f"artifact directory {artifact} does not exist; create it with `mamba-deploy export`")
    if not 0 <= port < 65536:
        raise UserError(f"--port must lie in [0, 65535], got {port}")
    tok = load_tokenizer(tokenizer) if tokenizer else None
    from ..serving.server import build_app
    app, engine = build_app(artifact if artifact is not None else model_ref, backend, max_batch=max_batch,
                            block=block, prefix_cache_mb=prefix_cache_mb, tokenizer=tok,
                            model_name=served_model_name, device=device, max_prompt_tokens=max_prompt_tokens,
                            max_tokens_limit=max_tokens_limit)
    import uvicorn
    click.echo(f"serving model '{app.state.model_name}' on http://{host}:{port} ({backend}, {max_batch} slots)",
               err=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
