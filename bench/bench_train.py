"""Whole-model training throughput: tokens/s of one optimizer step (forward + backward + AdamW, bf16 autocast,
fp32 master weights) for a model of a named size, with the Triton scan vs the chunked torch scan, in one run.

    python bench/bench_train.py --size 370m --batch 2 --seq-len 2048 --json train_bench.json

Writes medians over --steps timed steps (after --warmup), tokens/s, peak memory and the ratio triton/chunked.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mamba_deploy.config import config_for_size
from mamba_deploy.devices import require_cuda
from mamba_deploy.io import write_json
from mamba_deploy.model import random_model


def time_backend(size, backend, batch, seq_len, steps, warmup):
    torch.manual_seed(0)
    model = random_model(config_for_size(size), seed=0, device="cuda", scan_backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    vocab = model.config.vocab_size
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        ids = torch.randint(0, vocab, (batch, seq_len + 1), device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, _ = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out = {"backend": backend, "step_s_median": med, "step_s_all": times, "tokens_per_s": batch * seq_len / med,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": float(loss)}
    del model, opt
    torch.cuda.empty_cache()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="370m")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--backends", default="triton,chunked")
    p.add_argument("--json", default="train_bench.json")
    a = p.parse_args()
    require_cuda("bench/bench_train.py")
    results = {"size": a.size, "batch": a.batch, "seq_len": a.seq_len, "device": torch.cuda.get_device_name(),
               "runs": []}
    for backend in a.backends.split(","):
        try:
            r = time_backend(a.size, backend, a.batch, a.seq_len, a.steps, a.warmup)
        except torch.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            results["runs"].append({"backend": backend, "error": f"out of memory: {str(e).splitlines()[0]}"})
            print(f"{backend:8s} out of memory", flush=True)
            continue
        results["runs"].append(r)
        print(f"{backend:8s} step {r['step_s_median'] * 1e3:9.1f} ms  {r['tokens_per_s']:10.0f} tokens/s  "
              f"peak {r['peak_mem_gib']:.1f} GiB", flush=True)
    by = {r["backend"]: r for r in results["runs"] if "error" not in r}
    if "triton" in by and "chunked" in by:
        results["speedup_triton_over_chunked"] = by["triton"]["tokens_per_s"] / by["chunked"]["tokens_per_s"]
        print(f"triton / chunked tokens/s: {results['speedup_triton_over_chunked']:.1f}x")
    write_json(a.json, results)


if __name__ == "__main__":
    main()
