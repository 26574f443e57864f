"""dgemma.sampler vs transformers' DiffusionGemma sampler classes (the oracle), and the fused step's invariances."""

import math
from types import SimpleNamespace as NS

import pytest
import torch
from transformers.generation import LogitsProcessorList
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaGenerationConfig,
    DiffusionGemmaGenerationMixin,
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from dgemma.sampler import (
    SamplerConfig,
    StopState,
    canvas_seed,
    draw,
    draw_step_noise,
    entropy,
    entropy_bound_accept,
    fused_init_canvas,
    fused_step,
    raw_entropy,
    raw_logprobs,
    reference_init_canvas,
    reference_step,
    renoise,
    truncate,
    truncation_floor,
    temperature,
)


def _ref_sampler(cfg: SamplerConfig, canvas_len: int, vocab: int) -> EntropyBoundSampler:
    # EntropyBoundSamplerConfig refuses 0; the bound is only read from the instance, so set it afterwards.
    config = EntropyBoundSamplerConfig(entropy_bound=0.1)
    sampler = EntropyBoundSampler(config, canvas_len, vocab, cfg.max_denoising_steps)
    sampler.entropy_bound = cfg.entropy_bound
    return sampler


def _gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        {"max_denoising_steps": 0},
        {"max_denoising_steps": 2.0},
        {"entropy_bound": -0.1},
        {"t_min": 0.0},
        {"t_min": 0.9, "t_max": 0.8},
        {"stability_threshold": -1},
        {"stability_threshold": True},
        {"confidence_threshold": -1e-3},
        {"t_max": "0.8"},
        {"restarts": -1},
        {"restarts": 17},
        {"restarts": 1.0},
    ],
)
def test_config_validation(bad):
    with pytest.raises(ValueError):
        SamplerConfig(**bad)


def test_config_edges_and_replace():
    cfg = SamplerConfig(entropy_bound=0, t_min=0.5, t_max=0.5, stability_threshold=0, confidence_threshold=0)
    assert cfg.entropy_bound == 0.0 and isinstance(cfg.entropy_bound, float)
    assert SamplerConfig().replace(max_denoising_steps=8).max_denoising_steps == 8
    with pytest.raises(ValueError, match="unknown SamplerConfig field"):
        SamplerConfig().replace(temperature=1.0)
    with pytest.raises(ValueError):
        SamplerConfig().replace(t_min=2.0)


def test_generation_config_round_trip():
    gen = {  # the shape of a checkpoint's generation_config.json, with keys the sampler does not own
        "bos_token_id": 2,
        "eos_token_id": [1, 106, 50],
        "pad_token_id": 0,
        "max_denoising_steps": 32,
        "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.25},
        "t_min": 0.3,
        "t_max": 0.9,
        "stability_threshold": 2,
        "confidence_threshold": 0.01,
        "transformers_version": "5.23.0",
    }
    cfg = SamplerConfig.from_generation_config(gen)
    assert cfg == SamplerConfig(32, 0.25, 0.3, 0.9, 2, 0.01)
    out = cfg.to_generation_config()
    assert SamplerConfig.from_generation_config(out) == cfg
    assert SamplerConfig.from_generation_config({}) == SamplerConfig()
    # transformers itself accepts what we write
    ref = DiffusionGemmaGenerationConfig(**cfg.to_generation_config())
    assert (ref.max_denoising_steps, ref.sampler_config.entropy_bound, ref.t_min, ref.t_max) == (32, 0.25, 0.3, 0.9)
    assert (ref.stability_threshold, ref.confidence_threshold) == (2, 0.01)
    with pytest.raises(ValueError, match="_cls_name"):
        SamplerConfig.from_generation_config({"sampler_config": {"_cls_name": "Other", "entropy_bound": 0.1}})
    # dgemma's own `restarts` is written only when set, so the keys above stay exactly transformers'
    assert "restarts" not in out
    again = cfg.replace(restarts=3)
    assert again.to_generation_config()["restarts"] == 3
    assert SamplerConfig.from_generation_config({**gen, "restarts": 3}) == again


