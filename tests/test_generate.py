"""Generation: token-for-token parity with transformers' generate, and the engine's own guarantees."""

from __future__ import annotations

import pytest
import torch

from conftest import randomize, tiny_config
from dgemma.generate import AR, DIFFUSION, Commit, Done, Draft, GenerationError, GenerationParams, generate
from dgemma.model import DiffusionGemma
from dgemma.sampler import SamplerConfig
from dgemma.weights import save_model


class CharTokenizer:
    """A stand-in tokenizer for tiny vocabularies: token t decodes to one letter."""

    eos_ids = frozenset({1, 106, 50})

    def decode(self, ids, skip_special=False):
        return "".join(chr(97 + t % 26) for t in ids)


@pytest.fixture(scope="module")
def model():
    return randomize(DiffusionGemma(tiny_config("a")), seed=11).eval()


def _prompt(model, n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.cfg.vocab_size, (n,), generator=g).tolist()


# ---------------------------------------------------------------- parity with transformers
@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    out = {}
    for name, seed in (("a", 21), ("b", 22)):
        ours = randomize(DiffusionGemma(tiny_config(name)), seed=seed).eval()
        with torch.no_grad():  # sharper logits so that acceptance and early stopping really happen
            ours.embed_tokens.weight.mul_(4.0)
        d = tmp_path_factory.mktemp(f"gen_{name}")
        save_model(ours, d)
        hf = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(d, dtype=torch.float32).eval()
        out[name] = (ours, hf)
    return out


