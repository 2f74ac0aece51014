"""The command line as a whole: every command module registered, shared options declared once (same names, aliases,
validation) and documented, usage errors and bad devices as one line `mamba-deploy: error: …` on every command."""
from __future__ import annotations

import importlib
import pkgutil

import click
import pytest
import torch
from click.testing import CliRunner

import mamba_deploy.cli as cli_pkg
from mamba_deploy.cli import COMMANDS, main

NOT_COMMANDS = {"__main__", "options"}


def command_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(cli_pkg.__path__) if m.name not in NOT_COMMANDS)


def all_commands() -> dict[str, click.Command]:
    return {name: main.get_command(None, name) for name in COMMANDS}


def test_every_command_module_is_registered():
    registered = {module for module, _ in COMMANDS.values()}
    for module in command_modules():
        mod = importlib.import_module(f"mamba_deploy.cli.{module}")
        assert isinstance(getattr(mod, "command", None), click.Command), f"cli/{module}.py has no `command`"
        assert module in registered, f"cli/{module}.py defines a command that COMMANDS does not list"
    for name, cmd in all_commands().items():
        assert cmd.name == name


def test_help_is_consistent():
    """Every command has examples in its --help; every option says what it does."""
    for name, cmd in all_commands().items():
        assert "Example" in (cmd.help or ""), f"{name} --help has no examples"
        for p in cmd.params:
            if isinstance(p, click.Option):
                assert p.help, f"{name} {p.opts[0]} has no help text"
        r = CliRunner().invoke(main, [name, "--help"])
        assert r.exit_code == 0 and "Usage: " in r.output


SHARED = {"--artifact": "artifact", "--model": "model_ref", "--dtype": "dtype", "--device": "device",
          "--backend": "backends", "--max-new-tokens": "max_new_tokens"}


def test_shared_options_are_declared_once():
    """Same destination, aliases, type and callback in every command that takes a shared option."""
    seen: dict[str, tuple] = {}
    for name, cmd in all_commands().items():
        for p in cmd.params:
            opt = next((o for o in p.opts if o in SHARED), None)
            if opt is None:
                continue
            assert p.name == SHARED[opt], f"{name} {opt} binds to {p.name}"
            sig = (tuple(p.opts), tuple(p.secondary_opts), type(p.type).__name__,
                   getattr(p.type, "choices", None), p.callback and p.callback.__qualname__)
            assert seen.setdefault(opt, sig) == sig, f"{name} declares {opt} differently: {sig} vs {seen[opt]}"
    assert set(seen) == set(SHARED)
    assert seen["--backend"][0] == ("--backend", "--backends")
    assert set(seen["--max-new-tokens"][0]) == {"--max-new-tokens", "-n", "--gen-len", "--steps"}


def one_line(r) -> str:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and "Usage:" not in r.output, r.output
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mamba-deploy: error: "), r.stderr
    return lines[0]


@pytest.mark.parametrize("name", list(COMMANDS))
@pytest.mark.parametrize("bad", [["--no-such-option"], ["--help-me"], ["extra-argument"]])
def test_usage_errors_are_one_line(name, bad):
    one_line(CliRunner().invoke(main, [name, *bad]))


@pytest.mark.parametrize("args", [["nosuchcommand"], ["export"], ["bench", "--batch", "1,x"],
                                  ["random", "--size", "huge", "--out", "x"], ["bench", "--reps", "0"]])
def test_missing_and_invalid_values_are_one_line(args):
    one_line(CliRunner().invoke(main, args))


def device_commands() -> list[str]:
    return [n for n, c in all_commands().items() if any("--device" in p.opts for p in c.params) and n != "train"]


DEVICE_ARGS = {"generate": ["--model", "{ckpt}", "--prompt-ids", "1,2"],
               "check": ["--artifact", "{ckpt}"],
               "bench": ["--model", "{ckpt}", "--backend", "torch"],
               "serve": ["--model", "{ckpt}"]}


@pytest.mark.parametrize("device, words", [("gpu", "is not a device name"), ("GPU0", "is not a device name"),
                                           ("meta", "runs on cpu or cuda"), ("cuda", "cuda"),
                                           ("cuda:5", "cuda")])
def test_every_command_validates_the_device_the_same_way(tiny_checkpoint, device, words):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: cuda is a valid device here")
    assert set(device_commands()) == set(DEVICE_ARGS)
    lines = set()
    for name in device_commands():
        args = [a.format(ckpt=tiny_checkpoint()) for a in DEVICE_ARGS[name]]
        line = one_line(CliRunner().invoke(main, [name, *args, "--device", device]))
        assert words in line
        lines.add(line)
    assert len(lines) == 1, lines        # the same sentence everywhere
    if device.startswith("cuda"):
        assert "CPU-only" in lines.pop() or "no CUDA GPU" in lines.pop()


@pytest.mark.parametrize("device", ["gpu", "cuda" if not torch.cuda.is_available() else "cuda:99"])
def test_session_api_validates_the_device(tiny_checkpoint, device):
    from mamba_deploy.errors import UserError
    from mamba_deploy.runtime import open_session
    with pytest.raises(UserError, match="device"):
        open_session(tiny_checkpoint(), "torch", device=device)


def test_train_device_uses_the_shared_validation(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    line = one_line(CliRunner().invoke(main, ["train", "--config", "induction-tiny", "--device", "cuda",
                                              "--out", "/nonexistent/never-written"]))
    assert "--device cuda asked for a CUDA GPU" in line


@pytest.mark.parametrize("alias", ["--backend", "--backends"])
@pytest.mark.parametrize("length", ["--max-new-tokens", "-n", "--gen-len", "--steps"])
def test_aliases_mean_the_same(tiny_checkpoint, alias, length):
    r = CliRunner().invoke(main, ["generate", "--model", str(tiny_checkpoint()), alias, "torch",
                                  "--prompt-ids", "1,2", length, "3"])
    assert r.exit_code == 0, r.output
    assert len(r.stdout.split("|", 1)[1].split()) == 3


@pytest.mark.parametrize("n", [1, 2])
def test_threads_option_sets_torch_and_onnxruntime(tiny_checkpoint, tmp_path, monkeypatch, n):
    from mamba_deploy.runtime import ort_session
    seen = {}
    real = ort_session.OrtSession.__init__

    def spy(self, *a, threads=None, **kw):
        seen["ort"] = threads
        real(self, *a, threads=threads, **kw)

    monkeypatch.setattr(ort_session.OrtSession, "__init__", spy)
    art = tmp_path / "a"
    assert CliRunner().invoke(main, ["export", "--model", str(tiny_checkpoint()), "--out", str(art)]).exit_code == 0
    before = torch.get_num_threads()
    try:
        r = CliRunner().invoke(main, ["generate", "--artifact", str(art), "--backend", "onnxruntime",
                                      "--prompt-ids", "1", "-n", "1", "--threads", str(n)])
        assert r.exit_code == 0, r.output
        assert torch.get_num_threads() == n and seen["ort"] == n
    finally:
        torch.set_num_threads(before)
    assert "must be >= 1" in one_line(CliRunner().invoke(main, ["train", "--config", "induction-tiny",
                                                                "--threads", "0", "--print-config"]))
