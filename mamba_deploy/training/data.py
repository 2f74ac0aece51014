"""Training data: the synthetic tasks of the Mamba paper (§4.1, appendix E.1), generated on the fly, and text.

Every source yields ``(inputs [b, L] int64, labels [b, L] int64)`` with labels aligned to the model's outputs:
the loss at position t compares ``logits[:, t]`` with ``labels[:, t]``; positions that do not matter hold
``IGNORE`` (-100). Batches are a pure function of (seed, step, rank): no sampler state, exact resume, and each
data-parallel rank draws a different stream (the synthetic equivalent of a DistributedSampler).

Selective copying (Gu & Dao 2023, Fig. 2; the S4 repository's ``copying`` generator with ``variable=True``):
    alphabet of ``vocab`` symbols: 0 = blank (noise), vocab−1 = marker, 1 … vocab−2 = data symbols.
    [ L−M positions: M data tokens at random positions, blanks elsewhere ] [ M markers ]
    the output at the i-th marker must be the i-th data token (in order). Accuracy over those M positions.

Induction heads (Olsson et al. 2022; the paper's appendix E.1.2):
    alphabet of ``vocab`` symbols: 0 … vocab−2 = content, vocab−1 = the special (trigger) token.
    random content tokens; the trigger appears once at a random position p followed by the target x[p+1];
    the last token is the trigger again and the output there must be the target. Accuracy on that one output.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

IGNORE = -100
TRAIN_STREAM, VALID_STREAM = 0, 1


def generator_for(seed: int, stream: int, step: int, rank: int = 0) -> torch.Generator:
    """An independent, reproducible generator for one (seed, stream, step, rank)."""
    state = np.random.SeedSequence([seed, stream, step, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


class Task:
    """A data source. ``vocab_size`` is the number of distinct input/output ids."""

    name = "task"
    vocab_size: int
    seq_len: int

    def sample(self, gen: torch.Generator, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def train_batch(self, seed: int, step: int, rank: int, batch: int):
        return self.sample(generator_for(seed, TRAIN_STREAM, step, rank), batch, self.seq_len)

    def valid_batches(self, seed: int, samples: int, batch: int, length: int | None = None):
        """A fixed validation set (same for every call with the same arguments), in batches."""
        length = length or self.seq_len
        out, i = [], 0
        while i < samples:
            n = min(batch, samples - i)
            out.append(self.sample(generator_for(seed, VALID_STREAM, length, i), n, length))
            i += n
        return out


class SelectiveCopying(Task):
    name = "copying"

    def __init__(self, seq_len: int, vocab: int = 16, n_memorize: int = 16):
        self.seq_len, self.vocab_size, self.M = seq_len, vocab, n_memorize
        self.blank, self.marker = 0, vocab - 1

    def sample(self, gen, batch, length):
        M = self.M
        if length < 2 * M + 1:
            raise UserError(f"selective copying with {M} tokens needs length >= {2 * M + 1}, got {length}")
        body = length - M
        tokens = torch.randint(1, self.vocab_size - 1, (batch, M), generator=gen)
        positions = torch.rand(batch, body, generator=gen).argsort(dim=1)[:, :M].sort(dim=1).values
        inputs = torch.full((batch, length), self.blank, dtype=torch.long)
        inputs.scatter_(1, positions, tokens)
        inputs[:, body:] = self.marker
        labels = torch.full((batch, length), IGNORE, dtype=torch.long)
        labels[:, body:] = tokens
        return inputs, labels


class InductionHeads(Task):
    name = "induction"

    def __init__(self, seq_len: int, vocab: int = 16):
        self.seq_len, self.vocab_size = seq_len, vocab
        self.trigger = vocab - 1

    def sample(self, gen, batch, length):
        if length < 4:
            raise UserError(f"induction heads needs length >= 4, got {length}")
        inputs = torch.randint(0, self.trigger, (batch, length), generator=gen)
        p = torch.randint(0, length - 2, (batch,), generator=gen)      # trigger at p, target at p+1 <= L-2
        rows = torch.arange(batch)
        inputs[rows, p] = self.trigger
        target = inputs[rows, p + 1]
        inputs[:, -1] = self.trigger
        labels = torch.full((batch, length), IGNORE, dtype=torch.long)
        labels[:, -1] = target
        return inputs, labels


class TextData(Task):
    """Next-token prediction on a text file: byte-level (256 ids) or a local ``tokenizer.json``."""

    name = "text"

    def __init__(self, path: str, seq_len: int, tokenizer: str = "bytes", val_fraction: float = 0.05):
        self.seq_len = seq_len
        file = Path(path).expanduser()
        if not file.is_file():
            raise UserError(f"text file {file} does not exist (set data.path or pass --data FILE)")
        if tokenizer == "bytes":
            ids = torch.frombuffer(bytearray(file.read_bytes()), dtype=torch.uint8).long()
            self.vocab_size = 256
        else:
            ids, self.vocab_size = _encode_with_tokenizer(file, tokenizer)
        n_val = int(len(ids) * val_fraction)
        self.train_ids, self.val_ids = ids[: len(ids) - n_val], ids[len(ids) - n_val:]
        if len(self.train_ids) < seq_len + 2:
            raise UserError(f"{file} has only {len(self.train_ids)} training tokens; need more than "
                            f"seq_len + 1 = {seq_len + 1}")
        if len(self.val_ids) < seq_len + 2:
            self.val_ids = self.train_ids[-(seq_len + 2):]  # tiny files: evaluate on the training tail

    def _windows(self, ids: torch.Tensor, starts: torch.Tensor, length: int):
        idx = starts[:, None] + torch.arange(length + 1)
        w = ids[idx]
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def sample(self, gen, batch, length):
        high = len(self.train_ids) - length - 1
        if high < 1:
            raise UserError(f"the text has too few tokens for length {length}")
        return self._windows(self.train_ids, torch.randint(0, high, (batch,), generator=gen), length)

    def valid_batches(self, seed, samples, batch, length=None):
        length = length or self.seq_len
        high = len(self.val_ids) - length - 1
        if high < 1:
            raise UserError(f"the held-out text has too few tokens for length {length}")
        starts = torch.linspace(0, high - 1, min(samples, high)).long()
        return [self._windows(self.val_ids, starts[i:i + batch], length) for i in range(0, len(starts), batch)]


def _encode_with_tokenizer(file: Path, tokenizer: str) -> tuple[torch.Tensor, int]:
    tok_path = Path(tokenizer).expanduser()
    if not tok_path.is_file():
        raise UserError(f"[data] tokenizer must be \"bytes\" or a local tokenizer.json; {tok_path} does not exist")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UserError("a tokenizer.json needs the 'tokenizers' package (pip install tokenizers)") from None
    try:
        tok = Tokenizer.from_file(str(tok_path))
    except Exception as e:
        raise UserError(f"cannot read tokenizer {tok_path}: {str(e).splitlines()[0]}") from None
    text = file.read_text(encoding="utf-8", errors="replace")
    pieces, step = [], 1 << 20
    for i in range(0, len(text), step):  # encode in ~1 MB pieces (memory), split on characters
        pieces.append(torch.tensor(tok.encode(text[i:i + step], add_special_tokens=False).ids, dtype=torch.long))
    ids = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    return ids, tok.get_vocab_size()


def make_task(data_cfg) -> Task:
    if data_cfg.kind == "copying":
        return SelectiveCopying(data_cfg.seq_len, data_cfg.vocab, data_cfg.n_memorize)
    if data_cfg.kind == "induction":
        return InductionHeads(data_cfg.seq_len, data_cfg.vocab)
    if data_cfg.kind == "text":
        return TextData(data_cfg.path, data_cfg.seq_len, data_cfg.tokenizer, data_cfg.val_fraction)
    raise UserError(f"unknown data kind '{data_cfg.kind}'")
