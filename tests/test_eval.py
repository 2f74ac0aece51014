"""`mamba-deploy eval`: perplexity on a text made here, for a tiny byte-level model trained a few steps in the test.
Invariants: ONNX Runtime fp32 == the PyTorch model (float64 reference scan) within 1e-4 relative; the windowed
pass == one pass (the state carries the past); the trained model beats both the uniform distribution and its
own untrained start; int8/int4 artifacts are reported and stay near fp32."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from mamba_deploy.cli import main
from mamba_deploy.config import MambaConfig
from mamba_deploy.evaluate import encode_text, perplexity
from mamba_deploy.model import random_model

TEXT = ("the quick brown fox jumps over the lazy dog. " * 6 + "pack my box with five dozen liquor jugs. " * 6) * 3


def train_tiny(steps: int = 60):
    torch.manual_seed(0)
    model = random_model(MambaConfig(d_model=32, n_layer=2, vocab_size=256, d_state=8, d_conv=4, expand=2), seed=0)
    ids = encode_text(TEXT.encode())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        start = (step * 37) % (len(ids) - 65)
        x = ids[start:start + 65][None]
        logits, _ = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits[0, :, :256], x[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from mamba_deploy.checkpoint import save_model
    from mamba_deploy.onnx.export import export
    from mamba_deploy.onnx.quantize import parse_quant_spec

    root = tmp_path_factory.mktemp("eval")
    ckpt = save_model(train_tiny(), root / "ckpt")
    untrained = save_model(random_model(MambaConfig(d_model=32, n_layer=2, vocab_size=256, d_state=8, d_conv=4,
                                                    expand=2), seed=0), root / "untrained")
    text = root / "text.txt"
    text.write_text(TEXT)
    arts = {"fp32": export(ckpt, root / "fp32", all_logits=True),
            "fp32-steps": export(ckpt, root / "fp32-steps"),
            "int8": export(ckpt, root / "int8", all_logits=True, quant=parse_quant_spec("int8")),
            "int4": export(ckpt, root / "int4", all_logits=True, quant=parse_quant_spec("int4"))}
    return ckpt, untrained, text, arts


def run_eval(tmp_path, *args):
    out = tmp_path / f"ppl-{len(list(tmp_path.glob('ppl-*.json')))}.json"     # --json takes a new path each time
    r = CliRunner().invoke(main, ["eval", *args, "--json", str(out)])
    assert r.exit_code == 0, r.output
    return json.loads(out.read_text())


def test_perplexity_fp32_matches_torch_and_beats_uniform(trained, tmp_path):
    ckpt, untrained, text, arts = trained
    ort = run_eval(tmp_path, "--artifact", str(arts["fp32"]), "--text", str(text), "--window", "100")
    steps = run_eval(tmp_path, "--artifact", str(arts["fp32-steps"]), "--text", str(text))     # one step per token
    ref = run_eval(tmp_path, "--model", str(ckpt), "--text", str(text), "--window", "10000")   # one pass
    base = run_eval(tmp_path, "--model", str(untrained), "--text", str(text))
    assert ort["predicted"] == len(TEXT) - 1 == ref["predicted"]
    assert abs(ort["perplexity"] - ref["perplexity"]) <= 1e-4 * ref["perplexity"]
    assert abs(steps["perplexity"] - ref["perplexity"]) <= 1e-4 * ref["perplexity"]
    assert ref["perplexity"] < 0.5 * base["perplexity"] and ref["perplexity"] < 256 / 4
    assert math.isclose(ref["bits_per_token"], math.log2(ref["perplexity"]), rel_tol=1e-9)


def test_perplexity_by_hand(trained):
    """evaluate.perplexity (7-token windows, state carried) against a direct float64 log-softmax of one full
    forward pass of the same fp32 model."""
    from mamba_deploy.checkpoint import load_model
    from mamba_deploy.runtime.session import open_session

    ckpt, _, _, _ = trained
    model = load_model(ckpt, scan_backend="reference").eval()
    ids = encode_text(TEXT[:300].encode())
    with torch.no_grad():
        logits, _ = model(ids[None])
    logp = torch.log_softmax(logits[0, :-1, :256].double(), -1)
    nll = -float(logp.gather(1, ids[1:, None]).sum())
    got = perplexity(open_session(model, "torch"), ids, 256, window=7)
    assert math.isclose(got["nll"], nll, rel_tol=1e-5)


def test_quantized_perplexity_reported(trained, tmp_path):
    _, _, text, arts = trained
    ppl = {k: run_eval(tmp_path, "--artifact", str(arts[k]), "--text", str(text)) for k in ("fp32", "int8", "int4")}
    assert ppl["int8"]["quantization"]["scheme"] == "int8" and ppl["fp32"]["quantization"] is None
    assert abs(ppl["int8"]["perplexity"] / ppl["fp32"]["perplexity"] - 1) < 0.05
    assert abs(ppl["int4"]["perplexity"] / ppl["fp32"]["perplexity"] - 1) < 0.5
    assert ppl["int4"]["perplexity"] != ppl["fp32"]["perplexity"]


@pytest.mark.parametrize("args, message", [
    (["--text", "nope.txt"], "pass exactly one"),
    (["--model", "M", "--artifact", "A", "--text", "t"], "pass exactly one"),
])
def test_eval_bad_input(args, message):
    r = CliRunner().invoke(main, ["eval", *args])
    assert r.exit_code == 2 and message in r.output, r.output
