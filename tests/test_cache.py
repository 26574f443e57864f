"""KVCache: ring layout of sliding layers, row views, capacity errors."""

from __future__ import annotations

import pytest
import torch

from conftest import randomize, tiny_config
from dgemma.cache import CacheFullError
from dgemma.model import DiffusionGemma


@pytest.fixture(scope="module")
def model():
    return randomize(DiffusionGemma(tiny_config("a")), seed=3).eval()


def test_sliding_layers_keep_window_minus_one(model):
    cache = model.new_cache(2, 100)
    cfg = model.cfg
    for i, cap in enumerate(cache.capacity):
        assert cap == (cfg.sliding_window - 1 if cfg.is_sliding(i) else 100)


@torch.no_grad()
def test_row_views_equal_separate_caches(model):
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (1, n), generator=g) for n in (3, 21, 11)]
    canvas = torch.randint(0, cfg.vocab_size, (3, cfg.canvas_length), generator=g)
    shared = model.new_cache(3, 64)
    for r, p in enumerate(prompts):  # prefill each row alone through a one-row view
        model.encode(p, shared.select(torch.tensor([r])))
    assert shared.lengths.tolist() == [3, 21, 11]
    rows = torch.tensor([2, 0])
    got = model.denoise(canvas[rows], shared.select(rows))
    for j, r in enumerate(rows.tolist()):
        alone = model.new_cache(1, 64)
        model.encode(prompts[r], alone)
        assert (model.denoise(canvas[r:r + 1], alone) - got[j:j + 1]).abs().max() <= 1e-5
    # committing through a view advances only those rows
    model.encode(canvas[rows], shared.select(rows))
    assert shared.lengths.tolist() == [3 + cfg.canvas_length, 21, 11 + cfg.canvas_length]


@torch.no_grad()
def test_cache_full_is_a_clear_error(model):
    cache = model.new_cache(1, 10)
    with pytest.raises(CacheFullError, match="exceeds the cache capacity of 10"):
        model.encode(torch.zeros(1, 11, dtype=torch.long), cache)
    assert cache.lengths.tolist() == [0]  # nothing was written


@torch.no_grad()
@pytest.mark.parametrize("ring", [True, False])
def test_known_lengths_attend_only_filled_slots(model, ring):
    """With the rows' cached lengths known on the host, attention reads only the filled slots, row by row. Same
    results as attending over the whole buffer with masks: padded prefill, a commit past the sliding window (the
    ring wraps), AR-style one-token encodes, and denoising; and a row alone gives what it gives inside the batch."""
    from dgemma.cache import KVCache

    cfg = model.cfg
    g = torch.Generator().manual_seed(1)
    T = cfg.canvas_length
    lens = [3, 21, 11]
    ids = torch.randint(0, cfg.vocab_size, (3, max(lens)), generator=g)
    n = torch.tensor(lens)
    canvas = torch.randint(0, cfg.vocab_size, (3, T), generator=g)
    one = torch.randint(0, cfg.vocab_size, (3, 1), generator=g)

    def run(c, known):
        k = (lambda extra: None) if not known else (lambda extra: [x + extra for x in lens])
        outs = [model.encode(ids, c, n_valid=n, known_lengths=None if not known else [0, 0, 0])]
        outs.append(model.denoise(canvas, c, known_lengths=k(0)))
        outs.append(model.encode(canvas, c, known_lengths=k(0)))  # commit: past the window, the ring wraps
        outs.append(model.encode(one, c, known_lengths=k(T)))
        outs.append(model.denoise(canvas, c, known_lengths=k(T + 1)))
        return outs

    masked = run(KVCache(cfg, 3, 100, sliding_ring=ring), known=False)
    rows = run(KVCache(cfg, 3, 100, sliding_ring=ring), known=True)
    for r, L in enumerate(lens):  # prefill: the real tokens of each row
        assert (masked[0][r, :L] - rows[0][r, :L]).abs().max() <= 5e-5
    for a, b in zip(masked[1:], rows[1:]):
        assert (a - b).abs().max() <= 5e-5  # fp32 logits: rounding only
    with pytest.raises(ValueError, match="differ from the cache"):  # a wrong length is caught, not used
        model.denoise(canvas, KVCache(cfg, 3, 100, sliding_ring=ring), known_lengths=[1, 2, 3])
    # row 2 alone: the same as inside the batch, up to the matmuls' rounding for other shapes
    c = KVCache(cfg, 1, 100, sliding_ring=ring)
    model.encode(ids[2:, :lens[2]], c, known_lengths=[0])
    assert (model.denoise(canvas[2:], c, known_lengths=[lens[2]]) - rows[1][2:]).abs().max() <= 5e-5
