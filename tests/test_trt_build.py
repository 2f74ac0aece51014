"""TensorRT engine building on the CPU with TensorRT-RTX (no GPU needed to parse, call the plugin's build-time
methods and serialize engines), the plugin's Python logic, and the nvcc build of the kernels.

The counts of PLUGIN_V3 layers come from the parsed TensorRT networks (build_report.json), so these tests fail
when the parser inlines the custom nodes' ONNX function bodies instead of using the plugin.
"""
from __future__ import annotations

import json
import shutil
import sys

import onnx
import pytest
from click.testing import CliRunner

from mamba_deploy.errors import UserError
from mamba_deploy.onnx import contract
from mamba_deploy.trt import compat, kernels
from mamba_deploy.trt.plugin import ScanOpLogic

needs_trt = pytest.mark.skipif(not compat.available(), reason="neither tensorrt nor tensorrt_rtx is installed "
                               "(pip install 'mamba-deploy[tensorrt]')")
N_LAYER = 2


@pytest.fixture(scope="module")
def artifacts(tiny_checkpoint, tmp_path_factory):
    """Tiny exported artifacts (2 layers): fp32, fp16, and fp32 with all-position prefill logits."""
    from mamba_deploy.onnx.export import export

    ckpt = tiny_checkpoint(n_layer=N_LAYER)
    root = tmp_path_factory.mktemp("trt")
    return {"fp32": export(ckpt, root / "fp32"), "fp16": export(ckpt, root / "fp16", dtype="fp16"),
            "fp32_all": export(ckpt, root / "fp32_all", all_logits=True)}


def fresh_copy(src, tmp_path):
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def custom_nodes(path, op_type) -> list[str]:
    model = onnx.load(str(path), load_external_data=False)
    return [n.name for n in model.graph.node if n.domain == contract.DOMAIN and n.op_type == op_type]


@needs_trt
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_build_uses_one_plugin_layer_per_mamba_layer(artifacts, tmp_path, dtype):
    from mamba_deploy.trt.builder import build

    art = fresh_copy(artifacts[dtype], tmp_path)
    report = build(art, max_batch=4, max_prefill_len=32)
    on_disk = json.loads((art / "build_report.json").read_text())
    assert on_disk["engines"].keys() == {"step", "prefill"}
    for graph, op in (("step", "SelectiveScanStep"), ("prefill", "SelectiveScan")):
        e = on_disk["engines"][graph]
        plugin_layers = [layer["name"] for layer in e["layers"] if layer["type"] == "PLUGIN_V3"]
        assert len(plugin_layers) == N_LAYER, f"{graph}: {len(plugin_layers)} PLUGIN_V3 layers"
        assert sorted(plugin_layers) == sorted(custom_nodes(art / f"{graph}.onnx", op))  # one per custom node
        assert not {"RECURRENCE", "LOOP_OUTPUT", "ITERATOR"} & set(e["layer_types"])  # no inlined Scan loop
        assert (art / e["file"]).stat().st_size == e["plan_bytes"] > 0
        assert e["build_seconds"] > 0
    assert report["precision"] == dtype and report["plugin"] is True
    prof = on_disk["profiles"]["prefill"]["input_ids"]
    assert prof == {"min": [1, 1], "opt": [2, 16], "max": [4, 32]}


@needs_trt
@pytest.mark.parametrize("which", ["fp32", "fp32_all"])
def test_build_without_plugin_inlines_the_functions(artifacts, tmp_path, which):
    from mamba_deploy.trt.builder import build

    art = fresh_copy(artifacts[which], tmp_path)
    report = build(art, max_batch=2, max_prefill_len=16, use_plugin=False)
    for graph in ("step", "prefill"):
        e = report["engines"][graph]
        assert e["plugin_layers"] == 0 and "PLUGIN_V3" not in e["layer_types"]
        assert (art / e["file"]).is_file()
    assert "RECURRENCE" in report["engines"]["prefill"]["layer_types"]  # the function body's Scan → a loop
    assert report["plugins"] == []


