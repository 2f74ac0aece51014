"""Mamba-2 and FalconMamba PyTorch models against an independent reference (transformers' Mamba2ForCausalLM and
FalconMambaForCausalLM, tiny random weights), from both checkpoint formats, and against themselves."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from helpers import one_thread  # noqa: F401  (autouse fixture: one torch thread for tiny models)
from mamba_deploy.checkpoint import load_model, save_model
from mamba_deploy.cli import main
from mamba_deploy.model import MambaState, random_model

ATOL_FP32 = 1e-5  # max abs logit error vs transformers, fp32
FAMILIES = ("mamba2", "falcon_mamba")


def hf_tiny(family: str, seed: int = 0):
    """transformers' model (pure-torch path on CPU) with odd sizes: Mamba-2 with 2 groups, headdim 16, d_state 16,
    chunk 8; parameters that transformers initialises to constants (D, norms, conv bias) randomised so they matter."""
    torch.manual_seed(seed)
    if family == "mamba2":
        from transformers import Mamba2Config, Mamba2ForCausalLM
        cfg = Mamba2Config(vocab_size=96, hidden_size=32, state_size=16, num_hidden_layers=2, expand=2,
                           conv_kernel=4, head_dim=16, num_heads=4, n_groups=2, chunk_size=8,
                           tie_word_embeddings=False)
        model = Mamba2ForCausalLM(cfg)
    else:
        from transformers import FalconMambaConfig, FalconMambaForCausalLM
        cfg = FalconMambaConfig(vocab_size=96, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                                conv_kernel=4, tie_word_embeddings=False, mixer_rms_eps=1e-6)
        model = FalconMambaForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.backbone.layers:
            m = layer.mixer
            params = [m.D, layer.norm.weight, m.conv1d.bias] + ([m.norm.weight, m.dt_bias] if family == "mamba2" else [])
            for p in params:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=FAMILIES)
def reference(request, tmp_path_factory):
    """(family, transformers model, its HF-format directory, the same weights converted to the state-spaces format)."""
    model = hf_tiny(request.param)
    hf_dir = tmp_path_factory.mktemp("hf") / f"{request.param}-hf"
    model.save_pretrained(hf_dir)
    ss_dir = save_model(load_model(hf_dir), tmp_path_factory.mktemp("ss") / request.param, fmt="state-spaces")
    return request.param, model, hf_dir, ss_dir


def _ids(vocab, shape, seed):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _hf_cache_from(hf_model, state: MambaState):
    """A transformers cache holding our state (layouts are the same, so this is a copy)."""
    from transformers import DynamicCache
    cache = DynamicCache(config=hf_model.config)
    for layer, conv, ssm in zip(cache.layers, state.conv, state.ssm):
        layer.update_conv_state(conv.clone(), conv_kernel_size=conv.shape[-1])
        layer.update_recurrent_state(ssm.clone())
    return cache


def _state_from_hf(cache) -> MambaState:
    return MambaState([l.conv_states[0].clone() for l in cache.layers],
                      [l.recurrent_states[0].clone() for l in cache.layers])


@pytest.mark.parametrize("fmt", ["hf", "state-spaces"])
def test_logits_match_transformers(reference, fmt):
    family, hf_model, hf_dir, ss_dir = reference
    ours = load_model(hf_dir if fmt == "hf" else ss_dir)
    assert ours.config.family == family
    ids = _ids(96, (2, 45), seed=1)       # 45: not a multiple of the chunk (8)
    with torch.no_grad():
        ref = hf_model(ids).logits
        got, _ = ours(ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= ATOL_FP32


@pytest.mark.parametrize("fmt", ["hf", "state-spaces"])
def test_step_rollout_matches_transformers(reference, fmt):
    """Prefill 11 tokens, then 64 decode steps, each on both models with their own caches."""
    family, hf_model, hf_dir, ss_dir = reference
    ours = load_model(hf_dir if fmt == "hf" else ss_dir)
    prompt = _ids(96, (2, 11), seed=2)
    worst = 0.0
    with torch.no_grad():
        out = hf_model(prompt, use_cache=True)
        cache, ref = out.cache, out.logits[:, -1]
        got, state = ours(prompt)
        worst = max(worst, (got[:, -1] - ref).abs().max().item())
        for _ in range(64):
            tok = ref.argmax(-1)
            out = hf_model(tok[:, None], cache=cache, use_cache=True)
            cache, ref = out.cache, out.logits[:, -1]
            got, state = ours.step(tok, state)
            worst = max(worst, (got - ref).abs().max().item())
    assert worst <= ATOL_FP32, worst


def test_states_interchange_with_transformers(reference):
    """Our prefill state continues in transformers, and transformers' prefill state continues in ours."""
    family, hf_model, hf_dir, _ = reference
    ours = load_model(hf_dir)
    prompt, nxt = _ids(96, (2, 13), seed=3), _ids(96, (2,), seed=4)
    with torch.no_grad():
        _, our_state = ours(prompt)
        hf_cache = hf_model(prompt, use_cache=True).cache
        hf_state = _state_from_hf(hf_cache)
        for a, b in zip(our_state.conv + our_state.ssm, hf_state.conv + hf_state.ssm):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert (a - b).abs().max().item() <= ATOL_FP32
        ref = hf_model(nxt[:, None], cache=_hf_cache_from(hf_model, our_state), use_cache=True).logits[:, -1]
        got, _ = ours.step(nxt, our_state)
        assert (got - ref).abs().max().item() <= ATOL_FP32      # ours → transformers
        got_from_hf, _ = ours.step(nxt, hf_state)
        ref_hf = hf_model(nxt[:, None], cache=hf_cache, use_cache=True).logits[:, -1]
        assert (got_from_hf - ref_hf).abs().max().item() <= ATOL_FP32  # transformers → ours


