"""`mamba-deploy serve` against the official `openai` client, on 127.0.0.1, for the onnxruntime and torch backends.

Independent reference: `generation.generate` on a separate session of the same backend (prefill of the whole
prompt, then steps), which shares no code with the engine's slot pool, chunked prefill, batching or prefix cache.
Servers run in a background thread of the test process on a free port and are stopped by their fixture; every
client loop is bounded in count and has a timeout.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import httpx
import openai
import pytest

from mamba_deploy.generation import SamplingParams, generate
from mamba_deploy.onnx.export import export
from mamba_deploy.runtime.session import open_session
from mamba_deploy.serving.server import ServerThread, build_app

VOCAB = 96          # conftest.TINY
BLOCK = 16          # small blocks so test prompts cross several
MAX_BATCH = 16      # fewer slots than the 32 concurrent requests: the rest must queue
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def artifact(tiny_checkpoint, tmp_path_factory):
    return export(tiny_checkpoint("state-spaces", seed=5), tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module", params=["onnxruntime", "torch"])
def server(request, artifact):
    """(base url, backend, reference session) of a running server."""
    backend = request.param
    app, engine = build_app(str(artifact), backend, max_batch=MAX_BATCH, block=BLOCK, prefix_cache_mb=64,
                            model_name="tiny")
    with ServerThread(app) as url:
        yield url, backend, open_session(str(artifact), backend)
    assert not engine.alive     # the engine thread stopped with the server


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


def reference(session, prompt, n, params=SamplingParams(), seed=0):
    return generate(session, [prompt], max_new_tokens=n, params=params, seed=seed).tokens[0]


def token_ids(choice) -> list[int]:
    return choice.model_extra["token_ids"]


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(url + "/metrics", timeout=TIMEOUT).text
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


PROMPTS = [[5, 17, 3], list(range(1, 24)), [(7 * i) % VOCAB for i in range(40)]]   # 3, 23, 40 tokens


def test_completion_equals_generate(server):
    """Greedy and sampled (a random model's greedy output repeats itself; sampling depends on every logit)."""
    url, _, session = server
    c = client(url)
    for p in PROMPTS:
        r = c.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0)
        want = reference(session, p, 12)
        assert token_ids(r.choices[0]) == want
        assert r.choices[0].text == "".join(f" {t}" for t in want)
        assert r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(p), 12)
        r = c.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=1.0, seed=3)
        assert token_ids(r.choices[0]) == reference(session, p, 12, SamplingParams(temperature=1.0), seed=3)


def test_streaming_yields_the_same_tokens(server):
    url, _, session = server
    p = PROMPTS[1]
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9)
    for kw, want in (({"temperature": 0}, reference(session, p, 10)),
                     ({"temperature": 0.8, "top_p": 0.9, "extra_body": {"top_k": 20}, "seed": 7},
                      reference(session, p, 10, params, seed=7))):
        chunks = list(client(url).completions.create(model="tiny", prompt=p, max_tokens=10, stream=True, **kw))
        got = [t for ch in chunks for t in token_ids(ch.choices[0])]
        assert got == want
        assert len(chunks) >= 10                     # one event per token (then the finish event)
        assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_token_and_stop_string(server):
    url, _, session = server
    p = PROMPTS[2]
    full = reference(session, p, 12)
    c = client(url)
    r = c.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0,
                             extra_body={"stop_token_ids": [full[4]]})
    assert token_ids(r.choices[0]) == full[:full.index(full[4]) + 1] and r.choices[0].finish_reason == "stop"
    stop = f" {full[3]}"
    r = c.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0, stop=stop)
    text = "".join(f" {t}" for t in full)
    assert r.choices[0].text == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"


