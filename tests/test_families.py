"""The family structure: one weight table that matches the model, config round-trips through both checkpoint formats,
one meaning of vocab_size (padding ids never sampled), family detection, the artifact's dtype table."""
from __future__ import annotations

import ast
import dataclasses
import json
import pathlib

import pytest
import torch

from mamba_deploy import artifact
from mamba_deploy.checkpoint import load_model, save_model
from mamba_deploy.config import MambaConfig
from mamba_deploy.errors import UserError
from mamba_deploy.families import FAMILIES, detect, family_of, weight_table
from mamba_deploy.generation import SamplingParams, generate
from mamba_deploy.model import MambaLM, random_model
from mamba_deploy.runtime.session import open_session

FORMATS = ("state-spaces", "hf")
PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "mamba_deploy"

# a value different from the default for EVERY MambaConfig field (a new field without one fails the test below)
NON_DEFAULT = dict(d_model=48, n_layer=3, vocab_size=97, d_state=4, d_conv=3, expand=3, dt_rank=5, conv_bias=False,
                   bias=True, residual_in_fp32=False, norm_eps=0.5, pad_vocab_size_multiple=16, tie_embeddings=False)


@pytest.mark.parametrize("overrides", [{}, dict(bias=True, conv_bias=False, tie_embeddings=False), NON_DEFAULT])
def test_weight_table_is_the_models_parameters(overrides):
    cfg = MambaConfig(**{**dict(d_model=32, n_layer=2, vocab_size=96), **overrides})
    with torch.device("meta"):
        model = MambaLM(cfg)
    params = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        params.pop("lm_head.weight")
    table = weight_table(cfg)
    assert {w.name: w.shape for w in table} == params
    assert len({w.artifact_name for w in table}) == len(table)
    assert all(w.hf_name == w.name for w in table if "embedding" not in w.name)


def test_non_default_config_covers_every_field():
    fields = {f.name: f for f in dataclasses.fields(MambaConfig)}
    assert set(NON_DEFAULT) == set(fields)
    for name, f in fields.items():
        if f.default is not dataclasses.MISSING:
            assert NON_DEFAULT[name] != f.default, name


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("start", FORMATS)
def test_every_config_field_round_trips_through_both_formats(tmp_path, start, fmt):
    """Saved in ``start``, loaded, saved in ``fmt``, loaded: the same config and the same logits."""
    model = random_model(MambaConfig(**NON_DEFAULT), seed=3)
    with torch.no_grad():   # norm weights ≠ 1 so that ε and the norms matter
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    first = load_model(save_model(model, tmp_path / "a", fmt=start), dtype=torch.float32)
    second = load_model(save_model(first, tmp_path / "b", fmt=fmt), dtype=torch.float32)
    assert second.config == model.config
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(second(ids)[0], model(ids)[0], rtol=0, atol=0)


def test_hf_layer_norm_epsilon_survives_state_spaces_copy(tmp_path, hf_reference):
    """An HF checkpoint with layer_norm_epsilon 0.5 converted to state-spaces keeps ε (logits equal to the HF
    model's own, an independent reference)."""
    hf_model, hf_dir, _ = hf_reference
    raw = json.loads((hf_dir / "config.json").read_text())
    eps_dir = tmp_path / "eps-hf"
    eps_dir.mkdir()
    (eps_dir / "config.json").write_text(json.dumps({**raw, "layer_norm_epsilon": 0.5}))
    for f in hf_dir.iterdir():
        if f.name != "config.json":
            (eps_dir / f.name).symlink_to(f)
    ss = load_model(save_model(load_model(eps_dir), tmp_path / "eps-ss", fmt="state-spaces"))
    assert ss.config.norm_eps == 0.5
    from transformers import MambaForCausalLM
    want_model = MambaForCausalLM.from_pretrained(eps_dir).eval()
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        want = want_model(ids).logits
    torch.testing.assert_close(ss(ids)[0], want, rtol=1e-5, atol=1e-5)


def test_save_refuses_a_field_the_format_cannot_hold(tmp_path, monkeypatch):
    """A config.json writer that drops a field makes save_model fail with a one-line error naming the field, and
    nothing is written."""
    orig = MambaConfig.to_hf_json

    def drops_bias(self):
        raw = orig(self)
        raw.pop("use_bias")
        return raw

    monkeypatch.setattr(MambaConfig, "to_hf_json", drops_bias)
    model = random_model(MambaConfig(d_model=16, n_layer=1, vocab_size=32, bias=True))
    with pytest.raises(UserError, match="bias=True") as e:
        save_model(model, tmp_path / "x", fmt="hf")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x").exists()


# ---- vocab_size: the tokenizer vocabulary; padded_vocab_size: the logits width ----------------------------------
@pytest.fixture(scope="module")
def padded_model(tmp_path_factory):
    """vocab 97 padded to 104, poisoned so that the padding ids have the largest logits: every embedding puts 10 in
    channel 0 of the residual stream and the (untied) head's padding rows read channel 0 with weight 10, so greedy
    decoding would pick a padding id at every step unless generation masks them."""
    model = random_model(MambaConfig(d_model=32, n_layer=2, vocab_size=97, d_state=8, tie_embeddings=False), seed=5)
    with torch.no_grad():
        model.backbone.embedding.weight[:, 0] = 10.0
        model.lm_head.weight[97:, 0] = 10.0
    root = tmp_path_factory.mktemp("padded")
    return model, {fmt: save_model(model, root / fmt, fmt=fmt) for fmt in FORMATS}


