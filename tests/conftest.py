"""Shared fixtures: tiny random checkpoints in both formats, made on the fly (tests never download)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY = dict(d_model=32, n_layer=2, vocab_size=96, d_state=8, d_conv=4, expand=2)


def hf_tiny_model(seed: int = 0, **overrides):
    """An independent reference: transformers' MambaForCausalLM (pure-torch path on CPU), random weights."""
    from transformers import MambaConfig as HFMambaConfig, MambaForCausalLM

    t = {**TINY, **overrides}
    torch.manual_seed(seed)
    cfg = HFMambaConfig(vocab_size=t["vocab_size"], hidden_size=t["d_model"], state_size=t["d_state"],
                        num_hidden_layers=t["n_layer"], expand=t["expand"], conv_kernel=t["d_conv"],
                        time_step_rank=-(-t["d_model"] // 16), use_bias=False, use_conv_bias=True,
                        residual_in_fp32=True, layer_norm_epsilon=1e-5, use_mambapy=False)
    model = MambaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF leaves D = 1, A_log = log(1..N); randomise D a little so it matters
        for layer in model.backbone.layers:
            layer.mixer.D.add_(0.1 * torch.randn_like(layer.mixer.D))
            layer.norm.weight.add_(0.1 * torch.randn_like(layer.norm.weight))
    return model


@pytest.fixture(scope="session")
def hf_reference(tmp_path_factory):
    """(transformers model, its HF-format directory, the same weights converted to the state-spaces format)."""
    from mamba_deploy.checkpoint import load_model, save_model

    model = hf_tiny_model()
    hf_dir = tmp_path_factory.mktemp("hf") / "tiny-hf"
    model.save_pretrained(hf_dir)
    ss_dir = tmp_path_factory.mktemp("ss") / "tiny"
    save_model(load_model(hf_dir), ss_dir, fmt="state-spaces", safetensors=False)
    return model, hf_dir, ss_dir


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: a tiny random checkpoint (our init, realistic δ/A) in format ``fmt``; cached per arguments."""
    from mamba_deploy.checkpoint import save_model
    from mamba_deploy.config import MambaConfig
    from mamba_deploy.model import random_model

    cache = {}

    def make(fmt: str = "state-spaces", seed: int = 0, **overrides):
        key = (fmt, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            model = random_model(MambaConfig(**{**TINY, **overrides}), seed=seed)
            cache[key] = save_model(model, tmp_path_factory.mktemp("ckpt") / f"tiny-{fmt}-{seed}", fmt=fmt)
        return cache[key]

    return make
