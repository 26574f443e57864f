"""Prompt sharing within a prefill (always on, exact) and prefix caching across requests (`prefix_cache=True`)."""

from __future__ import annotations

import pytest
import torch

from conftest import randomize, tiny_config
from dgemma.cache import KVCache
from dgemma.generate import AR, Done, Engine, GenerationParams, common_prefix, generate
from dgemma.model import DiffusionGemma
from dgemma.sampler import SamplerConfig


@pytest.fixture(scope="module")
def model():
    return randomize(DiffusionGemma(tiny_config("a")), seed=3).eval()


def _prompt(n, seed=0, vocab=320):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def _count_encoded(model, monkeypatch) -> list[int]:
    """Record the real tokens each encoder call writes (n_valid summed, or rows x length)."""
    seen: list[int] = []
    real = model.encode

    def encode(ids, cache, n_valid=None, **kw):
        seen.append(int(n_valid.sum()) if n_valid is not None else ids.numel())
        return real(ids, cache, n_valid=n_valid, **kw)

    monkeypatch.setattr(model, "encode", encode)
    return seen


def _run(engine, prompt, params) -> Done:
    return [ev for ev in engine.run([prompt], params) if isinstance(ev, Done)][0]


def test_common_prefix():
    a = list(range(1000))
    assert common_prefix(a, a) == 1000 and common_prefix(a, a, 10) == 10
    assert common_prefix(a, a[:300] + [-1] + a[301:]) == 300
    assert common_prefix(a, []) == 0 and common_prefix([5], [6]) == 0 and common_prefix(a[:7], a) == 7


def test_rows_with_one_prompt_encode_it_once(model, monkeypatch):
    """n samples of one prompt: one row encodes it, the others copy its keys, and every row's tokens are what it
    gets alone (diffusion, AR, and ar_fallback, which needs the prompt's last hidden state too)."""
    p, q = _prompt(23, 1), _prompt(7, 2)
    steps = SamplerConfig(max_denoising_steps=6)
    for extra in ({}, {"mode": AR, "ar_temperature": 0.7}, {"ar_fallback": 0.0}):
        params = [GenerationParams(max_new_tokens=40, seed=s, sampler=steps, **extra) for s in range(4)]
        alone = [generate(model, [pp], [pr])[0].tokens for pp, pr in zip([p, q, p, p], params)]
        seen = _count_encoded(model, monkeypatch)
        done = generate(model, [p, q, p, p], params)
        monkeypatch.undo()
        assert [d.tokens for d in done] == alone
        assert seen[0] == len(p) + len(q)  # the prefill: each prompt once
        assert [d.stats["cached_prompt_tokens"] for d in done] == [0, 0, len(p), len(p)]


def test_prefix_cache_reuses_a_finished_rows_keys(model, monkeypatch):
    T = model.cfg.canvas_length
    p = _prompt(30, 4)
    greedy = GenerationParams(mode=AR, max_new_tokens=12, ignore_eos=True)
    engine = Engine(model, max_rows=2, max_len=256, prefix_cache=True)
    first = _run(engine, p, GenerationParams(max_new_tokens=T, seed=1, sampler=SamplerConfig(max_denoising_steps=3)))
    assert first.stats["cached_prompt_tokens"] == 0
    longer = p + _prompt(9, 5)
    seen = _count_encoded(model, monkeypatch)
    d = _run(engine, longer, greedy)
    assert d.stats["cached_prompt_tokens"] == len(p) and seen[0] == len(longer) - len(p)
    monkeypatch.undo()
    fresh = _run(Engine(model, max_rows=2, max_len=256), longer, greedy)
    assert fresh.stats["cached_prompt_tokens"] == 0
    assert d.tokens == fresh.tokens  # keys encoded in two pieces: the same up to float rounding
    # the full layers' keys of the reused and the fresh prompt agree to float rounding
    a, b = Engine(model, max_rows=1, max_len=256, prefix_cache=True), Engine(model, max_rows=1, max_len=256)
    for e, prompts in ((a, [p, longer]), (b, [longer])):
        for pr in prompts:
            _run(e, pr, GenerationParams(max_new_tokens=T, sampler=SamplerConfig(max_denoising_steps=1)))
    for layer, cap in enumerate(a.cache.capacity):
        if cap == a.cache.max_len:
            diff = (a.cache.k[layer][0, :, :len(longer)] - b.cache.k[layer][0, :, :len(longer)]).abs().max()
            assert diff.item() < 1e-4
    # a diffusion row takes the whole prompt from the cache: no prefill at all
    seen = _count_encoded(model, monkeypatch)
    d = _run(a, longer, GenerationParams(max_new_tokens=T, sampler=SamplerConfig(max_denoising_steps=1)))
    assert d.stats["cached_prompt_tokens"] == len(longer) and d.stats["encoder_passes"] == 0 and seen == []


