"""The PyTorch model against an independent reference (transformers' MambaForCausalLM) and against itself."""
from __future__ import annotations

import pytest
import torch

from helpers import assert_states_close
from mamba_deploy.checkpoint import load_model

ATOL_FP32 = 1e-5  # max abs logit error vs transformers, fp32 (same bound as an fp32 artifact)


def _ids(vocab, shape, seed):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", ["hf", "state-spaces"])
def test_logits_match_transformers(hf_reference, fmt):
    hf_model, hf_dir, ss_dir = hf_reference
    ours = load_model(hf_dir if fmt == "hf" else ss_dir)
    assert ours.source.weight_format == fmt and ours.source.config_format == fmt
    ids = _ids(hf_model.config.vocab_size, (2, 80), seed=1)
    with torch.no_grad():
        ref = hf_model(ids).logits
        full, _ = ours(ids)
        state = ours.allocate_state(2)
        rolled = []
        for t in range(ids.shape[1]):                     # >= 64-token step-by-step rollout
            logits, state = ours.step(ids[:, t], state)
            rolled.append(logits)
    assert (full - ref).abs().max().item() <= ATOL_FP32
    assert (torch.stack(rolled, 1) - ref).abs().max().item() <= ATOL_FP32


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint("state-spaces", seed=3))


def test_forward_then_step_equals_longer_forward(model):
    ids = _ids(model.config.vocab_size, (2, 33), seed=2)
    with torch.no_grad():
        _, state = model(ids[:, :32])
        step_logits, _ = model.step(ids[:, 32], state)
        full, _ = model(ids)
    torch.testing.assert_close(step_logits, full[:, 32], atol=1e-5, rtol=1e-5)


def test_forward_from_state_equals_concatenated(model):
    ids = _ids(model.config.vocab_size, (3, 50), seed=4)
    with torch.no_grad():
        full, full_state = model(ids)
        _, state = model(ids[:, :17])
        tail, tail_state = model(ids[:, 17:], state)
    torch.testing.assert_close(tail, full[:, 17:], atol=1e-5, rtol=1e-5)
    assert_states_close(full_state, tail_state)


def test_step_state_equals_forward_state(model):
    ids = _ids(model.config.vocab_size, (2, 9), seed=5)
    with torch.no_grad():
        _, fstate = model(ids)
        state = model.allocate_state(2)
        for t in range(9):
            _, state = model.step(ids[:, t], state)
    assert_states_close(fstate, state)


def test_batch_equals_each_alone(model):
    ids = _ids(model.config.vocab_size, (4, 40), seed=6)
    with torch.no_grad():
        batched, _ = model(ids)
        for i in range(4):
            alone, _ = model(ids[i:i + 1])
            torch.testing.assert_close(batched[i:i + 1], alone, atol=1e-6, rtol=1e-6)


def test_reference_and_chunked_backends_agree_in_model(model):
    ids = _ids(model.config.vocab_size, (1, 300), seed=7)
    with torch.no_grad():
        model.scan_backend = "reference"
        ref, _ = model(ids)
        model.scan_backend = "chunked"
        fast, _ = model(ids)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_bf16_model_runs_and_keeps_fp32_ssm_state(tiny_checkpoint):
    m = load_model(tiny_checkpoint("hf"), dtype="bf16")
    ids = _ids(m.config.vocab_size, (2, 5), seed=8)
    with torch.no_grad():
        logits, state = m(ids)
    assert logits.dtype == torch.bfloat16
    assert all(s.dtype == torch.float32 for s in state.ssm) and all(c.dtype == torch.bfloat16 for c in state.conv)
