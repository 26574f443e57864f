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