def test_32_concurrent_requests_equal_solo_and_finish_sooner(server):
    """32 requests (half greedy, half sampled with their own seeds) one after another, then all at once through
    the async client (one client thread, so the comparison measures the server, not client threads)."""
    import asyncio

    url, _, session = server
    jobs = []
    for i in range(32):
        prompt = [(3 * i + 7 * k) % VOCAB for k in range(3 + i % 20)]
        kw = {"temperature": 0} if i % 2 == 0 else {"temperature": 0.9, "top_p": 0.95, "seed": 100 + i}
        jobs.append((prompt, kw))

    async def main():
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)

        async def run(job):
            prompt, kw = job
            r = await c.completions.create(model="tiny", prompt=prompt, max_tokens=32, **kw)
            return token_ids(r.choices[0])

        t0 = time.perf_counter()
        solo = [await run(j) for j in jobs]
        t_serial = time.perf_counter() - t0
        t0 = time.perf_counter()
        together = await asyncio.wait_for(asyncio.gather(*[run(j) for j in jobs]), TIMEOUT)
        t_concurrent = time.perf_counter() - t0
        await c.close()
        return solo, together, t_serial, t_concurrent

    solo, together, t_serial, t_concurrent = asyncio.run(main())
    assert together == solo
    assert all(len(t) == 32 for t in together)
    want = [reference(session, prompt, 32, SamplingParams(temperature=kw["temperature"],
                                                          top_p=kw.get("top_p", 1.0)), seed=kw.get("seed", 0))
            for prompt, kw in jobs]
    assert solo == want
    assert t_concurrent < t_serial, (t_concurrent, t_serial)
    assert metric(url, "mamba_decode_batch_size_bucket", '{le="8.0"}') < metric(url, "mamba_decode_batch_size_count")
    assert httpx.get(url + "/health").json()["running"] == 0


def test_repeated_long_prefix_hits_the_cache_and_is_faster(server):
    url, backend, session = server
    c = client(url)
    prefix = [(11 * k + 5) % VOCAB for k in range(40 * BLOCK)]           # 640 tokens = 40 blocks

    def ttft(prompt) -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        stream = c.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, stream=True)
        first, toks = None, []
        for ch in stream:
            if first is None and token_ids(ch.choices[0]):
                first = time.perf_counter() - t0
            toks += token_ids(ch.choices[0])
        return first, toks

    hits0, hit_tokens0 = metric(url, "mamba_prefix_cache_hits_total"), metric(url, "mamba_prefix_cache_hit_tokens_total")
    prefilled0 = metric(url, "mamba_prefill_tokens_total")
    t_miss, _ = ttft(prefix + [1, 2, 3])
    assert metric(url, "mamba_prefix_cache_hits_total") == hits0
    suffix = [4, 5, 6, 7, 8]
    t_hit, toks = ttft(prefix + suffix)
    assert metric(url, "mamba_prefix_cache_hits_total") == hits0 + 1
    assert metric(url, "mamba_prefix_cache_hit_tokens_total") - hit_tokens0 == len(prefix)
    # only the suffix was prefilled the second time
    assert metric(url, "mamba_prefill_tokens_total") - prefilled0 == len(prefix) + 3 + len(suffix)
    assert toks == reference(session, prefix + suffix, 4)
    assert t_hit < t_miss, (t_hit, t_miss)


def test_disconnect_mid_stream_frees_the_slot(server):
    url, _, _ = server
    cancelled0 = metric(url, "mamba_requests_total", '{finish_reason="cancelled"}')
    body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 60000, "temperature": 0, "stream": True}
    with httpx.Client(timeout=TIMEOUT) as h:
        with h.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and httpx.get(url + "/health").json()["running"]:
        time.sleep(0.05)
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["running"] == 0
    assert metric(url, "mamba_requests_total", '{finish_reason="cancelled"}') == cancelled0 + 1


