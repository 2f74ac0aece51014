"""The fast PyTorch GPU session (backend ``torch-fast``): fused decode kernels, one CUDA graph per batch size.

Decode: the whole model's step (embedding, 48 × [add+RMSNorm, in_proj, conv step, x_proj, SSM step, out_proj],
final norm, lm_head) is captured once per batch size into ONE ``torch.cuda.CUDAGraph`` over static buffers: the
token ids, the per-layer conv and SSM states (updated in place by the kernels of ops/triton_decode.py) and the
logits. A step is then: copy ids in, replay, copy logits out.

State ownership (the fast path): ``step`` returns a ``MambaState`` whose tensors ARE the session's static buffers
for that batch size. Passing that same object back to the next ``step`` costs no copy; passing any other state
copies it into the buffers first. So the returned state is valid until the next ``step``/``prefill`` of that batch
size: ``state.clone()`` it to keep it. Logits are returned as a fresh fp32 tensor. Token ids already on the GPU
are not range-checked by ``step`` (that check would cost a host sync per token); ids from the CPU are.

Prefill runs the layers once over the prompt (fused add+RMSNorm kernel, cuBLAS projections, fp16 cuDNN conv,
the model's selective-scan backend — Triton on CUDA when available, else chunked) and applies lm_head to the last
position only; its final state lands directly in the static buffers, so the first step after it copies nothing.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..model import MambaLM, MambaState
from .session import is_artifact
from .torch_session import TorchSession


@dataclasses.dataclass
class _LayerWeights:
    norm_w: torch.Tensor
    in_w: torch.Tensor
    in_b: torch.Tensor | None
    conv_w: torch.Tensor        # [d_inner, d_conv]
    conv_b: torch.Tensor | None
    x_w: torch.Tensor
    dt_w: torch.Tensor          # [d_inner, dt_rank]
    dt_b: torch.Tensor          # fp32
    A: torch.Tensor             # −exp(A_log), fp32 [d_inner, N]
    D: torch.Tensor             # fp32
    out_w: torch.Tensor
    out_b: torch.Tensor | None


class FastDecoder:
    """The decode step written with the fused kernels (eager; FastSession captures it in a graph)."""

    def __init__(self, model: MambaLM, small_batch_max: int = 16):
        c = model.config
        # batches up to this size take the three-launch path (norm recomputed per program, x_proj by atomics)
        # (half-precision weights only: Triton's tl.dot would round fp32 operands to TF32)
        half = model.dtype in (torch.float16, torch.bfloat16) or model.device.type == "cpu"
        self.small_batch_max = small_batch_max if c.d_inner % 32 == 0 and half else 0
        self.config = c
        self.eps = c.norm_eps
        self.residual_dtype = torch.float32 if c.residual_in_fp32 else model.dtype
        # launch parameters of the kernels (block sizes, warps): ``launch`` for every batch size unless
        # ``tune(batch)`` measured better ones for that size (``launch_for[batch]``, timings in ``tuning_log``)
        self.launch: dict[str, dict] = {"front": {}, "ssm": {}, "out": {}, "conv": {}, "convx": {}}
        self.launch_for: dict[tuple[int, str], dict[str, dict]] = {}   # (batch, path) → launch parameters
        self.tuning_log: dict[tuple[int, str], dict] = {}
        self.path_for: dict[int, str] = {}                  # batch → decode path chosen by timing (FastSession)
        self.embedding = model.backbone.embedding.weight
        self.norm_f = model.backbone.norm_f.weight
        self.lm_head = model.lm_head.weight
        self.layers = []
        for layer in model.backbone.layers:
            m = layer.mixer
            self.layers.append(_LayerWeights(
                norm_w=layer.norm.weight, in_w=m.in_proj.weight.contiguous(), in_b=m.in_proj.bias,
                conv_w=m.conv1d.weight[:, 0, :].contiguous(), conv_b=m.conv1d.bias,
                x_w=m.x_proj.weight.contiguous(), dt_w=m.dt_proj.weight.contiguous(), dt_b=m.dt_proj.bias.float(),
                A=m.A().contiguous(), D=m.D.float(), out_w=m.out_proj.weight.contiguous(), out_b=m.out_proj.bias))

    def paths(self, batch: int) -> list[str]:
        """Decode paths that can run ``batch`` rows, the default first."""
        out = []
        if batch <= self.small_batch_max:
            out.append("gemv" if batch <= 8 else "small")   # at batch ≤ 8 the GEMV form of "small" stands in
        return out + ["general", "general-fused"]

    def valid_paths(self, batch: int) -> list[str]:
        """Every path that can run ``batch`` rows (``paths`` are the ones "auto" times)."""
        out = ["general", "general-fused"]
        if batch <= self.small_batch_max:
            out.append("small")
            if batch <= 8:
                out.append("gemv")
        return out

    def path(self, batch: int) -> str:
        return self.path_for.get(batch) or self.paths(batch)[0]

    def step(self, ids: torch.Tensor, conv: list[torch.Tensor], ssm: list[torch.Tensor]) -> torch.Tensor:
        """ids [M] → logits [M, V] fp32; conv/ssm states updated in place."""
        path = self.path(ids.shape[0])
        if path in ("general", "general-fused"):
            return self.step_general(ids, conv, ssm, fused=path == "general-fused")
        return self.step_small(ids, conv, ssm, gemv=path == "gemv")

    def step_small(self, ids, conv, ssm, gemv: bool = False) -> torch.Tensor:
        """Three launches per layer (norm+in_proj+conv+x_proj, SSM step, out_proj+residual); M ≤ 64 with tl.dot
        tiles ("small"), M ≤ 8 as matrix-vector products ("gemv")."""
        from ..ops.triton_decode import (add_rmsnorm, gemv_front, gemv_out, norm_in_proj_conv_xproj, out_proj_add,
                                         ssm_step)
        front, out_add = (gemv_front, gemv_out) if gemv else (norm_in_proj_conv_xproj, out_proj_add)
        c = self.config
        d = c.d_inner
        residual = F.embedding(ids, self.embedding).to(self.residual_dtype)
        M = residual.shape[0]
        launch = self.launch_for.get((M, "gemv" if gemv else "small"), self.launch)
        xd = self.layers[0].x_w.shape[0]
        xdbl = torch.zeros(c.n_layer, M, xd, dtype=torch.float32, device=ids.device)     # x_proj accumulators
        xc = torch.empty(M, d, dtype=self.embedding.dtype, device=ids.device)
        z = torch.empty_like(xc)
        y = torch.empty_like(xc)
        for i, w in enumerate(self.layers):
            front(residual, w.norm_w, self.eps, w.in_w, w.in_b, conv[i], w.conv_w, w.conv_b, w.x_w, xc, z, xdbl[i],
                  **launch["front"])
            ssm_step(xdbl[i], w.dt_w, w.dt_b, w.A, w.D, xc, z, ssm[i], y, **launch["ssm"])
            out_add(y, w.out_w, w.out_b, residual, **launch["out"])
        u = torch.empty(M, c.d_model, dtype=self.embedding.dtype, device=ids.device)
        add_rmsnorm(residual, residual, self.norm_f, self.eps, u, has_residual=False)
        return F.linear(u, self.lm_head).float()

    def step_general(self, ids, conv, ssm, fused: bool = False) -> torch.Tensor:
        """Six launches per layer: add+RMSNorm, in_proj (cuBLAS), conv step, x_proj (cuBLAS), SSM step, out_proj
        (cuBLAS); any batch size. ``fused``: conv step and x_proj in one launch (fp32 atomics), five per layer."""
        from ..ops.triton_decode import add_rmsnorm, conv_step, conv_xproj, ssm_step
        c = self.config
        d = c.d_inner
        h = F.embedding(ids, self.embedding)
        M = h.shape[0]
        launch = self.launch_for.get((M, "general-fused" if fused else "general"), self.launch)
        if fused:
            xdbl_all = torch.zeros(c.n_layer, M, self.layers[0].x_w.shape[0], dtype=torch.float32, device=h.device)
        residual = torch.empty(M, self.config.d_model, dtype=self.residual_dtype, device=h.device)
        u = torch.empty_like(h)
        xc = torch.empty(M, d, dtype=h.dtype, device=h.device)
        y = torch.empty_like(xc)
        for i, w in enumerate(self.layers):
            add_rmsnorm(h, residual, w.norm_w, self.eps, u, has_residual=i > 0)
            xz = F.linear(u, w.in_w, w.in_b)                                               # [M, 2d]
            if fused:
                xdbl = xdbl_all[i]
                conv_xproj(xz[:, :d], conv[i], w.conv_w, w.conv_b, w.x_w, xc, xdbl, **launch["convx"])
            else:
                conv_step(xz[:, :d], conv[i], w.conv_w, w.conv_b, xc, **launch["conv"])
                xdbl = F.linear(xc, w.x_w)                                                 # [M, R + 2N]
            ssm_step(xdbl, w.dt_w, w.dt_b, w.A, w.D, xc, xz[:, d:], ssm[i], y, **launch["ssm"])
            h = F.linear(y, w.out_w, w.out_b)
        add_rmsnorm(h, residual, self.norm_f, self.eps, u, has_residual=True)
        return F.linear(u, self.lm_head).float()


# Candidate launch parameters per path, the wrappers' defaults first (see /work/notes/decode_notes.md).
TUNING_CANDIDATES = {
    "small": {"front": [{}, dict(block_n=16, block_k=256)], "out": [{}], "ssm": [{}, dict(block_d=32)]},
    "gemv": {"front": [{}, dict(block_n=4), dict(block_n=16), dict(num_warps=8)],
             "out": [{}, dict(block_n=4), dict(block_n=16), dict(num_warps=4)],
             "ssm": [{}, dict(block_d=32), dict(block_d=16, num_warps=2)]},
    "general": {"conv": [{}, dict(block_d=1024)],
                "ssm": [{}, dict(block_d=32), dict(rows=1), dict(block_d=32, rows=8)]},
    "general-fused": {"convx": [{}, dict(block_m=16), dict(block_d=64)],
                      "ssm": [{}, dict(block_d=32), dict(rows=1), dict(block_d=32, rows=8)]},
}
_TUNED: dict[tuple, tuple[dict, dict]] = {}      # (shape signature, batch, path) → (launch, timings), per process


def _graph_ms(fn, reps: int = 5) -> float:
    """Device time of ``fn``'s launches replayed from a CUDA graph (no host launch overhead in the number)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()                                                 # compile, warm up
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def tune_decoder(decoder: "FastDecoder", batch: int, path: str, state: MambaState) -> dict[str, dict]:
    """Pick each kernel's launch parameters for ``batch`` rows on ``path``: every candidate runs once per layer
    (the real weights and state buffers, so weights stream from HBM as in a decode step) inside a CUDA graph, and
    the fastest replay wins. ``state`` is scribbled on (the caller restores it). Cached per process by shape."""
    from ..ops import triton_decode as td
    c, L0 = decoder.config, decoder.layers[0]
    key = (c.d_model, c.d_inner, c.d_state, c.d_conv, c.dt_rank_value, c.n_layer, str(L0.in_w.dtype), batch, path)
    if key not in _TUNED:
        dev, act = L0.in_w.device, L0.in_w.dtype
        M, d = batch, c.d_inner
        g = torch.Generator(device=dev).manual_seed(0)
        res = torch.randn(M, c.d_model, device=dev, generator=g).to(decoder.residual_dtype)
        xz = torch.randn(M, 2 * d, device=dev, generator=g).to(act)
        y = torch.randn(M, d, device=dev, generator=g).to(act)
        xc, z = torch.randn(M, d, device=dev, generator=g).to(act), torch.empty(M, d, device=dev, dtype=act)
        xdbl = torch.zeros(c.n_layer, M, L0.x_w.shape[0], device=dev)
        front = td.gemv_front if path == "gemv" else td.norm_in_proj_conv_xproj
        out_add = td.gemv_out if path == "gemv" else td.out_proj_add
        layers = list(enumerate(decoder.layers))
        kernels = {
            "front": lambda w, i, p: front(res, w.norm_w, decoder.eps, w.in_w, w.in_b, state.conv[i], w.conv_w,
                                           w.conv_b, w.x_w, xc, z, xdbl[i], **p),
            "out": lambda w, i, p: out_add(y, w.out_w, w.out_b, res, **p),
            "conv": lambda w, i, p: td.conv_step(xz[:, :d], state.conv[i], w.conv_w, w.conv_b, xc, **p),
            "convx": lambda w, i, p: td.conv_xproj(xz[:, :d], state.conv[i], w.conv_w, w.conv_b, w.x_w, xc,
                                                   xdbl[i], **p),
            "ssm": lambda w, i, p: td.ssm_step(xdbl[i], w.dt_w, w.dt_b, w.A, w.D, xc, z, state.ssm[i], y, **p)}
        launch, log = dict(decoder.launch), {}
        for name, candidates in TUNING_CANDIDATES[path].items():
            timings = []
            for params in candidates:
                run = kernels[name]
                try:
                    ms = _graph_ms(lambda: [run(w, i, params) for i, w in layers]) / len(layers)
                except Exception as e:  # a candidate that does not compile or launch here is skipped
                    timings.append({"params": params, "error": f"{type(e).__name__}: {str(e)[:120]}"})
                    continue
                timings.append({"params": params, "us": ms * 1e3})
            ok = [t for t in timings if "us" in t]
            if ok:
                launch[name] = dict(min(ok, key=lambda t: t["us"])["params"])
            log[name] = timings
        torch.cuda.synchronize()
        _TUNED[key] = (launch, log)
    launch, log = _TUNED[key]
    decoder.launch_for[(batch, path)], decoder.tuning_log[(batch, path)] = launch, log
    return launch


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


