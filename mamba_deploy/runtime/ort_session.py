"""The ONNX Runtime session: runs an artifact's step.onnx / prefill.onnx (custom ops run as their function bodies).

Everything comes from manifest.json: dims, dtypes, graph files and I/O names. States stay torch tensors:

* device "cpu": torch → numpy → ``InferenceSession.run`` → numpy → torch (zero-copy where numpy allows);
* device "cuda[:N]" (needs onnxruntime-gpu's CUDAExecutionProvider): IO binding straight on torch CUDA tensors
  (``bind_input``/``bind_output`` with ``data_ptr``), outputs allocated by torch, so states never leave the GPU.
  TF32 is off unless ``use_tf32=True`` (ORT enables it by default; parity wants it off).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..artifact import MANIFEST, torch_dtype
from ..errors import UserError
from ..model import MambaState
from ..onnx import contract
from .session import Session, is_artifact



def _ort_element_type(dtype: torch.dtype):
    """bind_input/bind_output element type: a numpy type, or the ONNX enum for bfloat16 (numpy has none)."""
    if dtype == torch.bfloat16:
        from onnx import TensorProto
        return TensorProto.BFLOAT16
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[dtype]


# Session settings on the CPU: ``default`` is ONNX Runtime's own; ``decode`` (the session's default) is chosen for
# token-by-token decode: one inter-op thread and sequential execution (the graph is a chain), memory patterns and
# the arena kept (decode shapes repeat every step), weights pre-packed for MLAS at load, worker threads that spin
# between the many small ops of a step, and denormals flushed to zero (exp(δ·A) of strongly decaying channels
# underflows into them). bench/bench_ort_cpu.py compares the two side by side (DIR@default vs DIR@decode).
CPU_SETTINGS: dict[str, dict] = {
    "default": {"options": {}, "config": {}},
    "decode": {
        "options": {"inter_op_num_threads": 1, "execution_mode": "ORT_SEQUENTIAL", "enable_mem_pattern": True,
                    "enable_cpu_mem_arena": True, "graph_optimization_level": "ORT_ENABLE_ALL"},
        "config": {"session.disable_prepacking": "0", "session.intra_op.allow_spinning": "1",
                   "session.set_denormal_as_zero": "1"},
    },
}


def cpu_session_options(threads: int | None = None, settings: str = "decode"):
    """``onnxruntime.SessionOptions`` for the CPU: ``threads`` intra-op threads (None: ONNX Runtime picks, one
    per physical core) and the named ``CPU_SETTINGS`` entry. Raises UserError for an unknown name."""
    import onnxruntime as ort

    if settings not in CPU_SETTINGS:
        raise UserError(f"unknown ONNX Runtime settings {settings!r}; choose one of {', '.join(CPU_SETTINGS)}")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only (the CUDA EP warns about every CPU-placed shape op)
    if threads:
        options.intra_op_num_threads = threads
    for key, value in CPU_SETTINGS[settings]["options"].items():
        if key == "execution_mode":
            value = getattr(ort.ExecutionMode, value)
        elif key == "graph_optimization_level":
            value = getattr(ort.GraphOptimizationLevel, value)
        setattr(options, key, value)
    for key, value in CPU_SETTINGS[settings]["config"].items():
        options.add_session_config_entry(key, value)
    return options


class OrtSession(Session):
    backend = "onnxruntime"

    def __init__(self, artifact_dir, device="cpu", verify: bool = True, use_tf32: bool = False,
                 threads: int | None = None, cuda_options: dict | None = None, prefill_chunk: int = 2048,
                 settings: str = "decode"):
        """``prefill_chunk``: prompts run through prefill.onnx in pieces of at most this many tokens (the graph
        takes the state the previous piece left), so memory is bounded by the chunk, not the prompt."""
        import onnxruntime as ort

        from ..artifact import ArtifactDims, check_against_graphs, graph_spec, read_manifest

        if prefill_chunk < 1:
            raise UserError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.artifact_dir = Path(artifact_dir)
        self.manifest = m = read_manifest(self.artifact_dir, verify=verify)
        if verify:  # verify=False trusts the files: no checksums, no cross-check
            check_against_graphs(self.artifact_dir, m)
        self.set_dims(ArtifactDims.of(m))
        self.specs = {g: graph_spec(m, g) for g in ("step", "prefill")}
        self.all_logits = bool(self.specs["prefill"].get("all_logits", False))
        for g, spec in self.specs.items():  # the contract's state names must be the graph's
            names = {p["name"] for p in spec["inputs"]} | {p["name"] for p in spec["outputs"]}
            want = {"input_ids", "logits"} | set(contract.state_inputs(self.n_layer)) | set(
                contract.state_outputs(self.n_layer))
            if names != want:
                raise UserError(f"{self.artifact_dir}: the {g} graph's inputs/outputs in the manifest do not match "
                                f"the graph contract (differ in {sorted(names ^ want)[:4]}); export it again")

        self.device = torch.device(device)
        self.options = cpu_session_options(threads, settings)
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UserError("device cuda needs onnxruntime-gpu (CUDAExecutionProvider is not available: "
                                f"{', '.join(ort.get_available_providers())}); pip install onnxruntime-gpu, or use "
                                "--device cpu")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            opts = {"device_id": self.device.index, "use_tf32": int(bool(use_tf32))}
            opts.update(cuda_options or {})
            self.providers = [("CUDAExecutionProvider", opts), "CPUExecutionProvider"]
        elif self.device.type == "cpu":
            if self.state_dtype == torch.bfloat16:
                raise UserError(f"{self.artifact_dir} is a bf16 artifact; ONNX Runtime has no bfloat16 kernels on "
                                "CPU: export fp16 or fp32 for CPU, or run it on cuda / TensorRT")
            self.providers = ["CPUExecutionProvider"]
        else:
            raise UserError(f"device '{device}' is not supported by the onnxruntime backend; use cpu or cuda")
        self._sessions: dict = {}

    # -- ONNX Runtime sessions, created on first use ---------------------------------------------------------
    def session(self, graph: str):
        if graph not in self._sessions:
            import onnxruntime as ort
            path = self.artifact_dir / self.specs[graph]["file"]
            try:
                self._sessions[graph] = ort.InferenceSession(str(path), self.options, providers=self.providers)
            except Exception as e:  # ORT raises its own exception types; a broken artifact is the user's to fix
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"ONNX Runtime cannot load {path}: {first}") from None
        return self._sessions[graph]

    def _run(self, graph: str, input_ids: torch.Tensor, state: MambaState) -> dict[str, torch.Tensor]:
        spec = self.specs[graph]
        feeds = {"input_ids": input_ids}
        for i in range(self.n_layer):
            feeds[contract.conv_state_name(i)] = state.conv[i]
            feeds[contract.ssm_state_name(i)] = state.ssm[i]
        out_names = [p["name"] for p in spec["outputs"]]
        if self.device.type == "cuda":
            return self._run_cuda(graph, feeds, out_names, input_ids.shape)
        arrays = {k: v.detach().cpu().contiguous().numpy() for k, v in feeds.items()}
        outs = self.session(graph).run(out_names, arrays)
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in zip(out_names, outs)}

    def _output_shape(self, port: dict, ids_shape) -> list[int]:
        sizes = {"batch": ids_shape[0], "seq": ids_shape[-1]}
        return [sizes[d] if isinstance(d, str) else d for d in port["shape"]]

    def _run_cuda(self, graph, feeds, out_names, ids_shape) -> dict[str, torch.Tensor]:
        sess = self.session(graph)
        binding = sess.io_binding()
        dev = self.device.index
        keep = []  # keep the contiguous copies alive until the run is over
        for name, t in feeds.items():
            t = t.detach().to(self.device).contiguous()
            keep.append(t)
            binding.bind_input(name, "cuda", dev, _ort_element_type(t.dtype), list(t.shape), t.data_ptr())
        outs = {}
        for port in self.specs[graph]["outputs"]:
            t = torch.empty(self._output_shape(port, ids_shape), dtype=torch_dtype(port["dtype"]),
                            device=self.device)
            binding.bind_output(port["name"], "cuda", dev, _ort_element_type(t.dtype), list(t.shape), t.data_ptr())
            outs[port["name"]] = t
        torch.cuda.synchronize(self.device)  # inputs written on torch's stream are complete before ORT reads them
        sess.run_with_iobinding(binding)     # ORT synchronizes its stream before returning
        return outs

    def _state_out(self, outs: dict) -> MambaState:
        return MambaState([outs[contract.conv_state_name(i, True)] for i in range(self.n_layer)],
                          [outs[contract.ssm_state_name(i, True)] for i in range(self.n_layer)])

    # -- Session API -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, input_ids, state: MambaState | None = None, all_logits: bool = False):
        """ids [b, T] (T ≥ 1) → (logits [b, V] of the last position, or [b, T, V] with ``all_logits`` when the
        artifact was exported with --all-logits; state after T tokens)."""
        ids = self.check_ids(input_ids, 2)
        if all_logits and not self.all_logits:
            raise UserError(f"{self.artifact_dir} returns the last position's logits only; export it with "
                            "--all-logits for every position")
        if state is None:
            state = self.new_state(ids.shape[0])
        self.check_state(state, ids.shape[0])
        pieces = []
        for t0 in range(0, ids.shape[1], self.prefill_chunk):
            outs = self._run("prefill", ids[:, t0:t0 + self.prefill_chunk], state)
            state = self._state_out(outs)
            pieces.append(outs["logits"] if all_logits else outs["logits"][:, -1] if self.all_logits
                          else outs["logits"])
        return (torch.cat(pieces, 1) if all_logits else pieces[-1]), state

    @torch.inference_mode()
    def step(self, input_ids, state: MambaState):
        ids = self.check_ids(input_ids, 1)
        self.check_state(state, ids.shape[0])
        outs = self._run("step", ids, state)
        return outs["logits"], self._state_out(outs)


def open_ort_session(source, device="cpu", verify: bool = True, use_tf32: bool = False, threads=None,
                     cuda_options=None, prefill_chunk: int = 2048, settings: str = "decode", **_) -> OrtSession:
    """``source``: an artifact directory (from ``mamba-deploy export``)."""
    if not isinstance(source, (str, Path)):
        raise UserError(f"the onnxruntime backend runs an exported artifact directory, not a "
                        f"{type(source).__name__}; export one with `mamba-deploy export`")
    if not is_artifact(source):
        raise UserError(f"the onnxruntime backend runs an exported artifact, and {source} is not one (no "
                        f"{MANIFEST}); export it first with `mamba-deploy export --model {source}`")
    return OrtSession(source, device=device, verify=verify, use_tf32=use_tf32, threads=threads,
                      cuda_options=cuda_options, prefill_chunk=prefill_chunk, settings=settings)