def test_cache_salt_keeps_each_salts_prefixes_apart(model):
    """vLLM's cache_salt: a row reuses only keys a row of the same salt left, so one user cannot tell from timing
    what another sent; the tokens are those of an unsalted run."""
    p = _prompt(24, 7)
    params = GenerationParams(max_new_tokens=8, seed=2, sampler=SamplerConfig(max_denoising_steps=2))
    engine = Engine(model, max_rows=1, max_len=128, prefix_cache=True)
    first = _run(engine, p, params.replace(cache_salt="alice"))
    other = _run(engine, p, params.replace(cache_salt="bob"))  # alice's keys are not bob's
    assert other.stats["cached_prompt_tokens"] == 0
    assert _run(engine, p, params).stats["cached_prompt_tokens"] == 0  # nor an unsalted request's
    _run(engine, p, params.replace(cache_salt="alice"))
    again = _run(engine, p, params.replace(cache_salt="alice"))
    assert again.stats["cached_prompt_tokens"] == len(p) and again.tokens == first.tokens == other.tokens
    # rows of one prefill share a prompt's encoding only within a salt too
    done = generate(model, [p] * 3, [params.replace(cache_salt=s) for s in ("a", "b", "a")])
    assert [d.stats["cached_prompt_tokens"] for d in done] == [0, 0, len(p)]


def test_prefix_cache_off_by_default_and_for_prompt_scoring(model):
    p = _prompt(20, 6)
    params = GenerationParams(max_new_tokens=8, sampler=SamplerConfig(max_denoising_steps=1))
    engine = Engine(model, max_rows=1, max_len=128)
    _run(engine, p, params)
    assert _run(engine, p, params).stats["cached_prompt_tokens"] == 0
    engine = Engine(model, max_rows=1, max_len=128, prefix_cache=True)
    _run(engine, p, params)
    scored = _run(engine, p, params.replace(prompt_logprobs=2, max_new_tokens=0))
    assert scored.stats["cached_prompt_tokens"] == 0
    assert scored.prompt_logprobs == generate(model, [p], params.replace(prompt_logprobs=2, max_new_tokens=0)
                                              )[0].prompt_logprobs


def test_ring_rewind_rule(model):
    """A sliding ring keeps W - 1 + margin positions: a context can be cut back at most `margin` tokens once it
    has wrapped (or anywhere while it has not); the engine then encodes the whole prompt instead."""
    cfg = model.cfg  # sliding window 8: rings of 7 + margin
    c = KVCache(cfg, 1, 100, margin=5)
    assert all(cap in (12, 100) for cap in c.capacity)
    assert c.can_rewind(12, 0) and c.can_rewind(30, 25) and not c.can_rewind(30, 24) and not c.can_rewind(3, 4)
    assert KVCache(cfg, 1, 100).can_rewind(30, 30) and not KVCache(cfg, 1, 100).can_rewind(30, 29)
    # the engine's margin: one canvas unless told (`dgemma serve --prefix-cache-margin`), none without the cache
    caps = {m: set(Engine(model, max_rows=1, max_len=128, **kw).cache.capacity) for m, kw in (
        ("default", {"prefix_cache": True}), ("40", {"prefix_cache": True, "prefix_margin": 40}), ("off", {}))}
    assert caps == {"default": {7 + cfg.canvas_length, 128}, "40": {47, 128}, "off": {7, 128}}
    p = _prompt(40, 7)
    greedy = GenerationParams(mode=AR, max_new_tokens=6, ignore_eos=True)
    engine = Engine(model, max_rows=1, max_len=128, prefix_cache=True, prefix_margin=0)
    first = _run(engine, p, greedy)
    # the held context is p + the AR tokens written back (all but the last): a prompt that continues it exactly
    # is reused even though the rings have wrapped; one that cuts it back is not
    cont = p + first.tokens + [5, 6]
    d = _run(engine, cont, greedy)
    assert d.stats["cached_prompt_tokens"] == len(p) + len(first.tokens) - 1
    assert d.tokens == _run(Engine(model, max_rows=1, max_len=128), cont, greedy).tokens
    assert _run(engine, p[:35] + [9, 9], greedy).stats["cached_prompt_tokens"] == 0


