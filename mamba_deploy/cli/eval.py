"""``mamba-deploy eval``: perplexity of an artifact (or checkpoint) on a local text file, as JSON."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .options import artifact_option, backend_option, model_option, single_backend, threads_option


@click.command(name="eval")
@artifact_option(required=False)
@model_option(required=False, help="A checkpoint (local directory or hub id) instead of an artifact (torch backend).")
@click.option("--text", "text_path", type=click.Path(), required=True, help="The text file to score.")
@backend_option(help="One backend: onnxruntime (default for --artifact), torch (default for --model), tensorrt.")
@click.option("--tokenizer", type=click.Path(), default=None, metavar="FILE",
              help="tokenizer.json; default byte-level (one token per UTF-8 byte).")
@click.option("--window", type=int, default=512, show_default=True,
              help="Tokens per prefill; the state carries over, so the result does not depend on it.")
@click.option("--max-tokens", type=int, default=None, help="Score only the first N tokens of the text.")
@threads_option
@click.option("--json", "json_path", type=click.Path(), default=None, help="Also write the result here.")
def command(artifact, model_ref, text_path, backends, tokenizer, window, max_tokens, threads, json_path):
    """Perplexity (and bits per token) of a model on a local text, every token predicted from all before it.

    \b
    Examples:
      mamba-deploy eval --artifact export/m --text held_out.txt
      mamba-deploy eval --artifact export/m-int4 --text held_out.txt --json int4.json
      mamba-deploy eval --model ckpt/m --text held_out.txt --backend torch
    Artifacts exported with --all-logits score a window per prefill; others (and TensorRT) one step per token.
    """
    from ..errors import UserError
    from ..evaluate import encode_text, perplexity
    from ..runtime.session import open_session

    if (artifact is None) == (model_ref is None):
        raise UserError("pass exactly one of --artifact DIR or --model REF")
    from ..io import refuse_existing_file, write_json
    text = Path(text_path)
    if not text.is_file():
        raise UserError(f"text file {text} " + ("is a directory" if text.is_dir() else "does not exist"))
    if text.stat().st_size == 0:
        raise UserError(f"text file {text} is empty; perplexity needs at least two tokens")
    refuse_existing_file(json_path, "--json")
    tok = None
    if tokenizer:
        from .generate import load_tokenizer
        tok = load_tokenizer(tokenizer)
    ids = encode_text(text.read_bytes(), tok)
    if max_tokens is not None:
        if max_tokens < 2:
            raise UserError(f"--max-tokens must be >= 2, got {max_tokens}")
        ids = ids[:max_tokens]
    source = artifact if artifact is not None else model_ref
    backend = single_backend(backends, "onnxruntime" if artifact is not None else "torch")
    options = {"threads": threads} if threads and backend == "onnxruntime" else {}
    session = open_session(source, backend, **options)
    if artifact is not None:
        from ..artifact import read_manifest
        manifest = read_manifest(artifact)
    else:
        manifest = {}
    # the real vocabulary (logit rows past it are padding)
    vocab = manifest["config"]["vocab_size"] if manifest else session.model.config.vocab_size
    if int(ids.max()) >= vocab:
        raise UserError(f"the text encodes to id {int(ids.max())}, beyond the model's vocabulary of {vocab}; "
                        "pass the model's --tokenizer (byte-level needs a vocabulary of at least 256)")
    from tqdm.auto import tqdm
    with tqdm(total=len(ids), unit="tok", desc="scoring", leave=False) as bar:
        result = perplexity(session, ids, vocab, window=window, progress=bar.update)
    result.update(source=str(source), backend=backend, text=str(text), tokenizer=tokenizer or "bytes",
                  window=window, quantization=manifest.get("quantization"), dtype=manifest.get("dtype"))
    out = json.dumps(result, indent=2)
    click.echo(out)
    if json_path:
        write_json(json_path, result)
