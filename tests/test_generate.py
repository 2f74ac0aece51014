"""generation.py and `mamba-deploy generate`: sampling, the batched prefill-then-decode loop, streaming, errors.

Independent reference for greedy decoding: re-run the full sequence through ``model(ids)`` (no state carried) and
take the argmax of the last position — so the state path (prefill, cat, step) is checked against plain forward.
"""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from mamba_deploy.cli import main
from mamba_deploy.generation import SamplingParams, TextStream, generate, sample
from mamba_deploy.runtime.session import open_session

PROMPTS = [[5, 17, 3], [40, 2, 9, 11, 60, 7, 1], [88]]       # different lengths on purpose


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint("state-spaces", seed=3)


@pytest.fixture(scope="module")
def session(ckpt):
    return open_session(str(ckpt), "torch")


def greedy_by_full_forward(model, prompt, n, vocab):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1, :vocab].float().argmax()))
    return ids[len(prompt):]


def test_greedy_matches_full_forward_and_is_deterministic(session):
    vocab = session.model.config.vocab_size
    for p in PROMPTS:
        want = greedy_by_full_forward(session.model, p, 12, vocab)
        got = generate(session, [p], max_new_tokens=12).tokens[0]
        assert got == want
        assert generate(session, [p], max_new_tokens=12).tokens[0] == got


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.0),
                                    SamplingParams(temperature=0.7, top_k=5, top_p=0.9)],
                         ids=["greedy", "t1", "t0.7-k5-p0.9"])
def test_batch_of_different_lengths_equals_each_alone(session, params):
    batched = generate(session, PROMPTS, max_new_tokens=10, params=params, seed=11).tokens
    alone = [generate(session, [p], max_new_tokens=10, params=params, seed=11).tokens[0]
             for p in PROMPTS]
    assert batched == alone
    assert all(len(t) == 10 for t in batched)


def test_sampling_reproducible_per_seed(session):
    p = SamplingParams(temperature=1.5)
    a = generate(session, PROMPTS, max_new_tokens=16, params=p, seed=1).tokens
    b = generate(session, PROMPTS, max_new_tokens=16, params=p, seed=1).tokens
    c = generate(session, PROMPTS, max_new_tokens=16, params=p, seed=2).tokens
    assert a == b
    assert a != c          # 48 draws at temperature 1.5 over 96 tokens: equal by chance is negligible
    assert all(0 <= t < session.vocab_size for seq in a for t in seq)


def test_top_k1_and_tiny_top_p_are_greedy(session):
    greedy = generate(session, PROMPTS, max_new_tokens=10).tokens
    for p in (SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=2.0, top_p=1e-6)):
        assert generate(session, PROMPTS, max_new_tokens=10, params=p, seed=5).tokens == greedy


def test_sample_distribution_and_filters():
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    g = torch.Generator().manual_seed(0)
    n = 4000
    draws = torch.stack([sample(logits, SamplingParams(temperature=1.0), g) for _ in range(n)])
    freq = torch.bincount(draws, minlength=4).float() / n
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.03), freq   # ~4.5 sigma at p=.4
    # top-k 2 keeps tokens 2, 3 only, renormalised 3:4
    draws = torch.stack([sample(logits, SamplingParams(temperature=1.0, top_k=2), g) for _ in range(n)])
    assert set(draws.tolist()) == {2, 3}
    assert abs((draws == 3).float().mean().item() - 4 / 7) < 0.03
    # top-p 0.6: 0.4 alone < 0.6, 0.4+0.3 ≥ 0.6 → {3, 2}
    draws = sample(logits.expand(n, 4), SamplingParams(temperature=1.0, top_p=0.6), g)
    assert set(draws.tolist()) == {2, 3}
    # batched greedy
    assert sample(torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])).tolist() == [1, 0]


def test_stop_ids_end_only_that_sequence(session):
    alone = [generate(session, [p], max_new_tokens=12).tokens[0] for p in PROMPTS]
    stop = alone[1][3]                                   # a token prompt 1 emits at its 4th step
    res = generate(session, PROMPTS, max_new_tokens=12, stop_ids=[stop])
    for seq, full, stopped in zip(res.tokens, alone, res.stopped):
        if stop in full:
            k = full.index(stop)
            assert seq == full[:k + 1] and stopped
        else:
            assert seq == full and not stopped
    assert res.stopped[1]