class _GraphedStep:
    """Static buffers + the captured graph of one batch size.

    With several decode paths able to run this batch size (``decoder.paths``), each is tuned, captured and its
    graph replays timed; a path whose logits (one step from the same state) differ from the general path's by
    more than 2e-2 (relative L2) is rejected; the fastest remaining one is kept. ``selection`` records it all."""

    def __init__(self, decoder: FastDecoder, batch: int, state: MambaState, use_graph: bool, tune: bool = False,
                 choose_path: bool = True):
        self.decoder = decoder
        self.state = state                                   # the static state object handed to callers
        self.ids = torch.zeros(batch, dtype=torch.long, device=state.ssm[0].device)
        self.graph = None
        self.logits = None
        self.selection: dict[str, dict] = {}
        if not use_graph:
            return
        saved = state.clone()
        probe = (torch.arange(batch, device=self.ids.device) * 7919 + 11) % decoder.config.vocab_size
        paths = decoder.paths(batch) if choose_path else [decoder.path(batch)]
        if choose_path and batch in decoder.path_for:
            paths = [decoder.path_for[batch]]
        captured = {}
        for path in paths:
            decoder.path_for[batch] = path
            try:
                if tune:
                    tune_decoder(decoder, batch, path, state)
                    copy_state(saved, state)
                graph, logits = self._capture(state)
                copy_state(saved, state)
                self.ids.copy_(probe)
                graph.replay()
                check = logits.clone()
                ms = self._time(graph)
            except Exception as e:  # a path that does not compile or run here is skipped
                if len(paths) == 1:
                    raise
                self.selection[path] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                continue
            captured[path] = (graph, logits, check)
            self.selection[path] = {"graph_ms": ms}
        ref = captured.get("general", next(iter(captured.values())))[2]
        for path, (_, _, check) in captured.items():
            err = _rel(check, ref)
            self.selection[path]["rel_to_general"] = err
            if not (err < 2e-2):                             # also rejects NaN
                self.selection[path]["rejected"] = True
        ok = [p for p in captured if not self.selection[p].get("rejected")]
        best = min(ok, key=lambda p: self.selection[p]["graph_ms"])
        decoder.path_for[batch] = best
        self.graph, self.logits = captured[best][0], captured[best][1]
        self.path = best
        del captured
        copy_state(saved, state)                             # warm-up, capture and timing advanced nothing visible
        self.ids.zero_()

    def _capture(self, state: MambaState):
        decoder = self.decoder
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):                      # warm-up: Triton compiles, cuBLAS picks kernels
            for _ in range(2):
                decoder.step(self.ids, state.conv, state.ssm)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = decoder.step(self.ids, state.conv, state.ssm)
        return graph, logits

    @staticmethod
    def _time(graph, n: int = 20, reps: int = 5) -> float:
        graph.replay()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / n)
        return sorted(times)[len(times) // 2]

    def run(self, ids: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids, non_blocking=True)
        if self.graph is None:
            return self.decoder.step(self.ids, self.state.conv, self.state.ssm)
        self.graph.replay()
        return self.logits.clone()


def copy_state(src: MambaState, dst: MambaState) -> None:
    for a, b in zip(src.conv, dst.conv):
        b.copy_(a, non_blocking=True)
    for a, b in zip(src.ssm, dst.ssm):
        b.copy_(a, non_blocking=True)


class FastSession(TorchSession):
    backend = "torch-fast"

    def __init__(self, model: MambaLM, use_graph: bool | None = None, small_batch_max: int = 16,
                 tune: bool = True, prefill_impl: str = "rows", prefill_scan: str = "triton-rows",
                 decode_path: str = "auto"):
        if model.device.type != "cuda" and use_graph is not False:
            raise UserError("backend torch-fast needs a CUDA GPU (its decode step is fused Triton kernels in a "
                            "CUDA graph); use --backend torch on the CPU")
        super().__init__(model)
        c = model.config
        self.use_graph = model.device.type == "cuda" if use_graph is None else use_graph
        self.tune = tune and self.use_graph       # time the kernels' launch parameters once per batch size
        if prefill_impl not in ("rows", "model-layout") or prefill_scan not in ("triton-rows", "rows", "triton"):
            raise UserError(f"unknown prefill options {prefill_impl!r}/{prefill_scan!r}")
        self.prefill_impl, self.prefill_scan = prefill_impl, prefill_scan
        if decode_path not in ("auto", "general", "general-fused", "small", "gemv"):
            raise UserError(f"unknown decode path {decode_path!r}; choose auto, general, general-fused, small or "
                            "gemv")
        self.decode_path = decode_path            # "auto": time every path that fits a batch size, keep the fastest
        self.scan_launch: dict = {}
        self.conv_rows_launch: dict = {}
        with torch.inference_mode():
            self.decoder = FastDecoder(model, small_batch_max)
        self._steps: dict[int, _GraphedStep] = {}

    # -- static buffers ---------------------------------------------------------------------------------------
    def _step_for(self, batch: int) -> _GraphedStep:
        g = self._steps.get(batch)
        if g is None:
            with torch.inference_mode():
                if self.decode_path != "auto":
                    ok = self.decoder.valid_paths(batch)
                    self.decoder.path_for[batch] = (self.decode_path if self.decode_path in ok
                                                    else self.decoder.paths(batch)[0])
                g = _GraphedStep(self.decoder, batch, self.new_state(batch), self.use_graph, self.tune,
                                 choose_path=self.decode_path == "auto")
            self._steps[batch] = g
        return g

    def decode_info(self, batch: int) -> dict:
        """How batch size ``batch`` is decoded: path, per-path graph timings of the selection, launch parameters."""
        g = self._steps.get(batch)
        path = self.decoder.path(batch)
        return {"path": path, "selection": g.selection if g else {},
                "launch": self.decoder.launch_for.get((batch, path), self.decoder.launch),
                "prefill": f"{self.prefill_impl}/{self.prefill_scan}"}

    def static_state(self, batch: int) -> MambaState:
        """The state object the fast path keeps for ``batch`` (what step/prefill return)."""
        return self._step_for(batch).state

    # -- Session API ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, input_ids, state=None):
        ids = self.check_ids(input_ids, 2).to(self.device)
        b = ids.shape[0]
        if state is not None:
            self.check_state(state, b)
        g = self._step_for(b)
        if self.prefill_impl == "model-layout":
            logits = self._prefill(ids, state, g.state)
        else:
            logits = self._prefill_rows(ids, state, g.state)
        return logits, g.state

    @torch.inference_mode()
    def step(self, input_ids, state: MambaState):
        if (isinstance(input_ids, torch.Tensor) and input_ids.device == self.device and input_ids.dim() == 1
                and input_ids.dtype in (torch.int64, torch.int32)):
            ids = input_ids   # ids already on the GPU: no range check, which would cost a host sync per step
        else:
            ids = self.check_ids(input_ids, 1).to(self.device, non_blocking=True)
        g = self._step_for(ids.shape[0])
        if state is not g.state:                             # slow path: a state the session does not own
            self.check_state(state, ids.shape[0])
            copy_state(state, g.state)
        return g.run(ids), g.state

    # -- prefill ----------------------------------------------------------------------------------------------
    def _prefill_rows(self, ids: torch.Tensor, state: MambaState | None, out: MambaState) -> torch.Tensor:
        """Prefill in the row layout [b·L, channels] the projections produce: no transposes or copies. Fused
        add+RMSNorm, cuBLAS projections, Triton causal conv over rows, and the selective scan on row views
        (``prefill_scan``: "triton-rows" = the Triton scan of ops/triton_scan.py given strided views, "rows" =
        the time-sequential scan of ops/triton_decode.py, "triton" = the public Triton scan on transposed copies)."""
        from ..ops.triton_decode import add_rmsnorm, conv_rows
        dec, cfg = self.decoder, self.model.config
        b, L = ids.shape
        d, k, N = cfg.d_inner, cfg.d_conv, cfg.d_state
        rows = b * L
        h = F.embedding(ids, dec.embedding).view(rows, -1)
        residual = torch.empty(rows, cfg.d_model, dtype=dec.residual_dtype, device=ids.device)
        u = torch.empty_like(h)
        xc = torch.empty(rows, d, dtype=h.dtype, device=ids.device)
        y = torch.empty_like(xc)
        zero_conv = None if state is not None else torch.zeros(b, d, k, dtype=h.dtype, device=ids.device)
        for i, w in enumerate(dec.layers):
            add_rmsnorm(h, residual, w.norm_w, dec.eps, u, has_residual=i > 0)
            xz = F.linear(u, w.in_w, w.in_b)                                               # [b·L, 2d]
            x, z = xz[:, :d], xz[:, d:]
            conv0 = state.conv[i] if state is not None else zero_conv
            if i == 0 and ids.is_cuda:
                self._tune_conv_rows(x, b, conv0, w, xc)
            conv_rows(x, b, conv0, w.conv_w, w.conv_b, xc, **self.conv_rows_launch)
            # new conv state: the last k inputs of [conv0, x] (read before out.conv[i] is overwritten)
            tail = x.view(b, L, d)[:, max(0, L - k):].transpose(1, 2)
            out.conv[i].copy_(torch.cat([conv0[..., L:], tail], dim=-1) if L < k else tail)
            xdbl = F.linear(xc, w.x_w)                                                     # [b·L, R + 2N]
            R = xdbl.shape[1] - 2 * N
            dt = F.linear(xdbl[:, :R], w.dt_w)                                             # [b·L, d]
            h0 = state.ssm[i] if state is not None else None
            yr = self._scan_rows(xc, dt, z, xdbl, w, h0, y, out.ssm[i], b, L, R, N)
            h = F.linear(yr, w.out_w, w.out_b)
        last = (torch.arange(b, device=ids.device) + 1) * L - 1
        u_last = torch.empty(b, cfg.d_model, dtype=u.dtype, device=u.device)
        res_last = residual[last].contiguous()
        add_rmsnorm(h[last].contiguous(), res_last, dec.norm_f, dec.eps, u_last, has_residual=True)
        return F.linear(u_last, dec.lm_head).float()

    _CONV_ROWS_CANDIDATES = [{}, dict(block_t=32, block_d=128), dict(block_t=16, block_d=256),
                             dict(block_t=128, block_d=64, num_warps=8), dict(block_t=8, block_d=512)]
    _conv_rows_tuned: dict = {}

    def _tune_conv_rows(self, x, b, conv0, w, xc) -> None:
        """Launch parameters of the prefill conv, timed once per process for large prompts (cheap ones keep the
        default)."""
        import triton.testing

        from ..ops.triton_decode import conv_rows
        key = (x.shape[1], x.shape[0] >= 4096)
        if key not in self._conv_rows_tuned:
            if not key[1]:
                self._conv_rows_tuned[key] = {}
            else:
                timings = []
                for p in self._CONV_ROWS_CANDIDATES:
                    try:
                        t = triton.testing.do_bench(lambda: conv_rows(x, b, conv0, w.conv_w, w.conv_b, xc, **p),
                                                    warmup=5, rep=20, return_mode="median")
                        timings.append((t, p))
                    except Exception:   # a candidate that does not compile here is skipped
                        continue
                self._conv_rows_tuned[key] = min(timings, key=lambda tp: tp[0])[1] if timings else {}
        self.conv_rows_launch = self._conv_rows_tuned[key]

    # tiles of the Triton scan (ops/triton_scan.py ScanConfig(T, NS, DS, num_warps)) tried on row-layout views
    _SCAN_TILES = [(8, 4, 1, 4), (16, 4, 1, 4), (8, 16, 1, 4), (8, 4, 2, 4), (4, 4, 1, 4), (8, 2, 1, 8)]
    _scan_tiles_tuned: dict = {}

    def _scan_tile(self, triton_scan, args):
        """The fastest scan tile for this shape class, timed once per process (None: keep the module's own)."""
        u = args[0]
        key = (u.shape[1], args[2].shape[1], u.shape[0] * u.shape[2] >= 4096)
        if key in self._scan_tiles_tuned:
            return self._scan_tiles_tuned[key]
        best = None
        if key[2] and hasattr(triton_scan, "ScanConfig") and hasattr(triton_scan, "set_configs"):
            import triton.testing
            saved = dict(getattr(triton_scan, "_CONFIG_OVERRIDE", {}))
            timings = []
            for tile in self._SCAN_TILES:
                try:
                    cfg = triton_scan.ScanConfig(*tile)
                    triton_scan.set_configs(fwd=cfg)
                    ms = triton.testing.do_bench(lambda: triton_scan._fwd(*args), warmup=2, rep=10,
                                                 return_mode="median")
                    timings.append((ms, tile, cfg))
                except Exception:  # a tile that does not compile here is skipped
                    continue
                finally:
                    triton_scan._CONFIG_OVERRIDE.clear()
                    triton_scan._CONFIG_OVERRIDE.update(saved)
            if timings:
                best = min(timings, key=lambda x: x[0])[2]
            self.scan_tile_log = [(tile, ms) for ms, tile, _ in timings]
        self._scan_tiles_tuned[key] = best
        return best

    def _scan_rows(self, xc, dt, z, xdbl, w, h0, y, h_out, b, L, R, N) -> torch.Tensor:
        """y rows [b·L, d] (``y`` or a tensor the scan allocated); the final state is written into ``h_out``."""
        from ..ops.triton_decode import scan_rows
        if self.prefill_scan == "rows":   # each program reads its h0 block before writing it: in place is fine
            scan_rows(xc, dt, z, xdbl, w.A, w.D, w.dt_b, h0, y, h_out, b, **self.scan_launch)
            return y
        d = xc.shape[1]

        def t(v):     # rows [b·L, c] → [b, c, L] view
            return v.view(b, L, -1).transpose(1, 2)
        Bm, Cm = t(xdbl)[:, R:R + N], t(xdbl)[:, R + N:]
        if self.prefill_scan == "triton-rows":
            from ..ops import triton_scan
            args = (t(xc), t(dt), w.A, Bm, Cm, w.D, t(z), w.dt_b, True, None if h0 is None else h0.contiguous(),
                    False)
            cfg = self._scan_tile(triton_scan, args) if xc.is_cuda else None
            saved = dict(getattr(triton_scan, "_CONFIG_OVERRIDE", {}))
            try:
                if cfg is not None:
                    triton_scan.set_configs(fwd=cfg)
                yy, hT, _, _ = triton_scan._fwd(*args)
            finally:
                if cfg is not None:
                    triton_scan._CONFIG_OVERRIDE.clear()
                    triton_scan._CONFIG_OVERRIDE.update(saved)
        else:
            from ..ops.selective_scan import selective_scan
            yy, hT = selective_scan(t(xc), t(dt), w.A, Bm, Cm, D=w.D, z=t(z), delta_bias=w.dt_b,
                                    delta_softplus=True, initial_state=h0,
                                    backend=self.model.scan_backend_for(xc.device))
        h_out.copy_(hT)
        return yy.transpose(1, 2).reshape(b * L, d)   # a view when the scan wrote the row layout (triton-rows)

    def _prefill(self, ids: torch.Tensor, state: MambaState | None, out: MambaState) -> torch.Tensor:
        """Layers over the whole prompt; final states written into ``out``; logits of the last position (fp32)."""
        from ..ops.selective_scan import selective_scan
        from ..ops.triton_decode import add_rmsnorm
        dec, cfg = self.decoder, self.model.config
        backend = self.model.scan_backend_for(ids.device)
        b, L = ids.shape
        d, k = cfg.d_inner, cfg.d_conv
        h = F.embedding(ids, dec.embedding).view(b * L, -1)
        residual = torch.empty(b * L, cfg.d_model, dtype=dec.residual_dtype, device=ids.device)
        u = torch.empty_like(h)
        for i, w in enumerate(dec.layers):
            add_rmsnorm(h, residual, w.norm_w, dec.eps, u, has_residual=i > 0)
            xz = F.linear(u, w.in_w, w.in_b).view(b, L, 2 * d)
            x = xz[..., :d].transpose(1, 2)                                                # [b, d, L]
            z = xz[..., d:].transpose(1, 2)
            conv0 = (state.conv[i].to(x.dtype) if state is not None
                     else x.new_zeros(b, d, k))
            history = torch.cat([conv0, x], dim=-1)                                        # [b, d, k + L]
            out.conv[i].copy_(history[..., -k:])
            xc = F.silu(F.conv1d(history[..., 1:], w.conv_w[:, None, :], w.conv_b, groups=d))  # [b, d, L]
            xdbl = F.linear(xc.transpose(1, 2).reshape(b * L, d), w.x_w)                   # [b·L, R + 2N]
            R, N = w.dt_w.shape[1], w.A.shape[1]
            dt_raw, B, C = xdbl.split([R, N, N], dim=-1)
            dt = F.linear(dt_raw, w.dt_w).view(b, L, d).transpose(1, 2)
            B = B.reshape(b, L, N).transpose(1, 2)
            C = C.reshape(b, L, N).transpose(1, 2)
            y, h_last = selective_scan(xc, dt, w.A, B, C, D=w.D, z=z, delta_bias=w.dt_b, delta_softplus=True,
                                       initial_state=None if state is None else state.ssm[i], backend=backend)
            out.ssm[i].copy_(h_last)
            h = F.linear(y.transpose(1, 2).reshape(b * L, d), w.out_w, w.out_b)
        last = (torch.arange(b, device=ids.device) + 1) * L - 1                            # last position rows
        u_last = torch.empty(b, cfg.d_model, dtype=u.dtype, device=u.device)
        res_last = residual[last].contiguous()
        add_rmsnorm(h[last].contiguous(), res_last, dec.norm_f, dec.eps, u_last, has_residual=True)
        return F.linear(u_last, dec.lm_head).float()


def open_fast_session(source, device="cuda", dtype=None, use_graph=None, small_batch_max: int = 16,
                      tune: bool = True, decode_path: str = "auto", allow_nonfinite: bool = False,
                      **_) -> FastSession:
    """``source``: a MambaLM, a checkpoint ref, or an artifact (its manifest names the source checkpoint).
    Default dtype fp16 (the decode kernels are written for half-precision weights; fp32/bf16 work too)."""
    if isinstance(source, MambaLM):
        return FastSession(source, use_graph=use_graph, small_batch_max=small_batch_max, tune=tune,
                           decode_path=decode_path)
    from ..checkpoint import load_model
    if is_artifact(source):
        from ..artifact import read_manifest
        source = read_manifest(source)["source"]["checkpoint"]
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError("backend torch-fast needs a CUDA GPU and none is visible; use --backend torch")
    return FastSession(load_model(source, dtype=dtype or torch.float16, device=device,
                                  allow_nonfinite=allow_nonfinite), use_graph=use_graph,
                       small_batch_max=small_batch_max, tune=tune, decode_path=decode_path)
