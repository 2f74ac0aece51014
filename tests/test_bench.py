"""`mamba-deploy bench` on the CPU: JSON with prefill and decode figures per backend, the floor arithmetic, the
timing bookkeeping, and one-line errors for user mistakes."""
from __future__ import annotations

import json
import time

import pytest
import torch
from click.testing import CliRunner

from mamba_deploy.bench import bench_session, decode_floor_bytes, state_bytes, weight_bytes
from mamba_deploy.cli import main
from mamba_deploy.config import MambaConfig
from mamba_deploy.model import MambaState, random_model


def test_floor_bytes_by_hand():
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=96, d_state=8, d_conv=4, expand=2)
    model = random_model(cfg, dtype=torch.float16)
    d, r, V = 64, 2, 96
    per_layer = 32 + 32 * 2 * d + d * 4 + d + d * (r + 16) + r * d + d + d * 8 + d + d * 32   # norm … out_proj
    params = V * 32 + 2 * per_layer + 32                                     # tied embedding once, norm_f
    assert weight_bytes(model) == 2 * params
    assert state_bytes(cfg, 3, 2) == 3 * 2 * d * (4 * 2 + 8 * 4)
    assert decode_floor_bytes(cfg, 3, 1000, 2) == 1000 + 2 * state_bytes(cfg, 3, 2)


class _SleepySession:
    """A session whose prefill takes 6 ms and step 3 ms: the engine must report those, per step, as medians."""
    vocab_size = 50

    def prefill(self, ids, state=None):
        time.sleep(0.006)
        return torch.zeros(ids.shape[0], 50), MambaState([], [])

    def step(self, ids, state):
        time.sleep(0.003)
        return torch.zeros(ids.shape[0], 50), state


def test_engine_timing_bookkeeping():
    row = bench_session(_SleepySession(), "fake", batch=4, prompt_len=10, gen_len=5, device=torch.device("cpu"),
                        reps=3, warmup=0)
    assert len(row.prefill_samples_ms) == 3 and len(row.decode_samples_ms) == 3
    assert 5.5 < row.prefill_ms < 60 and 2.8 < row.decode_ms_per_step < 30
    assert row.prefill_tokens_per_s == pytest.approx(4 * 10 / (row.prefill_ms / 1e3))
    assert row.decode_tokens_per_s == pytest.approx(4 / (row.decode_ms_per_step / 1e3))


class _HungrySession(_SleepySession):
    """Holds ``mib`` MiB (written, so resident) while its prefill runs."""

    def __init__(self, mib: int):
        self.mib = mib

    def prefill(self, ids, state=None):
        block = torch.ones(self.mib << 18)          # 4-byte floats
        del block
        return torch.zeros(ids.shape[0], 50), MambaState([], [])

    def step(self, ids, state):
        return torch.zeros(ids.shape[0], 50), state


def test_peak_memory_is_measured_from_each_backends_own_baseline():
    """A backend that needs 200 MiB reports about that; one run after it that needs almost nothing reports far less
    (the peak of the earlier backend is not counted again)."""
    run = lambda s: bench_session(s, "fake", batch=1, prompt_len=2, gen_len=2,  # noqa: E731
                                  device=torch.device("cpu"), reps=1, warmup=1)
    big = run(_HungrySession(200))
    small = run(_HungrySession(1))
    assert big.memory_kind == small.memory_kind == "host-rss-peak"
    assert 150 * 2**20 < big.peak_memory_bytes < 400 * 2**20
    assert small.peak_memory_bytes < 50 * 2**20


def _check_report(report, backends, batches):
    rows = report["rows"]
    assert sorted((r["backend"], r["batch"]) for r in rows) == sorted((b, n) for b in backends for n in batches)
    for r in rows:
        assert r["error"] is None, r
        assert r["prefill_ms"] > 0 and r["decode_ms_per_step"] > 0
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
        assert r["peak_memory_bytes"] is not None and r["peak_memory_bytes"] >= 0   # over the backend's own start
        assert r["floor_ms"] is None        # no GPU, no floor


