"""KVCache: preallocated per-layer key/value buffers that the encoder writes and the denoiser only reads.

Each layer owns a ring of `capacity` slots plus one trash slot (index `capacity`) where writes that must be
dropped land. A token at absolute position p lives in slot `p % capacity`, so:
- full-attention layers get capacity = the longest context, and the ring never wraps;
- sliding-window layers get capacity = sliding_window - 1 (what transformers' DynamicCache keeps) plus an
  optional `margin`, so memory does not grow with the context. Attention reads a ring's last W - 1 positions
  in position order, whatever its capacity. The margin is what lets a row's context be cut back (prefix
  caching, `rewind`): the last W - 1 positions before the cut are still in the ring if the cut drops at most
  `margin` tokens.

Every row keeps its own length, so rows with prompts of different lengths share one batch without padding the
cache, and a row's keys never depend on what else is in the batch.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class CacheFullError(ValueError):
    """The context (prompt plus committed canvases) would exceed the cache's capacity."""


class KVCache:
    """Per-layer ring buffers `[rows, kv_heads, capacity + 1, head_dim]` and per-row lengths `[rows]`."""

    def __init__(self, cfg: ModelConfig, rows: int, max_len: int, *, dtype=torch.float32, device=None,
                 sliding_ring: bool = True, margin: int = 0):
        if max_len <= 0:
            raise ValueError("max_len must be positive")
        if margin < 0:
            raise ValueError("margin must be >= 0")
        self.cfg = cfg
        self.max_len = max_len
        self.margin = margin
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.capacity: list[int] = []
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for i in range(cfg.num_hidden_layers):
            ring = sliding_ring and cfg.is_sliding(i)
            cap = min(max_len, cfg.sliding_window - 1 + margin) if ring else max_len
            cap = max(cap, 1)
            shape = (rows, cfg.layer_kv_heads(i), cap + 1, cfg.layer_head_dim(i))
            self.capacity.append(cap)
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            # V = K on full layers, but after different norms (k_norm + RoPE vs v_norm), so V is stored too.
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))

    @property
    def rows(self) -> int:
        return self.lengths.shape[0]

    @property
    def row_slots(self) -> range:
        """Which row of the buffers (`storage`) holds each row of this cache."""
        return range(self.rows)

    def storage(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's whole K and V buffers `[buffer rows, kv_heads, capacity + 1, head_dim]`, for views."""
        return self.k[layer], self.v[layer]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def slot_positions(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute position held by each slot `[rows, capacity+1]` and whether it holds a valid token."""
        L = self.lengths[:, None]
        s = torch.arange(capacity + 1, device=L.device)[None, :]
        pos = L - 1 - torch.remainder(L - 1 - s, capacity)
        valid = (pos >= 0) & (s < capacity)
        return pos, valid

    def check_room(self, n_new: torch.Tensor | int) -> None:
        """Raise before a write that would push a row past max_len (the full layers' capacity)."""
        need = self.lengths + n_new
        if bool((need > self.max_len).any()):
            raise CacheFullError(
                f"context of {int(need.max())} tokens exceeds the cache capacity of {self.max_len}"
            )

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, n_valid: torch.Tensor) -> None:
        """Store the K/V of `n_valid[b]` new tokens of each row (right-padded `[rows, heads, T, dim]`).

        Only the last `capacity` valid tokens of a row can survive in a ring, so the rest (and padding) are
        routed to the trash slot. Lengths are advanced by `advance`, once for all layers.
        """
        _scatter(self.k[layer], self.v[layer], self.capacity[layer], self.lengths, k, v, n_valid)

    def advance(self, n_valid: torch.Tensor) -> None:
        self.lengths += n_valid

    def can_rewind(self, held: int, keep: int) -> bool:
        """Whether a row holding `held` tokens can be cut back to its first `keep` and go on from there: every
        ring must still hold the window before position `keep` (it never wrapped, or the cut is within the
        margin). Full layers always can: their slot is the position."""
        if keep > held:
            return False
        return all(held <= cap or held - keep <= cap - (self.cfg.sliding_window - 1)
                   for cap in self.capacity if cap < self.max_len)

    def rewind(self, row: int, keep: int) -> None:
        """Cut row `row`'s context back to its first `keep` tokens (check `can_rewind` first). The slots after
        the cut keep stale keys until they are overwritten; attention never reads them (it reads positions
        below the row's length, and only a ring's last W - 1)."""
        self.lengths[row] = keep

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Forget the context of all rows, or of the rows in a bool mask (their buffers are simply overwritten)."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[rows] = 0

    def select(self, rows: torch.Tensor | None) -> "KVCache | RowView":
        """The same interface over a subset of rows (None = all rows, no copy). Reads gather, writes scatter back."""
        return self if rows is None else RowView(self, rows)

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Row `dst` gets row `src`'s first `length` tokens (their K/V in every layer, a wrapped ring whole) and
        that length: what encoding the same tokens into `dst` would write."""
        for layer, cap in enumerate(self.capacity):
            hi = cap if length > cap else length
            self.k[layer][dst, :, :hi] = self.k[layer][src, :, :hi]
            self.v[layer][dst, :, :hi] = self.v[layer][src, :, :hi]
        self.lengths[dst] = length

    def fork(self, row: int, copies: int) -> "KVCache":
        """A new cache whose `copies` rows all start from row `row` of this one (e.g. n samples of one prompt)."""
        new = object.__new__(KVCache)
        new.cfg, new.max_len, new.capacity, new.margin = self.cfg, self.max_len, list(self.capacity), self.margin
        new.lengths = self.lengths[row:row + 1].repeat(copies)
        new.k = [t[row:row + 1].repeat(copies, 1, 1, 1) for t in self.k]
        new.v = [t[row:row + 1].repeat(copies, 1, 1, 1) for t in self.v]
        return new


def _scatter(kbuf, vbuf, cap, lengths, k, v, n_valid) -> None:
    T = k.shape[2]
    t = torch.arange(T, device=k.device)[None, :]
    n = n_valid[:, None]
    keep = (t < n) & (t >= n - cap)
    slot = torch.where(keep, torch.remainder(lengths[:, None] + t, cap), torch.full_like(t, cap))
    idx = slot[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
    kbuf.scatter_(2, idx, k.to(kbuf.dtype))
    vbuf.scatter_(2, idx, v.to(vbuf.dtype))


class _Gather:
    """`view.k[layer]`: that layer's buffer for the selected rows (a copy, made when asked for)."""

    def __init__(self, bufs, rows):
        self.bufs, self.rows = bufs, rows

    def __getitem__(self, layer):
        return self.bufs[layer].index_select(0, self.rows)

    def __len__(self):
        return len(self.bufs)


class RowView:
    """A subset of a KVCache's rows, used like a KVCache by the model (step-level batching of requests)."""

    def __init__(self, parent: KVCache, rows: torch.Tensor):
        self.parent, self.rows = parent, rows.to(parent.lengths.device)
        self.row_slots = rows.tolist()
        self.cfg, self.max_len, self.capacity = parent.cfg, parent.max_len, parent.capacity
        self.k, self.v = _Gather(parent.k, self.rows), _Gather(parent.v, self.rows)
        self.storage = parent.storage

    @property
    def lengths(self) -> torch.Tensor:
        return self.parent.lengths.index_select(0, self.rows)

    slot_positions = KVCache.slot_positions
    check_room = KVCache.check_room

    def write(self, layer, k, v, n_valid) -> None:
        # Straight into each row of the parent's buffers (a scatter into a view writes through), rather than
        # gathering the rows' whole buffers, scattering, and copying them back.
        kb, vb = self.parent.storage(layer)
        lengths = self.lengths
        for i, s in enumerate(self.row_slots):
            _scatter(kb[s:s + 1], vb[s:s + 1], self.capacity[layer], lengths[i:i + 1], k[i:i + 1], v[i:i + 1],
                     n_valid[i:i + 1])

    def advance(self, n_valid: torch.Tensor) -> None:
        self.parent.lengths.index_add_(0, self.rows, n_valid)
