"""``mamba-deploy generate``: continue prompts on any backend, streaming tokens as they come."""
from __future__ import annotations

import sys

import click

from ..errors import UserError


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
    """A ``tokenizers`` tokenizer.json (no download)."""
    from pathlib import Path
    p = Path(path)
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


@click.command(name="generate")
@click.option("--artifact", type=click.Path(), default=None, metavar="DIR",
              help="An exported artifact directory (manifest.json, step.onnx, prefill.onnx).")
@click.option("--model", "model_ref", default=None, metavar="REF",
              help="A checkpoint (local directory or hub id) instead of an artifact (for the torch backends).")
@click.option("--backend", default="torch", show_default=True, metavar="NAME",
              help="torch, onnxruntime, or another registered backend. With --artifact and torch, the PyTorch "
                   "model is the artifact's source checkpoint.")
@click.option("--prompt-ids", "prompt_ids", multiple=True, metavar="1,2,3",
              help="A prompt as comma-separated token ids; repeat for several prompts (one batch).")
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT",
              help="A text prompt (needs --tokenizer); repeat for several prompts (one batch).")
@click.option("--tokenizer", type=click.Path(), default=None, metavar="FILE",
              help="tokenizer.json (HF tokenizers format) to encode --prompt and decode the output.")
@click.option("--max-new-tokens", "-n", type=int, default=32, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy (argmax).")
@click.option("--top-k", type=int, default=0, show_default=True, help="Sample among the k most likely (0 = off).")
@click.option("--top-p", type=float, default=1.0, show_default=True,
              help="Nucleus sampling: the smallest set of tokens with this probability mass (1 = off).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of each sequence's random generator (same seed, same tokens).")
@click.option("--stop-ids", "stop_ids", default=None, metavar="ID[,ID…]",
              help="Token ids that end a sequence (e.g. the EOS id 0 of GPT-NeoX's tokenizer).")
@click.option("--device", default=None,
              help="Device of the backend: cpu or cuda[:N] (default: the backend's; cpu for torch and onnxruntime).")
@click.option("--state-in", "state_in", type=click.Path(), default=None, metavar="FILE",
              help="Resume from a state file (--state-out of an earlier run, any backend of the same artifact); "
                   "the prompt, if given, continues it.")
@click.option("--state-out", "state_out", type=click.Path(), default=None, metavar="FILE",
              help="Save the state after the prompt and every generated token (safetensors, one prompt only).")
def command(artifact, model_ref, backend, prompt_ids, prompts, tokenizer, max_new_tokens, temperature, top_k,
            top_p, seed, stop_ids, device, state_in, state_out):
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
    from ..runtime.session import check_backend_name, open_session

    check_backend_name(backend)
    if (artifact is None) == (model_ref is None):
        raise UserError("give exactly one of --artifact DIR or --model REF")
    if artifact is not None and not Path(artifact).is_dir():
        raise UserError(f"artifact directory {artifact} does not exist; create it with `mamba-deploy export`")
    if prompt_ids and prompts:
        raise UserError("give --prompt-ids or --prompt, not both")
    if not prompt_ids and not prompts and state_in is None:
        raise UserError("give a prompt: --prompt-ids 1,2,3 or --prompt TEXT --tokenizer tokenizer.json")
    if prompts and tokenizer is None:
        raise UserError("--prompt TEXT needs --tokenizer tokenizer.json (or give token ids with --prompt-ids)")
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
    if state_out and not Path(state_out).resolve().parent.is_dir():
        raise UserError(f"--state-out {state_out}: directory {Path(state_out).parent} does not exist")

    options = {"device": device} if device else {}
    session = open_session(artifact if artifact is not None else model_ref, backend, **options)
    start = session.load_state(state_in) if state_in else None

    batch = len(ids)
    streams = [TextStream(tok, p) for p in ids] if tok else None

    def piece(i: int, token: int) -> str:
        return streams[i].push(token) if streams else f" {token}"

    if batch == 1:   # inline: the prompt, then each token as it comes
        click.echo(prompts[0] if prompts else ",".join(map(str, ids[0])) + " |", nl=False)

        def on_token(i, token):
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