@pytest.mark.parametrize("fmt", FORMATS)
def test_vocab_and_padded_width_survive_both_formats(padded_model, fmt):
    _, dirs = padded_model
    cfg = load_model(dirs[fmt]).config
    assert (cfg.vocab_size, cfg.padded_vocab_size) == (97, 104)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_generation_never_samples_a_padding_id(padded_model, tmp_path, fmt, backend):
    model, dirs = padded_model
    source = dirs[fmt]
    if backend == "onnxruntime":
        from mamba_deploy.onnx.export import export
        source = export(dirs[fmt], tmp_path / "art")
        m = artifact.read_manifest(source)
        assert (m["dims"]["vocab_size"], m["dims"]["padded_vocab_size"]) == (97, 104)
    session = open_session(source, backend)
    assert (session.vocab_size, session.padded_vocab_size) == (97, 104)
    logits, _ = session.prefill(torch.tensor([[1, 2, 3]]))
    assert logits.shape[-1] == 104 and int(logits.argmax(-1)) >= 97      # the poison works: argmax is padding
    for params in (SamplingParams(), SamplingParams(temperature=2.0)):
        out = generate(session, [[1, 2, 3], [4]], max_new_tokens=8, params=params, seed=1).tokens
        assert all(0 <= t < 97 for seq in out for t in seq), out


# ---- family detection and state shapes ----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_family_detected_from_both_dialects(tiny_checkpoint, fmt):
    raw = json.loads((tiny_checkpoint(fmt) / "config.json").read_text())
    family, dialect = detect(raw)
    assert (family.name, dialect) == ("mamba1", fmt)


@pytest.mark.parametrize("raw,needle", [({"d_model": 8, "ssm_cfg": {"layer": "Mamba3"}}, "Mamba3"),
                                        ({"hidden_size": 8, "model_type": "jamba"}, "jamba")])
def test_unknown_family_is_a_one_line_error(raw, needle):
    with pytest.raises(UserError, match=needle) as e:
        detect(raw)
    assert "\n" not in str(e.value)


def test_session_state_shapes_come_from_the_family(tiny_checkpoint):
    model = load_model(tiny_checkpoint())
    conv, ssm = family_of(model.config).state_shapes(model.config)
    session = open_session(model, "torch")
    state = session.new_state(3)
    assert [tuple(c.shape) for c in state.conv] == [(3, *conv)] * model.config.n_layer
    assert [tuple(s.shape) for s in state.ssm] == [(3, *ssm)] * model.config.n_layer
    _, out = session.prefill(torch.tensor([[1, 2], [3, 4], [5, 6]]), state)
    assert [tuple(s.shape) for s in out.ssm] == [(3, *ssm)] * model.config.n_layer
    with pytest.raises(UserError, match="ssm_state.0"):
        session.check_state(type(state)(state.conv, [s[..., :-1] for s in state.ssm]), 3)


def test_every_family_provides_the_interface():
    for name, family in FAMILIES.items():
        assert family.name == name == family.config_class.family
        assert family.ss_layers and family.hf_model_types
        emitter = family.graph_emitter()
        from mamba_deploy.onnx.export import LMGraphs
        assert issubclass(emitter, LMGraphs)
        assert emitter.step_mixer is not LMGraphs.step_mixer and emitter.prefill_mixer is not LMGraphs.prefill_mixer


# ---- the artifact spec ------------------------------------------------------------------------------------------
def test_dtype_table_matches_onnx_and_torch():
    from onnx import TensorProto
    for row in artifact.DTYPES:
        assert row.onnx == getattr(TensorProto, {"fp32": "FLOAT", "fp16": "FLOAT16", "bf16": "BFLOAT16",
                                                 "int64": "INT64", "int32": "INT32"}[row.name])
        assert artifact.dtype_info(row.long) is row and artifact.dtype_info(row.torch) is row
        assert artifact.from_onnx(row.onnx) is row and artifact.from_trt(row.trt) is row
    assert artifact.parse_dtype("half") is torch.float16
    with pytest.raises(UserError, match="fp32, fp16, bf16"):
        artifact.parse_dtype("int64")


def test_dtype_table_matches_tensorrt():
    from mamba_deploy.trt import compat
    try:
        trt = compat.tensorrt()
    except UserError:
        pytest.skip("no TensorRT package installed")
    for row in artifact.DTYPES:
        assert hasattr(trt.DataType, row.trt), row


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            out.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_runtime_takes_names_from_the_artifact_spec_not_the_builder_or_exporter():
    for path in sorted((PACKAGE / "runtime").glob("*.py")) + [PACKAGE / "parity.py", PACKAGE / "bench.py"]:
        bad = {m for m in _imports(path) if m.endswith(("trt.builder", "onnx.export", "onnx.manifest"))}
        assert not bad - ({"..onnx.export", ".onnx.export"} if path.name == "bench.py" else set()), (path, bad)