@pytest.mark.parametrize("name", ["a", "b"])
@pytest.mark.parametrize("sampler", [
    dict(max_denoising_steps=6, entropy_bound=0.1, t_min=0.4, t_max=0.8, stability_threshold=1,
         confidence_threshold=0.005),
    dict(max_denoising_steps=5, entropy_bound=2.0, t_min=0.2, t_max=0.5, stability_threshold=1,
         confidence_threshold=3.0),
    dict(max_denoising_steps=4, entropy_bound=0.5, t_min=0.3, t_max=0.9, stability_threshold=0,
         confidence_threshold=1.5),
])
def test_matches_transformers_generate(hf_pair, name, sampler):
    ours, hf = hf_pair[name]
    T = ours.cfg.canvas_length
    prompt = _prompt(ours, n=2 * ours.cfg.sliding_window + 1, seed=5)
    max_new = 3 * T
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    hf_kw = {k: v for k, v in sampler.items() if k != "entropy_bound"}
    hf_kw["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=sampler["entropy_bound"])
    for seed in (0, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new, **hf_kw).sequences[0, len(prompt):]
        ref = ref.tolist()
        cut = next((i for i, t in enumerate(ref) if t in (1, 106, 50)), None)
        ref_tokens = ref[:cut] if cut is not None else ref[:max_new]
        params = GenerationParams(max_new_tokens=max_new, sampler=SamplerConfig(**sampler), seed=seed,
                                  rng="reference")
        got = generate(ours, [prompt], params)[0]
        assert got.tokens == ref_tokens, f"seed {seed}"
        assert got.finish_reason == ("stop" if cut is not None else "length")



class _VllmCut:
    """The oracle for dgemma's diffusion cut: transformers' own MinP, TopK and TopP warpers applied in vLLM's
    order to the temperature-scaled logits (transformers' schedule, from cur_step = steps remaining); the tokens
    they cut get -inf in the raw logits, which generate's temperature processor then divides."""

    def __init__(self, sampler, top_k=0, top_p=1.0, min_p=0.0):
        from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.t = (sampler["t_min"], sampler["t_max"], sampler["max_denoising_steps"])
        self.warpers = [w for w in (MinPLogitsWarper(min_p) if min_p else None,
                                    TopKLogitsWarper(top_k) if top_k else None,
                                    TopPLogitsWarper(top_p) if top_p < 1 else None) if w is not None]

    def __call__(self, input_ids, scores, cur_step):
        t_min, t_max, n = self.t
        x = scores / (t_min + ((t_max - t_min) * (cur_step / n)))
        x = x.reshape(-1, x.shape[-1])  # the warpers take [positions, vocab]
        for w in self.warpers:
            x = w(input_ids, x)
        return scores.masked_fill(x.view(scores.shape) == float("-inf"), float("-inf"))


@pytest.mark.parametrize("cut", [dict(top_k=3), dict(top_p=0.7), dict(min_p=0.1),
                                 dict(min_p=0.02, top_k=8, top_p=0.9)])
def test_diffusion_cut_matches_transformers(hf_pair, cut):
    """min_p / top_k / top_p on a diffusion step, as vLLM applies them (after temperature; the sample, the
    entropies and self-conditioning see the cut distribution): token for token what transformers' generate
    gives with its own warpers doing that cut as a logits processor."""
    from transformers import LogitsProcessorList
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    ours, hf = hf_pair["a"]
    sampler = dict(max_denoising_steps=6, entropy_bound=0.5, t_min=0.4, t_max=0.8, stability_threshold=1,
                   confidence_threshold=0.005)
    prompt = _prompt(ours, n=12, seed=5)
    max_new = 2 * ours.cfg.canvas_length
    hf_kw = {k: v for k, v in sampler.items() if k != "entropy_bound"}
    hf_kw["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=sampler["entropy_bound"])
    torch.manual_seed(0)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new, **hf_kw,
                          logits_processor=LogitsProcessorList([_VllmCut(sampler, **cut)])).sequences[0, len(prompt):]
    ref = ref.tolist()
    cut_at = next((i for i, t in enumerate(ref) if t in (1, 106, 50)), len(ref))
    params = GenerationParams(max_new_tokens=max_new, sampler=SamplerConfig(**sampler), seed=0, rng="reference",
                              **cut)
    got = generate(ours, [prompt], params)[0]
    assert got.tokens == ref[:cut_at]
    plain = GenerationParams(max_new_tokens=max_new, sampler=SamplerConfig(**sampler), seed=0, rng="reference")
    assert generate(ours, [prompt], plain)[0].tokens != got.tokens  # the cut is not a no-op here


# ---------------------------------------------------------------- engine guarantees
def test_events_and_stats(model):
    T = model.cfg.canvas_length
    params = GenerationParams(max_new_tokens=2 * T, sampler=SamplerConfig(max_denoising_steps=5), ignore_eos=True)
    evs = list(generate(model, [_prompt(model)], params, drafts=True, events=True))
    drafts = [e for e in evs if isinstance(e, Draft)]
    commits = [e for e in evs if isinstance(e, Commit)]
    done = [e for e in evs if isinstance(e, Done)]
    assert len(commits) == 2 and len(done) == 1 and isinstance(evs[-1], Done)
    assert len(drafts) == sum(c.steps for c in commits) == done[0].stats["decoder_passes"]
    assert all(len(d.tokens) == T and len(d.accepted) == T for d in drafts)
    assert drafts[0].step == 1 and any(d.canvas == 1 for d in drafts)
    st = done[0].stats
    assert st["completion_tokens"] == 2 * T and st["canvases"] == 2
    assert st["tokens_per_forward"] == pytest.approx(2 * T / st["decoder_passes"])
    assert done[0].tokens == commits[0].tokens + commits[1].tokens
    last = [max((d for d in drafts if d.canvas == c), key=lambda d: d.step).mean_entropy for c in (0, 1)]
    assert st["final_mean_entropy_per_canvas"] == last  # each canvas's confidence when it stopped


def test_restarts(model):
    """A canvas that spends its whole budget without the early stop starts again from fresh noise (`restarts`):
    every attempt's steps count, the output is the attempt the model was surest of (lowest final mean entropy),
    the first attempt is the plain sampler's, and the row stays seeded and batch-invariant."""
    T = model.cfg.canvas_length
    base = SamplerConfig(max_denoising_steps=4)  # this random model never gets under 0.005 mean entropy
    p = _prompt(model)
    prm = GenerationParams(max_new_tokens=2 * T, ignore_eos=True, seed=5, sampler=base.replace(restarts=2))
    evs = list(generate(model, [p], prm, drafts=True, events=True))
    drafts = [e for e in evs if isinstance(e, Draft)]
    commits = [e for e in evs if isinstance(e, Commit)]
    done = evs[-1]
    st = done.stats
    assert st["restarts_per_canvas"] == [2, 2] and st["steps_per_canvas"] == [12, 12]
    assert st["decoder_passes"] == len(drafts) == 24 and [c.steps for c in commits] == [12, 12]
    for c in (0, 1):
        ends = [max((d for d in drafts if d.canvas == c and d.attempt == a), key=lambda d: d.step) for a in range(3)]
        assert [e.step for e in ends] == [4, 4, 4]
        assert len({tuple(e.tokens) for e in ends}) == 3  # fresh noise: three different canvases
        best = min(ends, key=lambda d: d.mean_entropy)
        assert commits[c].tokens == best.tokens
        assert st["final_mean_entropy_per_canvas"][c] == best.mean_entropy
    plain = [e for e in generate(model, [p], prm.replace(sampler=base), drafts=True, events=True)
             if isinstance(e, Draft) and e.canvas == 0]
    assert [d.tokens for d in drafts if d.canvas == 0 and d.attempt == 0] == [d.tokens for d in plain]
    other = GenerationParams(max_new_tokens=T, seed=9, sampler=base.replace(restarts=1))
    assert generate(model, [_prompt(model, 5, 1), p], [other, prm])[1].tokens == done.tokens
    # a canvas that stops early is never restarted, and without the early stop there is nothing to miss
    sure = base.replace(stability_threshold=0, confidence_threshold=50.0)
    d = generate(model, [p], prm.replace(sampler=sure.replace(restarts=2)))[0]
    assert d.stats["restarts_per_canvas"] == [0, 0] and d.stats["steps_per_canvas"] == [1, 1]
    assert d.tokens == generate(model, [p], prm.replace(sampler=sure))[0].tokens
    d = generate(model, [p], prm.replace(sampler=base.replace(confidence_threshold=0.0, restarts=2)))[0]
    assert d.stats["steps_per_canvas"] == [4, 4] and d.stats["restarts_per_canvas"] == [0, 0]


def test_seeded_determinism_and_batch_invariance(model):
    params = [GenerationParams(max_new_tokens=40, seed=s, sampler=SamplerConfig(max_denoising_steps=6))
              for s in (3, 4, 5)]
    prompts = [_prompt(model, n, seed=n) for n in (4, 17, 9)]
    alone = [generate(model, [p], prm)[0].tokens for p, prm in zip(prompts, params)]
    batch = [d.tokens for d in generate(model, prompts, params)]
    assert batch == alone
    again = generate(model, [prompts[0]], params[0])[0].tokens
    assert again == alone[0]
    other = generate(model, [prompts[0]], params[0].replace(seed=99))[0].tokens
    assert other != alone[0]


def test_rows_finish_on_their_own(model):
    """One row stops after one canvas, the other runs three; the short row's result is unchanged."""
    T = model.cfg.canvas_length
    p = _prompt(model)
    short = GenerationParams(max_new_tokens=T, ignore_eos=True, sampler=SamplerConfig(max_denoising_steps=3))
    long = GenerationParams(max_new_tokens=3 * T, ignore_eos=True, seed=1, sampler=SamplerConfig(max_denoising_steps=3))
    a, b = generate(model, [p, p], [short, long])
    assert len(a.tokens) == T and len(b.tokens) == 3 * T
    assert a.tokens == generate(model, [p], short)[0].tokens


def test_max_new_tokens_cuts_inside_a_canvas(model):
    T = model.cfg.canvas_length
    d = generate(model, [_prompt(model)], GenerationParams(max_new_tokens=T + 5, ignore_eos=True,
                                                             sampler=SamplerConfig(max_denoising_steps=3)))[0]
    assert len(d.tokens) == T + 5 and d.finish_reason == "length" and d.stats["canvases"] == 2


def test_eos_cut(model):
    """An EOS fixed at canvas position 5: the output is the 5 tokens before it and the row stops."""
    fixed = {0: 7, 1: 8, 2: 9, 3: 10, 4: 11, 5: 106}
    params = GenerationParams(max_new_tokens=100, fixed=fixed, sampler=SamplerConfig(max_denoising_steps=4))
    d = generate(model, [_prompt(model)], params)[0]
    assert d.tokens == [7, 8, 9, 10, 11] and d.finish_reason == "stop" and d.stats["canvases"] == 1


def test_infill_fixed_positions_never_change(model):
    T = model.cfg.canvas_length
    fixed = {0: 7, 1: 8, T - 2: 9, T - 1: 10}
    params = GenerationParams(max_new_tokens=T, fixed=fixed, ignore_eos=True,
                              sampler=SamplerConfig(max_denoising_steps=6))
    evs = list(generate(model, [_prompt(model)], params, drafts=True, events=True))
    for d in (e for e in evs if isinstance(e, Draft)):
        assert all(d.tokens[p] == t for p, t in fixed.items())
        assert all(d.accepted[p] for p in fixed)
    out = evs[-1].tokens
    assert all(out[p] == t for p, t in fixed.items())


@pytest.mark.parametrize("mode", [DIFFUSION, AR])
def test_allowed_tokens_constrain_every_draw(model, mode):
    """`allowed` bans every other token at its positions of the first canvas: drafts and output obey it, in a
    batch beside an unconstrained row that it does not change; the second canvas is free."""
    T, V = model.cfg.canvas_length, model.cfg.vocab_size
    g = torch.Generator().manual_seed(3)
    allowed = {p: torch.randperm(V - 3, generator=g)[:3].add(3).tolist() for p in range(0, T, 2)}
    sampler = SamplerConfig(max_denoising_steps=5)
    free = GenerationParams(max_new_tokens=2 * T, ignore_eos=True, sampler=sampler, mode=mode)
    params = free.replace(allowed=allowed, seed=1)
    evs = list(generate(model, [_prompt(model), _prompt(model, seed=1)], [params, free.replace(seed=2)],
                        drafts=True, events=True))
    for d in (e for e in evs if isinstance(e, Draft) and e.request == 0 and e.canvas == 0):
        assert all(d.tokens[p] in ok for p, ok in allowed.items())
    out = next(e for e in evs if isinstance(e, Done) and e.request == 0).tokens
    assert all(out[p] in ok for p, ok in allowed.items())
    alone = generate(model, [_prompt(model, seed=1)], free.replace(seed=2))[0].tokens
    assert next(e for e in evs if isinstance(e, Done) and e.request == 1).tokens == alone
    unconstrained = generate(model, [_prompt(model)], free.replace(seed=1))[0].tokens
    assert any(unconstrained[p] not in ok for p, ok in allowed.items())  # the constraint did something


@pytest.mark.parametrize("mode", [DIFFUSION, AR])
def test_logit_bias(model, mode):
    """-100 bans a token everywhere (every canvas), +100 forces one; a biased row leaves its batch neighbour
    alone; the reported logprobs include the bias."""
    T = model.cfg.canvas_length
    free = GenerationParams(max_new_tokens=2 * T, ignore_eos=True, sampler=SamplerConfig(max_denoising_steps=5),
                            mode=mode, seed=1)
    base = generate(model, [_prompt(model)], free)[0].tokens
    common = max(set(base), key=base.count)
    banned = generate(model, [_prompt(model)], free.replace(logit_bias={common: -100}))[0].tokens
    assert base.count(common) > 1 and common not in banned
    forced, other = generate(model, [_prompt(model), _prompt(model, seed=1)],
                             [free.replace(logit_bias={7: 100.0}, logprobs=0), free.replace(seed=2)])
    assert forced.tokens == [7] * (2 * T) and max(forced.logprobs) > -1e-3
    assert other.tokens == generate(model, [_prompt(model, seed=1)], free.replace(seed=2))[0].tokens
    for bias, msg in (({10**6: 1.0}, "not a token id"), ({5: 101}, "from -100 to 100"), ({5: "x"}, "number")):
        with pytest.raises(GenerationError, match=msg):
            generate(model, [_prompt(model)], free.replace(logit_bias=bias))


@pytest.mark.parametrize("mode", [DIFFUSION, AR])
def test_penalties(model, mode):
    """presence/frequency penalties push the output away from tokens it already holds: for diffusion those of the
    canvases committed before (the first canvas is unchanged), for AR those before each token."""
    T = model.cfg.canvas_length
    free = GenerationParams(max_new_tokens=3 * T, ignore_eos=True, sampler=SamplerConfig(max_denoising_steps=5),
                            mode=mode, seed=1)
    base = generate(model, [_prompt(model)], free)[0].tokens
    pen = generate(model, [_prompt(model)], free.replace(presence_penalty=2.0, frequency_penalty=2.0))[0].tokens
    repeats = lambda toks: len(toks) - len(set(toks))  # noqa: E731
    assert repeats(pen) < repeats(base)
    if mode == DIFFUSION:
        assert pen[:T] == base[:T] and pen[T:] != base[T:]
    neg = generate(model, [_prompt(model)], free.replace(frequency_penalty=-2.0))[0].tokens
    assert repeats(neg) > repeats(base)  # a negative penalty favours repeats
    for name in ("presence_penalty", "frequency_penalty"):
        with pytest.raises(GenerationError, match="from -2 to 2"):
            generate(model, [_prompt(model)], free.replace(**{name: 2.5}))


def test_fused_path_adds_biases_as_the_plain_path_does(model):
    """logit_bias and penalties no longer force materialised logits: the fused head adds them block by block,
    with the same tokens and logprobs as the plain path, next to an unbiased row."""
    T = model.cfg.canvas_length
    params = [GenerationParams(max_new_tokens=2 * T, seed=s, ignore_eos=True, logprobs=2,
                               sampler=SamplerConfig(max_denoising_steps=5, entropy_bound=0.5)) for s in (1, 2, 3)]
    params[0] = params[0].replace(logit_bias={5: 3.0, 9: -2.5})
    params[1] = params[1].replace(presence_penalty=0.7, frequency_penalty=0.4)
    _fused_is_plain(model, [_prompt(model, 7), _prompt(model, 12, seed=3), _prompt(model, 5, seed=4)], params)


def _fused_is_plain(model, prompts, params) -> list[Done]:
    """The fused head's results for these rows (in one batch) are the plain path's: tokens, logprobs, entropies."""
    plain = generate(model, prompts, params, fused_head=False)
    fused = generate(model, prompts, params, fused_head=True)
    assert [d.tokens for d in fused] == [d.tokens for d in plain]
    assert [d.logprobs for d in fused] == [d.logprobs for d in plain]
    for a, b in zip(fused, plain):
        assert a.entropies == pytest.approx(b.entropies, abs=1e-5)
    return plain


@pytest.mark.parametrize("allowed,msg", [({-1: [5]}, "outside the canvas"), ({0: []}, "non-empty"),
                                         ({0: [10**6]}, "non-empty"), ({0: "ab"}, "non-empty")])
def test_allowed_tokens_are_validated(model, allowed, msg):
    with pytest.raises(GenerationError, match=msg):
        generate(model, [_prompt(model)], GenerationParams(max_new_tokens=4, allowed=allowed))


def test_warm_start_canvas(model):
    T = model.cfg.canvas_length
    init = list(range(10, 10 + T))
    a = generate(model, [_prompt(model)], GenerationParams(max_new_tokens=T, init_canvas=init, ignore_eos=True,
                                                             sampler=SamplerConfig(max_denoising_steps=2)))[0]
    b = generate(model, [_prompt(model)], GenerationParams(max_new_tokens=T, ignore_eos=True,
                                                             sampler=SamplerConfig(max_denoising_steps=2)))[0]
    assert a.tokens != b.tokens  # the first decoder pass saw a different canvas


def test_stop_strings(model):
    tok = CharTokenizer()
    params = GenerationParams(max_new_tokens=60, ignore_eos=True, sampler=SamplerConfig(max_denoising_steps=3))
    full = generate(model, [_prompt(model)], params, tokenizer=tok)[0]
    stop = full.text[20:23]
    first = full.text.find(stop)
    d = generate(model, [_prompt(model)], params.replace(stop=(stop,)), tokenizer=tok)[0]
    assert d.finish_reason == "stop" and d.text == full.text[:first]
    assert tok.decode(d.tokens) == d.text


@torch.no_grad()
def test_ar_greedy_matches_full_recompute(model):
    """AR decoding through the KV cache equals re-encoding the whole sequence for every token."""
    p = _prompt(model, n=21)
    d = generate(model, [p], GenerationParams(max_new_tokens=12, mode=AR, ignore_eos=True))[0]
    seq = list(p)
    for _ in range(12):
        logits = model(torch.tensor([seq]))  # no cache: causal over everything
        seq.append(int(logits[0, -1].argmax()))
    assert d.tokens == seq[len(p):]
    assert d.stats["tokens_per_forward"] == pytest.approx(1.0)


def test_ar_sampled_is_seeded(model):
    p = _prompt(model)
    params = GenerationParams(max_new_tokens=10, mode=AR, ar_temperature=1.0, ignore_eos=True, seed=3)
    assert generate(model, [p], params)[0].tokens == generate(model, [p], params)[0].tokens


@pytest.mark.parametrize("prompt,params,msg", [
    ([], GenerationParams(), "prompt is empty"),
    ([5] * 1000, GenerationParams(max_new_tokens=100), "exceeds the context"),
    ([5], GenerationParams(max_new_tokens=-1), "max_new_tokens must be a non-negative integer"),
    ([5], GenerationParams(fixed={999: 3}), "outside the canvas"),
    ([5], GenerationParams(mode="beam"), "mode must be"),
])
def test_bad_requests(model, prompt, params, msg):
    with pytest.raises(GenerationError, match=msg):
        generate(model, [prompt], params)


@pytest.mark.parametrize("kw,msg", [
    (dict(max_denoising_steps=0), "max_denoising_steps"),
    (dict(entropy_bound=-1.0), "entropy_bound"),
])
def test_bad_sampler_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplerConfig(**kw)


def test_unknown_sampler_option():
    with pytest.raises(ValueError, match="unknown"):
        SamplerConfig().replace(temprature=1.0)


def test_pipeline_options(model):
    from dgemma.pipeline import Pipeline

    pipe = Pipeline(model, generation_config={"max_denoising_steps": 7, "sampler_config": {"entropy_bound": 0.3}})
    params = pipe.params(steps=5, seed=2, stop="x")
    assert params.sampler.max_denoising_steps == 5 and params.sampler.entropy_bound == 0.3
    assert params.stop == ("x",) and params.seed == 2
    with pytest.raises(GenerationError, match="unknown option 'temprature'"):
        pipe.params(temprature=1.0)
    with pytest.raises(GenerationError, match="entropy_bound must be >= 0"):
        pipe.params(entropy_bound=-0.5)


def test_fast_path_equals_plain_path(model):
    """The LM head fused into the sampler (default) gives the tokens of materialised logits + sampler, also
    with fixed (infill) positions and several rows."""
    T = model.cfg.canvas_length
    params = [GenerationParams(max_new_tokens=2 * T, seed=s, ignore_eos=True,
                               sampler=SamplerConfig(max_denoising_steps=5, entropy_bound=0.5))
              for s in (1, 2)]
    params[1] = params[1].replace(fixed={0: 5, T - 1: 6})
    prompts = [_prompt(model, 7), _prompt(model, 12, seed=3)]
    plain = [d.tokens for d in generate(model, prompts, params, fused_head=False)]
    assert [d.tokens for d in generate(model, prompts, params, fused_head=True)] == plain
    assert [d.tokens for d in generate(model, prompts, params)] == plain  # auto: plain at this vocabulary


@pytest.mark.parametrize("fused_head", [False, True])
def test_last_budgeted_step_skips_the_soft_embedding(model, monkeypatch, fused_head):
    """A canvas's last budgeted step conditions no later step, so the engine asks the sampler for no soft
    embedding there (a [canvas, V] x [V, H] matmul saved); every other step gets one, with fixed positions too."""
    import dgemma.sampler as S

    steps, seen = 3, []
    for name in ("fused_step", "fused_head_step"):
        real = getattr(S, name)

        def spy(*a, _real=real, **kw):
            out = _real(*a, **kw)
            seen.append(out.sc_embedding is not None)
            return out

        monkeypatch.setattr(S, name, spy)
    T = model.cfg.canvas_length
    params = GenerationParams(max_new_tokens=2 * T, seed=4, ignore_eos=True, fixed={0: 5},
                              sampler=SamplerConfig(max_denoising_steps=steps, confidence_threshold=0.0))
    generate(model, [_prompt(model)], params, fused_head=fused_head)
    assert seen == [True, True, False] * 2  # two canvases, each running all its steps


@pytest.mark.parametrize("mode", [DIFFUSION, AR])
def test_logprobs(model, mode):
    """Each output token gets its log-probability under the model's raw distribution and the most likely tokens
    there: the same on the fused and the plain path, the emitted token first among them (diffusion emits the
    draft, greedy AR the argmax), one-hot at fixed positions, and asking for them changes no token."""
    T = model.cfg.canvas_length
    sampler = SamplerConfig(max_denoising_steps=5, entropy_bound=0.5)
    base = [GenerationParams(max_new_tokens=T + 5, seed=s, ignore_eos=True, sampler=sampler, mode=mode)
            for s in (1, 2)]
    if mode == DIFFUSION:
        base[1] = base[1].replace(fixed={3: 5, T - 1: 6})
    prompts = [_prompt(model, 7), _prompt(model, 12, seed=3)]
    plain = generate(model, prompts, base)
    asked = [p.replace(logprobs=3) for p in base[:1]] + [base[1].replace(logprobs=0)]
    runs = [generate(model, prompts, asked, fused_head=f) for f in (False, True)]
    for fused in runs:
        assert [d.tokens for d in fused] == [d.tokens for d in plain]
        assert all(d.logprobs is None for d in plain)
        a, b = fused
        assert len(a.logprobs) == len(a.top_logprobs) == len(a.tokens) == T + 5
        assert all(lp <= 0 for lp in a.logprobs) and all(len(t) == 3 for t in a.top_logprobs)
        for tok, lp, top in zip(a.tokens, a.logprobs, a.top_logprobs):
            assert top[0][0] == tok and top[0][1] == pytest.approx(lp, abs=1e-6)
            assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        assert b.top_logprobs == [[] for _ in b.tokens]
        # each token's raw entropy: at least what its own log-probability leaves room for, never negative
        assert len(a.entropies) == len(a.tokens) and all(h >= -1e-5 for h in a.entropies)
        if mode == DIFFUSION:
            assert b.logprobs[3] == 0.0 and b.logprobs[T - 1] == 0.0
            assert b.entropies[3] == 0.0 and b.entropies[T - 1] == 0.0  # one-hot: nothing else possible
    for x, y in zip(*runs):
        assert x.top_logprobs == y.top_logprobs
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)
        assert x.entropies == pytest.approx(y.entropies, abs=1e-4)
    events = list(generate(model, prompts[:1], asked[0], events=True))
    commits = [e for e in events if isinstance(e, Commit)]
    assert sum((e.logprobs for e in commits), []) == events[-1].logprobs
    assert sum((e.entropies for e in commits), []) == events[-1].entropies
    if mode == AR:  # greedy AR: the entropy of the model's next-token distribution, recomputed without a cache
        seq = prompts[0] + events[-1].tokens
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[0, len(prompts[0]) - 1:-1]
        want = torch.distributions.Categorical(logits=logits.float()).entropy()
        assert events[-1].entropies == pytest.approx(want.tolist(), abs=1e-3)
    with pytest.raises(GenerationError, match="logprobs must be"):
        generate(model, prompts[:1], base[0].replace(logprobs=21))


