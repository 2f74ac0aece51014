"""NaN/Inf are reported, never passed on silently: in weights (load, export, info), at run time (generate stops
naming the step and layer), and in `check` (counts and first step in the table, JSON and plot)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from mamba_deploy.checkpoint import load_model, save_model
from mamba_deploy.cli import main
from mamba_deploy.errors import UserError

POISONS = {  # (parameter, index, value): fresh places and kinds, not one example
    "nan-A_log": ("backbone.layers.1.mixer.A_log", (5, 3), math.nan),
    "inf-out_proj": ("backbone.layers.0.mixer.out_proj.weight", (7, 11), math.inf),
    "neg-inf-norm_f": ("backbone.norm_f.weight", (2,), -math.inf),
    "nan-conv": ("backbone.layers.1.mixer.conv1d.weight", (9, 0, 2), math.nan),
}


def poisoned(ckpt, tmp_path, name, index, value, suffix=""):
    model = load_model(ckpt)
    with torch.no_grad():
        model.get_parameter(name)[index] = value
    return save_model(model, tmp_path / f"poisoned{suffix}")


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error(r) -> str:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit)
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("[")]   # export's progress lines
    assert len(lines) == 1 and lines[0].startswith("mamba-deploy: error: "), r.stderr
    return lines[0]


@pytest.mark.parametrize("poison", list(POISONS))
def test_load_export_info_refuse_nonfinite_weights(tiny_checkpoint, tmp_path, poison):
    name, index, value = POISONS[poison]
    bad = poisoned(tiny_checkpoint(seed=11), tmp_path, name, index, value)
    kind = "1 NaN, 0 Inf" if math.isnan(value) else "0 NaN, 1 Inf"
    want = f"{name}: {kind} (first at {list(index)})"
    with pytest.raises(UserError, match="non-finite weights") as e:
        load_model(bad)
    assert want in str(e.value) and "--allow-nonfinite" in str(e.value)
    assert [str(b) for b in load_model(bad, allow_nonfinite=True).nonfinite] == [want]
    # export: refused, nothing written; with the flag: written, with a warning
    out = tmp_path / "art"
    assert want in one_error(cli("export", "--model", bad, "--out", out))
    assert not out.exists()
    r = cli("export", "--model", bad, "--out", out, "--allow-nonfinite")
    assert r.exit_code == 0 and f"warning: non-finite weights exported as they are: {want}" in r.stderr
    # info: refused; with the flag: shown, in the text and the JSON
    assert want in one_error(cli("info", "--model", bad))
    r = cli("info", "--model", bad, "--allow-nonfinite")
    assert r.exit_code == 0 and f"non-finite   {want}" in r.stdout
    d = json.loads(cli("info", "--model", bad, "--allow-nonfinite", "--json").stdout)
    assert d["nonfinite"] == [{"name": name, "nan": int(math.isnan(value)), "inf": int(math.isinf(value)),
                               "first": list(index)}]


def test_cast_overflow_is_reported(tiny_checkpoint, tmp_path):
    """Finite fp32 weights that overflow fp16 (max 65504) are Inf after --dtype fp16: reported as such."""
    bad = poisoned(tiny_checkpoint(seed=12), tmp_path, "backbone.layers.0.mixer.in_proj.weight", (3, 4), 1e6)
    load_model(bad)                                           # fp32: fine
    line = one_error(cli("export", "--model", bad, "--out", tmp_path / "a", "--dtype", "fp16"))
    assert "after the cast to fp16" in line and "in_proj.weight: 0 NaN, 1 Inf (first at [3, 4])" in line


@pytest.fixture(scope="module")
def decode_poison(tiny_checkpoint, tmp_path_factory):
    """An untied tiny model whose embedding row for the 3rd greedy token is NaN: prefill and the first two decode
    steps are finite, the step that feeds that token is not (its NaN enters layer 0 first)."""
    from mamba_deploy.generation import generate
    from mamba_deploy.runtime import open_session

    clean = tiny_checkpoint(seed=13, tie_embeddings=False)
    prompt = [5, 6, 7, 8]
    tokens = generate(open_session(clean, "torch"), [prompt], max_new_tokens=4).tokens[0]
    x = tokens[2]
    assert x not in prompt and x not in tokens[:2], tokens
    model = load_model(clean)
    with torch.no_grad():
        model.backbone.embedding.weight[x] = math.nan
    bad = save_model(model, tmp_path_factory.mktemp("poison") / "decode")
    art = tmp_path_factory.mktemp("poison") / "art"
    assert cli("export", "--model", bad, "--out", art, "--allow-nonfinite").exit_code == 0
    return bad, art, prompt, tokens


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("sampling", [[], ["--temperature", "0.8", "--top-p", "0.9"]])
def test_generate_stops_where_nonfinite_values_appear(decode_poison, backend, sampling):
    bad, art, prompt, tokens = decode_poison
    source = ["--model", bad, "--allow-nonfinite"] if backend == "torch" else ["--artifact", art]
    r = cli("generate", *source, "--backend", backend, "--prompt-ids", ",".join(map(str, prompt)), "-n", "8",
            *([] if not sampling else sampling))
    if sampling and r.exit_code == 0:   # sampling may avoid the poisoned token; greedy cannot
        assert "nan" not in r.output.lower()
        return
    line = one_error(r)
    assert "non-finite values at decode step 3" in line and "layer 0" in line, line
    if not sampling:
        assert r.stdout.split() == [",".join(map(str, prompt)), "|", *map(str, tokens[:3])]


def test_generate_stops_at_the_prefill(tiny_checkpoint, tmp_path):
    bad = poisoned(tiny_checkpoint(seed=14), tmp_path, "backbone.layers.1.mixer.A_log", (0, 0), math.nan)
    r = cli("generate", "--model", bad, "--allow-nonfinite", "--prompt-ids", "1,2,3", "--prompt-ids", "4,5")
    line = one_error(r)
    assert "at the prefill of prompt 0" in line and "layer 1 (SSM state)" in line
    assert r.stdout == ""                      # nothing printed before the error


class PoisonAt:
    """Wraps a session; from decode step ``k`` on, its logits hold 3 NaN and layer 1's SSM state one +Inf (only in
    what it returns: it continues from its clean state, so the counts stay exact)."""

    def __init__(self, inner, k):
        self.inner, self.k, self.t = inner, k, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def prefill(self, ids, state=None):
        logits, self.clean = self.inner.prefill(ids, state)
        return logits, self.clean

    def step(self, ids, state):
        from mamba_deploy.model import MambaState
        self.t += 1
        logits, self.clean = self.inner.step(ids, self.clean)
        if self.t < self.k:
            return logits, self.clean
        logits = logits.clone()
        logits[0, :3] = math.nan
        ssm = [s.clone() for s in self.clean.ssm]
        ssm[1][0, 0, 0] = math.inf
        return logits, MambaState(list(self.clean.conv), ssm)


def test_check_reports_nan_and_inf_as_such(tiny_checkpoint, tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mamba_deploy.io import write_json
    from mamba_deploy.parity import format_table, plot_nonfinite, run_check, write_plot
    from mamba_deploy.runtime import open_session

    ckpt = tiny_checkpoint(seed=15)
    ref = open_session(ckpt, "torch")
    k = 4
    res = run_check(ref, {"poisoned": PoisonAt(open_session(ckpt, "torch"), k)}, steps=7, prompt_len=5, batch=2,
                    seed=1, atol=1e-5, rtol=1e-4, vocab_size=96, progress=False)
    assert not res.passed
    out = res.report["backends"]["poisoned"]["outputs"]
    steps_in = 7 - k + 1
    assert out["logits"]["nan"] == 3 * steps_in and out["logits"]["inf"] == 0
    assert out["logits"]["first_nonfinite_step"] == f"step {k}" and out["logits"]["max_abs"] == math.inf
    assert out["ssm_state_out.1"]["inf"] == steps_in and out["ssm_state_out.0"]["nan"] == 0
    assert out["ssm_state_out.0"]["first_nonfinite_step"] is None
    table = format_table(res.report)
    assert f"FAILED: {3 * steps_in} NaN, 0 Inf (first at step {k})" in table
    assert f"FAILED: 0 NaN, {steps_in} Inf (first at step {k})" in table
    assert "0.000e+00" not in table.split("logits", 1)[1].splitlines()[0]
    path = write_json(tmp_path / "report.json", res.report)

    def strict(c):
        raise AssertionError(c)

    back = json.loads(path.read_text(), parse_constant=strict)
    assert back["backends"]["poisoned"]["outputs"]["logits"]["max_abs"] == "Infinity"
    assert [s["logits_nonfinite"] for s in back["backends"]["poisoned"]["steps"]] == [0] * k + [3] * steps_in
    fig, ax = plt.subplots()
    plot_nonfinite(ax, "poisoned", res.report["backends"]["poisoned"], "C0")
    assert f"poisoned: NaN/Inf from step {k}" in ax.get_legend_handles_labels()[1]
    plt.close(fig)
    write_plot(res.report, tmp_path / "errors.png")
    assert (tmp_path / "errors.png").read_bytes()[:4] == b"\x89PNG"


def test_check_cli_names_nonfinite_backend(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint(seed=16)
    bad = poisoned(ckpt, tmp_path, "backbone.layers.0.mixer.D", (4,), math.nan)
    art = tmp_path / "art"
    assert cli("export", "--model", bad, "--out", art, "--allow-nonfinite").exit_code == 0
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["source"]["checkpoint"] = str(ckpt)          # the clean model is the reference
    (art / "manifest.json").write_text(json.dumps(manifest))
    r = cli("check", "--artifact", art, "--steps", "3", "--out", tmp_path / "chk")
    assert r.exit_code == 1
    assert "onnxruntime produced NaN/Inf (first at prefill)" in r.stderr
    assert "NaN" in r.stdout and "first at prefill" in r.stdout
