"""The OpenAI-compatible HTTP API (FastAPI) over an Engine: /v1/completions (JSON or server-sent events),
/v1/models, /health, /metrics (Prometheus text format).

Request fields follow OpenAI's completions API: ``model``, ``prompt`` (a string, which needs a tokenizer, or a list
of token ids; a list holding one of these is accepted too), ``max_tokens`` (default 16), ``temperature`` (default
1 as in OpenAI; 0 = greedy), ``top_p``, ``seed``, ``stop`` (a string or up to 4), ``stream``,
``stream_options.include_usage``; plus ``top_k`` and ``stop_token_ids`` (as vLLM names them). Each choice also
carries ``token_ids``, the generated ids (the text is the decoded tokens, or " id id …" without a tokenizer).
Errors are OpenAI-style JSON ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from ..generation import SamplingParams, TextStream
from .engine import Engine, Event, Request

Number = StrictInt | StrictFloat


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
    max_tokens: StrictInt = Field(16, ge=1)
    temperature: Number = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: Number = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: StrictInt = Field(0, ge=0)
    seed: StrictInt | None = Field(None, ge=-2**63, le=2**64 - 1)    # the range torch.Generator.manual_seed takes
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(1, ge=1, le=1)
    echo: StrictBool = Field(False)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def _validation_message(e) -> tuple[str, str | None]:
    first = e.errors()[0] if e.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    return (f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}", param)


def create_app(engine: Engine, model_name: str, tokenizer=None, max_prompt_tokens: int = 1 << 20,
               max_tokens_limit: int = 1 << 16, owns_engine: bool = True) -> FastAPI:
    """The app; with ``owns_engine`` its lifespan starts and stops ``engine``."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        nonlocal dispatcher
        dispatcher = LoopDispatcher(asyncio.get_running_loop())
        if owns_engine:
            engine.start()
        try:
            yield
        finally:
            if owns_engine:
                engine.stop()

    app = FastAPI(title="mamba-deploy", lifespan=lifespan)
    app.state.model_name = model_name
    dispatcher = None   # set when the event loop runs (lifespan), see LoopDispatcher
    metrics = engine.metrics
    vocab = engine.vocab_size

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        metrics.http_errors.labels(str(e.status)).inc()
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        metrics.http_errors.labels("400").inc()
        message, param = _validation_message(e)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        metrics.http_errors.labels(str(e.status_code)).inc()
        return error_response(e.status_code, str(e.detail))

    @app.get("/health")
    async def health():
        if not engine.alive:
            reason = f"engine stopped: {engine.error}" if engine.error else "engine not running"
            return JSONResponse({"status": "error", "message": reason}, 503)
        return {"status": "ok", "running": len(engine.running), "waiting": len(engine.waiting) +
                engine.inbox.qsize(), "slots": engine.max_batch}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "mamba-deploy"}]}

    def parse(body: Any) -> CompletionRequest:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            req = CompletionRequest.model_validate(body)
        except ValidationError as e:
            message, param = _validation_message(e)
            raise ApiError(400, message, param) from None
        if req.model != model_name:
            raise ApiError(404, f"model '{req.model}' does not exist; this server serves '{model_name}'",
                           "model", "model_not_found")
        if req.max_tokens > max_tokens_limit:
            raise ApiError(400, f"max_tokens must be <= {max_tokens_limit}, got {req.max_tokens}", "max_tokens")
        if req.echo:
            raise ApiError(400, "echo is not supported", "echo")
        return req

    def prompt_ids(req: CompletionRequest) -> list[int]:
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ApiError(400, f"one prompt per request (got {len(p)}); send several requests instead",
                               "prompt")
            p = p[0]
        if isinstance(p, str):
            if tokenizer is None:
                raise ApiError(400, "this server has no tokenizer: send the prompt as a list of token ids "
                               "(or start it with --tokenizer)", "prompt")
            ids = tokenizer.encode(p).ids
        else:
            ids = list(p)
        if not ids:
            raise ApiError(400, "the prompt is empty; give at least one token", "prompt")
        if len(ids) > max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this server takes at most "
                           f"{max_prompt_tokens}", "prompt")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
        return ids

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        req = parse(body)
        ids = prompt_ids(req)
        try:
            params = SamplingParams(temperature=float(req.temperature), top_k=req.top_k, top_p=float(req.top_p))
        except UserError as e:
            raise ApiError(400, str(e)) from None
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop takes up to 4 non-empty strings", "stop")
        if not engine.alive:
            raise ApiError(503, "the engine is not running")

        events: asyncio.Queue[Event] = asyncio.Queue()
        seed = req.seed if req.seed is not None else uuid.uuid4().int & 0x7FFF_FFFF
        job = Request(prompt=ids, max_tokens=req.max_tokens, params=params, seed=seed,
                      stop_ids=frozenset(req.stop_token_ids or ()),
                      on_event=lambda e: dispatcher.post(events, e))
        engine.submit(job)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        detok = Detokenizer(tokenizer, ids, stops)

        def chunk(text: str, token_ids: list[int], finish: str | None, usage: dict | None = None) -> dict:
            out = {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                   "choices": [{"index": 0, "text": text, "token_ids": token_ids, "logprobs": None,
                                "finish_reason": finish}]}
            if usage is not None:
                out["usage"] = usage
            return out

        async def run():
            """Yields (text, token_ids, finish_reason or None) as the engine produces tokens."""
            try:
                while True:
                    ev = await events.get()
                    if ev.kind == "token":
                        text, hit = detok.push(ev.token)
                        if hit:                       # a stop string: the request ends here
                            job.cancel()
                            yield text, [ev.token], "stop"
                            return
                        yield text, [ev.token], None
                    else:
                        if ev.finish_reason == "error":
                            raise ApiError(500, ev.message or "generation failed")
                        yield detok.flush(), [], ev.finish_reason
                        return
            finally:
                job.cancel()   # a client gone mid-stream (or any early exit) frees the slot

        def usage() -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": detok.n_tokens,
                    "total_tokens": len(ids) + detok.n_tokens}

        if not req.stream:
            text, token_ids, finish = [], [], None
            async for t, toks, fin in watch_disconnect(http, run(), job):
                text.append(t)
                token_ids += toks
                finish = fin or finish
            body = chunk("".join(text), token_ids, finish, usage())
            return JSONResponse(body)

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def sse():
            try:
                async for t, toks, fin in run():
                    if t or toks or fin:
                        yield f"data: {json.dumps(chunk(t, toks, fin))}\n\n"
                if include_usage:
                    final = chunk("", [], None, usage())
                    final["choices"] = []
                    yield f"data: {json.dumps(final)}\n\n"
                yield "data: [DONE]\n\n"
            except ApiError as e:
                yield f"data: {json.dumps({'error': {'message': e.message, 'type': 'server_error'}})}\n\n"
            finally:           # the client went away (the response task is cancelled): free the slot
                job.cancel()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