def test_prompt_logprobs_and_scoring_only(model):
    """prompt_logprobs: each prompt token's log-probability given the ones before it, from the prefill (checked
    against a cache-free causal forward), long prompts in chunks; max_new_tokens=0 scores the prompt alone."""
    prompt = _prompt(model, 40, seed=5)
    ref = torch.log_softmax(model(torch.tensor([prompt]))[0, :-1].double(), -1)
    want = ref.gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]
    for mode, new in ((DIFFUSION, 0), (DIFFUSION, 5), (AR, 0), (AR, 3)):
        d = generate(model, [prompt], GenerationParams(max_new_tokens=new, prompt_logprobs=2, mode=mode,
                                                       ignore_eos=True))[0]
        assert len(d.tokens) == new and d.prompt_logprobs[0] is None and d.prompt_top_logprobs[0] == []
        assert d.prompt_logprobs[1:] == pytest.approx(want.tolist(), abs=1e-4)
        assert [t[0][0] for t in d.prompt_top_logprobs[1:]] == ref.argmax(-1).tolist()
    from dgemma.generate import Engine

    small = Engine(model, max_rows=1)
    small.PROMPT_CHUNK = 7  # several chunks: the same values
    d = next(e for e in small.run([prompt], GenerationParams(max_new_tokens=0, prompt_logprobs=0))
             if isinstance(e, Done))
    assert d.prompt_logprobs[1:] == pytest.approx(want.tolist(), abs=1e-4) and d.prompt_top_logprobs[1] == []