# ----------------------------------------------------------------------------------------------------
# Pure functions vs the reference classes
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, t_min, t_max", [(48, 0.4, 0.8), (7, 0.3, 1.1), (1, 0.5, 0.9)])
def test_temperature_matches_reference_processor(n, t_min, t_max):
    cfg = SamplerConfig(max_denoising_steps=n, t_min=t_min, t_max=t_max)
    proc = LogitsProcessorList([LinearTemperatureScheduleLogitsProcessor(t_min, t_max, n)])
    scores = torch.randn(2, 5, 33, generator=torch.Generator().manual_seed(n)) * 20
    for k in range(1, n + 1):
        # `_denoising_step` passes the step as an int32 tensor
        ref = proc(None, scores, cur_step=torch.tensor(k, dtype=torch.int32))
        assert torch.equal(scores / temperature(k, cfg), ref)
    per_row = temperature(torch.arange(1, n + 1), cfg)
    assert torch.equal(per_row, torch.stack([temperature(k, cfg) for k in range(1, n + 1)]))
    assert per_row[-1].item() == pytest.approx(t_max)
    assert per_row[0].item() == pytest.approx(t_min + (t_max - t_min) / n)


def test_entropy_matches_categorical():
    logits = torch.randn(3, 7, 50, generator=torch.Generator().manual_seed(0)) * 10
    logits[0, 0, :45] = float("-inf")  # masked tokens
    logits[1, 2] = 0.0  # uniform
    ref = torch.distributions.Categorical(logits=logits).entropy()
    assert torch.equal(entropy(logits), ref)
    assert entropy(logits[1, 2]).item() == pytest.approx(math.log(50))


@pytest.mark.parametrize("bound", [0.0, 0.1, 0.7, 5.0])
def test_accept_matches_reference_sampler_with_ties(bound):
    g = torch.Generator().manual_seed(1)
    rows, canvas, vocab = 3, 300, 40
    # Only 6 distinct logit rows: every entropy is tied with ~50 others, and a long row makes the
    # (unstable) CPU sort order differ from a stable one.
    palette = torch.randn(6, vocab, generator=g) * torch.tensor([0.5, 2, 4, 8, 16, 30])[:, None]
    logits = palette[torch.randint(0, 6, (rows, canvas), generator=g)]
    current = torch.randint(0, vocab, (rows, canvas), generator=g)
    denoised = torch.randint(0, vocab, (rows, canvas), generator=g)
    sampler = _ref_sampler(SamplerConfig(entropy_bound=bound), canvas, vocab)
    ref_canvas = sampler.accept_canvas(current, denoised, logits, 1)
    mask = entropy_bound_accept(entropy(logits), bound)
    assert torch.equal(mask, sampler.accepted_token_mask)
    assert torch.equal(torch.where(mask, denoised, current), ref_canvas)
    # the stable order accepts as many tokens; it may pick different members of a tied group
    assert torch.equal(entropy_bound_accept(entropy(logits), bound, stable=True).sum(-1), mask.sum(-1))


def test_accept_hand_computed():
    # Dyadic entropies make every sum exact in float32.
    def acc(h, bound, stable=True):
        return entropy_bound_accept(torch.tensor([h]), bound, stable=stable)[0].tolist()

    assert acc([0.5, 0.25, 1.0], 0.0) == [False, True, False]  # only the lowest
    assert acc([3.0, 2.0, 5.0], 0.0) == [False, True, False]  # the lowest is accepted whatever its entropy
    assert acc([3.0, 2.0, 5.0], 2.0) == [True, True, False]  # 2+3 - 3 <= 2, 2+3+5 - 5 > 2
    assert acc([0.0, 0.0, 0.5, 1.0], 0.0) == [True, True, True, False]  # the max is excluded from the sum
    assert acc([0.25] * 4, 0.25) == [True, True, False, False]  # cut inside a tie: earlier positions first
    assert sum(acc([0.25] * 4, 0.25, stable=False)) == 2
    assert acc([0.25] * 4, 0.75) == [True] * 4
    per_row = entropy_bound_accept(torch.tensor([[1.0, 1.0, 1.0]] * 2), torch.tensor([0.0, 1.0]), stable=True)
    assert per_row.tolist() == [[True, False, False], [True, True, False]]


