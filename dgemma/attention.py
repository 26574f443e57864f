"""Attention masks for the two ways the one stack runs: the causal encoder and the bidirectional denoiser.

Keys are always laid out as `[cache slots (capacity + 1) ; new tokens (T)]`; masks are boolean, True = attend,
shaped to broadcast against `[rows, heads, queries, keys]` in `scaled_dot_product_attention`.

Sliding-window semantics follow transformers:
- encoder (prefill and commit): query at position q sees keys k with q - W < k <= q;
- denoiser: every canvas query sees the last W - 1 cached tokens (block-anchored, the same for the whole canvas)
  plus the whole canvas. Full layers see every cached token plus the whole canvas.
"""

from __future__ import annotations

import torch


def encoder_mask(q_pos: torch.Tensor, slot_pos: torch.Tensor, slot_valid: torch.Tensor, n_valid: torch.Tensor,
                 window: int | None, block: torch.Tensor | None = None) -> torch.Tensor:
    """Causal (optionally sliding) mask `[rows, 1, T, slots + T]` for T new tokens written after the cache.

    q_pos: `[rows, T]` absolute positions of the new tokens; n_valid: `[rows]` real (non-padding) new tokens.
    A query always sees itself, so padding queries never get an all-masked row (which would give NaN).
    block: `[rows, T]` image-span ids of the new tokens (-1 = text): tokens of one span also see each other
    both ways, whatever the window (transformers' blockwise overlay, OR-ed after the sliding window).
    """
    T = q_pos.shape[1]
    qp = q_pos[:, :, None]
    cache_ok = slot_valid[:, None, :] & (slot_pos[:, None, :] <= qp)
    t = torch.arange(T, device=q_pos.device)
    new_ok = (t[None, :] <= t[:, None])[None] & (t[None, None, :] < n_valid[:, None, None])
    new_ok = new_ok | torch.eye(T, dtype=torch.bool, device=q_pos.device)[None]
    if window is not None:
        cache_ok = cache_ok & (qp - slot_pos[:, None, :] < window)
        new_ok = new_ok & ((t[:, None] - t[None, :]) < window)[None]
    if block is not None:
        new_ok = new_ok | same_block(block)
    return torch.cat([cache_ok, new_ok], dim=-1)[:, None]


def same_block(block: torch.Tensor) -> torch.Tensor:
    """`[rows, T, T]`: query and key in the same image span."""
    return (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)


def denoiser_mask(lengths: torch.Tensor, slot_pos: torch.Tensor, slot_valid: torch.Tensor, T: int,
                  window: int | None) -> torch.Tensor:
    """Bidirectional mask `[rows, 1, 1, slots + T]`: the same key set for every canvas query."""
    cache_ok = slot_valid
    if window is not None:
        cache_ok = cache_ok & (slot_pos >= lengths[:, None] - (window - 1))
    canvas_ok = torch.ones(lengths.shape[0], T, dtype=torch.bool, device=lengths.device)
    return torch.cat([cache_ok, canvas_ok], dim=-1)[:, None, None]


def no_cache_mask(T: int, causal: bool, window: int | None, device=None) -> torch.Tensor | None:
    """Mask `[1, 1, T, T]` for a forward with no cache at all (None = attend everywhere)."""
    if not causal:
        return None
    t = torch.arange(T, device=device)
    m = t[None, :] <= t[:, None]
    if window is not None:
        m = m & ((t[:, None] - t[None, :]) < window)
    return m[None, None]
