"""What a newcomer hits in the first ten minutes: README's commands work in the order README gives them, generated
folders are git-ignored, the tokenizer beside the weights is found and carried into the artifact, a too-small
tokenizer and a bf16 export for a CPU say so."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from mamba_deploy.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def cli(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


# ---- README ------------------------------------------------------------------------------------------------------
def shell_blocks() -> list[str]:
    """README's command blocks (```bash fences and indented 4-space blocks), in order."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    blocks += ["\n".join(line[4:] for line in m.group(0).splitlines())
               for m in re.finditer(r"(?:^    mamba-deploy [^\n]*\n)+", README, flags=re.M)]
    return blocks


def commands(block: str) -> list[list[str]]:
    """Each command of a block (continuation lines joined, `&&` chains split, comments dropped)."""
    text = block.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        for part in line.split("&&"):
            if part.strip():
                out.append(shlex.split(part))
    return out


def extras_installed(cmds: list[list[str]]) -> set[str]:
    found = set()
    for c in cmds:
        if c[:2] == ["pip", "install"] or c[:4] == ["python", "-m", "pip", "install"]:
            for arg in c:
                m = re.search(r"\.\[([^\]]+)\]", arg)
                if m:
                    found |= set(m.group(1).split(","))
    return found


def test_readme_install_then_test_command_work_in_sequence():
    """The test command needs pytest and the test tools: the install block, or the test block itself, must
    install the `test` extra (and pyproject must declare pytest in it)."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    install = next(b for b in blocks if "pip install" in b)
    tests = next(b for b in blocks if "pytest" in b)
    steps = commands(install) + commands(tests)
    run_at = next(i for i, c in enumerate(steps) if "pytest" in c)
    assert "test" in extras_installed(steps[:run_at]), "README's test command runs before `.[test]` is installed"
    pyproject = (ROOT / "pyproject.toml").read_text()
    test_extra = re.search(r"^test = \[(.*?)\]\n", pyproject, flags=re.M | re.S).group(1)
    assert '"pytest' in test_extra


def test_readme_mamba_deploy_commands_parse_and_never_collide():
    """Every `mamba-deploy` command in README parses with today's options, and, in README order, no command
    writes an --out an earlier one wrote unless it passes --force (the TensorRT example after the quick start)."""
    written: dict[str, str] = {}
    n = 0
    for block in shell_blocks():
        for c in commands(block):
            if not c or c[0] != "mamba-deploy" or len(c) < 2 or c[1] not in COMMANDS:
                continue
            n += 1
            cmd = main.get_command(None, c[1])
            args = [a for a in c[2:] if a not in ("--device",)]
            params = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
            for a in args:
                if a.startswith("-") and a not in params:
                    raise AssertionError(f"README: `{' '.join(c)}` uses {a}, which `{c[1]}` does not take")
            out = None
            if "--out" in c and c[1] in ("random", "export"):
                out = c[c.index("--out") + 1]
            elif c[1] == "export":
                out = None
            if out is not None:
                assert out not in written or "--force" in c, \
                    f"README: `{' '.join(c)}` writes {out}, which `{written[out]}` wrote before, without --force"
                written[out] = " ".join(c)
    assert n >= 10


def test_readme_quick_start_then_tensorrt_export_run(tmp_path, monkeypatch):
    """The quick start's commands, then the TensorRT section's export, for real in a fresh directory."""
    monkeypatch.chdir(tmp_path)
    install = next(b for b in re.findall(r"```bash\n(.*?)```", README, flags=re.S) if "pip install" in b)
    trt = next(b for b in shell_blocks() if "mamba-deploy build" in b)
    for c in commands(install) + commands(trt):
        if c[0] != "mamba-deploy" or c[1] == "build":
            continue
        r = cli(*c[1:])
        assert r.exit_code == 0, (c, r.output)


def test_generated_folders_are_git_ignored():
    paths = ["ckpt/tiny/model.safetensors", ".venv-ci/bin/python", ".venv/bin/python", "export/tiny/step.onnx",
             "runs/x/metrics.jsonl"]
    r = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True)
    assert sorted(r.stdout.split()) == sorted(paths), r.stdout + r.stderr


# ---- tokenizer ---------------------------------------------------------------------------------------------------
def word_tokenizer(path: Path, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.save(str(path))
    return tok


@pytest.fixture()
def ckpt_with_tokenizer(tiny_checkpoint, tmp_path):
    import shutil
    pytest.importorskip("tokenizers")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint(seed=41), ckpt)
    word_tokenizer(ckpt / "tokenizer.json", 96)
    return ckpt


def test_tokenizer_beside_the_weights_is_used_and_exported(ckpt_with_tokenizer, tmp_path):
    ckpt = ckpt_with_tokenizer
    explicit = cli("generate", "--model", ckpt, "--tokenizer", ckpt / "tokenizer.json", "--prompt", "w5 w9", "-n", 4)
    assert explicit.exit_code == 0, explicit.output
    found = cli("generate", "--model", ckpt, "--prompt", "w5 w9", "-n", 4)
    assert found.exit_code == 0 and found.stdout == explicit.stdout and found.stdout.startswith("w5 w9 w")
    as_dir = cli("generate", "--model", ckpt, "--tokenizer", ckpt, "--prompt", "w5 w9", "-n", 4)
    assert as_dir.exit_code == 0 and as_dir.stdout == explicit.stdout
    art = tmp_path / "art"
    assert cli("export", "--model", ckpt, "--out", art).exit_code == 0
    manifest = json.loads((art / "manifest.json").read_text())
    assert (art / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    assert "tokenizer.json" in manifest["files"]
    r = cli("generate", "--artifact", art, "--backend", "onnxruntime", "--prompt", "w5 w9", "-n", 4)
    assert r.exit_code == 0 and r.stdout == explicit.stdout, r.output


@pytest.mark.parametrize("tok_vocab", [50, 95])
def test_tokenizer_smaller_than_the_vocabulary_warns(tiny_checkpoint, tmp_path, tok_vocab):
    pytest.importorskip("tokenizers")
    word_tokenizer(tmp_path / "tokenizer.json", tok_vocab)
    r = cli("generate", "--model", tiny_checkpoint(), "--tokenizer", tmp_path / "tokenizer.json",
            "--prompt", "w1 w2", "-n", 2)
    assert r.exit_code == 0, r.output
    assert f"the tokenizer has {tok_vocab} tokens but the model's vocabulary 96" in r.stderr
    word_tokenizer(tmp_path / "tokenizer.json", 96)
    r = cli("generate", "--model", tiny_checkpoint(), "--tokenizer", tmp_path / "tokenizer.json",
            "--prompt", "w1 w2", "-n", 2)
    assert "warning" not in r.stderr


# ---- precision -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stored, export_as, warns", [("bf16", None, True), ("fp32", "bf16", True),
                                                      ("bf16", "fp16", False), ("fp16", None, False)])
def test_bf16_export_says_onnxruntime_cpu_cannot_run_it_and_info_shows_the_stored_dtype(tmp_path, stored,
                                                                                           export_as, warns):
    ckpt = tmp_path / "c"
    assert cli("random", "--out", ckpt, "--dtype", stored).exit_code == 0
    info = cli("info", "--model", ckpt)
    assert f"stored as    {stored}" in info.stdout
    assert json.loads(cli("info", "--model", ckpt, "--json").stdout)["stored_dtype"] == [stored]
    r = cli("export", "--model", ckpt, "--out", tmp_path / "a", *(["--dtype", export_as] if export_as else []))
    assert r.exit_code == 0, r.output
    assert ("ONNX Runtime on CPU has no bf16 kernels" in r.stderr) == warns
