"""The fast PyTorch GPU session (backend ``torch-fast``): fused decode kernels, one CUDA graph per batch size.

Decode: the whole model's step (embedding, 48 × [add+RMSNorm, in_proj, conv step, x_proj, SSM step, out_proj],
final norm, lm_head) is captured once per batch size into ONE ``torch.cuda.CUDAGraph`` over static buffers: the
token ids, the per-layer conv and SSM states (updated in place by the kernels of ops/triton_decode.py) and the
logits. A step is then: copy ids in, replay, copy logits out. How a batch size is decoded — which of the decode
paths (``DECODE_PATHS``) and each kernel's launch parameters — is a ``DecodePlan``, chosen once per batch size in
one place (:class:`GraphedStep`: tune each candidate path's kernels, capture, time the replays, check the logits,
keep the fastest); every timing lands in the one per-process tuning cache (:func:`_fastest`).

State ownership (the fast path): ``step`` returns a ``MambaState`` whose tensors ARE the session's static buffers
for that batch size. Passing that same object back to the next ``step`` costs no copy; passing any other state
copies it into the buffers first. So the returned state is valid until the next ``step``/``prefill`` of that batch
size: ``state.clone()`` it to keep it. Logits are returned as a fresh fp32 tensor. Token ids already on the GPU
are not range-checked by ``step`` (that check would cost a host sync per token); ids from the CPU are.

Prefill works in the row layout ``[b·L, channels]`` that the projections produce, with no transposes or copies:
fused add+RMSNorm, cuBLAS projections, the Triton causal conv over rows (``conv_rows``) and the Triton scan's
forward kernel on transposed views of the rows (``selective_scan_triton_fwd``); lm_head on the last position only.
Its final state lands directly in the static buffers, so the first step after it copies nothing.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..families import weight_table
from ..model import MambaLM, MambaState
from ..ops import triton_decode as td
from ..ops.triton_scan import ScanConfig, selective_scan_triton_fwd
from .session import is_artifact
from .torch_session import TorchSession

# decode paths: "general" six launches per layer (cuBLAS projections), any batch; "general-fused" five (conv step
# and x_proj fused); "small" three (norm+in_proj+conv+x_proj, SSM step, out_proj+residual; tl.dot tiles, M ≤ 64);
# "gemv" the same three as matrix-vector products (M ≤ 8)
DECODE_PATHS = ("general", "general-fused", "small", "gemv")


@dataclasses.dataclass
class _LayerWeights:
    """One layer's operands of the decode/prefill kernels, taken from the family's weight table."""
    norm_w: torch.Tensor
    in_w: torch.Tensor
    in_b: torch.Tensor | None
    conv_w: torch.Tensor        # [d_inner, d_conv]
    conv_b: torch.Tensor | None
    x_w: torch.Tensor
    dt_w: torch.Tensor          # [d_inner, dt_rank]
    dt_b: torch.Tensor
    A: torch.Tensor             # −exp(A_log) [d_inner, N]
    D: torch.Tensor
    out_w: torch.Tensor
    out_b: torch.Tensor | None


# the kernels' operand for each row of one layer in the weight table (families/mamba1/weights.py), by the row's
# name within the layer; rows a config lacks (optional biases) stay None
_OPERANDS = {"norm.weight": "norm_w", "mixer.in_proj.weight": "in_w", "mixer.in_proj.bias": "in_b",
             "mixer.conv1d.weight": "conv_w", "mixer.conv1d.bias": "conv_b", "mixer.x_proj.weight": "x_w",
             "mixer.dt_proj.weight": "dt_w", "mixer.dt_proj.bias": "dt_b", "mixer.A_log": "A", "mixer.D": "D",
             "mixer.out_proj.weight": "out_w", "mixer.out_proj.bias": "out_b"}
_LAYER_PREFIX = "backbone.layers."


def refuse_other_families(family: str) -> None:
    """The fused kernels here are Mamba-1's block (FalconMamba's extra norms and Mamba-2's SSD are not in them)."""
    if family != "mamba1":
        raise UserError(f"backend torch-fast implements Mamba-1 blocks only (this is a {family} model); use "
                        "--backend torch or onnxruntime")


