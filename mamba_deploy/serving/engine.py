"""Continuous batching over a fixed pool of state slots, on any backend's Session.

One engine thread owns the session and loops over scheduler iterations:

1. new requests take free slots (beyond the pool they wait in FIFO order); a request whose prompt starts with a
   cached prefix (prefix_cache.py) copies that snapshot into its slot and prefills only the rest;
2. prefill: up to ``prefill_budget`` prompt tokens per iteration, in chunks that end at block boundaries (one
   sequence per call, since sequences of different lengths cannot share a prefill without padding, which a
   recurrent model has no mask for); the state after every full block goes into the prefix cache;
3. decode: every sequence whose prompt is done samples its next token from its logits (first token = time to
   first token), and all that go on take one ``session.step`` together, as one batch gathered from their slots.

So long prompts are chunked and interleaved with decode steps, new sequences join the decode batch at step
boundaries, and finished or cancelled sequences free their slot at once. Chunks always end at block boundaries,
so a prompt is computed with the same calls whether or not its prefix came from the cache. Sampling is
``generation.sample`` with one ``torch.Generator`` per request seeded with its seed, as ``generate`` does, so a
request gives the tokens ``generate`` gives for the same prompt and seed.

Tokens and the end of a request are reported through the request's ``on_event`` callback, called on the engine
thread (the HTTP layer hands them to its event loop).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import queue
import threading
import time
from typing import Callable

import torch

from ..errors import UserError
from ..generation import SamplingParams, sample
from ..model import MambaState
from .metrics import Metrics
from .prefix_cache import PrefixCache, Snapshot, block_keys


@contextlib.contextmanager
def one_thread():
    """Run the engine's small bookkeeping ops (slot gather/scatter, sampling) on one CPU thread. They are tiny,
    and an intra-op parallel region costs far more than it saves when the cores are busy (another runtime's
    threads, other processes): measured on 2 shared cores, gathering 16 slots of a d_inner-128 model took 84 ms
    with 2 threads and well under 1 ms with 1. The previous thread count is restored for the session's own work."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclasses.dataclass
class Event:
    """``kind`` "token" (``token``), or "finish" (``finish_reason``: stop | length | cancelled | error, with
    ``message`` for errors)."""

    kind: str
    token: int | None = None
    finish_reason: str | None = None
    message: str | None = None