@needs_trt
def test_build_cli_and_timing_cache(artifacts, tmp_path):
    from mamba_deploy.cli import main

    art = fresh_copy(artifacts["fp16"], tmp_path)
    cache = tmp_path / "timing.cache"
    result = CliRunner().invoke(main, ["build", "--artifact", str(art), "--max-batch", "2", "--max-prefill-len",
                                       "16", "--timing-cache", str(cache), "--graph", "step"])
    assert result.exit_code == 0, result.output
    assert "2 PLUGIN_V3" in result.output
    report = json.loads((art / "build_report.json").read_text())
    if compat.flavor() == "tensorrt_rtx":  # timing caches are no-ops there: said, not faked
        assert "ignored" in report["timing_cache"] and not cache.exists()
    else:
        assert cache.stat().st_size > 0
    assert not (art / "prefill.engine").exists() and (art / "step.engine").is_file()
    # an artifact of another precision is refused with one line (TensorRT-RTX builds typed networks)
    result = CliRunner().invoke(main, ["build", "--artifact", str(art), "--precision", "fp32"])
    assert result.exit_code == 2 and "export the artifact with --dtype fp32" in result.output


def test_build_errors_are_one_line(tmp_path):
    from mamba_deploy.cli import main

    result = CliRunner().invoke(main, ["build", "--artifact", str(tmp_path)])
    assert result.exit_code == 2 and "not a mamba-deploy artifact" in result.output


