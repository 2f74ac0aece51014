"""Serving: continuous batching over state slots (engine.py), the prefix-state cache (prefix_cache.py), the
OpenAI-compatible HTTP API (app.py), Prometheus metrics (metrics.py), uvicorn runners (server.py), and the Triton
Inference Server model repository writer (triton_repo.py)."""