def test_load_adaptive_step_budget(model):
    """Engine(adaptive_steps=(R, M)): a canvas starting while more than R diffusion rows are in the engine gets
    round(N * R / rows) of its N steps, at least M; rows that opt out keep N; at R rows or fewer nothing changes."""
    from dgemma.generate import Engine

    T = model.cfg.canvas_length
    base = GenerationParams(max_new_tokens=2 * T, ignore_eos=True, seed=3,
                            sampler=SamplerConfig(max_denoising_steps=8, confidence_threshold=0.0))
    prompts = [_prompt(model, 9, i) for i in range(4)]

    def run(engine, params):
        done = {e.request: e for e in engine.run(prompts[:len(params)], params) if isinstance(e, Done)}
        return [done[i] for i in sorted(done)]

    # 4 rows over R = 1: 8 * 1 / 4 = 2 steps per canvas; over R = 2, 4; a row that opts out keeps 8
    out = run(Engine(model, max_rows=4, adaptive_steps=(1, 1)), [base] * 3 + [base.replace(adaptive_steps=False)])
    assert [d.stats["steps_per_canvas"] for d in out] == [[2, 2]] * 3 + [[8, 8]]
    assert [d.stats["steps_per_canvas"] for d in run(Engine(model, max_rows=4, adaptive_steps=(2, 1)),
                                                     [base] * 4)] == [[4, 4]] * 4
    assert run(Engine(model, max_rows=4, adaptive_steps=(1, 3)), [base] * 4)[0].stats["steps_per_canvas"] == [3, 3]
    # within R rows: the same tokens as without the budget
    alone = run(Engine(model, max_rows=4, adaptive_steps=(2, 1)), [base] * 2)
    assert [d.tokens for d in alone] == [d.tokens for d in generate(model, prompts[:2], base)]
    assert out[3].tokens == generate(model, prompts[3:], base)[0].tokens  # opted out: as if it ran alone
    with pytest.raises(GenerationError, match="adaptive_steps"):
        Engine(model, max_rows=1, adaptive_steps=(0, 4))