@pytest.fixture(scope="module")
def mamba2_model():
    from mamba_deploy.families.mamba2.config import config_for_size
    return random_model(config_for_size("mamba2-tiny", d_model=32, headdim=8, D_has_hdim=True), seed=0)


@pytest.mark.parametrize("T", [1, 8, 21])
def test_forward_then_step_equals_longer_forward(mamba2_model, T):
    ids = _ids(mamba2_model.config.vocab_size, (2, T + 1), seed=T)
    with torch.no_grad():
        full, full_state = mamba2_model(ids)
        _, state = mamba2_model(ids[:, :T])
        last, step_state = mamba2_model.step(ids[:, T], state)
    assert (last - full[:, -1]).abs().max().item() <= 1e-5
    for a, b in zip(step_state.ssm + step_state.conv, full_state.ssm + full_state.conv):
        assert (a - b).abs().max().item() <= 1e-5


def test_reference_and_chunked_scans_agree_in_model(mamba2_model):
    ids = _ids(mamba2_model.config.vocab_size, (2, 37), seed=5)
    with torch.no_grad():
        a, sa = mamba2_model(ids)
        mamba2_model.scan_backend = "reference"
        try:
            b, sb = mamba2_model(ids)
        finally:
            mamba2_model.scan_backend = "auto"
    assert (a - b).abs().max().item() <= 1e-5
    assert all((x - y).abs().max().item() <= 1e-5 for x, y in zip(sa.ssm, sb.ssm))



# ---- config and weight layout -------------------------------------------------------------------------------------
def _non_default(family: str):
    """A config with a non-default value in EVERY field (a new field without one fails the check below)."""
    import dataclasses
    if family == "mamba2":
        from mamba_deploy.families.mamba2.config import Mamba2Config as cls
        values = dict(d_model=24, n_layer=3, vocab_size=97, d_state=8, d_conv=3, expand=4, headdim=12, ngroups=4,
                      chunk_size=5, D_has_hdim=True, norm_before_gate=True, dt_limit=(1e-3, 0.5), conv_bias=False,
                      bias=True, residual_in_fp32=False, norm_eps=0.5, pad_vocab_size_multiple=8,
                      tie_embeddings=False)
    else:
        from mamba_deploy.families.falcon_mamba.config import FalconMambaConfig as cls
        values = dict(d_model=48, n_layer=3, vocab_size=97, d_state=4, d_conv=3, expand=3, dt_rank=5, conv_bias=False,
                      bias=True, residual_in_fp32=False, norm_eps=0.5, pad_vocab_size_multiple=16,
                      tie_embeddings=False, mixer_rms_eps=0.25)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(values) == set(fields)
    assert all(values[n] != f.default for n, f in fields.items() if f.default is not dataclasses.MISSING)
    return cls(**values)


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_table_is_the_models_parameters(family):
    from mamba_deploy.families import weight_table
    from mamba_deploy.model import MambaLM
    for cfg in (_non_default(family), hf_tiny_config(family)):
        with torch.device("meta"):
            model = MambaLM(cfg)
        params = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if cfg.tie_embeddings:
            params.pop("lm_head.weight")
        assert {w.name: w.shape for w in weight_table(cfg)} == params


