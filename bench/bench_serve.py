#!/usr/bin/env python3
"""Serving benchmark: requests/s, generated tokens/s, time to first token and inter-token latency of
`mamba-deploy serve` at several numbers of concurrent clients.

    python bench/bench_serve.py --random tiny --backend onnxruntime --clients 1,8,32 --json serve.json
    python bench/bench_serve.py --random 370m --backend torch-fast --dtype fp16 --clients 1,8,32 \\
        --max-batch 64 --prompt-len 512 --max-tokens 128 --json serve-h200.json          # on a GPU

The server is the real command (`python -m mamba_deploy.cli serve …`) in a subprocess on 127.0.0.1 and a free port
(or an already running one with --url); the clients are asyncio tasks in this process streaming over HTTP
(server-sent events). Every client sends --requests requests one after another, each a fresh random prompt of
--prompt-len tokens (no shared prefixes, so the prefix cache does not help), greedy, exactly --max-tokens tokens
(no stop ids). TTFT is measured from sending the request to receiving the first token event; inter-token latency (ITL)
is a request's (last token time − first token time) / (tokens − 1), the median over requests. One warm-up request per level is not counted.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_source(args, tmp: Path) -> tuple[str, str]:
    """(--artifact or --model flag, path) for the server."""
    if args.artifact:
        return "--artifact", args.artifact
    if args.model:
        return "--model", args.model
    sys.path.insert(0, str(ROOT))
    from mamba_deploy.artifact import parse_dtype
    from mamba_deploy.checkpoint import save_model
    from mamba_deploy.config import config_for_size
    from mamba_deploy.model import random_model
    ckpt = save_model(random_model(config_for_size(args.random), seed=0, dtype=parse_dtype(args.dtype)),
                      tmp / f"random-{args.random}")
    if args.backend in ("onnxruntime", "tensorrt"):
        from mamba_deploy.onnx.export import export
        return "--artifact", str(export(ckpt, tmp / f"artifact-{args.random}"))
    return "--model", str(ckpt)


async def one_request(client, url, model, prompt, max_tokens) -> dict:
    import httpx  # noqa: F401  (client is an httpx.AsyncClient)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    stamps = []
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            n = len(json.loads(line[6:])["choices"][0].get("token_ids", []))
            stamps += [time.perf_counter()] * n
    # mean gap per request: events can arrive in bursts (several in one read), so single gaps mean little
    itl = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
    return {"ttft": stamps[0] - t0, "itl": itl, "tokens": len(stamps)}


async def level(url, model, clients, requests, prompt_len, max_tokens, vocab, seed) -> dict:
    import httpx
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_request(client, url, model, [1, 2, 3], 4)                        # warm-up
        results = []

        async def run_client():
            for _ in range(requests):
                prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
                results.append(await one_request(client, url, model, prompt, max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*[run_client() for _ in range(clients)])
        wall = time.perf_counter() - t0
    ttft = sorted(r["ttft"] for r in results)
    itl = sorted(r["itl"] for r in results if r["itl"] is not None)
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "wall_s": wall, "requests_per_s": len(results) / wall,
            "tokens_per_s": tokens / wall, "ttft_median_ms": 1e3 * statistics.median(ttft),
            "ttft_p90_ms": 1e3 * ttft[math.ceil(0.9 * len(ttft)) - 1],
            "itl_median_ms": 1e3 * statistics.median(itl) if itl else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--artifact")
    src.add_argument("--model")
    src.add_argument("--random", metavar="SIZE", help="a random checkpoint of this size (tiny, 130m, 370m, …)")
    src.add_argument("--url", help="benchmark a running server instead (give --served-model-name and --vocab)")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--dtype", default="fp32", help="with --random")
    ap.add_argument("--device", default=None)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--served-model-name", default="bench")
    ap.add_argument("--vocab", type=int, default=None, help="token ids are drawn below this (default: the model's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        proc = None
        if args.url:
            url, vocab = args.url.rstrip("/"), args.vocab or 256
        else:
            flag, path = make_source(args, Path(tmp))
            port = free_port()
            cmd = [sys.executable, "-m", "mamba_deploy.cli", "serve", flag, path, "--backend", args.backend,
                   "--port", str(port), "--max-batch", str(args.max_batch), "--served-model-name",
                   args.served_model_name]
            if args.device:
                cmd += ["--device", args.device]
            env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            url = f"http://127.0.0.1:{port}"
            vocab = args.vocab or _model_vocab(flag, path)
        try:
            _wait_healthy(url, proc)
            rows = []
            for c in [int(x) for x in args.clients.split(",")]:
                row = asyncio.run(level(url, args.served_model_name, c, args.requests, args.prompt_len,
                                        args.max_tokens, vocab, seed=c))
                rows.append(row)
                print(f"{c:>3} clients: {row['requests_per_s']:8.2f} req/s {row['tokens_per_s']:9.1f} tok/s  "
                      f"TTFT median {row['ttft_median_ms']:8.1f} ms (p90 {row['ttft_p90_ms']:.1f})  "
                      f"ITL median {row['itl_median_ms']:.2f} ms", flush=True)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)
    report = {"backend": args.backend, "source": args.artifact or args.model or f"random {args.random}",
              "dtype": args.dtype, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
              "max_batch": args.max_batch, "requests_per_client": args.requests,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "levels": rows}
    if args.json:
        sys.path.insert(0, str(ROOT))
        from mamba_deploy.io import write_json
        write_json(args.json, report)


def _model_vocab(flag, path) -> int:
    sys.path.insert(0, str(ROOT))
    if flag == "--artifact":
        from mamba_deploy.artifact import read_manifest
        return int(read_manifest(path)["config"]["vocab_size"])
    from mamba_deploy.checkpoint import inspect
    return int(inspect(path).config.vocab_size)


def _wait_healthy(url, proc, timeout=600):
    import httpx
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit("the server did not become healthy")


if __name__ == "__main__":
    main()