def test_streaming_order_and_sampling_param_errors(session):
    events = []
    res = generate(session, PROMPTS, max_new_tokens=4, on_token=lambda i, t: events.append((i, t)))
    assert [t for i, t in events if i == 2] == res.tokens[2]
    assert [i for i, _ in events[:3]] == [0, 1, 2]       # one token per prompt per step, in order
    from mamba_deploy.errors import UserError
    for bad in (dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(UserError):
            SamplingParams(**bad)


# ---- CLI -------------------------------------------------------------------------------------------------------
def word_tokenizer(path, vocab: int = 96):
    """A tiny WordLevel tokenizer: words w0 … w{vocab-1}, whitespace split (built here; nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")       # joins words with spaces
    tok.save(str(path))
    return Tokenizer.from_file(str(path))


def test_cli_prompt_ids_single_and_batch(ckpt, session):
    want = [generate(session, [p], max_new_tokens=6).tokens[0] for p in PROMPTS]
    r = CliRunner().invoke(main, ["generate", "--model", str(ckpt), "--prompt-ids", "5,17,3", "-n", "6"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "5,17,3 | " + " ".join(map(str, want[0]))
    args = ["generate", "--model", str(ckpt), "-n", "6"]
    for p in PROMPTS:
        args += ["--prompt-ids", ",".join(map(str, p))]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    for i, (p, w) in enumerate(zip(PROMPTS, want)):
        assert f"{','.join(map(str, p))} | {','.join(map(str, w))}" in r.stdout
        assert [int(line.split("]")[1]) for line in r.stdout.splitlines() if line.startswith(f"[{i}]")] == w


def test_cli_text_prompt_with_tokenizer(ckpt, session, tmp_path):
    tok = word_tokenizer(tmp_path / "tokenizer.json")
    prompt = "w5 w17 w3"
    assert tok.encode(prompt).ids == PROMPTS[0]
    want = generate(session, [PROMPTS[0]], max_new_tokens=5).tokens[0]
    r = CliRunner().invoke(main, ["generate", "--model", str(ckpt), "--tokenizer", str(tmp_path / "tokenizer.json"),
                                  "--prompt", prompt, "-n", "5", "--temperature", "0"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == tok.decode(PROMPTS[0] + want)
    stream = TextStream(tok, PROMPTS[0])
    assert "".join(stream.push(t) for t in want) + stream.flush() == " " + tok.decode(want)


@pytest.mark.parametrize("args, message", [
    (["--artifact", "/nonexistent/artifact", "--prompt-ids", "1"], "does not exist"),
    (["--model", "{ckpt}", "--prompt-ids", "1", "--backend", "nosuch"], "unknown backend 'nosuch'"),
    (["--model", "{ckpt}", "--prompt-ids", "1", "--backend", "onnxruntime"], "runs an exported artifact"),
    (["--model", "{ckpt}", "--prompt", "w1", "--tokenizer", "/nonexistent/tokenizer.json"],
     "tokenizer file /nonexistent/tokenizer.json does not exist"),
    (["--model", "{ckpt}", "--prompt", "w1"], "needs a tokenizer"),
    (["--model", "{ckpt}", "--prompt-ids", "1,x"], "comma-separated integer"),
    (["--model", "{ckpt}", "--prompt-ids", "1,500"], "token id 500 outside the model's vocabulary [0, 96)"),
    (["--model", "{ckpt}", "--prompt-ids", "1", "--stop-ids", "0,96"], "--stop-ids: token id 96 is outside"),
    (["--model", "{ckpt}", "--prompt-ids", "1", "--top-p", "0"], "--top-p must lie in"),
    (["--model", "{ckpt}"], "give a prompt"),
    (["--prompt-ids", "1"], "exactly one of --artifact"),
])
def test_cli_bad_input_one_line_error(ckpt, args, message):
    r = CliRunner().invoke(main, ["generate"] + [a.format(ckpt=ckpt) for a in args])
    assert r.exit_code == 2, r.output
    assert message in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.output