def test_ar_fallback_routes_unsure_canvases_to_ar(model):
    """ar_fallback: a canvas that ends above the entropy threshold is replaced by AR decoding of its span. A random
    model is never sure, so at threshold 0 every span is AR: exactly the tokens of AR decoding of the same weights
    (each span starts from the kept hidden state of the last cached token, as AR does); a high threshold changes
    nothing; stats count the fallbacks."""
    T = model.cfg.canvas_length
    base = GenerationParams(max_new_tokens=2 * T + 3, ignore_eos=True, seed=2,
                            sampler=SamplerConfig(max_denoising_steps=3))
    prompt = _prompt(model, 9)
    ar = generate(model, [prompt], base.replace(mode=AR))[0]
    always = generate(model, [prompt], base.replace(ar_fallback=0.0))[0]
    assert always.tokens == ar.tokens and always.stats["ar_fallback_canvases"] == 3
    assert always.stats["steps_per_canvas"] == [3, 3, 3]  # each canvas was denoised before it was dropped
    never = generate(model, [prompt], base.replace(ar_fallback=1e9))[0]
    assert never.tokens == generate(model, [prompt], base)[0].tokens and never.stats["ar_fallback_canvases"] == 0
    # Next to a plain row, in one batch: each row keeps its own tokens.
    both = generate(model, [prompt, prompt], [base.replace(ar_fallback=0.0), base])
    assert both[0].tokens == ar.tokens and both[1].tokens == never.tokens
    with pytest.raises(GenerationError, match="ar_fallback"):
        generate(model, [prompt], base.replace(ar_fallback=0.0, mode=AR))
    with pytest.raises(GenerationError, match=">= 0"):
        generate(model, [prompt], base.replace(ar_fallback=-1.0))


