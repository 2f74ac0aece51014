"""``mamba-deploy generate``: continue prompts on any backend, streaming tokens as they come."""
from __future__ import annotations

import sys

import click

from ..errors import UserError
from .options import (allow_nonfinite_option, artifact_option, backend_option, decode_len_option, device_option,
                      model_option, single_backend, threads_option)


def parse_ids(text: str, what: str = "--prompt-ids") -> list[int]:
    """'1,2,3' (spaces allowed) → [1, 2, 3]; anything else is a one-line UserError."""
    parts = [p.strip() for p in text.replace(" ", ",").split(",") if p.strip()]
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"{what} takes comma-separated integer token ids such as 1,2,3; got '{text}'") from None
    if not ids:
        raise UserError(f"{what} is empty; give comma-separated token ids such as 1,2,3")
    if min(ids) < 0:
        raise UserError(f"{what}: token ids must be >= 0; got '{text}'")
    return ids


def load_tokenizer(path):
    """A ``tokenizers`` tokenizer.json, or a directory holding one (no download)."""
    from pathlib import Path
    p = Path(path)
    if p.is_dir():
        if not (p / "tokenizer.json").is_file():
            raise UserError(f"--tokenizer {p} is a directory without a tokenizer.json; pass the file or the "
                            "directory that holds it")
        p = p / "tokenizer.json"
    if not p.is_file():
        raise UserError(f"tokenizer file {p} does not exist; pass --tokenizer PATH/tokenizer.json (the file that "
                        "ships with the model, e.g. EleutherAI/gpt-neox-20b's for Mamba)")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UserError("--tokenizer needs the 'tokenizers' package: pip install tokenizers") from None
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise UserError(f"{p} is not a valid tokenizer.json ({str(e).splitlines()[0][:200]})") from None


def find_tokenizer(artifact, model_ref):
    """tokenizer.json beside the weights (a local checkpoint directory) or in the artifact, if there is one."""
    from pathlib import Path
    for where in (artifact, model_ref):
        if where is not None and (Path(where) / "tokenizer.json").is_file():
            return Path(where) / "tokenizer.json"
    return None


def warn_small_tokenizer(tok, vocab: int) -> None:
    """A tokenizer with fewer tokens than the model's vocabulary cannot decode every id the model may produce."""
    n = tok.get_vocab_size(with_added_tokens=True)
    if n < vocab:
        click.echo(f"warning: the tokenizer has {n} tokens but the model's vocabulary {vocab}: ids {n}…{vocab - 1} "
                   "cannot be decoded (is it the model's own tokenizer?)", err=True)


def check_id_range(prompts: list[list[int]], stops: list[int], vocab: int, what: str) -> None:
    """Every prompt id and stop id must be a token of the model's vocabulary [0, vocab); checked before anything
    is printed or computed."""
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            where = f"prompt {i}" if len(prompts) > 1 else "the prompt"
            raise UserError(f"{what}: {where} has token id {bad[0]} outside the model's vocabulary [0, {vocab})")
    bad = [t for t in stops if not 0 <= t < vocab]
    if bad:
        raise UserError(f"--stop-ids: token id {bad[0]} is outside the model's vocabulary [0, {vocab})")


@click.command(name="generate")
@artifact_option(required=False)
@model_option(required=False, help="A checkpoint (local directory or hub id) instead of an artifact (for the torch "
                                   "backends).")
@backend_option(default="torch", help="One backend: torch, onnxruntime, torch-fast (CUDA), tensorrt. With "
                                      "--artifact and torch, the PyTorch model is the artifact's source checkpoint.")
@click.option("--prompt-ids", "prompt_ids", multiple=True, metavar="1,2,3",
              help="A prompt as comma-separated token ids; repeat for several prompts (one batch).")
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT",
              help="A text prompt (needs --tokenizer); repeat for several prompts (one batch).")
@click.option("--tokenizer", type=click.Path(), default=None, metavar="FILE|DIR",
              help="tokenizer.json (HF tokenizers format), or a directory holding one, to encode --prompt and decode "
                   "the output [default for --prompt: the tokenizer.json beside the weights or in the artifact].")
@decode_len_option(default=32, help="Tokens to generate per prompt (fewer when a stop id comes).")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy (argmax).")
@click.option("--top-k", type=int, default=0, show_default=True, help="Sample among the k most likely (0 = off).")
@click.option("--top-p", type=float, default=1.0, show_default=True,
              help="Nucleus sampling: the smallest set of tokens with this probability mass (1 = off).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of each sequence's random generator (same seed, same tokens).")
@click.option("--stop-ids", "stop_ids", default=None, metavar="ID[,ID…]",
              help="Token ids that end a sequence (e.g. the EOS id 0 of GPT-NeoX's tokenizer).")
@device_option
@click.option("--state-in", "state_in", type=click.Path(), default=None, metavar="FILE",
              help="Resume from a state file (--state-out of an earlier run, any backend of the same artifact); "
                   "the prompt, if given, continues it.")
@click.option("--state-out", "state_out", type=click.Path(), default=None, metavar="FILE",
              help="Save the state after the prompt and every generated token (safetensors, one prompt only).")
