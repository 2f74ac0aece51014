"""Helpers shared by the tests: one selective-scan input generator, the error measures, tolerance checks from the
artifact spec, state comparison, and the one-thread fixture and plugin-enqueue harness that several modules use."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from mamba_deploy.artifact import DEFAULT_TOLERANCES, within  # noqa: F401  (re-exported: one source of tolerances)

SCAN_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normwise relative error ‖a − b‖₂ / ‖b‖₂ in float64 (a zero reference counts as norm 1e-30)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def max_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out − ref| / max|ref| in float64; a reference that is exactly zero is compared absolutely. NaN anywhere
    in ``out`` (a poisoned element left unwritten) gives NaN, which fails every ``<=`` check."""
    ref = ref.double()
    scale = ref.abs().max().item()
    err = (out.double() - ref).abs().max().item()
    if torch.isnan(out).any():
        return math.nan
    return err / (scale if scale > 0 else 1.0)


def scan_inputs(batch: int, d: int, N: int, L: int | None, *, seed: int = 0, dtype=torch.float32, device="cpu",
                dist: str = "realistic", D: bool = True, z: bool = True, delta_bias: bool = True,
                initial_state: bool = True, large_delta: bool = False) -> dict[str, torch.Tensor | None]:
    """Inputs of ``ops.selective_scan`` (names as there; ``L=None``: one decode step, no time axis).

    ``dist="realistic"``: δ bias from upstream's init (softplus(bias) log-uniform in [1e-3, 0.1]), δ_raw = 0.5·N(0,1),
    A = −(1…N) per channel scaled by U(0.5, 1.5) (S4D-real), the rest N(0,1). ``dist="upstream"``: upstream's test
    distributions (δ_raw = 0.5·U, bias 0.5·U, A = −0.5·U). ``dist="s4d-jitter"``: as "realistic" but
    A = −(1…N)·(1 + 0.1·U) per element (the plugin kernels' tests; their measured bounds were set on these).
    ``large_delta`` sets every 11th δ_raw to 25 (past the softplus threshold). u, δ, B, C, z are in ``dtype``;
    A, D, δ bias and the state fp32.
    """
    g = torch.Generator().manual_seed(seed)
    seq = () if L is None else (L,)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def rand(*shape, scale=1.0):
        return torch.rand(*shape, generator=g) * scale

    if dist in ("realistic", "s4d-jitter"):
        dt = torch.exp(rand(d) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        bias = dt + torch.log(-torch.expm1(-dt))                                  # inverse softplus
        delta = randn(batch, d, *seq, scale=0.5)
        scale = 0.5 + rand(d, 1) if dist == "realistic" else 1 + 0.1 * rand(d, N)
        A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(d, 1) * scale
    elif dist == "upstream":
        bias = rand(d, scale=0.5)
        delta = rand(batch, d, *seq, scale=0.5)
        A = -rand(d, N, scale=0.5)
    else:
        raise ValueError(f"unknown dist {dist!r}")
    if large_delta:
        delta.view(-1)[::11] = 25.0
    out = dict(u=randn(batch, d, *seq), delta=delta, A=A, B=randn(batch, N, *seq), C=randn(batch, N, *seq),
               D=randn(d), z=randn(batch, d, *seq), delta_bias=bias, initial_state=randn(batch, d, N))
    keep = dict(D=D, z=z, delta_bias=delta_bias, initial_state=initial_state)
    act = ("u", "delta", "B", "C", "z")
    return {k: None if not keep.get(k, True) else v.to(device=device, dtype=dtype if k in act else torch.float32)
            .contiguous() for k, v in out.items()}


def run_with_grads(fn, inputs: dict, gy_seed: int = 1, **kw) -> dict[str, torch.Tensor]:
    """``fn(**inputs, **kw) -> (y, final state)``: y, the final state and the gradients of ⟨y, gy⟩ + ⟨h_T, gh⟩ (random
    gy, gh in float64) w.r.t. every tensor input that is not None, as ``d_<name>``."""
    leaves = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in inputs.items()}
    y, hT = fn(**leaves, **kw)
    g = torch.Generator(device="cpu").manual_seed(gy_seed)
    gy = torch.randn(y.shape, generator=g).to(y.device, torch.float64)
    gh = torch.randn(hT.shape, generator=g).to(y.device, torch.float64)
    loss = (y.double() * gy).sum() + (hT.double() * gh).sum()
    names = [k for k, v in leaves.items() if v is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    out = {"y": y.detach(), "final_state": hT.detach()}
    out.update({"d_" + k: gr for k, gr in zip(names, grads)})
    return out


def run_interpreter_worker(script: str, timeout: int = 600):
    """Run ``script`` in ONE fresh Python process with TRITON_INTERPRET=1 (the flag must be set before Triton
    decorates the kernels, and this process may already have imported them), with this folder as ``sys.argv[1]``;
    it prints one line ``RESULTS<json>``, returned parsed."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-c", script, os.path.dirname(os.path.abspath(__file__))], env=env,
                          capture_output=True, text=True, timeout=timeout)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS")), None)
    assert proc.returncode == 0 and line, f"interpreter worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(line[len("RESULTS"):])


# ---- the plugin's CUDA kernels (tests/test_plugin_kernels_gpu.py, tests/test_ssd_kernels_gpu.py) -----------------
KERNEL_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
KERNEL_Y_TOL = {"fp32": 1e-5, "fp16": 1e-3, "bf16": 8e-3}   # y: fp32 arithmetic, then rounding to the act dtype
KERNEL_STATE_TOL = 1e-5                                       # the fp32 state, for every activation dtype


def kernel_module_setup(report_env: str):
    """For a test module of the plugin's CUDA kernels, at import: skip it without a CUDA device or without nvcc (to
    build libmamba_scan.so); else return (the ``kernels`` module, a results dict, an autouse module fixture that
    loads the library and afterwards writes the results as JSON to the file the environment variable ``report_env``
    names, when set — the GPU scripts collect it)."""
    import json
    import os
    import shutil

    import pytest
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the plugin kernels run only on a GPU", allow_module_level=True)
    if not (shutil.which("nvcc") or os.environ.get("MAMBA_DEPLOY_SCAN_LIB")
            or os.path.exists("/usr/local/cuda/bin/nvcc")):
        pytest.skip("nvcc not found: cannot build libmamba_scan.so", allow_module_level=True)
    from mamba_deploy.trt import kernels
    results: dict = {}

    @pytest.fixture(scope="module", autouse=True)
    def library():
        yield kernels.load_library()
        path = os.environ.get(report_env)
        if path:
            with open(path, "w") as f:
                json.dump(results, f, indent=2)

    return kernels, results, library


def assert_states_close(a, b, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Every layer's SSM and conv state of two MambaStates agree."""
    assert len(a.ssm) == len(b.ssm) and len(a.conv) == len(b.conv)
    for x, y in zip(a.ssm + a.conv, b.ssm + b.conv):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol)