def test_diffusion_cut(model):
    """A cut to the likeliest token makes every step's distribution one-hot: zero entropy, every position
    accepted, each step's canvas its draft. The draft's logprob stays the raw model's. A row with a cut runs
    through the materialised logits; the rows beside it give the same tokens as without it (batch-invariant)."""
    p, q = _prompt(model), _prompt(model, 7, 1)
    base = GenerationParams(max_new_tokens=2 * model.cfg.canvas_length, ignore_eos=True, seed=4,
                            sampler=SamplerConfig(max_denoising_steps=4))
    for cut in ({"top_k": 1}, {"top_p": 0.0}, {"min_p": 1.0}):
        evs = list(generate(model, [p], base.replace(logprobs=0, **cut), drafts=True, events=True))
        drafts = [e for e in evs if isinstance(e, Draft)]
        assert drafts and all(all(d.accepted) and d.mean_entropy == 0.0 for d in drafts)
        assert all(lp < 0 for lp in evs[-1].logprobs)  # raw log-probabilities, not the cut's (0.0)
    wide = base.replace(top_k=40, top_p=0.95)
    alone = [generate(model, [x], prm)[0].tokens for x, prm in ((p, base), (q, wide))]
    assert [o.tokens for o in generate(model, [p, q], [base, wide])] == alone
    assert alone[1] != generate(model, [q], base)[0].tokens


def test_ar_top_k_top_p_min_p(model):
    """AR sampling cut to the most likely token is greedy decoding, whatever the temperature; a wider cut samples."""
    p = _prompt(model)
    greedy = generate(model, [p], GenerationParams(mode=AR, max_new_tokens=12, ignore_eos=True))[0].tokens
    for cut in ({"top_k": 1}, {"top_p": 0.0}, {"min_p": 1.0}):
        hot = GenerationParams(mode=AR, max_new_tokens=12, ignore_eos=True, ar_temperature=1.5, seed=3, **cut)
        assert generate(model, [p], hot)[0].tokens == greedy
    wide = GenerationParams(mode=AR, max_new_tokens=12, ignore_eos=True, ar_temperature=1.5, seed=3, top_k=50)
    assert generate(model, [p], wide)[0].tokens != greedy
    for bad, msg in (({"top_k": -1}, "top_k"), ({"top_p": 1.5}, "top_p"), ({"min_p": -0.1}, "min_p")):
        with pytest.raises(GenerationError, match=msg):
            generate(model, [p], GenerationParams(mode=AR, max_new_tokens=2, **bad))


# ---------------------------------------------------------------- vLLM's sampling extras
@pytest.mark.parametrize("mode", [DIFFUSION, AR])
def test_repetition_penalty(model, mode):
    """repetition_penalty > 1 pushes the output away from the tokens of the prompt and the output so far, < 1
    towards them; 1 changes nothing; a penalised row leaves its batch neighbour alone."""
    T = model.cfg.canvas_length
    free = GenerationParams(max_new_tokens=3 * T, ignore_eos=True, sampler=SamplerConfig(max_denoising_steps=5),
                            mode=mode, seed=1)
    p = _prompt(model)
    base = generate(model, [p], free)[0].tokens
    assert generate(model, [p], free.replace(repetition_penalty=1.0))[0].tokens == base
    repeats = lambda toks: len(toks) - len(set(toks))  # noqa: E731
    pen, other = generate(model, [p, _prompt(model, seed=1)], [free.replace(repetition_penalty=3.0),
                                                              free.replace(seed=2)])
    assert repeats(pen.tokens) < repeats(base)
    assert other.tokens == generate(model, [_prompt(model, seed=1)], free.replace(seed=2))[0].tokens
    assert repeats(generate(model, [p], free.replace(repetition_penalty=0.3))[0].tokens) > repeats(base)
    for bad in (0, -1.0, float("inf"), "x"):
        with pytest.raises(GenerationError, match="repetition_penalty"):
            generate(model, [p], free.replace(repetition_penalty=bad))


def test_repetition_penalty_is_transformers_processor():
    """A row's logits under repetition_penalty (then presence/frequency penalties, vLLM's order) are those of
    transformers' RepetitionPenaltyLogitsProcessor over prompt + output, then the penalties subtracted."""
    transformers = pytest.importorskip("transformers")
    from dgemma.generate import _Row

    V, T = 300, 8
    prompt, out = [5, 9, 9, 17], [9, 20, 5, 41, 41]
    params = GenerationParams(repetition_penalty=1.7, presence_penalty=0.5, frequency_penalty=0.25,
                              logit_bias={20: 2.0, 33: -1.0})
    row = _Row(0, 0, prompt, params, V, T)
    row.out = list(out)
    row.refresh_penalties()
    logits = torch.randn(T, V, generator=torch.Generator().manual_seed(0)) * 5
    ours = logits.clone()
    row.add_bias(ours)
    want = logits.clone()
    want[:, 20] += 2.0
    want[:, 33] -= 1.0
    proc = transformers.RepetitionPenaltyLogitsProcessor(1.7)
    want = proc(torch.tensor([prompt + out] * T), want)
    for tok in set(out):
        want[:, tok] -= 0.5 + 0.25 * out.count(tok)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", [DIFFUSION, AR])
