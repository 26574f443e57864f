"""Uniform-state forward corruption (SPEC §5) and the per-example random streams it draws from.

Every random choice the objective makes for one example (its noise level t, which canvas is trained, whether it
gets self-conditioning, which tokens are corrupted and into what) comes from that example's own generator, seeded
from (run seed, optimizer step, position in the global batch). So the noise never depends on how a batch is split
into micro-batches or across data-parallel ranks, nor on what ran before: one process with batch 2B, two ranks
with B each, and a run resumed from a checkpoint all draw exactly the same noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 over the parts), so nearby (step, index) pairs are unrelated."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        x = z ^ (z >> 31)
    return x & ((1 << 63) - 1)


def example_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The CPU generator of one example: `index` is its position in the global batch of optimizer `step`."""
    return torch.Generator().manual_seed(mix_seed(seed, step, index))


@dataclass(frozen=True)
class NoiseDraw:
    """What the objective decides at random for one example."""

    t: float  # corruption probability, t ~ U(eps, 1)
    block: int  # which of the example's canvases is trained
    self_condition: bool  # does pass 2 get the pass-1 soft embedding?
    uniforms: torch.Tensor  # [canvas] float64: token i is corrupted iff uniforms[i] < t
    tokens: torch.Tensor  # [canvas] long: the uniform-random replacement tokens


def draw(gen: torch.Generator, n_blocks: int, canvas: int, vocab: int, eps: float, sc_prob: float) -> NoiseDraw:
    """Draw one example's noise, always in the same order and amount (so streams stay aligned)."""
    head = torch.rand(3, generator=gen, dtype=torch.float64)
    t = eps + (1.0 - eps) * float(head[0])
    block = min(int(float(head[1]) * n_blocks), n_blocks - 1)
    uniforms = torch.rand(canvas, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, vocab, (canvas,), generator=gen)
    return NoiseDraw(t, block, float(head[2]) < sc_prob, uniforms, tokens)


def corrupt(clean: torch.Tensor, t: torch.Tensor | float, uniforms: torch.Tensor, tokens: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t: each token of `clean` replaced by its uniform-random `tokens` entry with probability t.

    There is no mask token: a corrupted position holds an ordinary vocabulary token (which may even equal the clean
    one, as in D3PM-uniform). Shapes broadcast: clean/uniforms/tokens `[..., T]`, t scalar or `[..., 1]`.
    Returns (noisy tokens, bool mask of the positions that were resampled).
    """
    hit = uniforms < t
    return torch.where(hit, tokens, clean), hit