def test_missing_tensorrt_says_what_to_install(monkeypatch):
    for name in ("tensorrt", "tensorrt_rtx_bindings", "tensorrt_rtx"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    compat._import.cache_clear()
    try:
        with pytest.raises(UserError, match=r"pip install 'mamba-deploy\[tensorrt\]'"):
            compat.tensorrt()
        assert not compat.available()
    finally:
        monkeypatch.undo()
        compat._import.cache_clear()


# ---- the plugin's decisions, without TensorRT ----------------------------------------------------------------------
MAMBA1_OPS = (contract.SELECTIVE_SCAN_STEP.op_type, contract.SELECTIVE_SCAN.op_type)


def test_plugin_logic_pins_fp32_ports_and_ties_activation_dtypes():
    for op_type in MAMBA1_OPS:
        logic = ScanOpLogic(op_type)
        # in_out order: x, delta, A, B, C, D, delta_bias, z, ssm_state | y, ssm_state_out
        assert logic.fp32_positions == {2, 5, 6, 8, 10}
        for act in ("FLOAT", "HALF", "BF16"):
            types = [act, act, "FLOAT", act, act, "FLOAT", "FLOAT", act, "FLOAT", act, "FLOAT"]
            assert all(logic.supports(i, types, True) for i in range(11))
            assert not logic.supports(0, types, False)  # only linear layouts
        bad_state = ["HALF", "HALF", "FLOAT", "HALF", "HALF", "FLOAT", "FLOAT", "HALF", "HALF"]
        assert not logic.supports(8, bad_state, True)  # the state is fp32 whatever the activations
        mixed = ["HALF", "BF16"]
        assert not logic.supports(1, mixed, True)
        assert not logic.supports(0, ["INT8"], True)
        assert logic.output_dtypes(["HALF"] * 8 + ["FLOAT"]) == ["HALF", "FLOAT"]


def test_plugin_logic_fields_follow_the_contract():
    logic = ScanOpLogic("SelectiveScan", {"delta_softplus": [0], "softplus_threshold": [15.0]})
    assert logic.fields == {"delta_softplus": 0, "softplus_threshold": 15.0}
    assert ScanOpLogic("SelectiveScanStep").fields == contract.SELECTIVE_SCAN_STEP.attributes
    with pytest.raises(ValueError, match="no field"):
        ScanOpLogic("SelectiveScan", {"threshold": [1]})


def test_ssd_plugin_logic_follows_the_contract():
    """The Mamba-2 ops: fp32 ports pinned (A, D, dt_bias, state in/out), activations tied to x's dtype, fields =
    the contract's attributes (dt_softplus, softplus_threshold, dt_min, dt_max)."""
    for op_type in contract.SSD_OPS:
        logic = ScanOpLogic(op_type)
        assert logic.is_ssd and logic.is_scan == (op_type == contract.SSD_SCAN.op_type)
        # in_out order: x, dt, A, B, C, D, dt_bias, ssm_state | y, ssm_state_out
        assert logic.fp32_positions == {2, 5, 6, 7, 9}
        for act in ("FLOAT", "HALF", "BF16"):
            types = [act, act, "FLOAT", act, act, "FLOAT", "FLOAT", "FLOAT", act, "FLOAT"]
            assert all(logic.supports(i, types, True) for i in range(10))
        assert not logic.supports(7, ["HALF", "HALF", "FLOAT", "HALF", "HALF", "FLOAT", "FLOAT", "HALF"], True)
        assert logic.output_dtypes(["BF16"] * 7 + ["FLOAT"]) == ["BF16", "FLOAT"]
        assert logic.fields == contract.OPS[op_type].attributes
    logic = ScanOpLogic("SSDScan", {"dt_min": [0.001], "dt_max": [0.1], "dt_softplus": [0]})
    assert logic.fields["dt_min"] == pytest.approx(0.001) and logic.fields["dt_softplus"] == 0


@needs_trt
def test_plugin_creators_register_and_serialize_fields():
    from mamba_deploy.trt.plugin import plugin_classes, register_plugins

    trt = compat.tensorrt()
    assert register_plugins(trt) == list(contract.OPS)
    assert register_plugins(trt) == list(contract.OPS)  # idempotent
    assert set(contract.SSD_OPS) <= set(contract.OPS)    # the Mamba-2 ops have their plugin too
    registry = trt.get_plugin_registry()
    for op_type in contract.OPS:
        assert registry.get_creator(op_type, contract.PLUGIN_VERSION, contract.PLUGIN_NAMESPACE) is not None
    for op_type in MAMBA1_OPS:
        creator = registry.get_creator(op_type, contract.PLUGIN_VERSION, contract.PLUGIN_NAMESPACE)
        assert creator is not None
        _, creator_cls = plugin_classes(trt)
        import numpy as np
        data = np.array([1], np.int32), np.array([12.5], np.float32)  # PluginField does not own its data
        fc = trt.PluginFieldCollection([
            trt.PluginField("delta_softplus", data[0], trt.PluginFieldType.INT32),
            trt.PluginField("softplus_threshold", data[1], trt.PluginFieldType.FLOAT32)])
        plugin = creator_cls(op_type).create_plugin("p", fc, trt.TensorRTPhase.BUILD)
        fields = {f.name: float(np.array(f.data).ravel()[0]) for f in plugin.get_fields_to_serialize()}
        assert fields == {"delta_softplus": 1.0, "softplus_threshold": 12.5}
        clone = plugin.clone()
        assert clone.logic.fields == plugin.logic.fields and clone is not plugin


# ---- the kernels' build --------------------------------------------------------------------------------------------
def test_nvcc_command_targets_all_archs(tmp_path):
    cmd = " ".join(kernels.nvcc_command("nvcc", kernels.find_sources(), tmp_path / "x.so"))
    for a in (80, 86, 87, 89, 90):
        assert f"arch=compute_{a},code=sm_{a}" in cmd
    assert "arch=compute_90,code=compute_90" in cmd  # PTX for newer GPUs


@pytest.mark.slow  # two kernel files for five architectures + PTX: about a minute of nvcc on two cores
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed: cannot compile the plugin kernels")
def test_nvcc_compiles_kernels_for_all_archs(tmp_path):
    import ctypes

    lib = kernels.build_library(out_dir=tmp_path, force=True)
    assert lib.is_file() and lib.stat().st_size > 100_000
    c = ctypes.CDLL(str(lib))  # cudart is linked statically; nothing below touches a GPU
    assert c.mamba_scan_abi_version() == kernels.ABI_VERSION
    c.mamba_selective_scan.restype = ctypes.c_int
    # argument validation answers before any CUDA call: d_state 0 → cudaErrorInvalidValue (1); empty batch → 0
    args = [None] * 11
    i64, i32 = ctypes.c_longlong, ctypes.c_int
    assert c.mamba_selective_scan(*args, i64(1), i64(4), i64(3), i32(0), i32(0), i32(1), ctypes.c_float(20.0),
                                  None) == 1
    assert c.mamba_selective_scan(*args, i64(0), i64(4), i64(3), i32(16), i32(0), i32(1), ctypes.c_float(20.0),
                                  None) == 0
    # the Mamba-2 kernels (ssd.h) are in the same library, with the same early validation
    c.mamba2_ssd_scan.restype = ctypes.c_int
    f32 = ctypes.c_float
    tail = (i32(0), i32(1), f32(20.0), f32(0.0), f32(float("inf")), None)  # dtype, softplus, threshold, limits
    ssd = [None] * 10
    assert c.mamba2_ssd_scan(*ssd, i64(1), i64(3), i32(4), i32(8), i32(1), i32(0), i32(0), *tail) == 1   # d_state 0
    assert c.mamba2_ssd_scan(*ssd, i64(1), i64(3), i32(4), i32(8), i32(3), i32(16), i32(0), *tail) == 1  # 3 ∤ 4
    assert c.mamba2_ssd_scan(*ssd, i64(0), i64(3), i32(4), i32(8), i32(1), i32(16), i32(0), *tail) == 0  # empty
    c.mamba2_ssd_step.restype = ctypes.c_int
    assert c.mamba2_ssd_step(*ssd, i64(1), i32(4), i32(8), i32(1), i32(16), i32(0), i32(7), *tail[1:]) == 1  # dtype


def test_missing_nvcc_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    for var in ("NVCC", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(kernels, "Path", lambda p: tmp_path / "none" / str(p).lstrip("/"))
    with pytest.raises(UserError, match="nvcc .* was not found"):
        kernels.find_nvcc()


# ---- the TensorRT session's buffer logic, with a stand-in engine ---------------------------------------------------
class _ModelEngine:
    """Stands in for a TensorRT engine (which cannot run here): fills the bound output tensors from the PyTorch
    model, reading the bound inputs, exactly as an engine would through set_tensor_address."""

    def __init__(self, model, graph, max_len):
        self.model, self.graph, self.max_len, self.calls = model, graph, max_len, []

    def max_dim(self, name, axis):
        return self.max_len if axis == 1 else 4

    def run(self, inputs, outputs, stream):
        from mamba_deploy.model import MambaState
        n = self.model.config.n_layer
        state = MambaState([inputs[f"conv_state.{i}"].clone() for i in range(n)],
                           [inputs[f"ssm_state.{i}"].clone() for i in range(n)])
        ids = inputs["input_ids"]
        self.calls.append(tuple(ids.shape))
        for name, t in inputs.items():  # an engine's outputs must never alias its inputs
            assert all(t.data_ptr() != o.data_ptr() for o in outputs.values()), name
        if self.graph == "step":
            logits, new = self.model.step(ids, state)
        else:
            logits, new = self.model(ids, state)
            logits = logits[:, -1]
        outputs["logits"].copy_(logits)
        for i in range(n):
            outputs[f"conv_state_out.{i}"].copy_(new.conv[i])
            outputs[f"ssm_state_out.{i}"].copy_(new.ssm[i])


def test_trt_session_ping_pong_and_chunked_prefill_match_torch(tiny_checkpoint):
    import torch

    from mamba_deploy.checkpoint import load_model
    from mamba_deploy.runtime.torch_session import TorchSession
    from mamba_deploy.runtime.trt_session import TensorRTSession

    model = load_model(tiny_checkpoint(n_layer=N_LAYER))
    ref = TorchSession(model)
    sess = object.__new__(TensorRTSession)  # no GPU/TensorRT here: wire the stand-in engines in by hand
    for name in ("n_layer", "vocab_size", "padded_vocab_size", "conv_shape", "ssm_shape", "state_dtype"):
        setattr(sess, name, getattr(ref, name))
    sess.device = torch.device("cpu")
    sess.engines = {"step": _ModelEngine(model, "step", 1), "prefill": _ModelEngine(model, "prefill", 4)}
    sess.all_logits, sess.max_batch, sess.cuda_graph, sess._pools, sess._graphs = False, 4, False, {}, {}

    ids = torch.randint(0, ref.vocab_size, (2, 10))
    start = sess.new_state(2)
    logits, state = sess.prefill(ids, start)
    assert sess.engines["prefill"].calls == [(2, 4), (2, 4), (2, 2)]  # 10 tokens in chunks of the profile max 4
    assert all(float(s.abs().sum()) == 0 for s in start.ssm)  # the caller's state is never written
    want, want_state = ref.prefill(ids)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    seen = set()
    for t in range(5):
        tok = torch.randint(0, ref.vocab_size, (2,))
        logits, state = sess.step(tok, state)
        want, want_state = ref.step(tok, want_state)
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
        seen.add(state.ssm[0].data_ptr())
    assert len(seen) == 2  # two buffer sets, ping-ponged
    for a, b in zip(state.ssm, want_state.ssm):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="--max-batch 5"):
        sess.step(torch.zeros(5, dtype=torch.long), sess.new_state(5))