@pytest.mark.parametrize("fmt", ["state-spaces", "hf"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_config_field_round_trips(tmp_path, family, fmt):
    """Saved and loaded: the same config and the same logits; a field the HF dialect cannot hold (Mamba-2's
    D_has_hdim, norm_before_gate) is a one-line error naming it, and nothing is written."""
    from mamba_deploy.errors import UserError
    model = random_model(_non_default(family), seed=3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    if family == "mamba2" and fmt == "hf":
        with pytest.raises(UserError, match="D_has_hdim=True, norm_before_gate=True"):
            save_model(model, tmp_path / "a", fmt=fmt)
        assert not (tmp_path / "a").exists()
        return
    back = load_model(save_model(model, tmp_path / "a", fmt=fmt), dtype=torch.float32)
    assert back.config == model.config
    ids = _ids(97, (2, 9), seed=0)
    with torch.no_grad():
        torch.testing.assert_close(back(ids)[0], model(ids)[0], rtol=0, atol=0)


def hf_tiny_config(family: str):
    """Our config of ``hf_tiny(family)``'s shape."""
    from mamba_deploy.families import config_from_json
    return config_from_json(hf_tiny(family).config.to_dict())[0]

# ---- bad inputs: one line, exit 2 ---------------------------------------------------------------------------------
def _one_line_error(args, needle):
    result = CliRunner().invoke(main, list(args))
    lines = [l for l in result.output.strip().splitlines() if l.strip()]
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert len(lines) == 1 and lines[0].startswith("mamba-deploy: error:") and needle in lines[0], result.output


def _patched_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes,needle", [
    ({"attn_layer_idx": [1], "attn_cfg": {"num_heads": 4}}, "attention layers"),
    ({"d_intermediate": 64}, "MLP"),
])
def test_hybrid_configs_refused(reference, tmp_path, changes, needle):
    family, _, _, ss_dir = reference
    _one_line_error(["info", "--model", str(_patched_copy(ss_dir, tmp_path / "hybrid", **changes))], needle)


def test_d_inner_not_a_multiple_of_headdim_refused(reference, tmp_path):
    family, _, hf_dir, ss_dir = reference
    if family != "mamba2":
        pytest.skip("headdim is a Mamba-2 field")
    bad = _patched_copy(ss_dir, tmp_path / "bad", ssm_cfg={"headdim": 48})
    _one_line_error(["info", "--model", str(bad)], "not a multiple of headdim")


def test_weights_of_one_family_with_config_of_another_refused(reference, tmp_path):
    """Mamba-2 weights under a Mamba-1 config, and FalconMamba (= Mamba-1-shaped) weights under a Mamba-2 config."""
    family, _, _, ss_dir = reference
    ssm_cfg = ({"layer": "Mamba1", "d_state": 16} if family == "mamba2"
               else {"layer": "Mamba2", "d_state": 8, "headdim": 16, "ngroups": 1})
    bad = tmp_path / "other"
    shutil.copytree(ss_dir, bad)
    (bad / "config.json").write_text(json.dumps({"d_model": 32, "n_layer": 2, "vocab_size": 96, "ssm_cfg": ssm_cfg,
                                                 "pad_vocab_size_multiple": 1, "tie_embeddings": False}))
    _one_line_error(["info", "--model", str(bad)], "config.json")


# ---- training (chunked scan on the CPU) ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("family,extra", [("mamba2", ["model.headdim=16", "model.ngroups=2", "model.chunk_size=16"]),
                                          ("falcon_mamba", [])])
def test_train_on_cpu_and_checkpoint_is_a_model(tmp_path, family, extra):
    """induction-tiny with the other family's block: the loss falls, the checkpoint loads, exports and checks."""
    from mamba_deploy.training.config import load_config
    from mamba_deploy.training.data import InductionHeads
    from mamba_deploy.training.evaluate import evaluate_forward

    run = tmp_path / "run"
    sets = [f'model.family="{family}"'] + extra + ["eval.every=50", "eval.samples=64", "eval.step_lengths=[40]",
                                                  "eval.step_samples=8"]
    args = ["train", "--config", "induction-tiny", "--out", str(run), "--max-steps", "50", "--device", "cpu",
            "--no-progress", "--set", "train.scan_backend=\"auto\""]
    for s in sets:
        args += ["--set", s]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    summary = json.loads((run / "summary.json").read_text())
    trained = load_model(summary["checkpoint"])
    assert trained.config.family == family
    cfg = load_config("induction-tiny")
    batches = InductionHeads(cfg.data.seq_len, cfg.data.vocab).valid_batches(seed=123, samples=128, batch=64)
    init = random_model(trained.config, seed=cfg.train.seed)
    loss_init = evaluate_forward(init, batches, 16, "cpu")["loss"]
    loss_trained = evaluate_forward(trained, batches, 16, "cpu")["loss"]
    assert loss_trained < loss_init - 0.03, (loss_init, loss_trained)
    r = CliRunner().invoke(main, ["export", "--model", summary["checkpoint"], "--out", str(tmp_path / "onnx")])
    assert r.exit_code == 0, r.output
