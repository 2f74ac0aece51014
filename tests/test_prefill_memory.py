"""Prefill memory is bounded by a chunk, not the prompt: no backend computes per-position logits unless asked
(all_logits), the layers never see more than `prefill_chunk` positions at once, and chunking changes nothing."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from mamba_deploy.checkpoint import load_model
from mamba_deploy.cli import main
from mamba_deploy.runtime import open_session


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint(seed=31)


@pytest.fixture(scope="module")
def artifact(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "a"
    assert CliRunner().invoke(main, ["export", "--model", str(ckpt), "--out", str(out)]).exit_code == 0
    return out


def record_rows(model):
    """Largest number of positions the lm_head and each mixer saw in one call."""
    seen = {"lm_head": 0, "mixer": 0}

    def hook(name):
        def f(module, args):
            x = args[0]
            rows = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
            positions = x.shape[1] if x.dim() == 3 else 1
            seen[name] = max(seen[name], rows if name == "lm_head" else positions)
        return f

    handles = [model.lm_head.register_forward_pre_hook(hook("lm_head"))]
    handles += [layer.mixer.register_forward_pre_hook(hook("mixer")) for layer in model.backbone.layers]
    return seen, handles


@pytest.mark.parametrize("T, chunk", [(1, 8), (63, 64), (64, 64), (65, 64), (300, 37), (257, 256)])
def test_torch_prefill_is_chunked_and_computes_only_the_last_logits(ckpt, T, chunk):
    model = load_model(ckpt)
    g = torch.Generator().manual_seed(T)
    ids = torch.randint(0, 96, (2, T), generator=g)
    with torch.no_grad():
        full_logits, full_state = model(ids)                  # the unchunked reference (all positions)
    session = open_session(model, "torch", prefill_chunk=chunk)
    seen, handles = record_rows(model)
    try:
        logits, state = session.prefill(ids)
    finally:
        for h in handles:
            h.remove()
    assert seen["lm_head"] <= 2, seen                           # batch × 1 row, never batch × T
    assert seen["mixer"] <= chunk, seen
    assert logits.shape == (2, 96)
    torch.testing.assert_close(logits, full_logits[:, -1].float(), atol=1e-5, rtol=1e-5)
    for a, b in zip((*state.conv, *state.ssm), (*full_state.conv, *full_state.ssm)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    every, _ = session.prefill(ids, all_logits=True)            # asked for: every position
    torch.testing.assert_close(every, full_logits.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T, chunk", [(50, 16), (33, 33), (7, 100)])
def test_onnxruntime_prefill_is_chunked(artifact, T, chunk, monkeypatch):
    ids = torch.randint(0, 96, (3, T), generator=torch.Generator().manual_seed(T))
    whole_logits, whole_state = open_session(artifact, "onnxruntime", prefill_chunk=10_000).prefill(ids)
    session = open_session(artifact, "onnxruntime", prefill_chunk=chunk)
    lengths = []
    run = session._run

    def spy(graph, input_ids, state):
        lengths.append(input_ids.shape[-1])
        return run(graph, input_ids, state)

    monkeypatch.setattr(session, "_run", spy)
    logits, state = session.prefill(ids)
    assert max(lengths) <= chunk and sum(lengths) == T
    torch.testing.assert_close(logits, whole_logits, atol=1e-5, rtol=1e-5)
    for a, b in zip((*state.ssm, *state.conv), (*whole_state.ssm, *whole_state.conv)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_prefill_chunk_must_be_positive(ckpt, artifact):
    from mamba_deploy.errors import UserError
    for src, be in ((ckpt, "torch"), (artifact, "onnxruntime")):
        with pytest.raises(UserError, match="prefill_chunk must be >= 1"):
            open_session(src, be, prefill_chunk=0)