def kernel_weights(model: MambaLM) -> tuple[dict[str, torch.Tensor], list[_LayerWeights]]:
    """Every tensor the fast path's kernels read, from the family's weight table (``families.weight_table``):
    each in the form and dtype the ONNX artifact stores it (``Weight.artifact_tensor``: A = −exp(A_log); the rows
    the reference upcasts before use — norms, conv, δ bias, D — in fp32, the projections in the model's dtype),
    contiguous. Returns ({"embedding", "norm_f", "lm_head"}, per-layer operands). Raises UserError for a model
    family whose table has rows these Mamba-1 kernels have no operand for."""
    refuse_other_families(getattr(model.config, "family", "mamba1"))
    layers = [dict.fromkeys(_OPERANDS.values()) for _ in range(model.config.n_layer)]
    shared = {}
    for w in weight_table(model.config):
        t = w.artifact_tensor(model.get_parameter(w.name), model.dtype).contiguous()
        if w.name.startswith(_LAYER_PREFIX):
            i, rest = w.name[len(_LAYER_PREFIX):].split(".", 1)
            if rest not in _OPERANDS:
                raise UserError(f"backend torch-fast has no kernel operand for weight {w.name}; use --backend torch")
            layers[int(i)][_OPERANDS[rest]] = t
        else:
            shared[{"backbone.embedding.weight": "embedding", "backbone.norm_f.weight": "norm_f",
                    "lm_head.weight": "lm_head"}[w.name]] = t
    shared.setdefault("lm_head", shared["embedding"])                     # tied: no lm_head row
    for op in layers:
        op["conv_w"] = op["conv_w"].view(op["conv_w"].shape[0], -1)          # [d_inner, 1, d_conv] → [d_inner, d_conv]
    return shared, [_LayerWeights(**op) for op in layers]


@dataclasses.dataclass
class DecodePlan:
    """How one batch size is decoded: the path, each kernel's launch parameters (kernel → keyword arguments of its
    wrapper in ops/triton_decode.py; absent = the wrapper's defaults), the candidate timings behind them, and the
    graph-replay comparison of the paths (path → graph_ms, rel_to_general, rejected or error)."""
    path: str
    launch: dict[str, dict] = dataclasses.field(default_factory=dict)
    tuning: dict[str, list] = dataclasses.field(default_factory=dict)
    selection: dict[str, dict] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# the one tuning cache
# ---------------------------------------------------------------------------------------------------------------
_TUNING_CACHE: dict[tuple, tuple[object, list[dict]]] = {}   # (what, shape signature…) → (fastest, timings)


def _fastest(key: tuple, candidates: list, time_ms: Callable[[object], float]):
    """The candidate with the smallest ``time_ms(candidate)``, measured once per process per ``key`` (then
    cached); a candidate that does not compile or run here is skipped and logged. Returns (fastest, timings);
    the first candidate when none ran."""
    if key not in _TUNING_CACHE:
        timings = []
        for params in candidates:
            try:
                timings.append({"params": params, "ms": time_ms(params)})
            except Exception as e:  # a candidate that does not compile or launch here is skipped
                timings.append({"params": params, "error": f"{type(e).__name__}: {str(e)[:120]}"})
        ok = [t for t in timings if "ms" in t]
        _TUNING_CACHE[key] = (min(ok, key=lambda t: t["ms"])["params"] if ok else candidates[0], timings)
    return _TUNING_CACHE[key]


