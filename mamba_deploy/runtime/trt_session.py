"""The TensorRT session: step.engine / prefill.engine of an artifact (``mamba-deploy build``) on a CUDA device.

Written against the Python API that ``tensorrt`` (>= 10) and TensorRT-RTX share: ``Runtime``,
``deserialize_cuda_engine``, ``IExecutionContext.set_input_shape / set_tensor_address / execute_async_v3``.
All buffers are torch CUDA tensors; TensorRT runs on torch's current stream.

* State: per batch size the session owns two ``MambaState`` buffer sets (per layer conv [b, d_inner, d_conv] in
  the activation dtype, ssm [b, d_inner, N] fp32) and ping-pongs them: a call whose input state is one set writes
  the other, so no state is copied. Consequence (documented API behaviour): a state returned by this session stays
  valid until the second call after the one that returned it; ``MambaState.clone()``-style copies keep one longer.
* CUDA graph (``cuda_graph=True``): the decode step for a batch size is captured once per ping-pong direction
  (state A → B and B → A, fixed addresses) and replayed; ids are copied into a static buffer first.
* Prefill longer than the engine's profile maximum runs in chunks, each resuming from the previous state (the
  SelectiveScan op takes an initial state).

Verification status (be aware): engine *building* is tested on CPU with TensorRT-RTX; the kernels the plugin
launches and the plugin's enqueue path are tested on an H100 without TensorRT. This session itself has never run:
full TensorRT cannot be installed on our machines and TensorRT-RTX does not support sm_90 (Hopper) GPUs. Treat it
as untested until ``mamba-deploy check --backend tensorrt`` passes on a machine with a supported TensorRT + GPU.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..model import MambaState
from ..onnx import contract
from .session import Session


class _Engine:
    """One deserialized engine with its execution context and I/O specs from the manifest."""

    def __init__(self, trt, runtime, path: Path, spec: dict, profile: dict):
        plan = path.read_bytes()
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise UserError(f"TensorRT could not load {path}: it was built by another TensorRT version or for "
                            "another GPU; run `mamba-deploy build` again on this machine")
        self.context = self.engine.create_execution_context()
        self.inputs = {t["name"]: t for t in spec["inputs"]}
        self.outputs = {t["name"]: t for t in spec["outputs"]}
        self.profile = profile

    def max_dim(self, name: str, axis: int) -> int:
        return int(self.profile[name]["max"][axis])

    def run(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], stream: int) -> None:
        ctx = self.context
        for name, t in inputs.items():
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        for name, t in outputs.items():
            ctx.set_tensor_address(name, t.data_ptr())
        if not ctx.execute_async_v3(stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")


class TensorRTSession(Session):
    backend = "tensorrt"

    def __init__(self, artifact, device="cuda", cuda_graph: bool = False, verbose: bool = False):
        from ..artifact import (ENGINE_FILES, ArtifactDims, check_against_graphs, graph_spec, read_build_report,
                                read_manifest)
        from ..trt import compat

        if not torch.cuda.is_available():
            raise UserError("the tensorrt backend needs a CUDA GPU; use --backend onnxruntime or torch on this "
                            "machine")
        self.artifact = Path(artifact)
        manifest = read_manifest(self.artifact)
        check_against_graphs(self.artifact, manifest)
        report = read_build_report(self.artifact)
        trt = compat.tensorrt()
        if report["plugin"]:
            from ..trt.plugin import register_plugins
            register_plugins(trt)
        self.device = torch.device(device)
        self.set_dims(ArtifactDims.of(manifest))
        self._logger = trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engines = {}
        for graph in ("step", "prefill"):
            if graph in report["engines"]:
                self.engines[graph] = _Engine(trt, self._runtime, self.artifact / ENGINE_FILES[graph],
                                              graph_spec(manifest, graph), report["profiles"][graph])
        if "step" not in self.engines:
            raise UserError(f"{self.artifact} has no step engine; run `mamba-deploy build --artifact "
                            f"{self.artifact}`")
        self.all_logits = bool(manifest["graphs"]["prefill"].get("all_logits", False))
        self.max_batch = self.engines["step"].max_dim("input_ids", 0)
        self.cuda_graph = cuda_graph
        self._pools: dict[int, list[MambaState]] = {}
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    # -- state buffers (ping-pong) -----------------------------------------------------------------------------
    def _pool(self, batch: int) -> list[MambaState]:
        if batch not in self._pools:
            self._pools[batch] = [self.new_state(batch), self.new_state(batch)]
        return self._pools[batch]

    def _target(self, state: MambaState, batch: int) -> tuple[int | None, MambaState]:
        """(index of the input in the pool or None, the pool buffer to write the new state into)."""
        pool = self._pool(batch)
        for i, buf in enumerate(pool):
            if buf.ssm[0] is state.ssm[0] and buf.conv[0] is state.conv[0]:
                return i, pool[1 - i]
        return None, pool[0]

    @staticmethod
    def _state_io(state_in: MambaState, state_out: MambaState) -> tuple[dict, dict]:
        ins, outs = {}, {}
        for i, (c, s) in enumerate(zip(state_in.conv, state_in.ssm)):
            ins[contract.conv_state_name(i)], ins[contract.ssm_state_name(i)] = c, s
        for i, (c, s) in enumerate(zip(state_out.conv, state_out.ssm)):
            outs[contract.conv_state_name(i, True)], outs[contract.ssm_state_name(i, True)] = c, s
        return ins, outs

    def _check_batch(self, batch: int, engine: str) -> None:
        if batch > self.max_batch:
            raise UserError(f"batch {batch} exceeds the engines' maximum {self.max_batch}; rebuild with "
                            f"`mamba-deploy build --max-batch {batch}`")

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    # -- the session API -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, input_ids, state: MambaState):
        ids = self.check_ids(input_ids, 1).to(self.device).contiguous()
        b = ids.shape[0]
        self._check_batch(b, "step")
        self.check_state(state, b)
        src, dst = self._target(state, b)
        if self.cuda_graph and src is not None:
            return self._step_graph(ids, src, dst)
        logits = torch.empty(b, self.padded_vocab_size, dtype=torch.float32, device=self.device)
        ins, outs = self._state_io(state, dst)
        self.engines["step"].run({"input_ids": ids, **ins}, {"logits": logits, **outs}, self._stream())
        return logits, dst

    def _step_graph(self, ids: torch.Tensor, src: int, dst: MambaState):
        b = ids.shape[0]
        key = (b, src)
        if key not in self._graphs:
            static_ids = torch.zeros_like(ids)
            logits = torch.empty(b, self.padded_vocab_size, dtype=torch.float32, device=self.device)
            ins, outs = self._state_io(self._pool(b)[src], dst)
            io_in, io_out = {"input_ids": static_ids, **ins}, {"logits": logits, **outs}
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm-up launch outside capture (TensorRT sets up shapes here)
                self.engines["step"].run(io_in, io_out, stream.cuda_stream)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                self.engines["step"].run(io_in, io_out, stream.cuda_stream)
            self._graphs[key] = (graph, static_ids, logits)
            # the warm-up wrote dst from src; the replay below recomputes the same dst (src is only read)
        graph, static_ids, logits = self._graphs[key]
        static_ids.copy_(ids)
        graph.replay()
        return logits.clone(), dst

    @torch.inference_mode()
    def prefill(self, input_ids, state: MambaState | None = None, all_logits: bool = False):
        if "prefill" not in self.engines:
            raise UserError(f"{self.artifact} has no prefill engine; run `mamba-deploy build` without --graph")
        ids = self.check_ids(input_ids, 2).to(self.device)
        b, T = ids.shape
        self._check_batch(b, "prefill")
        if T == 0:
            raise UserError("prefill needs at least one token")
        state = self.new_state(b) if state is None else state
        self.check_state(state, b)
        engine = self.engines["prefill"]
        chunk = engine.max_dim("input_ids", 1)
        pieces = []
        for t0 in range(0, T, chunk):
            part = ids[:, t0:t0 + chunk].contiguous()
            _, dst = self._target(state, b)
            shape = (b, part.shape[1], self.padded_vocab_size) if self.all_logits else (b, self.padded_vocab_size)
            logits = torch.empty(shape, dtype=torch.float32, device=self.device)
            ins, outs = self._state_io(state, dst)
            engine.run({"input_ids": part, **ins}, {"logits": logits, **outs}, self._stream())
            pieces.append(logits)
            state = dst
        if all_logits:
            if not self.all_logits:
                raise UserError("this artifact's prefill graph returns the last position only; export it with "
                                "--all-logits")
            return torch.cat(pieces, dim=1), state
        last = pieces[-1]
        return (last[:, -1] if self.all_logits else last), state


def open_trt_session(source, device="cuda", cuda_graph: bool = False, **_) -> TensorRTSession:
    """``source``: an artifact directory with engines built by ``mamba-deploy build``."""
    from .session import is_artifact
    if not is_artifact(source):
        raise UserError(f"the tensorrt backend needs an artifact directory with engines; {source} is not one "
                        "(mamba-deploy export, then mamba-deploy build)")
    return TensorRTSession(source, device=device, cuda_graph=cuda_graph)
