"""The ``mamba-deploy`` command: a group of small subcommands, one module each (imported when used).

User mistakes (``UserError``) print one line ``mamba-deploy: error: …`` and exit 2; a failed check exits 1.
"""
from __future__ import annotations

import importlib
import sys

import click

from .. import __version__

# name → (module under mamba_deploy.cli, one-line help). Modules are imported only when their command runs.
COMMANDS = {
    "info": ("info", "Show a checkpoint's format, config, parameter count and memory needs."),
    "random": ("random_ckpt", "Write a checkpoint of a named size with random weights (no hub needed)."),
    "export": ("export", "Export a checkpoint to an ONNX artifact (step + prefill graphs, manifest)."),
    "build": ("build", "Build TensorRT engines (step + prefill) for an artifact, with the selective-scan plugin."),
    "generate": ("generate", "Continue prompts on any backend (greedy or sampled), streaming tokens."),
    "check": ("check", "Compare an artifact's backends with the PyTorch source model (Polygraphy); exit 1 on failure."),
    "serve": ("serve", "Serve a model over an OpenAI-compatible HTTP API (continuous batching, prefix-state cache)."),
    "triton-repo": ("triton_repo", "Write a Triton Inference Server model repository (sequence batching, implicit "
                    "state)."),
    "eval": ("eval", "Perplexity of an artifact or checkpoint on a local text file (JSON)."),
    "bench": ("bench", "Time prefill and decode of several backends side by side, against the HBM floor."),
    "train": ("train", "Train a model from a TOML config or preset (synthetic tasks, text), with checkpoints."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f".{COMMANDS[name][0]}", __name__)
        return module.command

    def format_commands(self, ctx, formatter):
        rows = [(name, help_) for name, (_, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """As click's, but a usage error (unknown option, bad value, missing argument) is one line
        ``mamba-deploy: error: …`` with exit status 2 instead of click's usage block."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()
            sys.exit(e.exit_code)
        except click.ClickException as e:
            where = e.ctx.command_path if getattr(e, "ctx", None) is not None else "mamba-deploy"
            hint = f" (see `{where} --help`)" if isinstance(e, click.UsageError) else ""
            message = "; ".join(line.strip() for line in e.format_message().splitlines() if line.strip())
            click.echo(f"mamba-deploy: error: {message}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("mamba-deploy: interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx):
        from ..errors import CheckFailed, UserError
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"mamba-deploy: error: {e}", err=True)
            sys.exit(e.exit_code)
        except CheckFailed as e:
            click.echo(f"mamba-deploy: FAILED: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("mamba-deploy: interrupted", err=True)
            sys.exit(130)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="mamba-deploy")
def main():
    """Run Mamba language models outside PyTorch.

    \b
    A typical session:
      mamba-deploy random --size tiny --out ckpt/tiny      # or use a hub id / local checkpoint
      mamba-deploy info   --model ckpt/tiny
      mamba-deploy export --model ckpt/tiny --out export/tiny
      mamba-deploy check  --artifact export/tiny
      mamba-deploy generate --artifact export/tiny --prompt-ids 1,2,3 -n 16
    """


if __name__ == "__main__":
    main()