def _graph_ms(fn, reps: int = 5, n: int = 1) -> float:
    """Device time of ``fn``'s launches replayed from a CUDA graph (no host launch overhead in the number):
    median over ``reps`` of ``n`` back-to-back replays, per replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()                                                 # compile, warm up
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _replay_ms(graph, reps, n)


def _replay_ms(graph, reps: int = 5, n: int = 1) -> float:
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


def _bench_ms(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=2, rep=10, return_mode="median")


# ---------------------------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------------------------
class FastDecoder:
    """The decode step written with the fused kernels (eager; FastSession captures it in a graph)."""

    def __init__(self, model: MambaLM, small_batch_max: int = 16):
        c = model.config
        # batches up to this size may take the three-launch paths (norm recomputed per program, x_proj by atomics)
        # (half-precision weights only: Triton's tl.dot would round fp32 operands to TF32)
        half = model.dtype in (torch.float16, torch.bfloat16) or model.device.type == "cpu"
        self.small_batch_max = small_batch_max if c.d_inner % 32 == 0 and half else 0
        self.config = c
        self.eps = c.norm_eps
        self.residual_dtype = torch.float32 if c.residual_in_fp32 else model.dtype
        self.plans: dict[int, DecodePlan] = {}           # batch → how it is decoded (FastSession chooses)
        shared, self.layers = kernel_weights(model)
        self.embedding, self.norm_f, self.lm_head = shared["embedding"], shared["norm_f"], shared["lm_head"]

    def candidate_paths(self, batch: int, decode_path: str = "auto") -> list[str]:
        """The decode paths to try for ``batch`` rows, the default first. "auto": the ones worth timing (at
        batch ≤ 8 the GEMV form of "small" stands in for it); a named path: that one alone, or the default when it
        cannot run this batch size."""
        small = batch <= self.small_batch_max
        auto = (["gemv" if batch <= 8 else "small"] if small else []) + ["general", "general-fused"]
        if decode_path == "auto":
            return auto
        fits = decode_path in ("general", "general-fused") or (small and (decode_path == "small" or batch <= 8))
        return [decode_path if fits else auto[0]]

    def plan(self, batch: int) -> DecodePlan:
        p = self.plans.get(batch)
        return p if p is not None else DecodePlan(self.candidate_paths(batch)[0])

    def step(self, ids: torch.Tensor, conv: list[torch.Tensor], ssm: list[torch.Tensor]) -> torch.Tensor:
        """ids [M] → logits [M, V] fp32; conv/ssm states updated in place, by the path of ``plan(M)``."""
        plan = self.plan(ids.shape[0])
        launch = {k: plan.launch.get(k, {}) for k in ("front", "ssm", "out", "conv", "convx")}
        if plan.path in ("general", "general-fused"):
            return self._step_general(ids, conv, ssm, launch, fused=plan.path == "general-fused")
        return self._step_small(ids, conv, ssm, launch, gemv=plan.path == "gemv")

    def _step_small(self, ids, conv, ssm, launch, gemv: bool) -> torch.Tensor:
        """Three launches per layer (norm+in_proj+conv+x_proj, SSM step, out_proj+residual); M ≤ 64 with tl.dot
        tiles ("small"), M ≤ 8 as matrix-vector products ("gemv")."""
        front, out_add = (td.gemv_front, td.gemv_out) if gemv else (td.norm_in_proj_conv_xproj, td.out_proj_add)
        c = self.config
        d = c.d_inner
        residual = F.embedding(ids, self.embedding).to(self.residual_dtype)
        M = residual.shape[0]
        xd = self.layers[0].x_w.shape[0]
        xdbl = torch.zeros(c.n_layer, M, xd, dtype=torch.float32, device=ids.device)     # x_proj accumulators
        xc = torch.empty(M, d, dtype=self.embedding.dtype, device=ids.device)
        z = torch.empty_like(xc)
        y = torch.empty_like(xc)
        for i, w in enumerate(self.layers):
            front(residual, w.norm_w, self.eps, w.in_w, w.in_b, conv[i], w.conv_w, w.conv_b, w.x_w, xc, z, xdbl[i],
                  **launch["front"])
            td.ssm_step(xdbl[i], w.dt_w, w.dt_b, w.A, w.D, xc, z, ssm[i], y, **launch["ssm"])
            out_add(y, w.out_w, w.out_b, residual, **launch["out"])
        u = torch.empty(M, c.d_model, dtype=self.embedding.dtype, device=ids.device)
        td.add_rmsnorm(residual, residual, self.norm_f, self.eps, u, has_residual=False)
        return F.linear(u, self.lm_head).float()

    def _step_general(self, ids, conv, ssm, launch, fused: bool) -> torch.Tensor:
        """Six launches per layer: add+RMSNorm, in_proj (cuBLAS), conv step, x_proj (cuBLAS), SSM step, out_proj
        (cuBLAS); any batch size. ``fused``: conv step and x_proj in one launch (fp32 atomics), five per layer."""
        c = self.config
        d = c.d_inner
        h = F.embedding(ids, self.embedding)
        M = h.shape[0]
        if fused:
            xdbl_all = torch.zeros(c.n_layer, M, self.layers[0].x_w.shape[0], dtype=torch.float32, device=h.device)
        residual = torch.empty(M, self.config.d_model, dtype=self.residual_dtype, device=h.device)
        u = torch.empty_like(h)
        xc = torch.empty(M, d, dtype=h.dtype, device=h.device)
        y = torch.empty_like(xc)
        for i, w in enumerate(self.layers):
            td.add_rmsnorm(h, residual, w.norm_w, self.eps, u, has_residual=i > 0)
            xz = F.linear(u, w.in_w, w.in_b)                                               # [M, 2d]
            if fused:
                xdbl = xdbl_all[i]
                td.conv_xproj(xz[:, :d], conv[i], w.conv_w, w.conv_b, w.x_w, xc, xdbl, **launch["convx"])
            else:
                td.conv_step(xz[:, :d], conv[i], w.conv_w, w.conv_b, xc, **launch["conv"])
                xdbl = F.linear(xc, w.x_w)                                                 # [M, R + 2N]
            td.ssm_step(xdbl, w.dt_w, w.dt_b, w.A, w.D, xc, xz[:, d:], ssm[i], y, **launch["ssm"])
            h = F.linear(y, w.out_w, w.out_b)
        td.add_rmsnorm(h, residual, self.norm_f, self.eps, u, has_residual=True)
        return F.linear(u, self.lm_head).float()


# Candidate launch parameters per path and kernel, the wrappers' defaults first.
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


def tune_decoder(decoder: FastDecoder, batch: int, path: str, state: MambaState) -> DecodePlan:
    """A plan for ``batch`` rows on ``path`` with each kernel's launch parameters picked by timing: every
    candidate runs once per layer (the real weights and state buffers, so weights stream from HBM as in a decode
    step) inside a CUDA graph, and the fastest replay wins. ``state`` is scribbled on (the caller restores it)."""
    c, L0 = decoder.config, decoder.layers[0]
    shape = (c.d_model, c.d_inner, c.d_state, c.d_conv, c.dt_rank_value, c.n_layer, str(L0.in_w.dtype), batch)
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
    kernels = {
        "front": lambda w, i, p: front(res, w.norm_w, decoder.eps, w.in_w, w.in_b, state.conv[i], w.conv_w,
                                       w.conv_b, w.x_w, xc, z, xdbl[i], **p),
        "out": lambda w, i, p: out_add(y, w.out_w, w.out_b, res, **p),
        "conv": lambda w, i, p: td.conv_step(xz[:, :d], state.conv[i], w.conv_w, w.conv_b, xc, **p),
        "convx": lambda w, i, p: td.conv_xproj(xz[:, :d], state.conv[i], w.conv_w, w.conv_b, w.x_w, xc, xdbl[i],
                                               **p),
        "ssm": lambda w, i, p: td.ssm_step(xdbl[i], w.dt_w, w.dt_b, w.A, w.D, xc, z, state.ssm[i], y, **p)}
    plan = DecodePlan(path)
    layers = list(enumerate(decoder.layers))
    for name, candidates in TUNING_CANDIDATES[path].items():
        run = kernels[name]
        best, timings = _fastest(
            ("decode", *shape, path, name), candidates,
            lambda p: _graph_ms(lambda: [run(w, i, p) for i, w in layers]) / len(layers))
        plan.launch[name], plan.tuning[name] = dict(best), timings
    torch.cuda.synchronize()
    return plan


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


class GraphedStep:
    """Static buffers + the captured graph of one batch size, and the choice of its ``DecodePlan``.

    Every candidate path (``decoder.candidate_paths``) is tuned (``tune``), captured and its graph replays timed;
    a path whose logits (one step from the same state) differ from the general path's by more than 2e-2 (relative
    L2) is rejected; the fastest remaining one becomes ``decoder.plans[batch]`` (its ``selection`` records it
    all). Without a graph the first candidate is used untuned."""

    def __init__(self, decoder: FastDecoder, batch: int, state: MambaState, use_graph: bool, tune: bool,
                 decode_path: str):
        self.decoder = decoder
        self.state = state                                   # the static state object handed to callers
        self.ids = torch.zeros(batch, dtype=torch.long, device=state.ssm[0].device)
        self.graph = None
        self.logits = None
        paths = decoder.candidate_paths(batch, decode_path)
        if batch in decoder.plans:                           # a plan given beforehand is kept
            paths = [decoder.plans[batch].path]
        decoder.plans.setdefault(batch, DecodePlan(paths[0]))
        if not use_graph:
            return
        saved = state.clone()
        probe = (torch.arange(batch, device=self.ids.device) * 7919 + 11) % decoder.config.vocab_size
        captured, selection = {}, {}
        for path in paths:
            try:
                plan = tune_decoder(decoder, batch, path, state) if tune else DecodePlan(path)
                copy_state(saved, state)
                decoder.plans[batch] = plan
                graph, logits = self._capture(state)
                copy_state(saved, state)
                self.ids.copy_(probe)
                graph.replay()
                check = logits.clone()
                ms = _replay_ms(graph, n=20)
            except Exception as e:  # a path that does not compile or run here is skipped
                if len(paths) == 1:
                    raise
                selection[path] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                continue
            captured[path] = (graph, logits, check, plan)
            selection[path] = {"graph_ms": ms}
        ref = captured.get("general", next(iter(captured.values())))[2]
        for path, (_, _, check, _) in captured.items():
            err = _rel(check, ref)
            selection[path]["rel_to_general"] = err
            if not (err < 2e-2):                             # also rejects NaN
                selection[path]["rejected"] = True
        ok = [p for p in captured if not selection[p].get("rejected")]
        best = min(ok, key=lambda p: selection[p]["graph_ms"])
        self.graph, self.logits, _, plan = captured[best]
        plan.selection = selection
        decoder.plans[batch] = plan
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


# ---------------------------------------------------------------------------------------------------------------
# prefill tuning: candidates timed once per process for large prompts (smaller ones keep the defaults)
# ---------------------------------------------------------------------------------------------------------------
CONV_ROWS_CANDIDATES = [{}, dict(block_t=32, block_d=128), dict(block_t=16, block_d=256),
                        dict(block_t=128, block_d=64, num_warps=8), dict(block_t=8, block_d=512)]
# tiles of the Triton scan's forward (ops/triton_scan.py) tried on the row-layout views; None = its default
SCAN_CANDIDATES = [None, ScanConfig(8, 4, 1, 4), ScanConfig(16, 4, 1, 4), ScanConfig(8, 16, 1, 4),
                   ScanConfig(8, 4, 2, 4), ScanConfig(4, 4, 1, 4), ScanConfig(8, 2, 1, 8)]
_TUNE_PREFILL_ROWS = 4096


class FastSession(TorchSession):
    backend = "torch-fast"

    def __init__(self, model: MambaLM, use_graph: bool | None = None, small_batch_max: int = 16,
                 tune: bool = True, decode_path: str = "auto"):
        if model.device.type != "cuda" and use_graph is not False:
            raise UserError("backend torch-fast needs a CUDA GPU (its decode step is fused Triton kernels in a "
                            "CUDA graph); use --backend torch on the CPU")
        super().__init__(model)
        self.use_graph = model.device.type == "cuda" if use_graph is None else use_graph
        self.tune = tune and self.use_graph       # time the kernels' launch parameters once per batch size
        if decode_path != "auto" and decode_path not in DECODE_PATHS:
            raise UserError(f"unknown decode path {decode_path!r}; choose auto, " + ", ".join(DECODE_PATHS))
        self.decode_path = decode_path            # "auto": time every path that fits a batch size, keep the fastest
        self.prefill_launch: dict = {"conv": {}, "scan": None}   # of the last prefill (tuned for large prompts)
        with torch.inference_mode():
            self.decoder = FastDecoder(model, small_batch_max)
        self._steps: dict[int, GraphedStep] = {}

    # -- static buffers ---------------------------------------------------------------------------------------
    def _step_for(self, batch: int) -> GraphedStep:
        g = self._steps.get(batch)
        if g is None:
            with torch.inference_mode():
                g = GraphedStep(self.decoder, batch, self.new_state(batch), self.use_graph, self.tune,
                                 self.decode_path)
            self._steps[batch] = g
        return g

    def decode_info(self, batch: int) -> dict:
        """How batch size ``batch`` is decoded: path, per-path graph timings of the selection, launch parameters;
        and the prefill's tiles."""
        plan = self.decoder.plan(batch)
        return {"path": plan.path, "selection": plan.selection, "launch": plan.launch,
                "prefill": {"conv": self.prefill_launch["conv"], "scan": repr(self.prefill_launch["scan"])}}

    def static_state(self, batch: int) -> MambaState:
        """The state object the fast path keeps for ``batch`` (what step/prefill return)."""
        return self._step_for(batch).state

    def graphed_step(self, batch: int) -> GraphedStep:
        """The static buffers (``ids``, ``state``) and captured ``graph`` of ``batch`` (profiling)."""
        return self._step_for(batch)

    # -- Session API ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, input_ids, state=None):
        ids = self.check_ids(input_ids, 2).to(self.device)
        b = ids.shape[0]
        if state is not None:
            self.check_state(state, b)
        g = self._step_for(b)
        return self._prefill(ids, state, g.state), g.state

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
    def _prefill(self, ids: torch.Tensor, state: MambaState | None, out: MambaState) -> torch.Tensor:
        """Layers over the prompt in the row layout [b·L, channels]; final states written into ``out``; logits of
        the last position (fp32)."""
        dec, cfg = self.decoder, self.model.config
        b, L = ids.shape
        d, k, N = cfg.d_inner, cfg.d_conv, cfg.d_state
        rows = b * L
        h = F.embedding(ids, dec.embedding).view(rows, -1)
        residual = torch.empty(rows, cfg.d_model, dtype=dec.residual_dtype, device=ids.device)
        u = torch.empty_like(h)
        xc = torch.empty(rows, d, dtype=h.dtype, device=ids.device)
        zero_conv = None if state is not None else torch.zeros(b, d, k, dtype=h.dtype, device=ids.device)

        def t(v):     # rows [b·L, c] → [b, c, L] view
            return v.view(b, L, -1).transpose(1, 2)
        for i, w in enumerate(dec.layers):
            td.add_rmsnorm(h, residual, w.norm_w, dec.eps, u, has_residual=i > 0)
            xz = F.linear(u, w.in_w, w.in_b)                                               # [b·L, 2d]
            x, z = xz[:, :d], xz[:, d:]
            conv0 = state.conv[i] if state is not None else zero_conv

            def conv(p, x=x, conv0=conv0, w=w):
                td.conv_rows(x, b, conv0, w.conv_w, w.conv_b, xc, **p)
            if i == 0:
                self.prefill_launch["conv"] = self._tuned("prefill-conv", x, CONV_ROWS_CANDIDATES, conv, {})
            conv(self.prefill_launch["conv"])
            # new conv state: the last k inputs of [conv0, x] (read before out.conv[i] is overwritten)
            tail = x.view(b, L, d)[:, max(0, L - k):].transpose(1, 2)
            out.conv[i].copy_(torch.cat([conv0[..., L:], tail], dim=-1) if L < k else tail)
            xdbl = F.linear(xc, w.x_w)                                                     # [b·L, R + 2N]
            R = xdbl.shape[1] - 2 * N
            dt = F.linear(xdbl[:, :R], w.dt_w)                                             # [b·L, d]
            h0 = state.ssm[i].contiguous() if state is not None else None
            args = (t(xc), t(dt), w.A, t(xdbl)[:, R:R + N], t(xdbl)[:, R + N:], w.D, t(z), w.dt_b, True, h0)

            def scan(cfg, args=args):
                return selective_scan_triton_fwd(*args, config=cfg)
            if i == 0:
                self.prefill_launch["scan"] = self._tuned("prefill-scan", xc, SCAN_CANDIDATES, scan, None, N)
            y, hT = scan(self.prefill_launch["scan"])
            out.ssm[i].copy_(hT)
            h = F.linear(y.transpose(1, 2).reshape(rows, d), w.out_w, w.out_b)    # y is in the row layout: a view
        last = (torch.arange(b, device=ids.device) + 1) * L - 1
        u_last = torch.empty(b, cfg.d_model, dtype=u.dtype, device=u.device)
        res_last = residual[last].contiguous()
        td.add_rmsnorm(h[last].contiguous(), res_last, dec.norm_f, dec.eps, u_last, has_residual=True)
        return F.linear(u_last, dec.lm_head).float()

    @staticmethod
    def _tuned(what: str, rows: torch.Tensor, candidates: list, run, default, *shape):
        """The fastest of ``candidates`` for ``run(candidate)`` (the first layer's real tensors), timed once per
        process per shape class; prompts of fewer than 4096 rows (or off CUDA) keep ``default``."""
        if not rows.is_cuda or rows.shape[0] < _TUNE_PREFILL_ROWS:
            return default
        best, _ = _fastest((what, rows.shape[1], *shape, str(rows.dtype)), candidates,
                           lambda p: _bench_ms(lambda: run(p)))
        return best


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
        manifest = read_manifest(source)
        refuse_other_families(manifest["family"])
        source = manifest["source"]["checkpoint"]
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError("backend torch-fast needs a CUDA GPU and none is visible; use --backend torch")
    return FastSession(load_model(source, dtype=dtype or torch.float16, device=device,
                                  allow_nonfinite=allow_nonfinite), use_graph=use_graph,
                       small_batch_max=small_batch_max, tune=tune, decode_path=decode_path)
