"""`mamba-deploy triton-repo`: every config.pbtxt parses with the real ModelConfig schema from tritonclient, agrees
with the ONNX graph next to it, and its implicit-state declarations drive a correct rollout when a loop does what
Triton's sequence batcher does (zero initial state on START, each request's output state fed back as the next
request's input state), run here with ONNX Runtime. The Triton server itself is not run (none is available here).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from google.protobuf import text_format

from mamba_deploy.cli import main
from mamba_deploy.onnx.export import export
from mamba_deploy.runtime.session import open_session
from mamba_deploy.serving.triton_repo import model_config_pb2, parse_config

pb = model_config_pb2()
NP = {pb.TYPE_FP32: np.float32, pb.TYPE_FP16: np.float16, pb.TYPE_INT64: np.int64}


@pytest.fixture(scope="module")
def repo(tiny_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("triton")
    art = export(tiny_checkpoint("state-spaces", seed=4), tmp / "tiny")
    r = CliRunner().invoke(main, ["triton-repo", "--artifact", str(art), "--out", str(tmp / "repo"),
                                  "--max-batch", "4"])
    assert r.exit_code == 0, r.output
    return art, tmp / "repo"


def load(repo_dir, model):
    cfg = parse_config((repo_dir / model / "config.pbtxt").read_text())
    graph = onnx.load(str(repo_dir / model / "1" / "model.onnx"), load_external_data=False).graph
    return cfg, graph


def onnx_dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("graph_name", ["prefill", "step"])
def test_config_parses_and_matches_the_graph(repo, graph_name):
    _, repo_dir = repo
    cfg, graph = load(repo_dir, f"tiny_{graph_name}")
    assert cfg.name == f"tiny_{graph_name}" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 4
    inputs = {v.name: v for v in graph.input}
    outputs = {v.name: v for v in graph.output}
    sb = cfg.sequence_batching
    assert sb.oldest.max_candidate_sequences == 4
    # every graph input is either a request input or an implicit state; every state has its graph output
    declared = [i.name for i in cfg.input] + [s.input_name for s in sb.state]
    assert sorted(declared) == sorted(inputs)
    assert [i.name for i in cfg.input] == ["input_ids"] and [o.name for o in cfg.output] == ["logits"]
    assert len(sb.state) == 2 * 2                                  # conv + SSM per layer, 2 layers
    for st in sb.state:
        assert st.output_name in outputs
        assert st.output_name == st.input_name.replace("_state.", "_state_out.")
        assert list(st.dims) == onnx_dims(inputs[st.input_name])[1:] == onnx_dims(outputs[st.output_name])[1:]
        assert NP[st.data_type] == onnx.helper.tensor_dtype_to_np_dtype(
            inputs[st.input_name].type.tensor_type.elem_type)
        (init,) = st.initial_state
        assert init.zero_data and list(init.dims) == list(st.dims) and init.data_type == st.data_type
    assert list(cfg.output[0].dims) == onnx_dims(outputs["logits"])[1:]


def test_schema_is_strict():
    with pytest.raises(text_format.ParseError):
        parse_config('name: "x"\nsequence_batching { state { input_nam: "a" } }')


def triton_like_rollout(repo_dir, model, requests):
    """What the sequence batcher does for one sequence: START → states from initial_state (zeros); after each
    request, output_name's tensor becomes input_name's tensor for the next request."""
    cfg = parse_config((repo_dir / model / "config.pbtxt").read_text())
    sess = ort.InferenceSession(str(repo_dir / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    states = {}
    for st in cfg.sequence_batching.state:
        (init,) = st.initial_state
        states[st.input_name] = np.zeros([1, *init.dims], NP[init.data_type])
    logits = []
    for ids in requests:
        feeds = {"input_ids": np.asarray(ids, np.int64).reshape(1, -1) if model.endswith("prefill") else
                 np.asarray(ids, np.int64).reshape(1)}
        names = ["logits"] + [st.output_name for st in cfg.sequence_batching.state]
        outs = dict(zip(names, sess.run(names, {**feeds, **states})))
        states = {st.input_name: outs[st.output_name] for st in cfg.sequence_batching.state}
        logits.append(torch.from_numpy(outs["logits"]))
    return logits


def test_implicit_state_loop_reproduces_the_session(repo):
    art, repo_dir = repo
    session = open_session(str(art), "onnxruntime")
    prompt, tokens = [3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5, 8, 9, 7]
    want = []
    logits, state = session.prefill(torch.tensor([prompt]))
    want.append(logits)
    for t in tokens:
        logits, state = session.step(torch.tensor([t]), state)
        want.append(logits)
    got = triton_like_rollout(repo_dir, "tiny_prefill", [prompt] + [[t] for t in tokens])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    # the step model, one token per request, against the session's steps from a zero state
    state = session.new_state(1)
    want = []
    for t in prompt:
        logits, state = session.step(torch.tensor([t]), state)
        want.append(logits)
    for g, w in zip(triton_like_rollout(repo_dir, "tiny_step", [[t] for t in prompt]), want):
        assert torch.equal(g, w)


def test_errors_are_one_line(repo, tmp_path):
    art, repo_dir = repo
    for args in (["--artifact", str(art), "--out", str(repo_dir)],                        # exists, no --force
                 ["--artifact", str(art), "--out", str(tmp_path / "r"), "--platform", "tensorrt"],  # no engines
                 ["--artifact", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]):
        r = CliRunner().invoke(main, ["triton-repo", *args])
        assert r.exit_code == 2, r.output
        assert r.output.startswith("mamba-deploy: error:") and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob(".r.tmp*"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not ours")
    r = CliRunner().invoke(main, ["triton-repo", "--artifact", str(art), "--out", str(foreign), "--force"])
    assert r.exit_code == 2 and (foreign / "keep.txt").exists()
    r = CliRunner().invoke(main, ["triton-repo", "--artifact", str(art), "--out", str(repo_dir), "--force"])
    assert r.exit_code == 0, r.output