def test_failed_step_leaves_no_reusable_slot(model, monkeypatch):
    p = _prompt(20, 8)
    params = GenerationParams(max_new_tokens=40, sampler=SamplerConfig(max_denoising_steps=2))
    engine = Engine(model, max_rows=1, max_len=128, prefix_cache=True)
    rid = engine.add(p, params)
    engine.step()  # prefill + first denoising step

    def boom(*a, **kw):
        raise RuntimeError("device lost")

    monkeypatch.setattr(model, "denoise", boom)
    with pytest.raises(RuntimeError):
        engine.step()
    monkeypatch.undo()
    engine.cancel(rid)
    assert _run(engine, p, params).stats["cached_prompt_tokens"] == 0


# ---------------------------------------------------------------- chunked prefill
def test_chunked_prefill_encodes_a_prompt_over_several_steps(model, monkeypatch):
    """prefill_chunk: a 50-token prompt goes in as chunks of 16, 16, 16 and 2 tokens, one per step, while a row
    already denoising gets its step every time; the keys are those of one pass up to float rounding (greedy AR
    tokens agree), and a row's tokens do not depend on what runs beside it."""
    p, other = _prompt(50, 5), _prompt(6, 6)
    greedy = GenerationParams(mode=AR, max_new_tokens=12, ignore_eos=True)
    assert _run(Engine(model, max_rows=1, prefill_chunk=16), p, greedy).tokens == \
        _run(Engine(model, max_rows=1), p, greedy).tokens
    engine = Engine(model, max_rows=2, drafts=True, prefill_chunk=16)
    slow = GenerationParams(max_new_tokens=16, seed=1, sampler=SamplerConfig(max_denoising_steps=20,
                                                                              confidence_threshold=0))
    a = engine.add(other, slow)
    engine.step()  # its prefill (6 tokens: one chunk)
    seen = _count_encoded(model, monkeypatch)
    b = engine.add(p, GenerationParams(max_new_tokens=16, seed=2, sampler=SamplerConfig(max_denoising_steps=3)))
    drafts = []
    for _ in range(4):
        drafts.append({ev.request for ev in engine.step() if hasattr(ev, "step")})
    monkeypatch.undo()
    assert seen == [16, 16, 16, 2]  # the new row's chunks; the other row denoised meanwhile
    assert [a in d for d in drafts] == [True] * 4 and [b in d for d in drafts] == [False, False, False, True]
    ends = [ev for _ in range(64) if engine.busy for ev in engine.step() if isinstance(ev, Done)]
    assert {ev.request: ev.stats["encoder_passes"] for ev in ends}[b] == 4
    # bf16 (batch-invariant bit for bit): alone, or beside a short prompt and a second sample of its own prompt
    # (which waits for its chunks, then copies its keys)
    bf = randomize(DiffusionGemma(tiny_config("a")), seed=3).eval().to(torch.bfloat16)
    params = GenerationParams(max_new_tokens=32, seed=3, sampler=SamplerConfig(max_denoising_steps=4))
    alone = [_run(Engine(bf, max_rows=1, prefill_chunk=16), p, params.replace(seed=s)).tokens for s in (3, 4)]
    together = Engine(bf, max_rows=3, prefill_chunk=16).run([other, p, p], [params.replace(seed=9), params,
                                                                             params.replace(seed=4)])
    done = sorted((ev for ev in together if isinstance(ev, Done)), key=lambda d: d.request)
    assert [d.tokens for d in done[1:]] == alone and done[2].stats["cached_prompt_tokens"] == len(p)
    with pytest.raises(Exception, match="prefill_chunk must be"):
        Engine(model, prefill_chunk=0)


def test_chunked_prefill_leaves_prompt_scoring_whole(model):
    """A row that scores its prompt (prompt_logprobs) encodes it at once: the same scores with or without chunks."""
    p = _prompt(40, 7)
    params = GenerationParams(max_new_tokens=0, prompt_logprobs=2)
    a = _run(Engine(model, max_rows=1, prefill_chunk=8), p, params)
    b = _run(Engine(model, max_rows=1), p, params)
    assert a.prompt_logprobs == b.prompt_logprobs and a.stats["encoder_passes"] == 1