MALFORMED = [
    ("not json", {"content": b"{oops", "headers": {"content-type": "application/json"}}, 400),
    ("a JSON list", {"json": [1, 2, 3]}, 400),
    ("no prompt", {"json": {"model": "tiny", "max_tokens": 4}}, 400),
    ("prompt of wrong type", {"json": {"model": "tiny", "prompt": 3.5}}, 400),
    ("empty prompt", {"json": {"model": "tiny", "prompt": []}}, 400),
    ("token id out of range", {"json": {"model": "tiny", "prompt": [1, VOCAB + 5]}}, 400),
    ("negative max_tokens", {"json": {"model": "tiny", "prompt": [1], "max_tokens": -3}}, 400),
    ("negative temperature", {"json": {"model": "tiny", "prompt": [1], "temperature": -1}}, 400),
    ("top_p above 1", {"json": {"model": "tiny", "prompt": [1], "top_p": 1.5}}, 400),
    ("stream not a boolean", {"json": {"model": "tiny", "prompt": [1], "stream": "yes"}}, 400),
    ("text prompt without a tokenizer", {"json": {"model": "tiny", "prompt": "hello"}}, 400),
    ("unknown model", {"json": {"model": "gpt-17", "prompt": [1]}}, 404),
    ("max_tokens over the limit", {"json": {"model": "tiny", "prompt": [1], "max_tokens": 10 ** 9}}, 400),
    ("seed beyond 64 bits", {"json": {"model": "tiny", "prompt": [1], "max_tokens": 2, "seed": 2 ** 64}}, 400),
    ("seed below -2^63", {"json": {"model": "tiny", "prompt": [1], "max_tokens": 2, "seed": -2 ** 63 - 1}}, 400),
    ("infinite temperature", {"content": b'{"model": "tiny", "prompt": [1], "temperature": 1e999}',
                              "headers": {"content-type": "application/json"}}, 400),
]


def test_malformed_requests_get_4xx_json_and_the_server_keeps_serving(server):
    url, _, session = server
    errors0 = sum(metric(url, "mamba_http_errors_total", f'{{status="{s}"}}') for s in ("400", "404"))
    with httpx.Client(timeout=TIMEOUT) as h:
        for what, kwargs, status in MALFORMED:
            r = h.post(url + "/v1/completions", **kwargs)
            assert r.status_code == status, what
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["message"], what
        assert h.get(url + "/v1/completions").status_code == 405
        assert h.get(url + "/nowhere").json()["error"]["message"]
    assert sum(metric(url, "mamba_http_errors_total", f'{{status="{s}"}}') for s in ("400", "404")) == \
        errors0 + len(MALFORMED) + 1
    assert httpx.get(url + "/health").json()["status"] == "ok"
    r = client(url).completions.create(model="tiny", prompt=[9, 8, 7], max_tokens=5, temperature=0)
    assert token_ids(r.choices[0]) == reference(session, [9, 8, 7], 5)


def test_models_and_metrics_endpoints(server):
    url, _, _ = server
    assert [m.id for m in client(url).models.list()] == ["tiny"]
    text = httpx.get(url + "/metrics").text
    for name in ("mamba_requests_total", "mamba_generation_tokens_total", "mamba_queue_depth",
                 "mamba_decode_batch_size_bucket", "mamba_prefix_cache_hits_total",
                 "mamba_time_to_first_token_seconds_bucket", "mamba_inter_token_latency_seconds_bucket"):
        assert name in text, name


