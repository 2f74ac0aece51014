"""Checkpoint formats: round trips, sharded files, strict key checking, and one-line errors for user mistakes."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from helpers import assert_one_line_error
from mamba_deploy.checkpoint import inspect, load_model, save_model
from mamba_deploy.cli import main
from mamba_deploy.errors import UserError


def _logits(model, seed=0):
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)[0]


@pytest.mark.parametrize("fmt,safetensors", [("state-spaces", True), ("state-spaces", False), ("hf", True)])
def test_round_trip_identical_logits(tiny_checkpoint, tmp_path, fmt, safetensors):
    model = load_model(tiny_checkpoint("hf", seed=1))
    out = save_model(model, tmp_path / "rt", fmt=fmt, safetensors=safetensors)
    again = load_model(out)
    assert again.source.config_format == fmt and again.source.weight_format == fmt
    assert torch.equal(_logits(model), _logits(again))
    assert again.lm_head.weight is again.backbone.embedding.weight   # tie survives


def test_sharded_safetensors_with_index(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file
    src = tiny_checkpoint("hf", seed=2)
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(src / "config.json", out)
    sd = load_file(src / "model.safetensors")
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, out / name)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    assert torch.equal(_logits(load_model(src)), _logits(load_model(out)))


def test_dtype_cast_on_load(tiny_checkpoint):
    m = load_model(tiny_checkpoint("state-spaces"), dtype="fp16")
    assert all(p.dtype == torch.float16 for p in m.parameters())


def _edit_weights(ckpt, tmp_path, edit):
    from safetensors.torch import load_file, save_file
    out = tmp_path / "edited"
    shutil.copytree(ckpt, out)
    sd = load_file(out / "model.safetensors")
    edit(sd)
    save_file(sd, out / "model.safetensors")
    return out


def test_strict_missing_unexpected_misshaped_are_listed(tiny_checkpoint, tmp_path):
    def edit(sd):
        del sd["backbone.layers.1.mixer.D"]
        sd["backbone.layers.0.mixer.extra"] = torch.zeros(3)
        sd["backbone.layers.0.mixer.A_log"] = torch.zeros(5, 5)
    out = _edit_weights(tiny_checkpoint("state-spaces"), tmp_path, edit)
    with pytest.raises(UserError) as e:
        load_model(out)
    msg = str(e.value)
    assert "backbone.layers.1.mixer.D" in msg and "backbone.layers.0.mixer.extra" in msg
    assert "backbone.layers.0.mixer.A_log (5, 5)" in msg and "\n" not in msg


def with_config(src, out, **patch):
    """A copy of checkpoint ``src`` at ``out`` whose config.json has the fields ``patch`` replaced."""
    shutil.copytree(src, out)
    cfg = {**json.loads((out / "config.json").read_text()), **patch}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_config_that_does_not_match_weights(tiny_checkpoint, tmp_path):
    out = with_config(tiny_checkpoint("state-spaces"), tmp_path / "wrongcfg", d_model=48)
    with pytest.raises(UserError, match="do not match its config.json"):
        load_model(out)


@pytest.mark.parametrize("patch,needle", [
    ({"ssm_cfg": {"layer": "Mamba3"}}, "Mamba3"),
    ({"attn_layer_idx": [1]}, "attention"),
    ({"rms_norm": False}, "LayerNorm"),
])
def test_unsupported_state_spaces_configs_refused(tiny_checkpoint, tmp_path, patch, needle):
    out = with_config(tiny_checkpoint("state-spaces"), tmp_path / "unsup", **patch)
    with pytest.raises(UserError, match=needle):
        inspect(out)


def test_hf_hybrid_model_type_refused(tiny_checkpoint, tmp_path):
    out = with_config(tiny_checkpoint("hf"), tmp_path / "jamba", model_type="jamba")
    with pytest.raises(UserError, match="jamba"):
        inspect(out)


def test_mamba1_weights_under_a_mamba2_config_refused(tiny_checkpoint, tmp_path):
    out = with_config(tiny_checkpoint("state-spaces"), tmp_path / "m2", ssm_cfg={"layer": "Mamba2", "d_state": 8})
    with pytest.raises(UserError, match="do not match its config.json"):
        load_model(out)


def _cli(*args):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_cli_info_works_on_both_formats(tiny_checkpoint):
    for fmt in ("state-spaces", "hf"):
        code, out = _cli("info", "--model", str(tiny_checkpoint(fmt)))
        assert code == 0, out
        assert f"config: {fmt}" in out and "parameters" in out


def test_cli_errors_missing_path(tmp_path):
    assert_one_line_error(*_cli("info", "--model", str(tmp_path / "nope" / "x" / "y")), "neither an existing")


def test_cli_errors_empty_directory(tmp_path):
    assert_one_line_error(*_cli("info", "--model", str(tmp_path)), "no config.json")


def test_cli_errors_hub_id_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    assert_one_line_error(*_cli("info", "--model", "state-spaces/mamba-does-not-exist"), "hub cannot be reached")


@pytest.mark.parametrize("fmt", ["state-spaces", "hf"])
def test_cli_errors_truncated_weights(tiny_checkpoint, tmp_path, fmt):
    out = tmp_path / "trunc"
    shutil.copytree(tiny_checkpoint(fmt), out)
    w = out / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    assert_one_line_error(*_cli("info", "--model", str(out)), "truncated or corrupt")


def test_cli_errors_corrupt_bin(tiny_checkpoint, tmp_path):
    out = tmp_path / "corrupt"
    save_model(load_model(tiny_checkpoint("state-spaces")), out, safetensors=False)
    (out / "pytorch_model.bin").write_bytes(b"not a zip file at all" * 10)
    assert_one_line_error(*_cli("info", "--model", str(out)), "truncated or corrupt")


def test_cli_errors_config_weights_mismatch(tiny_checkpoint, tmp_path):
    out = with_config(tiny_checkpoint("state-spaces"), tmp_path / "mismatch", n_layer=3)
    assert_one_line_error(*_cli("info", "--model", str(out)), "missing: backbone.layers.2")


def test_cli_random_refuses_existing_without_force(tmp_path):
    out = tmp_path / "r"
    assert _cli("random", "--out", str(out))[0] == 0
    assert_one_line_error(*_cli("random", "--out", str(out)), "--force")
    assert _cli("random", "--out", str(out), "--force", "--format", "hf")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]   # nothing half-written left beside it
