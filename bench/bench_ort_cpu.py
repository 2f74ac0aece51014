#!/usr/bin/env python3
"""ONNX Runtime on the CPU: several artifacts (and session settings) side by side, interleaved in one run.

    python bench/bench_ort_cpu.py --artifact seq=export/m-seq --artifact chunked=export/m \
        --threads 2 --prompt-len 256 --decode-steps 32 --rounds 5 --json ort_cpu.json

Each round runs every variant once (prefill of ``--prompt-len`` random token ids, then ``--decode-steps`` decode
steps fed back their own state), so machine noise hits all variants alike; the JSON holds every sample, the
medians and each variant's ratio to the first one, in wall-clock time and in CPU time of all threads (on a
machine shared with other work, CPU time is the steadier measure of the work done; spinning threads add to it). A variant is ``NAME=DIR`` (the artifact at the session
settings ``--settings``) or ``NAME=DIR@SETTINGS`` with SETTINGS one of ``mamba_deploy.runtime.ort_session``'s
``CPU_SETTINGS`` names (e.g. ``default``, ``decode``), to compare session options on one artifact.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mamba_deploy.runtime.ort_session import CPU_SETTINGS, OrtSession  # noqa: E402


def parse_variant(text: str, settings: str):
    name, _, rest = text.partition("=")
    path, _, setting = rest.partition("@")
    if not name or not path:
        raise SystemExit(f"--artifact takes NAME=DIR[@SETTINGS], got {text!r}")
    setting = setting or settings
    if setting not in CPU_SETTINGS:
        raise SystemExit(f"unknown settings {setting!r}; choose one of {', '.join(CPU_SETTINGS)}")
    return name, path, setting


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", action="append", required=True, metavar="NAME=DIR[@SETTINGS]")
    ap.add_argument("--settings", default="decode", help="session settings of variants that name none")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    variants = [parse_variant(v, args.settings) for v in args.artifact]
    sessions = {name: OrtSession(path, threads=args.threads, settings=setting) for name, path, setting in variants}
    first = next(iter(sessions.values()))
    gen = torch.Generator().manual_seed(0)
    samples = {name: {"prefill_ms": [], "decode_ms_per_step": [], "prefill_cpu_ms": [], "decode_cpu_ms_per_step": []}
               for name in sessions}
    for rnd in range(args.rounds + 1):                         # round 0 warms up (session creation, allocators)
        ids = torch.randint(0, first.vocab_size, (args.batch, args.prompt_len), generator=gen)
        steps = torch.randint(0, first.vocab_size, (args.decode_steps, args.batch), generator=gen)
        for name, s in sessions.items():
            t0, c0 = time.perf_counter(), time.process_time()
            _, state = s.prefill(ids)
            t1, c1 = time.perf_counter(), time.process_time()
            for tok in steps:
                _, state = s.step(tok, state)
            t2, c2 = time.perf_counter(), time.process_time()
            if rnd:
                n = max(1, args.decode_steps)
                samples[name]["prefill_ms"].append(1e3 * (t1 - t0))
                samples[name]["decode_ms_per_step"].append(1e3 * (t2 - t1) / n)
                samples[name]["prefill_cpu_ms"].append(1e3 * (c1 - c0))
                samples[name]["decode_cpu_ms_per_step"].append(1e3 * (c2 - c1) / n)
        print(f"round {rnd}: " + ", ".join(
            f"{n} {samples[n]['prefill_ms'][-1]:.0f} ms / {samples[n]['decode_ms_per_step'][-1]:.1f} ms"
            for n in sessions if rnd), file=sys.stderr)
    results = {}
    base = variants[0][0]
    for (name, path, setting) in variants:
        med = {k: statistics.median(v) for k, v in samples[name].items()}
        results[name] = {"artifact": path, "settings": setting, **{f"{k}_median": v for k, v in med.items()},
                         "samples": samples[name]}
    for name in results:
        for k in samples[name]:
            results[name][f"{k}_ratio_to_{base}"] = results[name][f"{k}_median"] / results[base][f"{k}_median"]
    out = {"threads": args.threads, "batch": args.batch, "prompt_len": args.prompt_len,
           "decode_steps": args.decode_steps, "rounds": args.rounds, "machine": platform.processor() or
           platform.machine(), "cpu_count": os.cpu_count(), "onnxruntime": __import__("onnxruntime").__version__,
           "variants": results}
    for name, r in results.items():
        print(f"{name:>16}: prefill {r['prefill_ms_median']:8.1f} ms ({r[f'prefill_ms_ratio_to_{base}']:.2f}×, CPU "
              f"{r['prefill_cpu_ms_median']:.0f} ms)   decode {r['decode_ms_per_step_median']:6.2f} ms/token "
              f"({r[f'decode_ms_per_step_ratio_to_{base}']:.2f}×, CPU {r['decode_cpu_ms_per_step_median']:.1f} ms)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