def test_min_tokens(model, mode):
    """min_tokens bans EOS and the stop tokens until the output holds that many tokens: with EOS forced
    everywhere the output is exactly min_tokens long, across canvases too; stop strings wait as well."""
    T = model.cfg.canvas_length
    eos = GenerationParams(max_new_tokens=3 * T, logit_bias={106: 100.0}, seed=1, mode=mode,
                           sampler=SamplerConfig(max_denoising_steps=4))
    p = _prompt(model)
    assert generate(model, [p], eos)[0].tokens == []
    for n in (5, T + 3):
        d = generate(model, [p], eos.replace(min_tokens=n))[0]
        assert len(d.tokens) == n and d.finish_reason == "stop" and 106 not in d.tokens
    stop = eos.replace(logit_bias={7: 100.0}, stop_token_ids=(7,), ignore_eos=True)
    assert generate(model, [p], stop)[0].tokens == [7]  # the stop token is not special here: kept
    d = generate(model, [p], stop.replace(min_tokens=4))[0]
    assert len(d.tokens) == 5 and d.tokens[4] == 7 and 7 not in d.tokens[:4]
    with pytest.raises(GenerationError, match="at most max_new_tokens"):
        generate(model, [p], eos.replace(min_tokens=3 * T + 1))


@pytest.mark.parametrize("mode", [DIFFUSION, AR])
def test_stop_token_ids(model, mode):
    """A stop token ends the output at its first occurrence, kept in it (not a special token), finish "stop";
    the tokens before it are those of the run without it."""
    T = model.cfg.canvas_length
    free = GenerationParams(max_new_tokens=2 * T, ignore_eos=True, sampler=SamplerConfig(max_denoising_steps=4),
                            mode=mode, seed=1)
    p = _prompt(model)
    base = generate(model, [p], free)[0].tokens
    k = next(i for i in range(3, len(base)) if base[i] not in base[:i])
    d = generate(model, [p], free.replace(stop_token_ids=(base[k],)))[0]
    assert d.tokens == base[:k + 1] and d.finish_reason == "stop"
    with pytest.raises(GenerationError, match="stop_token_ids"):
        generate(model, [p], free.replace(stop_token_ids=(10**6,)))


@pytest.mark.parametrize("mode", [DIFFUSION, AR])
def test_allowed_token_ids(model, mode):
    """allowed_token_ids: only those tokens, at every position of every canvas."""
    T = model.cfg.canvas_length
    free = GenerationParams(max_new_tokens=2 * T, ignore_eos=True, sampler=SamplerConfig(max_denoising_steps=4),
                            mode=mode, seed=1)
    d = generate(model, [_prompt(model)], free.replace(allowed_token_ids=(4, 8, 15, 16, 23, 42)))[0]
    assert len(d.tokens) == 2 * T and set(d.tokens) <= {4, 8, 15, 16, 23, 42}
    with pytest.raises(GenerationError, match="at least one"):
        generate(model, [_prompt(model)], free.replace(allowed_token_ids=()))
    # nothing left to sample is refused up front (it crashed the fused step, and AR wrote a banned token)
    only_ends = free.replace(ignore_eos=False, allowed_token_ids=(1, 106), min_tokens=2)
    with pytest.raises(GenerationError, match="min_tokens leaves nothing"):
        generate(model, [_prompt(model)], only_ends)
    with pytest.raises(GenerationError, match="min_tokens leaves nothing"):
        generate(model, [_prompt(model)], free.replace(allowed_token_ids=(7,), stop_token_ids=(7,), min_tokens=1))
    assert set(generate(model, [_prompt(model)], only_ends.replace(ignore_eos=True))[0].tokens) <= {1, 106}
    with pytest.raises(GenerationError, match=r"allowed\[0\] leaves no token"):
        generate(model, [_prompt(model)], free.replace(allowed_token_ids=(4, 8), allowed={0: [9]}))
    with pytest.raises(GenerationError, match=r"allowed\[1\] leaves no token"):
        generate(model, [_prompt(model)], free.replace(ignore_eos=False, allowed={1: [1]}, min_tokens=2))


@pytest.mark.parametrize("mode", [DIFFUSION, AR])
def test_bad_words(model, mode):
    """bad_words: a one-token word is never sampled (diffusion and AR, fused head or not); a longer one is never
    written either (AR: cut at its last token, the output the same up to where the word began; diffusion: the
    canvas committed left to right, each position's last-token ban known from the output before it)."""
    from collections import Counter

    T = model.cfg.canvas_length
    free = GenerationParams(max_new_tokens=2 * T, ignore_eos=True, sampler=SamplerConfig(max_denoising_steps=4),
                            mode=mode, seed=1)
    plain = generate(model, [_prompt(model)], free)[0].tokens
    common = Counter(plain).most_common(1)[0][0]
    for fused in (True, False):
        d = generate(model, [_prompt(model)], free.replace(bad_words=((common,),)), fused_head=fused)[0]
        assert len(d.tokens) == 2 * T and common not in d.tokens
    k = next(i for i in range(1, len(plain)) if plain[i] != plain[i - 1])  # a pair of two different tokens
    pair = (plain[k - 1], plain[k])
    if mode == DIFFUSION:  # the pairs the plain output holds most, and a triple: none of them written
        pairs = [p for p, _ in Counter(zip(plain, plain[1:])).most_common(3)]
        words = (*pairs, tuple(plain[k - 1:k + 2]))
        for fused in (True, False):
            d = generate(model, [_prompt(model)], free.replace(bad_words=words), fused_head=fused)[0].tokens
            assert len(d) == 2 * T
            assert not any(tuple(d[i:i + len(w)]) == w for w in words for i in range(len(d)))
        d = generate(model, [_prompt(model)], free.replace(bad_words=(pair,)))[0].tokens
        assert all((a, b) != pair for a, b in zip(d, d[1:]))
    else:
        d = generate(model, [_prompt(model)], free.replace(bad_words=(pair,)))[0].tokens
        assert all((a, b) != pair for a, b in zip(d, d[1:])) and d[:k] == plain[:k] and d[k] != plain[k]
    with pytest.raises(GenerationError, match="bad_words must be"):
        generate(model, [_prompt(model)], free.replace(bad_words=((),)))
    # every token the word leaves would finish it: the output ends there
    d = generate(model, [_prompt(model)], free.replace(allowed_token_ids=(4, 5), bad_words=((4, 4), (4, 5))))[0]
    assert d.tokens[-1] == 4 and set(d.tokens) <= {4, 5} and d.finish_reason == "stop"
    with pytest.raises(GenerationError, match="leave no token"):
        generate(model, [_prompt(model)], free.replace(allowed_token_ids=(4,), bad_words=((4,),)))


