"""dgemma vs the transformers reference (DiffusionGemmaForBlockDiffusion), fp32, on tiny random models.

The same weights go both ways (dgemma saves, transformers loads); we compare the encoder's logits on a prompt
longer than the sliding window, the denoiser's logits on a random canvas with and without self-conditioning,
and the denoiser's logits after a canvas has been committed into the cache.
"""

from __future__ import annotations

import pytest
import torch

from conftest import randomize, tiny_config
from dgemma.model import DiffusionGemma
from dgemma.weights import save_model

transformers = pytest.importorskip("transformers")
from transformers import DiffusionGemmaForBlockDiffusion  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402

TOL = 1e-4


def _hf_logits(hf, h):
    logits = hf.lm_head(h).float()
    cap = hf.config.text_config.final_logit_softcapping
    return torch.tanh(logits / cap) * cap


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """For each tiny config: (dgemma model, transformers model loaded from dgemma's save)."""
    from conftest import TINY_CONFIGS

    out = {}
    for i, name in enumerate(sorted(TINY_CONFIGS)):
        cfg = tiny_config(name)
        ours = randomize(DiffusionGemma(cfg), seed=100 + i).eval()
        d = tmp_path_factory.mktemp(f"ckpt_{name}")
        save_model(ours, d)
        hf = DiffusionGemmaForBlockDiffusion.from_pretrained(d, dtype=torch.float32).eval()
        out[name] = (ours, hf)
    return out


def _maxdiff(a, b):
    return (a - b).abs().max().item()


@torch.no_grad()
def test_encoder_logits(pairs, cfg_name):
    ours, hf = pairs[cfg_name]
    cfg = ours.cfg
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (2, 3 * cfg.sliding_window + 5), generator=g)
    ref_cache = DynamicCache(config=hf.config.text_config)
    ref = _hf_logits(hf, hf.model.encoder(input_ids=prompt, past_key_values=ref_cache).last_hidden_state)
    cache = ours.new_cache(2, 256)
    got = ours.encode(prompt, cache)
    assert got.shape == ref.shape
    assert _maxdiff(got, ref) <= TOL
    assert cache.lengths.tolist() == [prompt.shape[1]] * 2


@torch.no_grad()
@pytest.mark.parametrize("with_sc", [False, True])
def test_denoiser_logits(pairs, cfg_name, with_sc):
    ours, hf = pairs[cfg_name]
    cfg = ours.cfg
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, cfg.vocab_size, (2, 2 * cfg.sliding_window + 3), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (2, cfg.canvas_length), generator=g)
    sc_logits = torch.randn(2, cfg.canvas_length, cfg.vocab_size, generator=g) * 3 if with_sc else None

    ref_cache = DynamicCache(config=hf.config.text_config)
    hf.model.encoder(input_ids=prompt, past_key_values=ref_cache)
    ref = hf(decoder_input_ids=canvas, past_key_values=ref_cache, self_conditioning_logits=sc_logits).logits

    cache = ours.new_cache(2, 256)
    ours.encode(prompt, cache)
    before = [k.clone() for k in cache.k]
    sc = ours.soft_embed(sc_logits) if with_sc else None
    got = ours.denoise(canvas, cache, sc=sc)
    assert _maxdiff(got, ref) <= TOL
    # the denoiser reads the cache and never writes it
    assert all(torch.equal(a, b) for a, b in zip(before, cache.k))
    assert cache.lengths.tolist() == [prompt.shape[1]] * 2