def test_bench_cli_torch_and_onnxruntime(tiny_checkpoint, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = CliRunner().invoke(main, ["bench", "--model", str(tiny_checkpoint()), "--backend", "torch,onnxruntime",
                                       "--batch", "1,3", "--prompt-len", "6", "--gen-len", "3", "--reps", "2",
                                       "--json", str(out), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    _check_report(report, ["torch", "onnxruntime"], [1, 3])
    assert report["model"]["weight_bytes"] > 0 and report["settings"]["prompt_len"] == 6
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "onnxruntime" in result.output and "decode ms/step" in result.output


def test_bench_cli_random_size_and_artifact(tiny_checkpoint, tmp_path):
    """--random builds weights in memory; --artifact runs an exported artifact (torch loads its source)."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    runner = CliRunner()
    out = tmp_path / "r.json"
    result = runner.invoke(main, ["bench", "--random", "tiny", "--backend", "torch", "--batch", "2",
                                  "--prompt-len", "4", "--gen-len", "2", "--reps", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    _check_report(json.loads(out.read_text()), ["torch"], [2])
    from mamba_deploy.onnx.export import export
    artifact = export(str(tiny_checkpoint()), tmp_path / "art")
    out = tmp_path / "a.json"
    result = runner.invoke(main, ["bench", "--artifact", str(artifact), "--backend", "onnxruntime,torch",
                                  "--prompt-len", "4", "--gen-len", "2", "--reps", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    _check_report(json.loads(out.read_text()), ["onnxruntime", "torch"], [1])


@pytest.mark.parametrize("args, message", [
    (["--backend", "torch"], "exactly one of --artifact"),
    (["--random", "tiny", "--model", "x", "--backend", "torch"], "exactly one of --artifact"),
    (["--random", "tiny", "--backend", "tensorflow"], "unknown backend"),
    (["--random", "tiny", "--backend", "torch-fast", "--device", "cpu"], "needs a CUDA GPU"),
    (["--random", "tiny", "--batch", "1,x"], "comma-separated integers"),
    (["--artifact", "/nonexistent/dir", "--backend", "torch"], "not an artifact"),
])
def test_bench_user_errors(args, message):
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_engine_budget_cuts_repetitions():
    """A budget that half the first timed call already fills leaves one timed repetition per phase (warm-up calls
    are never the sample)."""
    row = bench_session(_SleepySession(), "fake", batch=1, prompt_len=4, gen_len=4, device=torch.device("cpu"),
                        reps=5, warmup=1, budget_s=0.005)
    assert len(row.prefill_samples_ms) == 1 and len(row.decode_samples_ms) == 1


def test_bench_backend_failure_is_a_row_not_an_abort(tmp_path):
    """onnxruntime cannot run a bf16 artifact on the CPU: its rows carry the error, torch's rows are measured."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    out = tmp_path / "b.json"
    result = CliRunner().invoke(main, ["bench", "--random", "tiny", "--backend", "onnxruntime,torch", "--dtype", "bf16",
                                       "--device", "cpu", "--prompt-len", "3", "--gen-len", "2", "--reps", "1",
                                       "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = {r["backend"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["onnxruntime"]["error"] and "bf16" in rows["onnxruntime"]["error"]
    assert rows["torch"]["error"] is None and rows["torch"]["decode_ms_per_step"] > 0


class _SlowFirstCall(_SleepySession):
    """First prefill 80 ms (compilation, tuning …), later ones 6 ms."""
    calls = 0

    def prefill(self, ids, state=None):
        self.calls += 1
        if self.calls == 1:
            time.sleep(0.08)
        return super().prefill(ids, state)


def test_engine_never_times_the_warm_up_call():
    row = bench_session(_SlowFirstCall(), "fake", batch=1, prompt_len=4, gen_len=2, device=torch.device("cpu"),
                        reps=2, warmup=1, budget_s=0.02)
    assert row.prefill_samples_ms and max(row.prefill_samples_ms) < 60, row.prefill_samples_ms