def test_fused_path_applies_vllm_extras_as_the_plain_path_does(model):
    """repetition_penalty (with and without the other biases), allowed_token_ids and min_tokens in the fused
    head: the plain path's tokens and logprobs, next to a row with none of them."""
    T = model.cfg.canvas_length
    base = GenerationParams(max_new_tokens=2 * T, seed=1, logprobs=2,
                            sampler=SamplerConfig(max_denoising_steps=5, entropy_bound=0.5))
    params = [base.replace(repetition_penalty=1.6, ignore_eos=True),
              base.replace(seed=2, repetition_penalty=0.8, presence_penalty=0.7, logit_bias={5: 3.0},
                           ignore_eos=True),
              base.replace(seed=3, allowed_token_ids=tuple(range(3, 60)), ignore_eos=True),
              base.replace(seed=4, min_tokens=T + 5, logit_bias={106: 6.0}),
              base.replace(seed=5, ignore_eos=True)]
    prompts = [_prompt(model, 7), _prompt(model, 12, seed=3), _prompt(model, 5, seed=4), _prompt(model, 8, seed=5),
               _prompt(model, 6, seed=6)]
    plain = _fused_is_plain(model, prompts, params)
    assert len(plain[3].tokens) >= T + 5


def test_stop_strings_min_tokens_and_include(model):
    """include_stop_str_in_output keeps the stop string; min_tokens skips a match that ends within its text."""
    tok = CharTokenizer()
    params = GenerationParams(max_new_tokens=60, ignore_eos=True, sampler=SamplerConfig(max_denoising_steps=3))
    full = generate(model, [_prompt(model)], params, tokenizer=tok)[0].text
    stop = full[20:22]
    first = full.find(stop)
    d = generate(model, [_prompt(model)], params.replace(stop=(stop,), include_stop_str_in_output=True),
                 tokenizer=tok)[0]
    assert d.finish_reason == "stop" and d.text == full[:first + 2]
    d = generate(model, [_prompt(model)], params.replace(stop=(stop,), min_tokens=first + 2), tokenizer=tok)[0]
    later = full.find(stop, first + 1)
    assert d.text == (full[:later] if later >= 0 else full)


def test_partial_warm_start_is_the_draft_over_the_canvas_noise(model):
    """init_canvas shorter than the canvas: its tokens at the first positions, the rest the noise the row would
    have drawn anyway, so a draft of k tokens runs exactly as the full canvas made of them and that noise."""
    from dgemma.sampler import canvas_seed, fused_init_canvas

    T = model.cfg.canvas_length
    params = GenerationParams(max_new_tokens=T, ignore_eos=True, seed=5, sampler=SamplerConfig(max_denoising_steps=3))
    draft = [7, 8, 9, 10, 11]
    noise = fused_init_canvas([torch.Generator().manual_seed(canvas_seed(5, 0))], T, model.cfg.vocab_size)[0]
    full = draft + noise[len(draft):].tolist()
    a = generate(model, [_prompt(model)], params.replace(init_canvas=draft))[0]
    b = generate(model, [_prompt(model)], params.replace(init_canvas=full))[0]
    c = generate(model, [_prompt(model)], params)[0]
    assert a.tokens == b.tokens != c.tokens
    for bad in ([], [1] * (T + 1)):
        with pytest.raises(GenerationError, match="init_canvas must hold"):
            generate(model, [_prompt(model)], params.replace(init_canvas=bad))


def test_predicted_draft_follows_the_output_through_edits():
    """Where the next canvas's draft starts in a prediction: after the output's last tokens wherever they are in
    it (an output that inserted or dropped tokens is found again), the match nearest the hint winning; no match,
    the hint; past the prediction's end, no draft."""
    from dgemma.generate import predicted_draft

    pred = list(range(100, 160))
    assert predicted_draft(pred, [], 0, 8) == (0, pred[:8])
    assert predicted_draft(pred, pred[:20], 20, 8) == (20, pred[20:28])  # followed it
    inserted = pred[:10] + [1, 2, 3] + pred[10:20]  # three tokens more, so the hint (23) is 3 past the end
    assert predicted_draft(pred, inserted, 23, 8) == (20, pred[20:28])
    dropped = pred[:10] + pred[15:30]  # five fewer: the hint (25) is 5 short
    assert predicted_draft(pred, dropped, 25, 8) == (30, pred[30:38])
    assert predicted_draft(pred, [1, 2, 3, 4, 5], 12, 8) == (12, pred[12:20])  # left it: trust the hint
    assert predicted_draft(pred, pred, 60, 8) == (60, [])
    twice = [5, 6, 7, 8, 9] * 4  # repeated text: the occurrence nearest the hint
    assert predicted_draft(twice, [5, 6, 7, 8, 9], 10, 4)[0] == 10


def test_prediction_drafts_every_canvas(model):
    """prediction: the first canvas starts exactly as init_canvas = its first tokens would; every canvas's draft
    is the slice after the output so far, and the stats count the predicted tokens kept where they were put."""
    from dgemma.generate import predicted_draft

    T = model.cfg.canvas_length
    g = torch.Generator().manual_seed(3)
    pred = torch.randint(3, model.cfg.vocab_size, (3 * T,), generator=g).tolist()
    params = GenerationParams(max_new_tokens=3 * T, ignore_eos=True, seed=2,
                              sampler=SamplerConfig(max_denoising_steps=3))
    a = generate(model, [_prompt(model)], params.replace(prediction=pred))[0]
    first = generate(model, [_prompt(model)], params.replace(init_canvas=pred[:T], max_new_tokens=T))[0]
    assert a.tokens[:T] == first.tokens
    at, kept = 0, 0
    for k in range(3):
        at, draft = predicted_draft(pred, a.tokens[:k * T], at, T)
        kept += sum(x == y for x, y in zip(draft, a.tokens[k * T:(k + 1) * T]))
        at += T
    assert a.stats["accepted_prediction_tokens"] == kept
    assert a.stats["rejected_prediction_tokens"] == len(pred) - kept
    assert generate(model, [_prompt(model)], params)[0].stats["accepted_prediction_tokens"] == 0
    for bad, msg in ((dict(prediction=[]), "non-empty"), (dict(prediction=[10 ** 6]), "in the vocabulary"),
                     (dict(prediction=[5], mode=AR), "needs diffusion")):
        with pytest.raises(GenerationError, match=msg):
            generate(model, [_prompt(model)], params.replace(**bad))