def test_cli_serve_in_a_subprocess(artifact, tmp_path):
    """The real command: start it on a free port, one completion, stop it."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mamba_deploy.cli", "serve", "--artifact", str(artifact),
                             "--backend", "onnxruntime", "--port", str(port), "--max-batch", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-2000:]
            time.sleep(0.2)
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4,
                                                      "temperature": 0}, timeout=TIMEOUT)
        assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 4
    finally:
        proc.terminate()
        proc.wait(30)


def test_cli_serve_errors_are_one_line(tmp_path):
    from click.testing import CliRunner

    from mamba_deploy.cli import main
    for args in (["--artifact", str(tmp_path / "missing")], [], ["--artifact", str(tmp_path), "--backend", "x"]):
        r = CliRunner().invoke(main, ["serve", *args])
        assert r.exit_code == 2, r.output
        assert r.output.strip().startswith("mamba-deploy: error:") and len(r.output.strip().splitlines()) == 1


def test_prefix_cache_evicts_least_recently_used():
    import torch

    from mamba_deploy.model import MambaState
    from mamba_deploy.serving.prefix_cache import PrefixCache, Snapshot, block_keys

    def snap(n):
        return Snapshot(MambaState([torch.zeros(1, 4, 2)], [torch.zeros(1, 4, 3)]), torch.zeros(1, 5), n)

    size = snap(0).nbytes
    cache = PrefixCache(block=2, budget_bytes=2 * size)
    a, b, c = block_keys([1, 2, 3, 4], 2), block_keys([5, 6], 2), block_keys([7, 8], 2)
    assert a[0] != b[0] and block_keys([1, 2, 9, 9], 2)[0] == a[0] and block_keys([1, 2, 9, 9], 2)[1] != a[1]
    cache.put(a[0], snap(2))
    cache.put(b[0], snap(2))
    assert cache.lookup(a).n_tokens == 2          # touches a: b is now the least recently used
    cache.put(c[0], snap(2))
    assert cache.lookup(b) is None and cache.lookup(a) is not None and cache.lookup(c) is not None
    assert cache.nbytes == 2 * size


class Recorder:
    """A session that records its calls (kind, tokens per row, batch) and delegates everything else."""

    def __init__(self, session):
        self.inner, self.calls = session, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def prefill(self, ids, state=None):
        self.calls.append(("prefill", ids.shape[1], ids.shape[0]))
        return self.inner.prefill(ids, state)

    def step(self, ids, state):
        self.calls.append(("step", 1, ids.shape[0]))
        return self.inner.step(ids, state)


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(artifact):
    import threading

    from mamba_deploy.serving.engine import Engine, Request

    session = Recorder(open_session(str(artifact), "torch"))
    engine = Engine(session, max_batch=2, block=BLOCK, prefix_cache_bytes=0)
    done = {"a": threading.Event(), "b": threading.Event()}
    tokens = {"a": [], "b": []}

    def on_event(name):
        def f(e):
            if e.kind == "token":
                tokens[name].append(e.token)
                if name == "a" and len(tokens["a"]) == 3:
                    engine.submit(Request(prompt=long_prompt, max_tokens=4, on_event=on_event("b")))
            else:
                done[name].set()
        return f

    long_prompt = [(5 * k + 1) % VOCAB for k in range(10 * BLOCK)]
    engine.start()
    try:
        engine.submit(Request(prompt=[1, 2, 3], max_tokens=40, on_event=on_event("a")))
        assert done["a"].wait(TIMEOUT) and done["b"].wait(TIMEOUT)
    finally:
        engine.stop()
    chunks = [i for i, c in enumerate(session.calls) if c[0] == "prefill" and c[1] == BLOCK]
    assert len(chunks) == 10                            # the long prompt went in 10 block-sized chunks …
    for i, j in zip(chunks, chunks[1:]):                # … with a decode step of the running request between each
        assert ("step", 1, 1) in session.calls[i + 1:j]
    assert max(c[2] for c in session.calls if c[0] == "step") == 2     # then both decoded in one batch
    assert tokens["b"] == reference(session.inner, long_prompt, 4)
    assert tokens["a"] == reference(session.inner, [1, 2, 3], 40)


def test_text_prompts_through_a_tokenizer(artifact):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from mamba_deploy.generation import TextStream

    words = [f"w{i}" for i in range(VOCAB - 1)]
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    session = open_session(str(artifact), "onnxruntime")
    app, _ = build_app(str(artifact), "onnxruntime", max_batch=2, block=BLOCK, tokenizer=tok, model_name="tiny")
    prompt = "w5 w17 w3 w44 w60"
    ids = tok.encode(prompt).ids
    want = reference(session, ids, 8, SamplingParams(temperature=1.0), seed=1)
    stream = TextStream(tok, ids)
    want_text = "".join(stream.push(t) for t in want) + stream.flush()
    with ServerThread(app) as url:
        c = client(url)
        r = c.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=1.0, seed=1)
        assert token_ids(r.choices[0]) == want and r.choices[0].text == want_text
        assert r.usage.prompt_tokens == len(ids)
        stop = want_text.split()[2]
        r = c.completions.create(model="tiny", prompt=[prompt], max_tokens=8, temperature=1.0, seed=1, stop=[stop])
        assert r.choices[0].text == want_text[:want_text.index(stop)] and r.choices[0].finish_reason == "stop"