def test_init_canvas_and_renoise_match_reference():
    rows, canvas, vocab = 2, 9, 77
    sampler = _ref_sampler(SamplerConfig(), canvas, vocab)
    torch.manual_seed(5)
    ref_init = sampler.initialize_canvas(rows, torch.device("cpu"))
    torch.manual_seed(5)
    assert torch.equal(reference_init_canvas(rows, canvas, vocab), ref_init)

    g = torch.Generator().manual_seed(2)
    candidates = torch.randint(0, vocab, (rows, canvas), generator=g)
    current = torch.randint(0, vocab, (rows, canvas), generator=g)
    accepted = torch.rand(rows, canvas, generator=g) < 0.5
    sampler.accepted_token_mask = accepted
    torch.manual_seed(9)
    ref = sampler.renoise_canvas(torch.where(accepted, candidates, current), 1)
    torch.manual_seed(9)
    assert torch.equal(renoise(candidates, accepted, reference_init_canvas(rows, canvas, vocab)), ref)


@pytest.mark.parametrize("stability", [0, 1, 2, 3])
def test_stop_matches_reference_over_canvases(stability):
    g = torch.Generator().manual_seed(stability)
    rows, canvas, vocab = 4, 6, 5
    ref = StableAndConfidentStoppingCriteria(stability_threshold=stability, confidence_threshold=0.05)
    ours = StopState(stability, 0.05)
    seen = set()
    for _ in range(2):  # two canvases, reset in between as `_prepare_denoiser_inputs` does
        ref.reset()
        ours.reset()
        prev = torch.randint(0, vocab, (rows, canvas), generator=g)
        for step in range(8):
            # drafts change rarely, so stability triggers; rows 0-1 are confident, rows 2-3 only sometimes
            change = torch.rand(rows, canvas, generator=g) < 0.15
            draft = torch.where(change, torch.randint(0, vocab, (rows, canvas), generator=g), prev)
            prev = draft
            scale = torch.tensor([60.0, 60.0, 1.0, 60.0 if step % 2 else 1.0])[:, None, None]
            logits = torch.randn(rows, canvas, vocab, generator=g) * scale
            expected = ref(draft, logits)
            assert torch.equal(ours.update(draft, entropy(logits)), expected), (stability, step)
            seen.update(expected.tolist())
    assert seen == {True, False}  # the flags are not trivially constant


def test_stop_earliest_and_row_reset():
    draft = torch.zeros(2, 3, dtype=torch.long)
    h = torch.zeros(2, 3)  # zero entropy: always confident
    stop = StopState(1, 0.005)
    assert stop.update(draft, h).tolist() == [False, False]  # history starts at -1
    assert stop.update(draft, h).tolist() == [True, True]  # second step of a canvas at the earliest
    stop.reset(torch.tensor([True, False]))
    assert stop.update(draft, h).tolist() == [False, True]
    assert StopState(0, 0.005).update(draft, h).tolist() == [True, True]  # confidence only


# ----------------------------------------------------------------------------------------------------
# reference_step vs transformers `_denoising_step`, driven step by step under one global seed
# ----------------------------------------------------------------------------------------------------
def _fake_logits(canvas: torch.Tensor, k: int, table: torch.Tensor) -> torch.Tensor:
    """A deterministic 'decoder' that reads no global RNG: row 0 is confident and stable, the rest are not."""
    logits = table[canvas] + table[k][None, None] * 0.5
    logits[0, :, 3] += 60.0
    return logits


