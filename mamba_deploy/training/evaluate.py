"""Task metrics, two ways: the parallel forward (training path) and the recurrence ``model.step`` (decode path).

For every position with a label (``labels != IGNORE``): cross-entropy, token accuracy (argmax over the real
vocabulary, padded rows excluded), and sequence accuracy (all labelled positions of a sequence right).
Evaluating through ``step`` one token at a time is what a deployed model does, and it is how the induction-heads
model is checked far beyond its training length (paper §4.1: trained at 256, tested up to 2^20).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .data import IGNORE


def _metrics(logits: torch.Tensor, labels: torch.Tensor, vocab: int) -> dict[str, float]:
    """logits [b, P, V'] and labels [b, P] at labelled positions only (IGNORE allowed)."""
    logits = logits[..., :vocab].float()
    mask = labels != IGNORE
    loss_sum = F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=IGNORE,
                               reduction="sum").item()
    right = (logits.argmax(-1) == labels) & mask
    seq_right = (right | ~mask).all(dim=1)
    return {"loss_sum": loss_sum, "right": int(right.sum()), "count": int(mask.sum()),
            "seq_right": int(seq_right.sum()), "seqs": labels.shape[0]}


def _combine(parts: list[dict]) -> dict[str, float]:
    count = sum(p["count"] for p in parts)
    seqs = sum(p["seqs"] for p in parts)
    return {"loss": sum(p["loss_sum"] for p in parts) / max(count, 1),
            "accuracy": sum(p["right"] for p in parts) / max(count, 1),
            "seq_accuracy": sum(p["seq_right"] for p in parts) / max(seqs, 1),
            "positions": count}


def _labelled_columns(labels: torch.Tensor) -> torch.Tensor:
    """Positions where any sequence of the batch has a label."""
    return (labels != IGNORE).any(dim=0).nonzero().flatten()


@torch.no_grad()
def evaluate_forward(model, batches, vocab: int, device, autocast=None) -> dict[str, float]:
    """Metrics through the parallel forward pass, ``model(ids)``."""
    was_training = model.training
    model.eval()
    parts = []
    for inputs, labels in batches:
        cols = _labelled_columns(labels)
        with autocast or contextlib.nullcontext():
            logits, _ = model(inputs.to(device))
        parts.append(_metrics(logits[:, cols.to(device)], labels[:, cols].to(device), vocab))
    model.train(was_training)
    return _combine(parts)


@torch.no_grad()
def evaluate_step(model, batches, vocab: int, device, progress=None) -> dict[str, float]:
    """Metrics through the recurrence: ``model.step`` over every token, from a zero state. Only the logits at
    labelled positions are kept. ``progress``: optional callable(tokens_done) for a progress bar."""
    was_training = model.training
    model.eval()
    parts = []
    for inputs, labels in batches:
        b, L = inputs.shape
        wanted = set(_labelled_columns(labels).tolist())
        inputs = inputs.to(device)
        state = model.allocate_state(b, device=device)
        kept = []
        for t in range(L):
            logits, state = model.step(inputs[:, t], state)
            if t in wanted:
                kept.append(logits)
            if progress is not None:
                progress(1)
        cols = sorted(wanted)
        parts.append(_metrics(torch.stack(kept, dim=1), labels[:, cols].to(device), vocab))
    model.train(was_training)
    return _combine(parts)
