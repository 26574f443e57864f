"""The DiffusionGemma training objective (SPEC §5) and the cache that makes its attention block-causal.

One step over a batch (see data.py for the layout):
  1. encode   the clean prompt + response, causally, in one pass; K/V of every layer land in a `TrainCache`
              (kept as autograd tensors, so the canvas loss trains the encoder through its keys and values)
  2. AR loss  next-token cross-entropy of the encoder on the clean response
  3. anchor   set each row's cache length to its canvas start P + sel*T: the denoiser then sees exactly the clean
              prompt and the clean blocks before the canvas
  4. pass 1   (only if some row self-conditions) denoise x_t without self-conditioning, no gradient (at wide
              vocabularies the soft embedding is accumulated block by block, without the pass's logits)
  5. pass 2   denoise x_t with softmax(pass-1 logits) @ E * scale for the self-conditioning rows, 0 for the rest
  6. canvas   cross-entropy over every position of the canvas (corrupted or not, EOS padding included), unweighted

Why step 3 is exactly block-causal: `model.forward(denoise=True)` builds its mask from `slot_positions`, and a
`TrainCache` reports a slot valid iff its position is < the row's length. Full layers therefore see positions
[0, start) and sliding layers [start - (W-1), start) (`attention.denoiser_mask`), i.e. the same keys an
inference-time cache holds after prefill + committing the earlier blocks; the canvas itself is attended
bidirectionally. Keys at positions >= start (the canvas's own clean tokens and every later block) are masked out,
so they get zero attention weight and zero gradient. The encoder keys are those of a causal pass over the whole
clean sequence, which at each position equal the ones prefill + block-by-block commits would write.

Choices where the public references differ (SPEC §5):
- earlier blocks are seen *clean* (NeMo's strict block-causal mask), not as noisy canvases (JAX's mask comment);
- "no self-conditioning" is a zero soft embedding, as in HF, NeMo and inference (JAX feeds zero *logits*, i.e. the
  uniform vocabulary mean);
- pass-1 logits are soft-capped but not temperature-scaled (inference feeds T-scaled ones), as in JAX and NeMo.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from ..vision import vision_tower
from .data import IGNORE, Batch


class TrainCache:
    """The `KVCache` interface over one training batch: written once by the encoder, read by the denoiser.

    Unlike `KVCache` it keeps no preallocated buffers: `write` stores the encoder's K/V tensors themselves (no
    copy, no scatter), so the encoder pass attends over [0 slots; new tokens] and gradients flow straight back
    from the denoiser into the encoder. Every layer keeps every position (no sliding ring): the sliding window is
    applied by the denoiser mask, anchored at each row's `lengths`.
    """

    def __init__(self, cfg: ModelConfig, rows: int, device=None, dtype=torch.float32):
        n = cfg.num_hidden_layers
        self.cfg = cfg
        self.max_len = cfg.max_position_embeddings
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.k = [torch.zeros(rows, cfg.layer_kv_heads(i), 0, cfg.layer_head_dim(i), dtype=dtype, device=device)
                  for i in range(n)]
        self.v = list(self.k)
        self.capacity = [0] * n

    @property
    def rows(self) -> int:
        return self.lengths.shape[0]

    def slot_positions(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot s holds position s; it is visible iff s < the row's length (the canvas start when denoising)."""
        pos = torch.arange(capacity, device=self.lengths.device)[None, :].expand(self.rows, capacity)
        return pos, pos < self.lengths[:, None]

    def check_room(self, n_new) -> None:
        pass

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, n_valid: torch.Tensor) -> None:
        if self.capacity[layer]:
            raise RuntimeError("a TrainCache is written once, by one encoder pass over the whole clean sequence")
        # Padding positions (>= n_valid) are stored too; they sit at positions >= every row's canvas start
        # (the canvas lies inside the clean sequence), so the denoiser never sees them.
        self.k[layer], self.v[layer], self.capacity[layer] = k, v, k.shape[2]

    def advance(self, n_valid: torch.Tensor) -> None:
        self.lengths = self.lengths + n_valid

    def layer_state(self, layer: int) -> tuple:
        """What an encoder layer reads of the cache: its K/V and capacity (see `replay`)."""
        return self.k[layer], self.v[layer], self.capacity[layer]

    @contextlib.contextmanager
    def replay(self, layer: int, state: tuple):
        """Gradient checkpointing's rerun of an encoder layer in the backward pass (`model._checkpointed`): the layer
        reads `state` (`layer_state` before its first run), and what it writes again is dropped; the K/V of the first
        run, which the denoiser read, stay."""
        kept = self.layer_state(layer)
        self.k[layer], self.v[layer], self.capacity[layer] = state
        try:
            yield
        finally:
            self.k[layer], self.v[layer], self.capacity[layer] = kept

    def select(self, rows: torch.Tensor) -> "TrainCache":
        """The same cache restricted to some rows (an autograd-tracked index, not a copy of the graph)."""
        sub = object.__new__(TrainCache)
        sub.cfg, sub.max_len, sub.capacity = self.cfg, self.max_len, list(self.capacity)
        sub.lengths = self.lengths[rows]
        sub.k = [t[rows] for t in self.k]
        sub.v = [t[rows] for t in self.v]
        return sub

    def anchor(self, canvas_start: torch.Tensor) -> None:
        """Step 3: each row's denoiser sees positions [0, canvas_start) (sliding layers: the last W-1 of them).

        Keys at or past the largest canvas start are invisible to every row, so they are dropped: the denoiser
        then attends over max(canvas_start) + T keys instead of the whole clean sequence + T.
        """
        self.lengths = canvas_start.to(self.lengths.device)
        keep = int(self.lengths.max())
        self.k = [t[:, :, :keep] for t in self.k]
        self.v = [t[:, :, :keep] for t in self.v]
        self.capacity = [min(c, keep) for c in self.capacity]