@pytest.mark.parametrize("stability", [None, 0, 1, 2])
def test_reference_step_matches_denoising_step(stability):
    rows, canvas_len, vocab, n = 3, 8, 64, 6
    cfg = SamplerConfig(max_denoising_steps=n, stability_threshold=stability or 0)
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)) * 3
    fake_model = NS(
        config=NS(text_config=NS(vocab_size=vocab)),
        model=NS(decoder=NS(embed_tokens=NS(weight=torch.empty(0, dtype=torch.bfloat16)))),
    )
    sampler = _ref_sampler(cfg, canvas_len, vocab)
    processors = LogitsProcessorList([LinearTemperatureScheduleLogitsProcessor(cfg.t_min, cfg.t_max, n)])
    ref_stop = None if stability is None else StableAndConfidentStoppingCriteria(stability, cfg.confidence_threshold)
    our_stop = None if stability is None else StopState.from_config(cfg)

    def run_reference():
        torch.manual_seed(1234)
        trace = []
        for _ in range(2):  # two canvases
            if ref_stop is not None:
                ref_stop.reset()
            canvas = sampler.initialize_canvas(rows, torch.device("cpu"))
            argmax, sc, finished = canvas, None, torch.zeros(rows, dtype=torch.bool)
            for k in reversed(range(1, n + 1)):
                logits = _fake_logits(canvas, k, table)
                canvas, argmax, sc, finished = DiffusionGemmaGenerationMixin._denoising_step(
                    fake_model,
                    decoder_forward=lambda _l=logits, **_: NS(logits=_l),
                    current_canvas=canvas,
                    argmax_canvas=argmax,
                    input_ids=None,
                    decoder_position_ids=None,
                    self_conditioning_logits=sc,
                    mask_mapping=None,
                    past_key_values=None,
                    finished_denoising=finished.clone(),
                    cur_step=k,
                    sampler=sampler,
                    logits_processor=processors,
                    diffusion_stopping_criteria=ref_stop,
                )
                trace.append((canvas, argmax, sc, finished.clone()))
                if finished.all():
                    break
        return trace, torch.get_rng_state()

    def run_ours():
        torch.manual_seed(1234)
        trace = []
        for _ in range(2):
            if our_stop is not None:
                our_stop.reset()
            canvas = reference_init_canvas(rows, canvas_len, vocab)
            argmax, sc, finished = canvas, None, torch.zeros(rows, dtype=torch.bool)
            for k in reversed(range(1, n + 1)):
                out = reference_step(
                    _fake_logits(canvas, k, table), k, cfg, canvas,
                    argmax_canvas=argmax, sc_logits=sc, finished=finished, stop=our_stop, sc_dtype=torch.bfloat16,
                )  # fmt: skip
                canvas, argmax, sc = out.canvas, out.argmax, out.sc_logits
                finished = finished if out.finished is None else out.finished
                trace.append((canvas, argmax, sc, finished))
                if finished.all():
                    break
        return trace, torch.get_rng_state()

    ref_trace, ref_rng = run_reference()
    our_trace, our_rng = run_ours()
    assert len(our_trace) == len(ref_trace)
    for step, (ours, ref) in enumerate(zip(our_trace, ref_trace)):
        for a, b in zip(ours, ref):
            assert a.dtype == b.dtype and torch.equal(a, b), step
    assert torch.equal(our_rng, ref_rng)  # the same number and order of draws
    if stability is not None:  # row 0 stopped early and was frozen while the others went on
        assert any(f[0] and not f[1:].any() for *_, f in ref_trace)


# ----------------------------------------------------------------------------------------------------
# fused_step
# ----------------------------------------------------------------------------------------------------
ROWS, CANVAS, VOCAB, BLOCK = 3, 16, 1000, 64  # 1000 = 15 full blocks + a ragged one of 40


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(ROWS, CANVAS, VOCAB, generator=g) * 6
    logits[0, :, 7] += 50.0  # a confident row: argmax in the first block
    logits[1, :4, 990] += 40.0  # confident positions whose argmax is in the ragged block
    logits[2, :, 64:128] = float("-inf")  # a fully masked block
    embedding = torch.randn(VOCAB, 12, generator=g)
    return logits, embedding


def test_fused_step_matches_direct_computation():
    cfg = SamplerConfig()
    logits, emb = _case()
    draws = draw_step_noise(_gens(1, 2, 3), CANVAS, VOCAB, block=BLOCK)
    out = fused_step(logits, 10, cfg, draws=draws, embedding=emb, embed_scale=1.5, block=BLOCK)
    processed = logits / temperature(10, cfg)
    assert torch.equal(out.argmax, processed.argmax(-1))
    torch.testing.assert_close(out.entropies, entropy(processed), atol=1e-5, rtol=1e-5)
    assert torch.equal(out.accepted, entropy_bound_accept(out.entropies, cfg.entropy_bound, stable=True))
    assert torch.equal(out.canvas, torch.where(out.accepted, out.candidates, draws[1]))
    assert out.accepted[0].all()  # confident row: everything passes
    assert not ((out.candidates >= 64) & (out.candidates < 128))[2].any()  # masked block never sampled
    direct = torch.softmax(processed, dim=-1) @ emb * 1.5
    assert (out.sc_embedding - direct).abs().max() < 1e-5