_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class Request:
    prompt: list[int]
    max_tokens: int
    params: SamplingParams = SamplingParams()
    seed: int = 0
    stop_ids: frozenset = frozenset()
    on_event: Callable[[Event], None] = lambda e: None
    # filled in by the engine
    id: int = dataclasses.field(default_factory=lambda: next(_ids))
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    slot: int | None = None
    cursor: int = 0                        # prompt tokens consumed by the slot's state
    logits: torch.Tensor | None = None     # [1, V] pending logits (prompt done)
    generated: int = 0
    last_token_time: float | None = None
    keys: list = dataclasses.field(default_factory=list)
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Ask the engine to drop this request (client gone, stop string hit); its slot is freed next iteration."""
        self.cancelled.set()


class Engine:
    """``Engine(session, max_batch=…)``; ``start()``, ``submit(request)``, ``stop()``.

    Tokens are sampled among the first ``session.vocab_size`` logits (the tokenizer vocabulary; the rest of the
    ``padded_vocab_size`` logits are padding rows). ``block``: prompt
    block (prefix-cache granularity and prefill chunk end points); ``prefix_cache_bytes`` 0 turns the cache off.
    """

    def __init__(self, session, max_batch: int = 8, block: int = 256,
                 prefill_budget: int | None = None, prefix_cache_bytes: int = 256 << 20,
                 metrics: Metrics | None = None):
        if max_batch < 1:
            raise UserError(f"--max-batch must be >= 1, got {max_batch}")
        if block < 1:
            raise UserError(f"--block must be >= 1, got {block}")
        self.session = session
        self.max_batch = max_batch
        self.vocab_size = session.vocab_size
        self.block = block
        self.prefill_budget = prefill_budget or block
        self.cache = PrefixCache(block, prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.metrics = metrics or Metrics()
        self.pool = session.new_state(max_batch)          # one row per slot
        self.free = list(range(max_batch - 1, -1, -1))
        self.inbox: queue.Queue[Request] = queue.Queue()
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []                  # hold a slot (prefilling or decoding)
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    # -- control -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="mamba-engine", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        self.inbox.put(None)  # wake the loop
        if self.thread is not None:
            self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and self.error is None

    def submit(self, request: Request) -> Request:
        if not self.alive:
            raise RuntimeError("the engine is not running")
        self.inbox.put(request)
        return request

    # -- slots ---------------------------------------------------------------------------------------------------
    def _gather(self, slots: list[int]) -> MambaState:
        idx = torch.tensor(slots, dtype=torch.long, device=self.pool.ssm[0].device)
        with one_thread():
            return self.pool.select(idx)

    def _scatter(self, slots: list[int], state: MambaState) -> None:
        idx = torch.tensor(slots, dtype=torch.long, device=self.pool.ssm[0].device)
        with one_thread():
            for dst, src in zip([*self.pool.conv, *self.pool.ssm], [*state.conv, *state.ssm]):
                dst.index_copy_(0, idx, src.to(dst.dtype))

    def _finish(self, req: Request, reason: str, message: str | None = None) -> None:
        if req.slot is not None:
            self.free.append(req.slot)
            req.slot = None
        if req in self.running:
            self.running.remove(req)
        self.metrics.requests.labels(reason).inc()
        req.on_event(Event("finish", finish_reason=reason, message=message))

    # -- the loop ------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self.stopping.is_set():
                self._take_inbox(block=not self.running and not self.waiting)
                self._drop_cancelled()
                self._admit()
                self._prefill()
                self._decode()
                self.metrics.queue_depth.set(len(self.waiting))
                self.metrics.running.set(len(self.running))
        except BaseException as e:  # a backend failure: fail every request, keep the reason for /health
            self.error = e
            self._finish_all("error", f"{type(e).__name__}: {e}")
            raise
        finally:
            self._finish_all("cancelled")

    def _finish_all(self, reason: str, message: str | None = None) -> None:
        self._take_inbox(block=False)
        pending = [*self.running, *self.waiting]
        self.waiting.clear()
        for req in pending:
            self._finish(req, reason, message)

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.1) if block else self.inbox.get_nowait()
            while True:
                if item is not None:
                    self.waiting.append(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            pass

    def _drop_cancelled(self) -> None:
        for req in [r for r in self.waiting if r.cancelled.is_set()]:
            self.waiting.remove(req)
            self._finish(req, "cancelled")
        for req in [r for r in self.running if r.cancelled.is_set()]:
            self._finish(req, "cancelled")

    def _admit(self) -> None:
        while self.free and self.waiting:
            req = self.waiting.popleft()
            req.slot = self.free.pop()
            req.generator = torch.Generator().manual_seed(req.seed)
            self.metrics.prompt_tokens.inc(len(req.prompt))
            snap = None
            if self.cache is not None:
                req.keys = block_keys(req.prompt, self.block)
                snap = self.cache.lookup(req.keys)
                (self.metrics.prefix_hits if snap else self.metrics.prefix_misses).inc()
            if snap is not None:
                self._scatter([req.slot], snap.state)
                req.cursor = snap.n_tokens
                self.metrics.prefix_hit_tokens.inc(snap.n_tokens)
                if req.cursor == len(req.prompt):
                    req.logits = snap.logits
            self.running.append(req)

    def _prefill(self) -> None:
        budget = self.prefill_budget
        for req in list(self.running):
            while budget > 0 and req.cursor < len(req.prompt):
                end = min(len(req.prompt), (req.cursor // self.block + 1) * self.block, req.cursor + budget)
                ids = torch.tensor([req.prompt[req.cursor:end]], dtype=torch.long)
                try:
                    # a fresh sequence starts from no state, exactly as ``generate`` does
                    state = self._gather([req.slot]) if req.cursor else None
                    logits, state = self.session.prefill(ids, state)
                except UserError as e:
                    self._finish(req, "error", str(e))
                    break
                self._scatter([req.slot], state)
                self.metrics.prefill_tokens.inc(end - req.cursor)
                budget -= end - req.cursor
                req.cursor = end
                if self.cache is not None and end % self.block == 0:
                    snap = Snapshot(state.clone(), logits.clone(), end)
                    self.cache.put(req.keys[end // self.block - 1], snap)
                    self.metrics.prefix_bytes.set(self.cache.nbytes)
                    self.metrics.prefix_entries.set(len(self.cache))
                if req.cursor == len(req.prompt):
                    req.logits = logits
            if budget <= 0:
                break

    def _decode(self) -> None:
        ready = [r for r in self.running if r.logits is not None]
        if not ready:
            return
        go, tokens = [], []
        now = time.perf_counter()
        with one_thread():
            greedy = [r for r in ready if r.params.greedy]       # one argmax for all greedy rows
            picked = dict(zip(greedy, torch.cat([r.logits for r in greedy])[:, :self.vocab_size].argmax(-1)
                              .tolist())) if greedy else {}
            for req in ready:
                if not req.params.greedy:
                    lg = req.logits[0, :self.vocab_size]
                    picked[req] = int(sample(lg, req.params, req.generator))
        for req in ready:
            tok = picked[req]
            req.generated += 1
            self.metrics.generation_tokens.inc()
            if req.last_token_time is None:
                self.metrics.ttft.observe(now - req.arrival)
            else:
                self.metrics.itl.observe(now - req.last_token_time)
            req.last_token_time = now
            req.on_event(Event("token", token=tok))
            if tok in req.stop_ids:
                self._finish(req, "stop")
            elif req.generated >= req.max_tokens:
                self._finish(req, "length")
            elif req.cancelled.is_set():
                self._finish(req, "cancelled")
            else:
                go.append(req)
                tokens.append(tok)
        if not go:
            return
        slots = [r.slot for r in go]
        self.metrics.batch_size.observe(len(go))
        try:
            logits, state = self.session.step(torch.tensor(tokens, dtype=torch.long), self._gather(slots))
        except UserError as e:
            for req in go:
                self._finish(req, "error", str(e))
            return
        self._scatter(slots, state)
        logits = logits.float()
        for r, req in enumerate(go):
            req.logits = logits[r:r + 1]