@allow_nonfinite_option
@threads_option
def command(artifact, model_ref, backends, prompt_ids, prompts, tokenizer, max_new_tokens, temperature, top_k,
            top_p, seed, stop_ids, device, state_in, state_out, allow_nonfinite, threads):
    """Continue one or more prompts, printing tokens as they are generated.

    \b
    Each prompt is prefilled at its own length, then all decode together in one batch, so a prompt gives the
    same tokens alone or batched. With --tokenizer the output is text; otherwise token ids.
    \b
    Examples:
      mamba-deploy generate --model ckpt/tiny --prompt-ids 1,2,3 -n 16
      mamba-deploy generate --artifact export/tiny --prompt-ids 1,2,3 -n 8 --state-out s.safetensors
      mamba-deploy generate --artifact export/tiny --backend onnxruntime --state-in s.safetensors -n 8
      mamba-deploy generate --artifact export/mamba-370m --backend onnxruntime \\
          --tokenizer tokenizer.json --prompt "Mamba is" --prompt "The capital of France" --temperature 0.8 --top-p 0.9
    """
    from pathlib import Path

    from ..generation import SamplingParams, TextStream, generate
    from ..runtime.session import open_session

    backend = single_backend(backends, "torch")
    if (artifact is None) == (model_ref is None):
        raise UserError("give exactly one of --artifact DIR or --model REF")
    if artifact is not None and not Path(artifact).is_dir():
        raise UserError(f"artifact directory {artifact} does not exist; create it with `mamba-deploy export`")
    if prompt_ids and prompts:
        raise UserError("give --prompt-ids or --prompt, not both")
    if not prompt_ids and not prompts and state_in is None:
        raise UserError("give a prompt: --prompt-ids 1,2,3 or --prompt TEXT --tokenizer tokenizer.json")
    if prompts and tokenizer is None:
        tokenizer = find_tokenizer(artifact, model_ref)
        if tokenizer is None:
            raise UserError("--prompt TEXT needs a tokenizer: --tokenizer tokenizer.json (or its directory), a "
                            "tokenizer.json beside the weights, or token ids with --prompt-ids")
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    stops = parse_ids(stop_ids, "--stop-ids") if stop_ids else []
    tok = load_tokenizer(tokenizer) if tokenizer else None
    if prompts:
        ids = [tok.encode(p).ids for p in prompts]
        for p, i in zip(prompts, ids):
            if not i:
                raise UserError(f"prompt '{p}' encodes to no tokens")
    else:
        ids = [parse_ids(p) for p in prompt_ids] or [[]]   # no prompt: continue --state-in's stored logits
    if (state_in or state_out) and len(ids) != 1:
        raise UserError("--state-in/--state-out work on one prompt at a time")
    from ..io import refuse_existing_file
    from ..runtime.state_io import is_state_file
    refuse_existing_file(state_out, "--state-out", ours=is_state_file)    # a state file it wrote may be advanced
    if state_out and not Path(state_out).resolve().parent.is_dir():
        raise UserError(f"--state-out {state_out}: directory {Path(state_out).parent} does not exist")

    options = {"device": device} if device else {}
    if backend == "onnxruntime":
        options["threads"] = threads
    if allow_nonfinite:
        options["allow_nonfinite"] = True
    session = open_session(artifact if artifact is not None else model_ref, backend, **options)
    start = session.load_state(state_in) if state_in else None

    vocab = session.vocab_size
    if tok is not None:
        warn_small_tokenizer(tok, vocab)
    check_id_range(ids, stops, vocab, "--prompt" if prompts else "--prompt-ids")
    batch = len(ids)
    streams = [TextStream(tok, p) for p in ids] if tok else None

    def piece(i: int, token: int) -> str:
        return streams[i].push(token) if streams else f" {token}"

    if batch == 1:   # inline: the prompt (once the first token came: an error before prints nothing), then tokens
        echoed = []

        def on_token(i, token):
            if not echoed:
                echoed.append(True)
                click.echo(prompts[0] if prompts else ",".join(map(str, ids[0])) + " |", nl=False)
            text = piece(i, token)
            if text:
                click.echo(text, nl=False)
                sys.stdout.flush()
    else:            # one line per token event, tagged with the prompt index
        def on_token(i, token):
            text = piece(i, token)
            if text:
                click.echo(f"[{i}] {text!r}" if streams else f"[{i}]{text}")

    result = generate(session, ids, max_new_tokens=max_new_tokens, params=params, seed=seed, stop_ids=stops,
                      on_token=on_token, start=start, keep_state=state_out is not None)
    if state_out:
        n_tokens = (start.n_tokens if start else 0) + len(ids[0]) + len(result.tokens[0])
        session.save_state(result.state, state_out, n_tokens, result.logits)
        click.echo(f"state after {n_tokens} tokens saved to {state_out}", err=True)
    if batch == 1:
        if not echoed:  # --max-new-tokens 0
            click.echo(prompts[0] if prompts else ",".join(map(str, ids[0])) + " |", nl=False)
        if streams:
            tail = streams[0].flush()
            if tail:
                click.echo(tail, nl=False)
        click.echo()
    else:
        for i, new in enumerate(result.tokens):
            text = tok.decode(ids[i] + new) if tok else ",".join(map(str, ids[i])) + " | " + \
                ",".join(map(str, new))
            click.echo(f"--- prompt {i} ({len(new)} new tokens{', stopped' if result.stopped[i] else ''}) ---")
            click.echo(text)
