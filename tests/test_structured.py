"""Structured output: grammars (dgemma.structured) and decoding under them, diffusion and AR, on tiny random models
with a byte-level tokenizer. A random model writes noise, so everything it writes under a grammar is the grammar's
doing: these tests check that the text always matches, across canvases, seeds, batches and logprobs."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from conftest import randomize, tiny_config
from dgemma.generate import AR, DIFFUSION, Commit, Done, Draft, GenerationError, GenerationParams, generate
from dgemma.model import DiffusionGemma
from dgemma.sampler import SamplerConfig
from dgemma.structured import Grammar, GrammarError
from dgemma.tokenizer import byte_level

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "b": {"enum": ["yes", "no"]}},
          "required": ["a", "b"], "additionalProperties": False}
FAST = SamplerConfig(max_denoising_steps=4)


@pytest.fixture(scope="module")
def tok():
    return byte_level(320)


@pytest.fixture(scope="module")
def model():
    return randomize(DiffusionGemma(tiny_config("a", vocab_size=320)), seed=5).eval()


def _run(model, tok, grammar, *, mode=DIFFUSION, seed=0, n=48, prompt="x = ", **kw):
    params = GenerationParams(max_new_tokens=n, sampler=FAST, seed=seed, mode=mode, grammar=grammar,
                              ar_temperature=1.0 if mode == AR else 0.0, **kw)
    [done] = generate(model, [tok.encode(prompt)], params, tokenizer=tok)
    return done


def _valid(doc):
    return set(doc) == {"a", "b"} and isinstance(doc["a"], int) and 0 <= doc["a"] <= 99 and doc["b"] in ("yes", "no")


# ---------------------------------------------------------------- grammars
def test_grammar_errors_are_clear(tok):
    with pytest.raises(GrammarError, match="unclosed group"):
        Grammar.regex("((").check(tok)
    with pytest.raises(GrammarError, match="invalid json schema"):
        Grammar.json_schema({"type": "nonsense"}).check(tok)
    with pytest.raises(GrammarError, match="not valid JSON"):
        Grammar.json_schema("{nope")
    with pytest.raises(GrammarError, match="unknown name"):
        Grammar.lark("start: nothing_here").check(tok)
    for bad in ([], [""], "ab", [1]):
        with pytest.raises(GrammarError, match="non-empty list"):
            Grammar.choice(bad)
    with pytest.raises(GrammarError):
        Grammar.regex("")
    with pytest.raises(GrammarError, match="no token of this model's tokenizer can begin"):
        Grammar.regex("[0-9]+").check(_letters_only())
    with pytest.raises(GrammarError, match="needs a byte-level BPE or byte-fallback"):
        Grammar.regex("[a-z]+").check(_letters_only(decoder=False))


def _letters_only(decoder=True):
    """A byte-level tokenizer that can spell a-z and nothing else (and EOS); without a decoder, one that
    llguidance cannot read."""
    from tokenizers import decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    from dgemma.tokenizer import Tokenizer

    vocab = {"<pad>": 0, "<eos>": 1, **{chr(97 + i): 2 + i for i in range(26)}}
    backend = Backend(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    if decoder:
        backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend, bos_id=None, eos_ids=[1], pad_id=0)


def test_matcher_masks_the_vocabulary(tok):
    m = Grammar.choice(["ab", "b\"c"]).matcher(tok, 400)  # a model vocabulary past the tokenizer's
    allowed = m.allowed()
    assert allowed.shape == (400,) and not allowed[320:].any()
    assert sorted(tok.decode([t]) for t in allowed.nonzero()[:, 0].tolist()) == ["a", "b"]
    for t in tok.encode("b\"c"):
        m.consume(t)
    assert m.done
    assert allowed[tok.encode("a")[0]] and set(m.allowed().nonzero()[:, 0].tolist()) <= set(tok.eos_ids)
    with pytest.raises(GrammarError):
        Grammar.regex("[0-9]").matcher(tok, 320).consume(tok.encode("x")[0])


# ---------------------------------------------------------------- decoding
@pytest.mark.parametrize("mode", [DIFFUSION, AR])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_output_is_valid(model, tok, mode, seed):
    done = _run(model, tok, Grammar.json_schema(SCHEMA), mode=mode, seed=seed)
    assert done.finish_reason == "stop", done.text
    assert _valid(json.loads(done.text)), done.text
    if mode == DIFFUSION:  # 16-token canvases: the object spans two of them, the matcher carries over
        assert done.stats["canvases"] >= 2 and done.stats["decoder_passes"] < len(done.tokens)


@pytest.mark.parametrize("mode", [DIFFUSION, AR])
def test_other_grammars(model, tok, mode):
    cases = [(Grammar.regex(r"[a-c]{3}-[0-9]{2}"), lambda t: re.fullmatch(r"[a-c]{3}-[0-9]{2}", t)),
             (Grammar.choice(["red", "green", "blue"]), lambda t: t in ("red", "green", "blue")),
             (Grammar.lark('start: "f(" NUM ("," NUM)? ")"\nNUM: /[0-9]/'),
              lambda t: re.fullmatch(r"f\([0-9](,[0-9])?\)", t)),
             (Grammar.json_object(), lambda t: isinstance(json.loads(t), dict))]
    for grammar, ok in cases:
        done = _run(model, tok, grammar, mode=mode, n=64)
        if grammar.kind == "json_object" and done.finish_reason == "length":
            continue  # a random model may write an open-ended object past 64 tokens: nothing to parse
        assert done.finish_reason == "stop" and ok(done.text), (grammar.kind, done.text)



@pytest.mark.parametrize("mode", [DIFFUSION, AR])
def test_sampling_cut_under_a_grammar(model, tok, mode):
    """top_k / top_p / min_p cut what the grammar allows at each position, as AR sampling cuts: the output still
    matches. Cut to one token, every position of the walk is certain (zero entropy), so a canvas is committed
    whole in its first step."""
    for cut in (dict(top_k=1), dict(top_p=0.5), dict(min_p=0.2, top_k=3)):
        done = _run(model, tok, Grammar.json_schema(SCHEMA), mode=mode, **cut)
        assert done.finish_reason == "stop" and _valid(json.loads(done.text)), (cut, done.text)
        if mode == DIFFUSION and "top_k" in cut and cut["top_k"] == 1:
            assert done.stats["decoder_passes"] == done.stats["canvases"]


def test_length_cut_keeps_a_valid_prefix(model, tok):
    done = _run(model, tok, Grammar.regex("[a-z]{40}"), n=20)
    assert done.finish_reason == "length" and re.fullmatch("[a-z]{20}", done.text)


def test_committed_positions_stay_and_drafts_show_them(model, tok):
    params = GenerationParams(max_new_tokens=16, sampler=SamplerConfig(max_denoising_steps=6), seed=3,
                              grammar=Grammar.regex("[a-z]{16}"), drafts=True)
    events = list(generate(model, [tok.encode("x")], params, tokenizer=tok, events=True))
    drafts = [e for e in events if isinstance(e, Draft)]
    final = [e for e in events if isinstance(e, Done)][0].tokens
    assert 1 <= len(drafts) <= 6
    committed = 0
    for d in drafts:  # each step commits a run at least one long, and a commit is never taken back
        run = 0
        while run < 16 and d.tokens[run] == final[run]:
            run += 1
        assert run > committed or run == 16
        committed = run


def test_batch_invariant_and_plain_rows_unchanged(model, tok):
    g = Grammar.json_schema(SCHEMA)
    p_json = GenerationParams(max_new_tokens=48, sampler=FAST, seed=4, grammar=g)
    p_free = GenerationParams(max_new_tokens=24, sampler=FAST, seed=9)
    prompts = [tok.encode("a: "), tok.encode("b = ")]
    alone_json = generate(model, prompts[:1], p_json, tokenizer=tok)[0].tokens
    alone_free = generate(model, prompts[1:], p_free, tokenizer=tok)[0].tokens
    both = generate(model, prompts, [p_json, p_free], tokenizer=tok)
    assert both[0].tokens == alone_json and both[1].tokens == alone_free


def test_logprobs_under_a_grammar(model, tok):
    done = _run(model, tok, Grammar.regex("[ab]{5}"), n=16, logprobs=3)
    assert re.fullmatch("[ab]{5}", done.text)
    assert len(done.logprobs) == len(done.tokens) == 5
    for lp, top in zip(done.logprobs, done.top_logprobs):
        assert lp <= 1e-6 and 1 <= len(top) <= 2  # only a and b are possible there
        assert {tok.decode([t]) for t, _ in top} <= {"a", "b"}
        assert abs(sum(torch.tensor([v for _, v in top]).exp().tolist()) - 1) < 1e-4
    # the raw entropy of the same (masked) distribution: two tokens at most, so at most ln 2
    assert len(done.entropies) == 5 and all(-1e-6 <= h <= math.log(2) + 1e-5 for h in done.entropies)
    for h, top in zip(done.entropies, done.top_logprobs):
        assert h == pytest.approx(-sum(math.exp(v) * v for _, v in top), abs=1e-4)


@pytest.mark.parametrize("mode", [DIFFUSION, AR])
def test_stop_token_ids_under_a_grammar(model, tok, mode):
    """A stop token the grammar allows ends the text there (kept: it is no special token), finish "stop"."""
    b = tok.encode("b", add_bos=False)[0]
    texts = [_run(model, tok, Grammar.regex("[ab]{8}"), mode=mode, seed=seed, n=16, stop_token_ids=(b,))
             for seed in range(4)]
    assert all(re.fullmatch("a*b|a{8}", d.text) and d.finish_reason == "stop" for d in texts), [d.text for d in texts]
    assert any(d.text.endswith("b") for d in texts)  # the stop token came up, and ended the text


def test_bad_combinations(model, tok):
    for kw in (dict(min_tokens=2), dict(allowed_token_ids=(5, 6))):
        with pytest.raises(GenerationError, match="grammar"):
            generate(model, [[5, 6]], GenerationParams(grammar=Grammar.json_object(), **kw), tokenizer=tok)
    g = Grammar.json_object()
    for kw in (dict(fixed={0: 5}), dict(allowed={0: [5]}), dict(ignore_eos=True), dict(rng="reference")):
        with pytest.raises(GenerationError, match="grammar"):
            generate(model, [[5, 6]], GenerationParams(grammar=g, **kw), tokenizer=tok)
    with pytest.raises(GenerationError, match="tokenizer"):
        generate(model, [[5, 6]], GenerationParams(grammar=g))
    with pytest.raises(GenerationError, match="unclosed group"):
        generate(model, [[5, 6]], GenerationParams(grammar=Grammar.regex("((")), tokenizer=tok)


@pytest.mark.parametrize("mode", ["schema", "regex"])
def test_fused_and_plain_paths_agree(model, tok, mode):
    """The default path at large vocabularies fuses the LM head into the sampler step and computes the walk's
    logits a few positions at a time; the plain path materialises them. Same tokens and logprobs, with a
    logit_bias and penalties too (seed 2), which both paths add before the walk reads the logits."""
    grammar = Grammar.json_schema(SCHEMA) if mode == "schema" else Grammar.regex("[a-z ]{30}")
    e = tok.encode("e")[0]
    for seed in range(3):
        params = GenerationParams(max_new_tokens=40, sampler=FAST, seed=seed, grammar=grammar, logprobs=2)
        if seed == 2:
            params = params.replace(logit_bias={e: 5.0}, frequency_penalty=1.5)
        runs = [generate(model, [tok.encode("y = ")], params, tokenizer=tok, fused_head=fused)[0]
                for fused in (False, True)]
        assert runs[0].tokens == runs[1].tokens and runs[0].logprobs == runs[1].logprobs
        assert runs[0].top_logprobs == runs[1].top_logprobs


def test_committed_runs_stream_before_their_canvas_ends(model, tok):
    """A grammar row's runs are final when the walk commits them: each step's run goes out as a partial Commit,
    the canvas's own Commit carries what is left, and together they are the output, logprobs included."""
    params = GenerationParams(max_new_tokens=48, sampler=SamplerConfig(max_denoising_steps=6), seed=1,
                              grammar=Grammar.json_schema(SCHEMA), logprobs=1, drafts=True)
    events = list(generate(model, [tok.encode("x = ")], params, tokenizer=tok, events=True))
    done = events[-1]
    commits = [e for e in events if isinstance(e, Commit)]
    assert isinstance(done, Done) and done.finish_reason == "stop" and _valid(json.loads(done.text))
    assert [t for c in commits for t in c.tokens] == done.tokens
    assert [v for c in commits for v in c.logprobs] == done.logprobs
    partial = [i for i, e in enumerate(events) if isinstance(e, Commit) and e.partial]
    last_draft_of_first_canvas = max(i for i, e in enumerate(events) if isinstance(e, Draft) and e.canvas == 0)
    assert len(partial) >= 2 and partial[0] < last_draft_of_first_canvas  # text before its canvas ended
    assert sum(not c.partial for c in commits) == done.stats["canvases"]


