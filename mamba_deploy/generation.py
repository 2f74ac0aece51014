"""Text generation over any backend's Session: sampling (logits → token) and the prefill-then-decode loop.

Batching prompts of different lengths without padding (a recurrent model has no attention mask to hide pads):

    for each prompt p_i (its own length T_i):   logits_i, state_i = session.prefill(p_i[None])
    state = MambaState.cat([state_1 … state_b])   — one batch from here on
    repeat: token = sample(logits); logits, state = session.step(token, state)

so every sequence sees exactly the tokens it would see alone. Each sequence draws its random numbers from its own
``torch.Generator`` seeded with ``seed``, so a prompt's sampled tokens do not depend on which other prompts share the
batch either. Sequences that produce a stop id stop (the stop id is their last token) and leave the batch.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Sequence

import torch

from .errors import UserError
from .finite import check_step_finite
from .model import MambaState


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 → greedy (argmax). top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top-p must lie in (0, 1] (1 = off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample(logits: torch.Tensor, params: SamplingParams = SamplingParams(),
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens from ``logits`` [b, V] (or [V]) → int64 [b] (or []).

    Greedy: argmax. Otherwise softmax(logits / temperature), restricted to the ``top_k`` largest logits and then to
    the smallest set of tokens whose probability mass reaches ``top_p`` (nucleus; the most likely token always
    stays), sampled with ``generator`` — the same generator state gives the same tokens.
    """
    squeeze = logits.dim() == 1
    logits = logits.float().reshape(-1, logits.shape[-1])
    if params.greedy:
        tokens = logits.argmax(-1)
    else:
        logits = logits / params.temperature
        if params.top_k and params.top_k < logits.shape[-1]:
            kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            mass_before = probs.cumsum(-1) - probs          # mass of the strictly more likely tokens
            drop_sorted = mass_before >= params.top_p       # position 0 has mass_before 0: always kept
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = logits.softmax(-1)
        tokens = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)
    return tokens[0] if squeeze else tokens


@dataclasses.dataclass
class Generation:
    """What ``generate`` returns: per prompt, the new tokens (a stop id, when hit, is the last one)."""

    tokens: list[list[int]]
    stopped: list[bool]          # True where a stop id ended the sequence (else it ran to max_new_tokens)
    state: MambaState | None = None      # with keep_state: the state after every prompt and generated token
    logits: torch.Tensor | None = None   # with keep_state: the logits for the next token [1, V]


def generate(session, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32,
             params: SamplingParams = SamplingParams(), seed: int = 0, stop_ids: Iterable[int] = (),
             on_token: Callable[[int, int], None] | None = None,
             start=None, keep_state: bool = False) -> Generation:
    """Continue each prompt (a list of token ids) by up to ``max_new_tokens`` tokens on ``session``.

    Only the first ``session.vocab_size`` logits (the tokenizer vocabulary) are sampled from: the logits are
    ``session.padded_vocab_size`` wide and the ids beyond the vocabulary are padding rows, never a token.
    ``on_token(i, token)`` is called as soon as prompt ``i`` gets a token (for streaming).
    ``start``: a ``SavedState`` (runtime/state_io.py) of one sequence to continue from: the prompt is prefilled
    from its state, or, when the prompt is empty, generation starts from its stored logits.
    ``keep_state`` (one prompt): also consume the last generated token and return the final state and logits in
    ``Generation.state`` / ``.logits`` (what ``save_state`` stores to resume later).
    Non-finite logits or states stop it with a UserError naming the step and the first layer where they appeared.
    """
    if not prompts:
        raise UserError("give at least one prompt")
    if max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if (start is not None or keep_state) and len(prompts) != 1:
        raise UserError("resuming from a saved state or keeping the final state works on one prompt at a time")
    if start is not None and start.state.batch != 1:
        raise UserError(f"the saved state holds {start.state.batch} sequences; resume needs a state of one")
    for i, p in enumerate(prompts):
        if len(p) == 0 and (start is None or start.logits is None):
            raise UserError(f"prompt {i} is empty; every prompt needs at least one token"
                            + (" (the saved state has no logits to continue from)" if start is not None else ""))
    stop = set(int(s) for s in stop_ids)
    b = len(prompts)
    out: list[list[int]] = [[] for _ in range(b)]
    stopped = [False] * b
    if max_new_tokens == 0 and not keep_state:
        return Generation(out, stopped)

    generators = []
    for _ in range(b):
        g = torch.Generator()
        g.manual_seed(seed)
        generators.append(g)

    # prefill each prompt at its own length, then one batch
    logits, states = [], []
    for p in prompts:
        if start is not None and len(p) == 0:
            lg, st = start.logits, start.state
        else:
            ids = torch.tensor([list(p)], dtype=torch.long)
            lg, st = session.prefill(ids, start.state if start is not None else None)
        check_step_finite(lg, st, f"the prefill of prompt {len(logits)}")
        logits.append(lg)
        states.append(st)
    logits = torch.cat(logits)
    state = MambaState.cat(states) if b > 1 else states[0]

    vocab_size = session.vocab_size
    if max_new_tokens == 0:
        return Generation(out, stopped, state, logits)
    active = list(range(b))                      # prompt index of each batch row
    for t in range(max_new_tokens):
        lg = logits[:, :vocab_size]
        if params.greedy:
            tokens = sample(lg, params)
        else:
            tokens = torch.stack([sample(lg[r], params, generators[i]) for r, i in enumerate(active)])
        tokens = tokens.cpu()
        keep = []
        for r, i in enumerate(active):
            tok = int(tokens[r])
            out[i].append(tok)
            if on_token is not None:
                on_token(i, tok)
            if tok in stop:
                stopped[i] = True
            else:
                keep.append(r)
        if not keep or t == max_new_tokens - 1:
            break
        if len(keep) < len(active):              # finished sequences leave the batch
            rows = torch.tensor(keep, dtype=torch.long)
            state = state.select(rows.to(state.ssm[0].device))
            tokens = tokens[rows]
            active = [active[r] for r in keep]
        logits, state = session.step(tokens, state)
        check_step_finite(logits, state, f"decode step {t + 1}")
    if keep_state:                               # consume the last token: the state then covers every token
        logits, state = session.step(torch.tensor([out[0][-1]], dtype=torch.long), state)
        return Generation(out, stopped, state, logits)
    return Generation(out, stopped)


class TextStream:
    """Incremental detokenisation: feed token ids, get the new text. Decodes the whole sequence each time and holds
    back text that ends in an incomplete character (U+FFFD), so multi-byte characters and byte-level BPE pieces
    come out right."""

    def __init__(self, tokenizer, prefix_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(prefix_ids)
        self.printed = len(self._decode())

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=False)

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self._decode()
        if text.endswith("\ufffd"):
            return ""
        new, self.printed = text[self.printed:], len(text)
        return new

    def flush(self) -> str:
        text = self._decode()
        new, self.printed = text[self.printed:], len(text)
        return new
