"""``mamba-deploy check``: parity of an artifact's backends against the PyTorch model of its source checkpoint."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import CheckFailed, UserError
from .options import (allow_nonfinite_option, artifact_option, backend_option, decode_len_option, device_option,
                      model_option, threads_option)


@click.command(name="check")
@artifact_option
@model_option(required=False, help="Reference checkpoint (default: the source checkpoint named in the artifact's "
                                   "manifest).")
@backend_option(default="onnxruntime", help="Backends to check against the reference, e.g. onnxruntime,tensorrt.")
@decode_len_option(default=64, help="Decode steps after the prefill.")
@click.option("--prompt-len", type=int, default=16, show_default=True, help="Length of the random prompt.")
@click.option("--batch", type=int, default=2, show_default=True, help="Sequences per run.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random prompt.")
@click.option("--atol", type=float, default=None,
              help="Absolute tolerance (default per artifact dtype, from mamba_deploy/artifact.py).")
@click.option("--rtol", type=float, default=None, help="Relative tolerance (default per artifact dtype, as --atol).")
@device_option(help="Device of the checked backends: cpu, cuda or cuda:N [default: each backend's own; cpu for "
                    "onnxruntime]. The reference always runs fp32 on CPU.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Where the report, plot and Polygraphy step files go (default: ARTIFACT/check).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="JSON report with per-step errors (default: OUT/report.json).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="PNG of max abs error vs step per backend (default: OUT/errors.png).")
@allow_nonfinite_option
@threads_option
def command(artifact, model_ref, backends, max_new_tokens, prompt_len, batch, seed, atol, rtol, device, out_dir,
            json_path, plot_path, allow_nonfinite, threads):
    """Check an artifact against the fp32 PyTorch model of its source checkpoint.

    \b
    A random prompt (from --seed) is prefilled on every backend and on the reference, then decoded for
    --max-new-tokens steps. All runs get the same input tokens (the reference's greedy choices) but each backend
    feeds back its own state, so an error in the state update grows over the rollout and shows. Logits and states
    of every step are compared with Polygraphy's Comparator (simple compare function, element-wise: an element
    fails when it exceeds both --atol and --rtol); NaN and Inf are counted and always fail. Exits 1 when any
    tolerance is exceeded.
    \b
    Writes OUT/report.json (per-step errors), OUT/errors.png, and the inputs and reference outputs of the first
    decode step in Polygraphy's formats, with the `polygraphy run` command that re-checks that step.
    \b
    Example:
      mamba-deploy check --artifact export/mamba-370m --backend onnxruntime --max-new-tokens 64
    """
    import torch

    from ..artifact import (CHECK_DIR, CHECK_PLOT, CHECK_REPORT, DEFAULT_TOLERANCES, RELATIVE_ATOL, read_manifest,
                            tolerance_key)
    from ..checkpoint import load_model
    from ..io import refuse_existing_file, write_json
    from ..parity import format_table, polygraphy_command, run_check, write_plot
    from ..runtime.session import open_session

    refuse_existing_file(json_path, "--json")
    refuse_existing_file(plot_path, "--plot")

    steps = max_new_tokens
    for opt, value, low in (("--prompt-len", prompt_len, 1), ("--batch", batch, 1)):
        if value < low:
            raise UserError(f"{opt} must be >= {low}, got {value}")
    for opt, value in (("--atol", atol), ("--rtol", rtol)):
        if value is not None and value < 0:
            raise UserError(f"{opt} must be >= 0, got {value}")
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        raise UserError("check compares with Polygraphy: pip install polygraphy") from None

    artifact = Path(artifact)
    if not artifact.is_dir():
        raise UserError(f"artifact directory {artifact} does not exist; create it with `mamba-deploy export`")
    manifest = read_manifest(artifact)
    names = backends
    dtype = tolerance_key(manifest)
    if dtype not in DEFAULT_TOLERANCES and (atol is None or rtol is None):
        raise UserError(f"no default tolerance for an artifact of dtype '{dtype}'; pass --atol and --rtol")
    atol_relative = atol is None and dtype in RELATIVE_ATOL   # an --atol given is absolute
    d_atol, d_rtol = DEFAULT_TOLERANCES.get(dtype, (atol, rtol))
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    atol_s = f"{atol:g}×max|ref|" if atol_relative else f"{atol:g}"

    source = model_ref or manifest["source"]["checkpoint"]
    options = {"device": device} if device else {}
    options["threads"] = threads
    sessions = {name: open_session(artifact, name, **options) for name in names}
    reference = open_session(load_model(source, dtype=torch.float32, allow_nonfinite=allow_nonfinite), "torch")
    first = next(iter(sessions.values()))
    if (reference.vocab_size, reference.padded_vocab_size) != (first.vocab_size, first.padded_vocab_size):
        raise UserError(f"reference checkpoint {source} has a vocabulary of {reference.vocab_size} "
                        f"({reference.padded_vocab_size} logits), the artifact {first.vocab_size} "
                        f"({first.padded_vocab_size}): --model names a different model")
    click.echo(f"checking {artifact} ({dtype}) against {source} (PyTorch fp32): backends {', '.join(names)}; "
               f"{steps} steps after a {prompt_len}-token prefill, batch {batch}, seed {seed}")

    out = Path(out_dir) if out_dir else artifact / CHECK_DIR
    state_dtype = first.state_dtype
    result = run_check(reference, sessions, steps=steps, prompt_len=prompt_len, batch=batch, seed=seed,
                       atol=atol, rtol=rtol, vocab_size=first.vocab_size, step0_dir=out, state_dtype=state_dtype,
                       atol_relative=atol_relative)
    report = result.report
    report.update(artifact=str(artifact), dtype=dtype, reference={"checkpoint": str(source), "dtype": "fp32"})
    cmd = None
    if "polygraphy" in report:
        cmd = polygraphy_command(artifact, report["polygraphy"], atol, rtol)
        report["polygraphy"]["command"] = cmd
    json_path = Path(json_path) if json_path else out / CHECK_REPORT
    plot_path = Path(plot_path) if plot_path else out / CHECK_PLOT
    write_json(json_path, report)
    write_plot(report, plot_path)

    click.echo(format_table(report))
    click.echo(f"report   {json_path}")
    click.echo(f"plot     {plot_path}")
    if cmd:
        click.echo(f"one step with Polygraphy (ONNX Runtime vs the saved reference outputs):\n  {cmd}")
    if not result.passed:
        failed = [n for n, b in report["backends"].items() if not b["passed"]]
        nonfinite = [f"{n} produced NaN/Inf (first at {first})" for n, b in report["backends"].items()
                     for first in [next((v["first_nonfinite_step"] for v in b["outputs"].values()
                                         if v.get("first_nonfinite_step")), None)] if first]
        if nonfinite:
            raise CheckFailed("; ".join(nonfinite) + f"; see {json_path}")
        raise CheckFailed(f"{', '.join(failed)} exceeded the tolerance (atol={atol_s}, rtol={rtol:g}) vs the "
                          f"PyTorch reference; see {json_path}")
    click.echo(f"PASSED: {', '.join(names)} match the PyTorch reference within atol={atol_s}, rtol={rtol:g}")