@dataclass(frozen=True)
class ObjectiveConfig:
    diffusion_weight: float = 1.0
    ar_weight: float = 1.0
    ar_on_prompt: bool = False
    # Logits materialised at once by the loss (recomputed in the backward when there is more than one chunk):
    # at most 8,192 rows, fewer where the vocabulary is wide (512 at the real 262,144, 512 MiB in fp32).
    ce_chunk: int = 8192
    ce_elements: int = 2**27

    def ce_rows(self, vocab: int) -> int:
        return max(1, min(self.ce_chunk, self.ce_elements // vocab))


def chunked_ce(model, h: torch.Tensor, targets: torch.Tensor, chunk: int, recompute: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of cross-entropy and number of correct argmaxes over rows of hidden states `h` `[N, H]`.

    With a big vocabulary the fp32 logits `[N, V]` dominate memory; each chunk's logits are recomputed in the
    backward pass (activation checkpointing) instead of kept, when there are several chunks or `recompute`
    (the model's gradient checkpointing) asks.
    """
    total = h.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=h.device)

    def piece(hc, tc):
        logits = model.logits(hc)
        return F.cross_entropy(logits, tc, reduction="sum"), (logits.argmax(-1) == tc).sum()

    for i in range(0, h.shape[0], chunk):
        hc, tc = h[i:i + chunk], targets[i:i + chunk]
        if h.requires_grad and (h.shape[0] > chunk or recompute):
            ce, ok = checkpoint(piece, hc, tc, use_reentrant=False)
        else:
            ce, ok = piece(hc, tc)
        total, correct = total + ce, correct + ok
    return total, correct


def objective(model, batch: Batch, ocfg: ObjectiveConfig, *, canvas_norm: float, ar_norm: float
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one micro-batch (steps 1-6 above) and detached statistics.

    canvas_norm / ar_norm: the number of canvas / AR tokens in the whole *global* batch of the optimizer step, so
    that summing micro-batch gradients over accumulation steps and data-parallel ranks gives exactly the
    gradient of the global token-mean loss, however the batch was split.
    """
    cfg = model.cfg
    chunk, recompute = ocfg.ce_rows(cfg.vocab_size), getattr(model, "gradient_checkpointing", False)
    cache = TrainCache(cfg, batch.rows, device=batch.enc_ids.device, dtype=model.dtype)
    # 1. encode (also fills the cache)
    images = None
    if getattr(batch, "images", None):  # the frozen tower's features (cached per image), as inference computes them
        tower = vision_tower(model)
        images = [[(a, tower.features(img)) for a, img in row] for row in batch.images]
    h_enc = model.forward(batch.enc_ids, cache, n_valid=batch.enc_len, head=False, images=images)
    # 2. AR loss
    stats = {}
    loss = h_enc.new_zeros((), dtype=torch.float32)
    sel = batch.ar_targets != IGNORE
    if ocfg.ar_weight and bool(sel.any()):
        ar_sum, ar_ok = chunked_ce(model, h_enc[sel], batch.ar_targets[sel], chunk, recompute)
        loss = loss + ocfg.ar_weight * ar_sum / ar_norm
        stats.update(ar_sum=ar_sum.detach(), ar_correct=ar_ok, ar_tokens=sel.sum())
    # 3. anchor the denoiser at each row's canvas
    cache.anchor(batch.canvas_start)
    # 4-5. two-pass self-conditioning; pass 1 runs only on the rows that use it. A zero soft embedding is
    # exactly "no self-conditioning" (the SC MLP has no biases and pre_norm(0) = 0), so one pass-2 call serves all.
    sc = None
    rows = batch.self_condition.nonzero().squeeze(1)
    if rows.numel():
        with torch.no_grad():
            if chunk < ocfg.ce_chunk:  # a wide vocabulary: the soft embedding without the pass's logits
                soft = model.soft_embed_hidden(model.forward(batch.noisy[rows], cache.select(rows), denoise=True,
                                                             head=False))
            else:
                soft = model.soft_embed(model.forward(batch.noisy[rows], cache.select(rows), denoise=True))
            sc = torch.zeros(batch.rows, *batch.noisy.shape[1:], cfg.hidden_size, dtype=model.dtype,
                             device=soft.device)
            sc[rows] = soft.to(sc.dtype)  # bf16 under autocast
        del soft
    h = model.forward(batch.noisy, cache, denoise=True, sc=sc, head=False)
    # 6. canvas loss over all positions
    T = batch.clean.shape[1]
    ce_sum, ok = chunked_ce(model, h.reshape(-1, h.shape[-1]), batch.clean.reshape(-1), chunk, recompute)
    loss = loss + ocfg.diffusion_weight * ce_sum / canvas_norm
    stats.update(canvas_sum=ce_sum.detach(), canvas_correct=ok, canvas_tokens=torch.tensor(batch.rows * T))
    return loss, stats