@torch.no_grad()
def test_denoiser_after_commit(pairs, cfg_name):
    """Prefill, commit one canvas through the encoder (positions continue), then denoise a fresh canvas."""
    ours, hf = pairs[cfg_name]
    cfg = ours.cfg
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, cfg.vocab_size, (1, cfg.sliding_window + 2), generator=g)
    committed = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=g)
    sc_logits = torch.randn(1, cfg.canvas_length, cfg.vocab_size, generator=g)

    ref_cache = DynamicCache(config=hf.config.text_config)
    hf.model.encoder(input_ids=prompt, past_key_values=ref_cache)
    ref_commit = _hf_logits(hf, hf.model.encoder(input_ids=committed, past_key_values=ref_cache).last_hidden_state)
    ref = hf(decoder_input_ids=canvas, past_key_values=ref_cache, self_conditioning_logits=sc_logits).logits

    cache = ours.new_cache(1, 256)
    ours.encode(prompt, cache)
    got_commit = ours.encode(committed, cache)
    got = ours.denoise(canvas, cache, sc=ours.soft_embed(sc_logits))
    assert _maxdiff(got_commit, ref_commit) <= TOL
    assert _maxdiff(got, ref) <= TOL


@torch.no_grad()
def test_chunked_prefill_and_ragged_batch_match_single_rows(pairs):
    """Rows of different prompt lengths in one batch give each row's own logits, and a prompt fed in chunks
    equals the prompt fed at once (the ring buffers of sliding layers wrap several times here)."""
    ours, _ = pairs["a"]
    cfg = ours.cfg
    g = torch.Generator().manual_seed(4)
    lens = [5, 29]
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in lens]
    canvas = torch.randint(0, cfg.vocab_size, (2, cfg.canvas_length), generator=g)

    singles = []
    for r, p in enumerate(prompts):
        c = ours.new_cache(1, 128)
        ours.encode(p[None], c)
        singles.append(ours.denoise(canvas[r:r + 1], c))

    batch = torch.zeros(2, max(lens), dtype=torch.long)
    for r, p in enumerate(prompts):
        batch[r, :len(p)] = p
    c = ours.new_cache(2, 128)
    ours.encode(batch, c, n_valid=torch.tensor(lens))
    both = ours.denoise(canvas, c)
    for r in range(2):
        assert _maxdiff(both[r:r + 1], singles[r]) <= 1e-5

    c = ours.new_cache(1, 128)
    for start in range(0, lens[1], 7):
        ours.encode(prompts[1][None, start:start + 7], c)
    assert _maxdiff(ours.denoise(canvas[1:2], c), singles[1]) <= 1e-5


@torch.no_grad()
def test_bf16_is_as_close_to_fp32_as_transformers_bf16(pairs, cfg_name, tmp_path):
    """bf16 is the default dtype on CUDA and on CPUs with native bf16 (`pipeline.default_dtype`). Its bits cannot
    match anyone's, so the test is that dgemma in bf16 stays as close to the fp32 reference as transformers in bf16
    does, on the engine's own path (cached context, attention over the filled slots, self-conditioning)."""
    ours32, hf32 = pairs[cfg_name]
    cfg = ours32.cfg
    save_model(ours32, tmp_path)
    from dgemma.weights import load_model

    ours = load_model(tmp_path, dtype=torch.bfloat16, quiet=True).eval()
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, cfg.vocab_size, (1, 2 * cfg.sliding_window + 3), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=g)
    sc_logits = torch.randn(1, cfg.canvas_length, cfg.vocab_size, generator=g) * 3

    def reference(model):
        cache = DynamicCache(config=model.config.text_config)
        model.model.encoder(input_ids=prompt, past_key_values=cache)
        return model(decoder_input_ids=canvas, past_key_values=cache, self_conditioning_logits=sc_logits).logits.float()

    ref = reference(hf32)
    cache = ours.new_cache(1, 256)
    ours.encode(prompt, cache, known_lengths=[0])
    got = ours.denoise(canvas, cache, sc=ours.soft_embed(sc_logits.bfloat16()), known_lengths=[prompt.shape[1]])
    ours_err, hf_err = _maxdiff(got.float(), ref), _maxdiff(reference(hf), ref)
    assert ours_err <= 1.5 * hf_err + 1e-3, (ours_err, hf_err)
