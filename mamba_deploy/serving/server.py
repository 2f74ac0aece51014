"""Put a session, an engine and the HTTP app together, and run it under uvicorn (in the foreground for the CLI, or
in a background thread for tests and the benchmark)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

from ..errors import UserError


def build_app(source, backend: str = "torch", *, max_batch: int = 8, block: int = 256,
              prefix_cache_mb: float = 256, tokenizer=None, model_name: str | None = None, device=None,
              max_prompt_tokens: int = 1 << 20, max_tokens_limit: int = 1 << 16):
    """(app, engine) for an artifact directory or checkpoint ``source`` on ``backend``; the app's lifespan starts
    and stops the engine."""
    from ..runtime.session import open_session
    from .app import create_app
    from .engine import Engine

    if prefix_cache_mb < 0:
        raise UserError(f"--prefix-cache-mb must be >= 0 (0 = off), got {prefix_cache_mb}")
    options = {"device": device} if device else {}
    session = open_session(source, backend, **options)
    engine = Engine(session, max_batch=max_batch, block=block, prefix_cache_bytes=int(prefix_cache_mb * (1 << 20)))
    name = model_name or (Path(source).name if isinstance(source, (str, Path)) else "mamba")
    app = create_app(engine, name, tokenizer=tokenizer, max_prompt_tokens=max_prompt_tokens,
                     max_tokens_limit=max_tokens_limit)
    return app, engine


class ServerThread:
    """``with ServerThread(app) as url:`` — uvicorn on 127.0.0.1 and a free port in a daemon thread, stopped (and
    joined) on exit. ``url`` is ``http://127.0.0.1:PORT``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 60.0):
        import uvicorn
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    lifespan="on", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.start_timeout = start_timeout
        self.url = None

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