class LoopDispatcher:
    """Hands engine events (posted from the engine thread) to asyncio queues with one loop wake-up per burst rather
    than one per token: the first post schedules a flush, later posts before it runs join it."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list = []

    def post(self, queue: asyncio.Queue, event) -> None:
        with self.lock:
            self.pending.append((queue, event))
            if len(self.pending) > 1:
                return
        self.loop.call_soon_threadsafe(self.flush)

    def flush(self) -> None:
        with self.lock:
            items, self.pending = self.pending, []
        for queue, event in items:
            queue.put_nowait(event)


async def watch_disconnect(http: HttpRequest, gen, job: Request):
    """Iterate ``gen`` while checking every 0.5 s whether the client went away (then cancel ``job``)."""
    it = gen.__aiter__()
    while True:
        nxt = asyncio.ensure_future(it.__anext__())
        while True:
            done, _ = await asyncio.wait({nxt}, timeout=0.5)
            if done:
                break
            if await http.is_disconnected():
                job.cancel()
        try:
            yield nxt.result()
        except StopAsyncIteration:
            return


class Detokenizer:
    """Token ids → text pieces, and OpenAI ``stop`` strings: the text up to (not including) the first stop string is
    returned and the request ends there. Without a tokenizer a token's text is " <id>"."""

    def __init__(self, tokenizer, prompt_ids: list[int], stops: list[str]):
        self.stream = TextStream(tokenizer, prompt_ids) if tokenizer is not None else None
        self.stops = stops
        self.text = ""          # generated text so far (all of it, for stop matching)
        self.sent = 0           # characters of it already handed out
        self.n_tokens = 0
        self.hold = max((len(s) for s in stops), default=1) - 1   # a stop string may still be forming

    def push(self, token: int) -> tuple[str, bool]:
        self.n_tokens += 1
        self.text += self.stream.push(token) if self.stream else f" {token}"
        for s in self.stops:
            at = self.text.find(s, max(0, self.sent - len(s) + 1))
            if at >= 0:
                out = self.text[self.sent:at]
                self.sent = len(self.text)
                return out, True
        upto = max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:upto], upto
        return out, False

    def flush(self) -> str:
        if self.stream:
            self.text += self.stream.flush()
        out, self.sent = self.text[self.sent:], len(self.text)
        return out