def test_stop_strings_and_n_rows_under_a_grammar(model, tok):
    """A stop string cuts a grammar's text as it cuts any other; rows of one batch keep their own matchers."""
    params = GenerationParams(max_new_tokens=40, sampler=FAST, seed=2, grammar=Grammar.regex("[a-f]{30}"), stop=("e",))
    [done] = generate(model, [tok.encode("x")], params, tokenizer=tok)
    assert re.fullmatch("[a-df]*", done.text) and (done.finish_reason == "stop" or len(done.text) == 30)
    grammars = [Grammar.regex("[0-9]{6}"), Grammar.choice(["alpha", "beta"]), Grammar.json_schema(SCHEMA)]
    batch = generate(model, [tok.encode("y")] * 3,
                     [GenerationParams(max_new_tokens=48, sampler=FAST, seed=7, grammar=g) for g in grammars],
                     tokenizer=tok)
    assert re.fullmatch("[0-9]{6}", batch[0].text) and batch[1].text in ("alpha", "beta")
    assert _valid(json.loads(batch[2].text))


def test_after_thought_lets_a_thought_channel_come_first(tok):
    """With thinking on, a grammar holds the answer after Gemma 4's thought channel (free text), not the thought."""
    for grammar, answer in ((Grammar.json_schema(SCHEMA), '{"a": 7, "b": "no"}'), (Grammar.regex("[a-c]{3}"), "abc"),
                            (Grammar.choice(["left", "right"]), "left")):
        thinking = grammar.after_thought(tok)
        thinking.check(tok)
        assert thinking.accepts(tok, answer)
        assert thinking.accepts(tok, "<|channel>thought\nFirst {, then}.<channel|>" + answer)
        assert not thinking.accepts(tok, "<|channel>thought\nhm<channel|>zzz")
        assert not grammar.accepts(tok, "<|channel>thought\nhm<channel|>" + answer)
