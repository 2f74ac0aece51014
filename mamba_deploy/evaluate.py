"""Perplexity of a session (any backend) on a token sequence, through the recurrent state.

Mamba's state carries the whole past, so the text is fed in windows of ``window`` tokens with the state of the
previous window: every token is predicted from all tokens before it, exactly as one pass over the whole text
(no sliding-window approximation). Per window, the logits of every position come from ``prefill(all_logits=True)``
(the torch backends; ONNX artifacts exported with ``--all-logits``), else the window is fed one ``step`` at a time.

    nll = −Σ_t log softmax(logits_{t−1})[id_t]   over t = 1 … T−1 (float64, over the real vocabulary)
    perplexity = exp(nll / (T − 1)),   bits per token = nll / ((T − 1)·ln 2)
"""
from __future__ import annotations

import math

import torch

from .errors import UserError


def _supports_all_logits(session) -> bool:
    """Artifact sessions say whether their prefill graph returns every position; torch sessions always do."""
    return getattr(session, "all_logits", True)


def window_logits(session, ids: torch.Tensor, state):
    """Logits [1, W, V] of every position of ``ids`` [1, W] from ``state``, and the state after them."""
    if _supports_all_logits(session):
        return session.prefill(ids, state, all_logits=True)
    out = []
    for t in range(ids.shape[1]):
        logits, state = session.step(ids[:, t], state)
        out.append(logits)
    return torch.stack(out, dim=1), state


def perplexity(session, ids: torch.Tensor, vocab_size: int, window: int = 512, progress=None) -> dict:
    """``ids``: 1-D int tensor of T ≥ 2 token ids. Returns {tokens, nll, perplexity, bits_per_token}; ``vocab_size``
    is the real vocabulary (padded logit rows are ignored). ``progress(n)`` is called with tokens done."""
    ids = torch.as_tensor(ids).long().reshape(1, -1)
    T = ids.shape[1]
    if T < 2:
        raise UserError(f"the text has {T} token(s); perplexity needs at least 2")
    if window < 1:
        raise UserError(f"--window must be >= 1, got {window}")
    state = session.new_state(1)
    nll = 0.0
    prev = None                                   # logits of the last position of the previous window
    for start in range(0, T, window):
        chunk = ids[:, start:start + window]
        logits, state = window_logits(session, chunk, state)
        logp = torch.log_softmax(logits[0, :, :vocab_size].double(), dim=-1)     # [W, V]
        targets = chunk[0]
        if prev is not None:                                                     # predicts the chunk's first id
            nll -= float(prev[targets[0]])
        nll -= float(logp[:-1].gather(1, targets[1:, None]).sum())
        prev = logp[-1]
        if progress is not None:
            progress(chunk.shape[1])
    n = T - 1
    return {"tokens": T, "predicted": n, "nll": nll, "perplexity": math.exp(nll / n),
            "bits_per_token": nll / (n * math.log(2))}


def encode_text(data: bytes, tokenizer=None) -> torch.Tensor:
    """Byte-level ids (one per UTF-8 byte), or the ids of a ``tokenizers.Tokenizer``."""
    if tokenizer is None:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    return torch.tensor(tokenizer.encode(data.decode("utf-8", errors="replace")).ids, dtype=torch.long)
