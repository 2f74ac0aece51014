"""``mamba-deploy check``: parity of an artifact's backends against the PyTorch model of its source checkpoint."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import CheckFailed, UserError


@click.command(name="check")
@click.option("--artifact", type=click.Path(), required=True, metavar="DIR",
              help="The artifact directory `mamba-deploy export` wrote.")
@click.option("--model", "model_ref", default=None, metavar="REF",
              help="Reference checkpoint (default: the source checkpoint named in the artifact's manifest).")
@click.option("--backends", default="onnxruntime", show_default=True, metavar="NAME[,NAME…]",
              help="Backends to check against the reference, e.g. onnxruntime,tensorrt.")
@click.option("--steps", type=int, default=64, show_default=True, help="Decode steps after the prefill.")
@click.option("--prompt-len", type=int, default=16, show_default=True, help="Length of the random prompt.")
@click.option("--batch", type=int, default=2, show_default=True, help="Sequences per run.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random prompt.")
@click.option("--atol", type=float, default=None,
              help="Absolute tolerance (default per artifact dtype, from mamba_deploy/artifact.py).")
@click.option("--rtol", type=float, default=None, help="Relative tolerance (default per artifact dtype, as --atol).")
@click.option("--device", default=None,
              help="Device of the checked backends: cpu or cuda[:N] (default: each backend's own; cpu for "
                   "onnxruntime). The reference always runs fp32 on CPU.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Where the report, plot and Polygraphy step files go (default: ARTIFACT/check).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="JSON report with per-step errors (default: OUT/report.json).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="PNG of max abs error vs step per backend (default: OUT/errors.png).")
def command(artifact, model_ref, backends, steps, prompt_len, batch, seed, atol, rtol, device, out_dir, json_path,
            plot_path):
    """Check an artifact against the fp32 PyTorch model of its source checkpoint.

    \b
    A random prompt (from --seed) is prefilled on every backend and on the reference, then decoded for --steps
    steps. All runs get the same input tokens (the reference's greedy choices) but each backend feeds back its
    own state, so an error in the state update grows over the rollout and shows. Logits and states of every
    step are compared with Polygraphy's Comparator (simple compare function, element-wise: an element fails when
    it exceeds both --atol and --rtol). Exits 1 when any tolerance is exceeded.
    \b
    Writes OUT/report.json (per-step errors), OUT/errors.png, and the inputs and reference outputs of the first
    decode step in Polygraphy's formats, with the `polygraphy run` command that re-checks that step.
    \b
    Example:
      mamba-deploy check --artifact export/mamba-370m --backends onnxruntime --steps 64
    """
    import torch

    from ..artifact import CHECK_DIR, CHECK_PLOT, CHECK_REPORT, DEFAULT_TOLERANCES, read_manifest
    from ..checkpoint import load_model
    from ..io import write_json
    from ..parity import format_table, polygraphy_command, run_check, write_plot
    from ..runtime.session import check_backend_name, open_session

    for opt, value, low in (("--steps", steps, 0), ("--prompt-len", prompt_len, 1), ("--batch", batch, 1)):
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
    names = [b.strip() for b in backends.split(",") if b.strip()]
    if not names:
        raise UserError("--backends is empty; name at least one backend, e.g. onnxruntime")
    for name in names:
        check_backend_name(name)
    dtype = manifest["dtype"]
    if dtype not in DEFAULT_TOLERANCES and (atol is None or rtol is None):
        raise UserError(f"no default tolerance for an artifact of dtype '{dtype}'; pass --atol and --rtol")
    d_atol, d_rtol = DEFAULT_TOLERANCES.get(dtype, (atol, rtol))
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol

    source = model_ref or manifest["source"]["checkpoint"]
    options = {"device": device} if device else {}
    sessions = {name: open_session(artifact, name, **options) for name in names}
    reference = open_session(load_model(source, dtype=torch.float32), "torch")
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
                       atol=atol, rtol=rtol, vocab_size=first.vocab_size, step0_dir=out, state_dtype=state_dtype)
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
        raise CheckFailed(f"{', '.join(failed)} exceeded the tolerance (atol={atol:g}, rtol={rtol:g}) vs the "
                          f"PyTorch reference; see {json_path}")
    click.echo(f"PASSED: {', '.join(names)} match the PyTorch reference within atol={atol:g}, rtol={rtol:g}")