@pytest.mark.parametrize("top", [0, 5])
def test_fused_step_logprobs(top):
    """The draft's raw log-probability and the top tokens, block by block, against the materialised formula; and
    asking for them changes nothing else."""
    cfg = SamplerConfig()
    logits, emb = _case(4)
    draws = draw_step_noise(_gens(1, 2, 3), CANVAS, VOCAB, block=BLOCK)
    plain = fused_step(logits, 10, cfg, draws=draws, embedding=emb, block=BLOCK)
    out = fused_step(logits, 10, cfg, draws=draws, embedding=emb, block=BLOCK, logprobs=top)
    for a, b in zip(plain[:6], out[:6]):
        assert torch.equal(a, b)
    lp, ids, top_lp = raw_logprobs(logits, out.argmax, top)
    torch.testing.assert_close(out.logprob, lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logprob, torch.log_softmax(logits, -1).gather(-1, out.argmax[..., None])[..., 0],
                               atol=1e-4, rtol=0)
    assert (out.logprob <= 0).all() and out.logprob[0].gt(-1e-3).all()  # row 0 is confident
    if top:
        assert torch.equal(out.top_ids, ids)
        torch.testing.assert_close(out.top_logprobs, top_lp, atol=1e-5, rtol=0)
        assert torch.equal(out.top_ids[..., 0], out.argmax)  # the draft is the most likely token
        assert (out.top_logprobs.diff(dim=-1) <= 0).all()
        assert not ((out.top_ids >= 64) & (out.top_ids < 128))[2].any()  # masked tokens are never listed
    else:
        assert out.top_ids is None and out.top_logprobs is None
    # the raw entropy, block by block (row 2 has a masked block: -inf entries carry no mass), against the formula
    # over materialised logits and torch's own
    want = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(out.raw_entropy, want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(raw_entropy(logits), want, atol=1e-4, rtol=1e-5)
    assert plain.raw_entropy is None and out.raw_entropy[0].lt(1e-2).all()  # row 0 is confident



def _vllm_cut_keeps(x, top_k, top_p, min_p):
    """What one position keeps, the slow way: min_p, top_k, then top_p over a full sort of what is left."""
    keep = torch.ones_like(x, dtype=torch.bool)
    if min_p:
        keep &= x - x.max() >= math.log(min_p)
    if top_k:
        keep &= x >= x.topk(top_k).values[-1]
    if top_p < 1:
        w, order = (torch.exp(x - x.max()).double() * keep).sort(descending=True)
        nucleus = (w.cumsum(0) - w) < top_p * w.sum()
        nucleus[0] = True
        keep &= x >= x[order[nucleus]].min()
    return keep


@pytest.mark.parametrize("vocab", [50, 1000, 5000])  # 5000: flat rows read past the first 64 and 512 values
def test_truncation_floor(vocab):
    """The diffusion cut's per-position threshold keeps what vLLM's order keeps, and (on positions without ties)
    what `truncate`, AR sampling's cut, keeps of the tokens with any probability."""
    g = torch.Generator().manual_seed(vocab)
    for top_k, top_p, min_p in ((0, 1.0, 0.0), (1, 1.0, 0.0), (7, 1.0, 0.0), (0, 0.0, 0.0), (0, 0.5, 0.0),
                                (0, 0.97, 0.0), (0, 1.0, 0.05), (0, 1.0, 1.0), (40, 0.9, 0.01), (3, 0.6, 0.2)):
        x = torch.randn(6, vocab, generator=g) * torch.tensor([0.05, 0.5, 2, 5, 20, 80])[:, None]
        x[5, :10] = float("-inf")  # banned tokens
        floor = truncation_floor(x, 1.0, top_k, top_p, min_p)
        for i in range(6):
            keep = x[i] >= floor[i]
            assert torch.equal(keep, _vllm_cut_keeps(x[i], top_k, top_p, min_p)), (i, top_k, top_p, min_p)
            assert keep[x[i].argmax()]
            probs = torch.softmax(x[i], -1)  # (entries that underflow to 0 are never drawn either way)
            assert torch.equal(keep & (probs > 0), truncate(probs, top_k, top_p, min_p) > 0)
        if (top_k, top_p, min_p) == (0, 1.0, 0.0):
            assert torch.isneginf(floor).all()


def test_fused_step_floor():
    """A floor cuts the processed logits below it: the step is the step over logits with those entries at -inf
    (sample, entropy, accept, soft embedding), with the draft and the raw log-probabilities unchanged."""
    cfg = SamplerConfig()
    logits, emb = _case(5)
    draws = draw_step_noise(_gens(1, 2, 3), CANVAS, VOCAB, block=BLOCK)
    x = logits / temperature(10, cfg)
    floor = torch.stack([truncation_floor(logits[r], temperature(10, cfg), top_k=5, top_p=0.8)
                         for r in range(ROWS)])
    floor[1] = float("-inf")  # a row without a cut
    out = fused_step(logits, 10, cfg, draws=draws, embedding=emb, block=BLOCK, logprobs=3, floor=floor)
    cut = fused_step(logits.masked_fill(x < floor[..., None], float("-inf")), 10, cfg, draws=draws, embedding=emb,
                     block=BLOCK)
    plain = fused_step(logits, 10, cfg, draws=draws, embedding=emb, block=BLOCK, logprobs=3)
    for a, b in zip(out[:6], cut[:6]):
        assert torch.equal(a, b)
    for a, b in zip(out[6:9], plain[6:9]):
        assert torch.equal(a, b)
    assert torch.equal(out.argmax, plain.argmax)
    for a, b in zip(out[:6], plain[:6]):  # the row without a cut is the plain step's
        assert torch.equal(a[1], b[1])
    assert not torch.equal(out.entropies[2], plain.entropies[2])
    ranks = (x >= x.gather(-1, out.candidates[..., None])).sum(-1)  # each sample's rank in its position
    assert (ranks[[0, 2]] <= 5).all()


def test_fused_step_batch_invariance():
    cfg = SamplerConfig()
    logits, emb = _case(2)
    seeds = (11, 12, 13)
    k = torch.tensor([48, 20, 1])  # rows at different steps
    batch = fused_step(logits, k, cfg, _gens(*seeds), embedding=emb, block=BLOCK)
    for r, seed in enumerate(seeds):
        alone = fused_step(logits[r : r + 1], int(k[r]), cfg, _gens(seed), embedding=emb, block=BLOCK)
        for a, b in zip(alone[:5], batch[:5]):
            assert torch.equal(a[0], b[r])
        torch.testing.assert_close(alone.sc_embedding[0], batch.sc_embedding[r], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("logprobs", [None, 3])
def test_fused_step_cpu_or_accelerator_choices(monkeypatch, logprobs):
    """The CPU keeps the chosen block's rows by index and finds a block's argmax from its zeros (`_first_zero`);
    a GPU keeps them by one select and takes max with its index: the same results, bit for bit."""
    import dgemma.sampler as S

    logits, emb = _case(2)
    logits[1, 5, 200:300] = logits[1, 5].max() + 1  # a tie across block boundaries: the first index wins
    cfg, k = SamplerConfig(), torch.tensor([48, 20, 1])
    cpu = fused_step(logits, k, cfg, _gens(11, 12, 13), embedding=emb, block=BLOCK, logprobs=logprobs)
    assert torch.equal(cpu.argmax, (logits / temperature(k, cfg)[:, None, None]).argmax(-1))
    assert cpu.argmax[1, 5] == 200
    monkeypatch.setattr(S.runtime, "host_reads_free", lambda device: False)
    accel = fused_step(logits, k, cfg, _gens(11, 12, 13), embedding=emb, block=BLOCK, logprobs=logprobs)
    for a, b in zip(cpu, accel):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_raw_logprobs_against_fp64(scale):
    """raw_logprobs' fp32 exp2 sum gives fp64 log_softmax's values to fp32 precision, masked entries included."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 5000, generator=g) * scale
    logits[0, :4000] = float("-inf")
    tokens = torch.tensor([4500, 3, 17, 4999, 0, 2500])
    ref = torch.log_softmax(logits.double(), -1)
    lp, ids, top = raw_logprobs(logits, tokens, 4)
    torch.testing.assert_close(lp.double(), ref.gather(-1, tokens[:, None])[:, 0], atol=1e-5, rtol=1e-6)
    assert torch.equal(ids, logits.topk(4, dim=-1).indices)
    torch.testing.assert_close(top.double(), ref.gather(-1, ids), atol=1e-5, rtol=1e-6)


def test_first_zero_is_max_index():
    """`_first_zero` on `x - max(x)` (scaled) gives torch.max's index: ties (bf16 logits are full of them), -inf
    entries and all -inf rows; a row with no zero (NaN logits) gets 0, a valid index."""
    from dgemma.sampler import _LOG2E, _F32_MIN, _first_zero

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 700, generator=g).bfloat16().float() * 3
    x[1, 5] = x[1, 600] = x[1].max() + 1  # a tie: the first
    x[2, :] = float("-inf")
    x[3, :10] = float("-inf")
    x[4] = 1e-30  # all equal, tiny
    m = x.amax(-1).clamp(min=_F32_MIN)
    d = (x - m[:, None]).mul_(_LOG2E).clamp_(min=_F32_MIN)
    assert torch.equal(_first_zero(d), x.max(dim=-1).indices)
    assert _first_zero(d)[1] == 5 and _first_zero(d)[2] == 0
    assert _first_zero(torch.full((2, 5), float("nan"))).tolist() == [0, 0]


def test_fused_step_sampling_distribution():
    cfg = SamplerConfig(max_denoising_steps=1, t_min=1.0, t_max=1.0)
    vocab, n = 10, 40000
    row = torch.tensor([0.0, 1.0, 2.0, float("-inf"), -1.0, 0.5, 3.0, -3.0, 1.5, 2.5])
    logits = row.expand(1, n, vocab).contiguous()
    out = fused_step(logits, 1, cfg, _gens(7), block=4)  # 3 blocks, the last one ragged
    freq = torch.bincount(out.candidates[0], minlength=vocab).double() / n
    p = torch.softmax(row.double(), dim=-1)
    assert freq[3] == 0
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-9).all(), (freq, p)


def test_fused_step_sampling_distribution_across_chunks():
    """Blocks of several CHUNK-entry chunks (the two-level inverse CDF: the chunk, then the entry in it), a ragged
    last block, and masked entries inside a chunk: every token keeps exactly its share."""
    from dgemma.sampler import CHUNK

    cfg = SamplerConfig(max_denoising_steps=1, t_min=1.0, t_max=1.0)
    vocab, n, block = 5 * CHUNK + 9, 40000, 4 * CHUNK  # 2 blocks: 4 chunks, then 1 ragged chunk of CHUNK + 9
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(3)) * 1.5
    row[CHUNK + 3:CHUNK + 30] = float("-inf")
    logits = row.expand(1, n, vocab).contiguous()
    out = fused_step(logits, 1, cfg, _gens(9), block=block)
    freq = torch.bincount(out.candidates[0], minlength=vocab).double() / n
    p = torch.softmax(row.double(), dim=-1)
    assert freq[CHUNK + 3:CHUNK + 30].sum() == 0
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-9).all()
    assert (freq[p > 5e-3] > 0).all()


def test_fused_step_uniform_edges():
    # u = 0 and the largest u < 1 must both land on tokens with probability > 0. Blocks of 4: token 2 lives
    # in block 0, token 9 in block 2. All-zero uniforms take every block with mass (the last one wins) and the
    # first token in it; uniforms just under 1 keep the first block with mass and its last token with mass.
    cfg = SamplerConfig(max_denoising_steps=1, t_min=1.0, t_max=1.0)
    row = torch.full((12,), float("-inf"))
    row[[2, 9]] = 0.0
    logits = row.expand(1, 2, 12).contiguous()
    u = torch.stack([torch.zeros(4, dtype=torch.float64), torch.full((4,), 1.0 - 2.0**-53, dtype=torch.float64)])[None]
    out = fused_step(logits, 1, cfg, draws=(u, torch.zeros(1, 2, dtype=torch.long)), block=4)
    assert out.candidates.tolist() == [[9, 2]]


def test_fused_rng_protocol_and_no_global_rng():
    gens = _gens(3, 4)
    twins = _gens(3, 4)
    state = torch.get_rng_state()
    uniforms, noise = draw_step_noise(gens, 5, 100)
    assert torch.equal(torch.get_rng_state(), state)
    for r, g in enumerate(twins):  # per row: the uniforms (one per block, plus one), then the renoise tokens
        assert torch.equal(uniforms[r], torch.rand(5, 2, dtype=torch.float64, generator=g))
        assert torch.equal(noise[r], torch.randint(0, 100, (5,), generator=g))
    init = fused_init_canvas(_gens(8, 9), 6, 100)
    assert torch.equal(init[1], torch.randint(0, 100, (6,), generator=torch.Generator().manual_seed(9)))
    logits, _ = _case()
    fused_step(logits, 5, SamplerConfig(), _gens(1, 2, 3), block=BLOCK)
    assert torch.equal(torch.get_rng_state(), state)
    seeds = {canvas_seed(s, c) for s in range(4) for c in range(4)}
    assert len(seeds) == 16 and all(0 <= s < 2**63 for s in seeds)
    assert canvas_seed(3, 1) == canvas_seed(3, 1)


def test_fused_step_has_no_host_sync(monkeypatch):
    # Catches syncs made from Python (.item(), truth tests, tolist); C++-internal syncs need CUDA to detect.
    logits, emb = _case()
    draws = draw_step_noise(_gens(1, 2, 3), CANVAS, VOCAB, block=BLOCK)

    def sync(*_args, **_kwargs):
        raise AssertionError("host sync in fused_step")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    fused_step(logits, torch.tensor([3, 2, 1]), SamplerConfig(), draws=draws, embedding=emb, block=BLOCK)


def test_fused_step_rejects_bad_block():
    logits, _ = _case()
    with pytest.raises(ValueError, match="block must be positive"):
        fused_step(logits, 1, SamplerConfig(), _gens(1, 2, 3), block=0)


def test_fused_head_step_equals_materialised_logits():
    """The LM head fused into the step gives bitwise the results of the model's head + fused_step."""
    from dgemma.model import head_block_logits
    from dgemma.sampler import fused_head_step

    g = torch.Generator().manual_seed(5)
    vocab, hidden, block = 300, 16, 64
    h = torch.randn(2, 8, hidden, generator=g)
    emb = torch.randn(vocab, hidden, generator=g)
    logits = torch.cat([head_block_logits(h.reshape(16, hidden), emb, lo, min(lo + block, vocab), 30.0)
                        for lo in range(0, vocab, block)], dim=-1).view(2, 8, vocab)
    cfg = SamplerConfig()
    draws = draw_step_noise(_gens(1, 2), 8, vocab, block=block)
    ref = fused_step(logits, 7, cfg, draws=draws, embedding=emb, embed_scale=2.0, block=block, logprobs=3)
    keep = torch.tensor([0, 5, 13])  # positions whose logits the pass copies out (the grammar walk's)
    got = fused_head_step(h, emb, 30.0, 7, cfg, draws=draws, embed_scale=2.0, block=block, logprobs=3, keep=keep)
    for name in got._fields:
        if name != "kept_logits":
            assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert ref.kept_logits is None and torch.equal(got.kept_logits, logits.view(16, vocab)[keep])


def test_draw_follows_the_distribution():
    """sampler.draw (AR sampling, the grammar walk): one uniform per token, zero-probability tokens never drawn,
    frequencies within 4 sigma of the probabilities over 20,000 draws."""
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([draw(probs * 7.0, g) for _ in range(20_000)]), minlength=6)
    assert counts[[0, 2, 5]].sum() == 0
    freq = counts.double() / 20_000
    sigma = (probs.double() * (1 - probs.double()) / 20_000).sqrt()
    assert ((freq - probs.double()).abs() <= 4 * sigma + 1e-12).all(), freq
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [draw(probs, g1) for _ in range(50)] == [draw(probs, g2) for _ in range(50)]


def test_truncate_top_k_top_p_min_p():
    p = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    kept = lambda **kw: (truncate(p, **kw) > 0).nonzero().flatten().tolist()  # noqa: E731
    assert kept() == [0, 1, 2, 3, 4]
    assert kept(top_k=2) == [1, 3] and kept(top_k=1) == [1]
    assert kept(top_p=0.39) == [1] and kept(top_p=0.41) == [1, 3] and kept(top_p=0.8) == [1, 3, 4] and kept(top_p=0.86) == [1, 2, 3, 4]
    assert kept(top_p=0.0) == [1]  # the most likely token always stays
    assert kept(min_p=0.5) == [1, 3] and kept(min_p=0.25) == [1, 2, 3, 4]
    assert kept(top_k=3, top_p=0.9, min_p=0.3) == [1, 3, 4] and kept(top_k=3, min_p=0.5) == [1, 3]
    # vLLM's order: top_p is a share of what min_p and top_k left (0.4 of 0.7 passes 0.55 of it: one token)
    assert kept(top_k=2, top_p=0.55) == [1] and kept(min_p=0.5, top_p=0.55) == [1]
    assert torch.equal(truncate(p, top_k=2)[[1, 3]], p[[1, 3]])  # what stays keeps its probability
    tied = torch.tensor([0.2, 0.4, 0.4])  # bf16 logits tie often: top_k=1 keeps argmax's choice, the first
    assert (truncate(tied, top_k=1) > 0).tolist() == [False, True, False]