def assert_one_line_error(code: int, output: str, needle: str) -> None:
    """A CLI run failed with exactly one line ``mamba-deploy: error: …`` containing ``needle`` and no traceback."""
    assert code != 0
    assert "Traceback" not in output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mamba-deploy: error:"), output
    assert needle in lines[0], output


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: per-op work is microseconds, so one torch thread (no OpenMP barriers) is fastest, and robust on
    a loaded machine. Import it into a test module to apply it to that module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def poisoned(like: torch.Tensor) -> torch.Tensor:
    """An output buffer filled with NaN, so an element a kernel leaves unwritten fails every comparison."""
    return torch.full_like(like, float("nan"))


def _plugin_desc(t: torch.Tensor):
    name = {torch.float32: "FLOAT", torch.float16: "HALF", torch.bfloat16: "BF16"}[t.dtype]
    return SimpleNamespace(type=SimpleNamespace(name=name), dims=tuple(t.shape))


def enqueue_on_stream(logic, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> int:
    """``logic.enqueue`` (the body of a TensorRT plugin's enqueue) on fake descriptors and the tensors' raw device
    pointers, on a fresh non-default CUDA stream; returns its status after the stream has finished."""
    stream = torch.cuda.Stream()
    torch.cuda.current_stream().synchronize()
    ret = logic.enqueue([_plugin_desc(v) for v in inputs], [_plugin_desc(v) for v in outputs],
                        [v.data_ptr() for v in inputs], [v.data_ptr() for v in outputs], 0, stream.cuda_stream)
    stream.synchronize()
    return ret
