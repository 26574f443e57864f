"""The DiffusionGemma sampler: pure functions over decoder logits, plus one small stop state.

One denoising *step* turns the decoder's logits for a *canvas* (a block of `canvas` positions that is
denoised together) into the next canvas. For `k = N, N-1, ..., 1` (k counts the steps *remaining*):

    1. temperature  T_k = t_min + (t_max - t_min) * k / N, processed logits l' = l / T_k; with a request's
                    min_p / top_k / top_p (as vLLM applies them to a diffusion step), the tokens they cut get
                    l' = -inf (`truncation_floor`): no mass in the sample, the entropy or the self-conditioning
    2. sample       candidates x_i ~ softmax(l'_i); the *draft* is argmax(l'_i)
    3. entropy      H_i of softmax(l'_i)
    4. accept       the longest low-entropy prefix with  sum(H) - max(H) <= entropy_bound
    5. renoise      next canvas = candidate where accepted, a fresh uniform token elsewhere
    6. stop         stable (draft unchanged for `stability_threshold` steps) and confident (mean H small)
    7. self-conditioning  the next step is conditioned on softmax(l') @ E * embed_scale

Two implementations of a step live here:

* `reference_step` is the oracle. It replays transformers 5.23.0 `DiffusionGemmaGenerationMixin._denoising_step`
  op for op, including how it consumes the *global* torch RNG, so a generation loop built on it reproduces
  `generate` token for token under `torch.manual_seed(seed)`.
* `fused_step` is the hot path. It walks the `[rows, canvas, vocab]` logits once, block by block, draws
  ONE uniform per position (inverse-CDF sampling instead of vocab-sized noise) from each row's own
  `torch.Generator`, and never syncs with the host. Its results do not depend on the other rows of the
  batch. It is a different random stream from the reference, so it is equal to the
  reference in distribution, not token for token.

RNG order of the reference `generate` (eager path, which is the default one)
---------------------------------------------------------------------------
Everything below draws from the global (default) generator of the logits' device:

    prefill encoder pass                          no draws (eval mode: no dropout, no router noise)
    for each canvas c = 0 .. ceil(max_new_tokens / canvas) - 1:
        encoder pass on the previous canvas       no draws
        initial canvas: torch.randint(0, V, (rows, canvas))
            (always drawn, even when `decoder_input_ids` is passed: `dict.pop(key, default)` evaluates
            the default eagerly; a user canvas only replaces the draw for canvas 0)
        for k = N .. 1 (until EVERY row has stopped):
            decoder pass                          no draws (the canvas is passed, so the model's own
                                                  randint fallback is never reached)
            torch.multinomial(probs.view(rows * canvas, V), 1)
                (n_sample == 1 takes PyTorch's fast path: it fills a [rows*canvas, V] tensor with
                exponential_() noise and takes argmax(p / q), so it consumes rows*canvas*V draws; the
                probability check before it is a host sync in older PyTorch, an async assert in newer)
            renoise: torch.randint(0, V, (rows, canvas))
                (drawn for every row and position, including rows that already stopped, accepted
                positions, and the last step k = 1)

Rows that stopped (`finished_denoising`) or finished the sequence (EOS in an earlier canvas) are still
denoised and still consume draws; only the early `break` when all rows stopped skips draws. So the
draws of one row depend on the whole batch. With a compileable (static) cache `generate` compiles
accept/renoise/stop; Inductor then replaces the renoise `torch.randint` with its own Philox stream (checked:
compiled and eager randint differ under one seed), so that path is not reproducible by eager code.

RNG protocol of `fused_step` (per row, independent of the batch)
-----------------------------------------------------------------
Each row r owns a generator. At the start of canvas c the loop reseeds it with
`canvas_seed(seed_r, c)`, so a row's stream never depends on how many steps the batch ran before. Then:

    fused_init_canvas       randint(0, V, (canvas,))            one call per row, rows in order
    every step              rand(canvas, n_blocks + 1, float64), then randint(0, V, (canvas,))   per row, in order
                            (n_blocks = ceil(V / vocab_block(device)): 4,096-entry blocks on the CPU, 16,384 on
                            an accelerator, so a seed's tokens depend on the kind of device as well as on its
                            floating-point rounding)

The step always draws both, for every row, so the count is fixed and needs no host knowledge of which
rows stopped; frozen rows simply ignore their draws (`freeze_finished`).
A restart (`SamplerConfig.restarts`) of canvas c, attempt a = 1, 2, ..., reseeds with
`canvas_seed(canvas_seed(seed_r, c), a)` and then draws as above.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import runtime
from .model import HEAD_BLOCK, head_block_logits, vocab_block

__all__ = [
    "SamplerConfig",
    "temperature",
    "entropy",
    "entropy_bound_accept",
    "renoise",
    "freeze_finished",
    "stable_and_confident",
    "StopState",
    "reference_init_canvas",
    "ReferenceStep",
    "reference_step",
    "FUSED_BLOCK",
    "canvas_seed",
    "fused_init_canvas",
    "draw_step_noise",
    "FusedStep",
    "fused_step",
    "fused_head_step",
    "raw_logprobs",
]

# The class name transformers writes next to `entropy_bound` in generation_config.json.
_SAMPLER_CLS_NAME = "EntropyBoundSamplerConfig"
MAX_RESTARTS = 16


# ----------------------------------------------------------------------------------------------------
# 1. Config
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplerConfig:
    """Knobs of the denoising loop; defaults are transformers' `_get_default_generation_params`."""

    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    # dgemma's own (transformers has no such knob): a canvas that spends all max_denoising_steps without the
    # early stop starts again from fresh noise, up to `restarts` more times; see `Engine` in generate.py
    restarts: int = 0

    def __post_init__(self) -> None:
        for name in ("max_denoising_steps", "stability_threshold", "restarts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"SamplerConfig.{name} must be an int, got {value!r}")
        for name in ("entropy_bound", "t_min", "t_max", "confidence_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"SamplerConfig.{name} must be a number, got {value!r}")
            # JSON may hold `1` for 1.0; store floats so equality and serialisation are stable.
            object.__setattr__(self, name, float(value))
        if self.max_denoising_steps < 1:
            raise ValueError(f"max_denoising_steps must be >= 1, got {self.max_denoising_steps}")
        if self.entropy_bound < 0:
            raise ValueError(f"entropy_bound must be >= 0, got {self.entropy_bound}")
        if not 0 < self.t_min <= self.t_max:
            raise ValueError(f"need 0 < t_min <= t_max, got t_min={self.t_min}, t_max={self.t_max}")
        if self.stability_threshold < 0:
            raise ValueError(f"stability_threshold must be >= 0, got {self.stability_threshold}")
        if self.confidence_threshold < 0:
            raise ValueError(f"confidence_threshold must be >= 0, got {self.confidence_threshold}")
        if not 0 <= self.restarts <= MAX_RESTARTS:
            raise ValueError(f"restarts must be from 0 to {MAX_RESTARTS}, got {self.restarts}")

    @classmethod
    def from_generation_config(cls, gen: dict[str, Any]) -> SamplerConfig:
        """Read a checkpoint's generation_config.json dict; missing keys keep the defaults, others are ignored."""
        kwargs: dict[str, Any] = {}
        for field in ("max_denoising_steps", "t_min", "t_max", "stability_threshold", "confidence_threshold",
                      "restarts"):
            if gen.get(field) is not None:
                kwargs[field] = gen[field]
        sampler = gen.get("sampler_config")
        if isinstance(sampler, dict):
            cls_name = sampler.get("_cls_name", _SAMPLER_CLS_NAME)
            if cls_name != _SAMPLER_CLS_NAME:
                raise ValueError(f"unsupported sampler_config._cls_name {cls_name!r}; expected {_SAMPLER_CLS_NAME!r}")
            kwargs["entropy_bound"] = sampler["entropy_bound"]
        elif sampler is not None:  # an EntropyBoundSamplerConfig instance
            kwargs["entropy_bound"] = sampler.entropy_bound
        return cls(**kwargs)

    def to_generation_config(self) -> dict[str, Any]:
        """The generation_config.json keys for this config (the inverse of `from_generation_config`). `restarts`
        is written only when set, so a config without it stays exactly transformers' keys."""
        extra = {"restarts": self.restarts} if self.restarts else {}
        return {
            "max_denoising_steps": self.max_denoising_steps,
            "sampler_config": {"entropy_bound": self.entropy_bound, "_cls_name": _SAMPLER_CLS_NAME},
            "t_min": self.t_min,
            "t_max": self.t_max,
            "stability_threshold": self.stability_threshold,
            "confidence_threshold": self.confidence_threshold,
            **extra,
        }

    def replace(self, **overrides: Any) -> SamplerConfig:
        """A copy with some fields changed; unknown names are an error rather than silently ignored."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown SamplerConfig field(s) {unknown}; valid fields are {sorted(known)}")
        return dataclasses.replace(self, **overrides)


# ----------------------------------------------------------------------------------------------------
# 2. Pure functions
# ----------------------------------------------------------------------------------------------------
def temperature(k_remaining: int | Tensor, cfg: SamplerConfig, device: torch.device | str | None = None) -> Tensor:
    """T_k = t_min + (t_max - t_min) * k / N, k = steps remaining (N at the first step, 1 at the last).

    k_remaining: int or int tensor of shape [] or [rows]. Returns float32 of the same shape.
    The first step runs at t_max and the last at t_min + (t_max - t_min) / N, never exactly t_min.
    """
    # The reference turns the step into an int32 tensor before dividing, so the schedule is evaluated in
    # float32, not in Python doubles; doing the same keeps l / T bit-identical.
    k = torch.as_tensor(k_remaining, device=device).to(torch.int32)
    return cfg.t_min + ((cfg.t_max - cfg.t_min) * (k / cfg.max_denoising_steps))


def entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim: [..., vocab] -> [...].

    The exact op sequence of `torch.distributions.Categorical(logits=...).entropy()`, so it is bit-identical
    to what the reference accepts and stops on. It materialises several vocab-sized temporaries: this is
    the oracle; `fused_step` computes the same quantity block by block.
    """
    log_p = logits - logits.logsumexp(dim=-1, keepdim=True)
    p = F.softmax(log_p, dim=-1)
    # clamp turns -inf log-probs (masked tokens) into a finite number so that 0 * log 0 = 0, not NaN.
    return -(torch.clamp(log_p, min=torch.finfo(log_p.dtype).min) * p).sum(-1)


def entropy_bound_accept(entropies: Tensor, bound: float | Tensor, *, stable: bool = False) -> Tensor:
    """Entropy-bound acceptance (Ben-Hamu et al., arXiv 2505.24857): [rows, canvas] float -> [rows, canvas] bool.

    1. Sort the entropies ascending.
    2. Accept position j of the sorted list iff cumsum(H)_j - H_j <= bound. H_j is the running max because
       the list is sorted, so this is sum - max <= bound, an upper bound on the mutual information of the
       accepted tokens. The lowest-entropy position always passes (H_1 - H_1 = 0).
    3. Scatter the mask back to canvas order.

    bound: float, or a float tensor broadcastable to [rows, 1] for per-row bounds.
    stable=False is the reference's `torch.sort` call, whose tie order is whatever that kernel does; the
    cut can fall between tied entropies, so only that call matches the reference bit for bit.
    stable=True breaks ties by canvas position (earlier first), the same on every device.
    """
    if stable:
        sorted_h, order = torch.sort(entropies, dim=-1, descending=False, stable=True)
    else:
        sorted_h, order = torch.sort(entropies, dim=-1, descending=False)
    if isinstance(bound, Tensor) and bound.dim() == 1:
        bound = bound[:, None]
    sorted_accept = torch.cumsum(sorted_h, dim=-1) - sorted_h <= bound
    return torch.scatter(torch.zeros_like(sorted_accept), -1, order, sorted_accept)


def renoise(candidates: Tensor, accepted: Tensor, noise_tokens: Tensor) -> Tensor:
    """Next canvas: the candidate where accepted, a fresh noise token elsewhere. All [rows, canvas].

    The reference first falls back to the *current* canvas where not accepted and then overwrites exactly
    those positions with noise, so the current canvas never survives a step.
    """
    return torch.where(accepted, candidates, noise_tokens)


def freeze_finished(finished: Tensor, old: Tensor, new: Tensor) -> Tensor:
    """Keep `old` for rows that already stopped: finished [rows] bool, old/new [rows, ...]."""
    return torch.where(finished.view(-1, *([1] * (new.dim() - 1))), old, new)


def stable_and_confident(
    history: Tensor, argmax_canvas: Tensor, entropies: Tensor, confidence_threshold: float
) -> tuple[Tensor, Tensor]:
    """One update of the stable-and-confident stop: returns (stop [rows] bool, new history).

    history: [S, rows, canvas] drafts of the previous S steps, -1 where none yet (S = stability_threshold;
    S = 0 means confidence only). argmax_canvas: [rows, canvas]. entropies: [rows, canvas].
    1. stable: the draft equals each of the S previous drafts (an empty history is trivially stable).
    2. confident: mean entropy over the canvas < confidence_threshold.
    3. The history drops its oldest draft and appends this one.
    Because the history starts at -1, with S >= 1 the earliest stop is the second step of a canvas.
    """
    if history.shape[0] == 0:
        stable = torch.ones(argmax_canvas.shape[0], dtype=torch.bool, device=argmax_canvas.device)
    else:
        stable = (history == argmax_canvas[None]).all(dim=-1).all(dim=0)
        history = torch.cat([history[1:], argmax_canvas[None].to(history.dtype)])
    confident = torch.mean(entropies, dim=-1) < confidence_threshold
    return stable & confident, history


@dataclass
class StopState:
    """The per-row state of the stable-and-confident stop: the last `stability_threshold` drafts."""

    stability_threshold: int
    confidence_threshold: float
    history: Tensor | None = None  # [stability_threshold, rows, canvas]; allocated on the first update

    @classmethod
    def from_config(cls, cfg: SamplerConfig) -> StopState:
        return cls(cfg.stability_threshold, cfg.confidence_threshold)

    def reset(self, rows: Tensor | None = None) -> None:
        """Forget the history: of every row (new canvas for the whole batch), or of the rows in a [rows] bool mask."""
        if rows is None or self.history is None:
            self.history = None
        else:
            self.history = torch.where(rows[None, :, None], -1, self.history)

    def update(self, argmax_canvas: Tensor, entropies: Tensor) -> Tensor:
        """Feed this step's draft [rows, canvas] and entropies [rows, canvas]; returns stop [rows] bool."""
        if self.history is None:
            shape = (self.stability_threshold, *argmax_canvas.shape)
            self.history = torch.full(shape, -1, dtype=argmax_canvas.dtype, device=argmax_canvas.device)
        stop, self.history = stable_and_confident(self.history, argmax_canvas, entropies, self.confidence_threshold)
        return stop


# ----------------------------------------------------------------------------------------------------
# 3. Reference-compatible step (global RNG, same draws as transformers `generate`)
# ----------------------------------------------------------------------------------------------------
def reference_init_canvas(rows: int, canvas_len: int, vocab: int, device: torch.device | str | None = None) -> Tensor:
    """A fresh canvas of uniform tokens over the full vocab: [rows, canvas_len] int64, from the global RNG.

    The same call as `EntropyBoundSampler.initialize_canvas`, which is also the renoise draw.
    """
    return torch.randint(low=0, high=vocab, size=(rows, canvas_len), device=device)


class ReferenceStep(NamedTuple):
    canvas: Tensor  # [rows, canvas] int64, the next canvas (frozen for stopped rows)
    argmax: Tensor  # [rows, canvas] int64, the draft (frozen for stopped rows)
    sc_logits: Tensor  # [rows, canvas, vocab] processed logits for self-conditioning (frozen, cast to sc_dtype)
    entropies: Tensor  # [rows, canvas] float, entropies of the processed logits
    accepted: Tensor  # [rows, canvas] bool
    candidates: Tensor  # [rows, canvas] int64, the multinomial draws
    finished: Tensor | None  # [rows] bool, updated stop flags (None when no stop state was given)


def reference_step(
    logits: Tensor,
    k_remaining: int,
    cfg: SamplerConfig,
    current_canvas: Tensor,
    *,
    argmax_canvas: Tensor | None = None,
    sc_logits: Tensor | None = None,
    finished: Tensor | None = None,
    stop: StopState | None = None,
    sc_dtype: torch.dtype | None = None,
) -> ReferenceStep:
    """transformers' `_denoising_step` after the decoder pass, op for op. logits: [rows, canvas, vocab].

    current_canvas / argmax_canvas: [rows, canvas] (argmax defaults to the current canvas, as at the start
    of a canvas in the reference); sc_logits: the previous step's `sc_logits` or None at the first step;
    finished: [rows] bool of rows that stopped in this canvas; stop: the stop state, or None to run
    without adaptive stopping (then nothing is frozen). sc_dtype: the embedding dtype; the reference
    stores the self-conditioning logits in it (bf16 for real checkpoints).

    1. processed logits l' = l / T_k (T_k as a float32 0-dim tensor)
    2. candidates = multinomial(softmax(l', fp32).view(rows*canvas, V), 1)   <- RNG draw 1
    3. draft = argmax(l')
    4. accept = entropy_bound_accept(entropy(l'), entropy_bound)
    5. renoise with reference_init_canvas(rows, canvas, V)                   <- RNG draw 2
    6. rows that already stopped keep their canvas, draft and sc logits; the stop flags are OR-ed
    7. sc_logits = l' cast to sc_dtype
    """
    rows, canvas_len, vocab = logits.shape
    # 1.
    processed = logits / temperature(k_remaining, cfg, logits.device)
    # 2. softmax in fp32 over the full vocab, then the multinomial fast path (see the module docstring).
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
    candidates = torch.multinomial(probs.view(-1, vocab), num_samples=1).squeeze(-1).view(rows, canvas_len)
    # 3.
    argmax = torch.argmax(processed, dim=-1)
    # 4.
    entropies = entropy(processed)
    accepted = entropy_bound_accept(entropies, cfg.entropy_bound)
    # 5. drawn even for rows that stopped: the reference always renoises the whole batch.
    canvas = renoise(candidates, accepted, reference_init_canvas(rows, canvas_len, vocab, logits.device))
    # 6. The reference only freezes inside `if finished.any()`; an unconditional where gives the same
    # values without the host sync.
    if stop is not None:
        if finished is None:
            finished = torch.zeros(rows, dtype=torch.bool, device=logits.device)
        if argmax_canvas is None:
            argmax_canvas = current_canvas
        argmax = freeze_finished(finished, argmax_canvas, argmax)
        canvas = freeze_finished(finished, current_canvas, canvas)
        if sc_logits is not None:
            processed = freeze_finished(finished, sc_logits, processed)
        # The reference recomputes entropies on the frozen logits; they differ only for rows that are
        # already finished, whose flag is OR-ed, so this step's entropies give the same flags.
        finished = finished | stop.update(argmax, entropies)
    # 7.
    sc_out = processed if sc_dtype is None else processed.to(sc_dtype)
    return ReferenceStep(canvas, argmax, sc_out, entropies, accepted, candidates, finished)


# ----------------------------------------------------------------------------------------------------
# 4. Fused, memory-bounded, batch-invariant step (per-row generators)
# ----------------------------------------------------------------------------------------------------
FUSED_BLOCK = HEAD_BLOCK  # vocab entries per block on the CPU (in general `vocab_block`): the draws depend on it
CHUNK = 64  # entries per chunk of the within-block inverse CDF (see _fused, 4.)

_F32_MIN = torch.finfo(torch.float32).min
_F64_MIN = torch.finfo(torch.float64).min
_LOG2E = 1.4426950408889634  # 1 / ln 2: the step's exponentials are exp2(d * log2 e)
_LN2 = 0.6931471805599453


def _first_zero(d: Tensor) -> Tensor:
    """The first index of each row's 0 in `d` `[N, n]` fp32, whose entries are 0 or negative (`x - max(x)`, scaled
    by a positive factor, so 0 exactly where x holds its maximum): `torch.max(x, dim=-1)`'s index, by integer ops.

    On the CPU torch's max-with-index is a scalar loop, ~15x slower than its max without one; this is one integer
    pass and a max. As int32 a negative float has the sign bit set and +0 is 0, so `bits | (n - 1 - i)` is
    negative except at the zeros, where it is `n - 1 - i`, largest at the first one. A row with no 0 (NaN logits)
    gets index 0. One corner differs from torch.max: a row whose max is 0.0 holding both -0.0 and +0.0 gets its
    first +0.0 (x - max is -0.0 at a -0.0 when the max is +0.0); the soft-capped head never gives -0.0."""
    n = d.shape[-1]
    rev = torch.arange(n - 1, -1, -1, dtype=torch.int32, device=d.device)
    idx = (n - 1) - torch.bitwise_or(d.view(torch.int32), rev).amax(dim=-1).long()
    return torch.where((idx >= 0) & (idx < n), idx, 0)


def _sum_exp(x: Tensor, shift: Tensor) -> Tensor:
    """`exp(x - shift)` summed over the last dim, in fp32, as exp2 of `(x - shift) * log2 e`: torch's CPU exp (and
    logsumexp) takes a slow path for arguments far below 0, where most of a vocabulary's entries are."""
    return torch.exp2((x - shift).mul_(_LOG2E)).sum(-1)


def canvas_seed(seed: int, canvas_index: int) -> int:
    """A 63-bit seed for (row seed, canvas index), mixed with splitmix64 so neighbouring pairs decorrelate."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + canvas_index + 1) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) >> 1


def n_blocks(vocab: int, block: int = FUSED_BLOCK) -> int:
    return -(-vocab // block)


def _block(block: int | None, device, vocab: int) -> int:
    """The step's block: `block`, or the device's (`vocab_block`); a vocabulary smaller than it is one block of
    `vocab` entries (the same draws, n_blocks is 1 either way, without padding every position to a whole block)."""
    return min(vocab_block(device if device is not None else "cpu") if block is None else block, vocab)


def fused_init_canvas(
    row_generators: Sequence[torch.Generator], canvas_len: int, vocab: int, device: torch.device | str | None = None
) -> Tensor:
    """A fresh canvas [rows, canvas_len] int64, row r drawn from row_generators[r] only (on the generator's own
    device, then moved: CPU generators give the same canvas on every device)."""
    return torch.stack(
        [torch.randint(0, vocab, (canvas_len,), generator=g, device=g.device) for g in row_generators]
    ).to(device)


def draw_step_noise(
    row_generators: Sequence[torch.Generator], canvas_len: int, vocab: int, device: torch.device | str | None = None,
    block: int | None = None,
) -> tuple[Tensor, Tensor]:
    """One step's randomness: (uniforms [rows, canvas, n_blocks + 1] float64, renoise tokens [rows, canvas] int64).
    block: the step's vocabulary block (None: `vocab_block(device)`, what the step itself uses by default).

    Per row, in row order: canvas_len * (n_blocks + 1) uniforms (per position: one per vocabulary block for the
    block choice, then one for the token within the chosen block), then canvas_len renoise tokens. float64
    uniforms give 53 bits of resolution, so even 1e-9-probability tokens keep their share.
    """
    nb = n_blocks(vocab, _block(block, device, vocab))
    uniforms, noise = [], []
    for g in row_generators:  # drawn where the generator lives (the same draws on every device), then moved
        uniforms.append(torch.rand(canvas_len, nb + 1, dtype=torch.float64, generator=g, device=g.device))
        noise.append(torch.randint(0, vocab, (canvas_len,), generator=g, device=g.device))
    return torch.stack(uniforms).to(device), torch.stack(noise).to(device)


class FusedStep(NamedTuple):
    canvas: Tensor  # [rows, canvas] int64, the next canvas (candidates where accepted, noise elsewhere)
    candidates: Tensor  # [rows, canvas] int64, samples of softmax(l')
    argmax: Tensor  # [rows, canvas] int64, the draft (first index of the max, like torch.argmax)
    entropies: Tensor  # [rows, canvas] float32
    accepted: Tensor  # [rows, canvas] bool
    sc_embedding: Tensor | None  # [rows, canvas, hidden] float32, softmax(l') @ E * embed_scale
    # with logprobs=n: the draft's log-probability under the raw logits (before temperature) [rows, canvas], and
    # the n most likely tokens there with theirs [rows, canvas, n] (see `raw_logprobs`)
    logprob: Tensor | None = None
    top_ids: Tensor | None = None
    top_logprobs: Tensor | None = None
    # with keep=idx (flat positions row * canvas + j): those positions' raw logits [len(idx), vocab], copied out
    # of the blocks as they pass (the grammar walk reads them; the fused head otherwise never holds logits)
    kept_logits: Tensor | None = None
    # with logprobs: the entropy (nats) of the raw distribution the log-probabilities are of [rows, canvas]
    raw_entropy: Tensor | None = None


def _inverse_cdf(ends: Tensor, target: Tensor) -> Tensor:
    """The first index whose running sum `ends` [N, n] (non-decreasing, fp64) passes `target` [N, 1]. Rounding can
    leave none (target at or above the total); then the first index holding the total, the last one with mass."""
    last = torch.searchsorted(ends, ends[:, -1:].contiguous())
    return torch.minimum(torch.searchsorted(ends, target.contiguous(), right=True), last)


def _keep(kept: Tensor, take: Tensor, chosen: Tensor, by_index: bool) -> Tensor:
    """Rows where `take` holds get `chosen`'s row, the others keep theirs (the same bits either way).

    by_index (CPU) copies only the rows that switch blocks (after the first few blocks, few do); without it (a
    GPU, where the index list would cost a host sync) it is one elementwise select over the whole block.
    """
    if not by_index:
        return torch.where(take[:, None], chosen, kept)
    rows = take.nonzero().squeeze(1)
    if rows.numel():
        kept.index_copy_(0, rows, chosen.index_select(0, rows))
    return kept


def fused_step(
    logits: Tensor,
    k_remaining: int | Tensor,
    cfg: SamplerConfig,
    row_generators: Sequence[torch.Generator] | None = None,
    *,
    draws: tuple[Tensor, Tensor] | None = None,
    embedding: Tensor | None = None,
    embed_scale: float = 1.0,
    block: int | None = None,
    logprobs: int | None = None,
    floor: Tensor | None = None,
) -> FusedStep:
    """One denoising step over materialised logits [rows, canvas, vocab] (any float dtype). See `_fused`.
    floor: [rows, canvas] fp32, the lowest processed logit l / T_k each position keeps (`truncation_floor`;
    -inf keeps all), or None."""
    rows, canvas_len, vocab = logits.shape

    def source(lo: int, hi: int) -> Tensor:
        return logits[..., lo:hi].reshape(rows * canvas_len, hi - lo).float()

    return _fused(source, rows, canvas_len, vocab, logits.device, k_remaining, cfg, row_generators, draws,
                  embedding, embed_scale, block, logprobs, floor=floor)


def repetition_penalty(logits: Tensor, penalty: float) -> Tensor:
    """vLLM's (and transformers') repetition penalty on the logits of tokens seen: l / p where l > 0, else l * p."""
    return torch.where(logits > 0, logits / penalty, logits * penalty)


def fused_head_step(
    hidden: Tensor,
    embedding: Tensor,
    softcap: float | None,
    k_remaining: int | Tensor,
    cfg: SamplerConfig,
    row_generators: Sequence[torch.Generator] | None = None,
    *,
    draws: tuple[Tensor, Tensor] | None = None,
    embed_scale: float = 1.0,
    block: int | None = None,
    logprobs: int | None = None,
    self_conditioning: bool = True,
    keep: Tensor | None = None,
    bias: Tensor | None = None,
    repetition: Sequence[tuple[int, Tensor, float, Tensor]] = (),
    after: Tensor | None = None,
    bans: Sequence[tuple[int, int, Sequence[int]]] = (),
) -> FusedStep:
    """The LM head fused into the step: hidden [rows, canvas, H] (final-normed) in, logits never materialised.

    Each block's logits are computed, used and dropped; bitwise the same results as
    `fused_step(model.logits(hidden), ...)`, since the model's head computes the same blocks the same way.
    self_conditioning=False skips the soft embedding (`sc_embedding` is None), as `embedding=None` does there.
    keep: flat positions whose logits to return as `kept_logits` (the same bits `model.logits` gives).
    bias: [rows, V] fp32 added to every position's logits of its row (logit_bias, penalties; 0.0 where none), as
    the plain path adds it to materialised logits: the same bits. Then repetition: (row, sorted token ids on
    the device, penalty p, the same ids on the host), `repetition_penalty` at those tokens of the row (only they
    are touched); then after ([rows, V]) added (the penalties, when a repetition penalty comes between). bans:
    (row, n, token ids) with -inf at those tokens of the row's first n positions (min_tokens).
    """
    rows, canvas_len, _ = hidden.shape
    flat = hidden.reshape(rows * canvas_len, -1)
    vocab = embedding.shape[0]

    # each repeated row's token ids per block: searched once, not per block and row
    step = _block(block, hidden.device, vocab)
    spans = [(i, ids, p, torch.searchsorted(host, torch.arange(0, vocab + step, step)).tolist())
             for i, ids, p, host in repetition]

    def source(lo: int, hi: int) -> Tensor:
        logits = head_block_logits(flat, embedding, lo, hi, softcap)
        if bias is None and not repetition and after is None and not bans:
            return logits
        v = logits.view(rows, canvas_len, hi - lo)
        if bias is not None:
            v = v + bias[:, None, lo:hi]
        for i, ids, p, at in spans:
            b = lo // step
            sel = ids[at[b]:at[b + 1]] - lo
            if len(sel):
                v[i, :, sel] = repetition_penalty(v[i, :, sel], p)
        if after is not None:
            v = v + after[:, None, lo:hi]
        for i, n, ids in bans:
            inside = [t - lo for t in ids if lo <= t < hi]
            if inside:
                v[i, :n, inside] = float("-inf")
        return v.reshape(rows * canvas_len, hi - lo)

    return _fused(source, rows, canvas_len, vocab, hidden.device, k_remaining, cfg, row_generators, draws,
                  embedding if self_conditioning else None, embed_scale, block, logprobs, keep)


def _fused(source, rows, canvas_len, vocab, device, k_remaining, cfg, row_generators, draws, embedding,
           embed_scale, block, logprobs=None, keep_rows=None, floor=None) -> FusedStep:
    """One denoising step in one streaming pass over the vocabulary, one block at a time, in a fixed order.

    source(lo, hi) returns the fp32 logits of entries [lo, hi) (at most one block) for all N = rows * canvas
    positions.
    1. Draw, per position, one uniform per block and one more, plus a renoise token.
    2. For each block b (in order): x = l / T_k; block max and first argmax; d = (x - block max) / ln 2 and
       e = exp2(d), which is exp(x - block max); block sums of e and e * d; the self-conditioning soft embedding
       accumulated online with a running max (as flash-attention's softmax); and the *block choice* by weighted
       reservoir sampling: with R_b the mass of blocks 0..b, block b replaces the chosen block when
       u_b * R_b < mass_b, so block b ends up chosen with probability mass_b / R_total, exactly its share. The
       chosen block's e and its sums over chunks of CHUNK entries (which also give the block's sum) are kept per
       position. exp2 rather than exp: torch's CPU exp takes a slow path for arguments far below 0, which most of
       a vocabulary's entries are (8 ms against 0.7 for a [256, 4096] block of logits spread over +-100).
    3. Combine the blocks in fp64: global max and draft, logsumexp, entropy.
    4. Within the chosen block: inverse CDF of its kept e with the last uniform, in two levels: a binary search
       of the running chunk sums picks the chunk, one of the chunk's running sums the entry. Two small fp64
       cumulative sums instead of one over the block (a 4,096-entry fp64 cumsum per position was a third of a
       step at 8,192); the chunk sums are fp32, so a chunk's share is exact to float rounding (~1e-7 relative).
    5. Accept (stable tie order) and renoise.
    With `floor` ([rows, canvas], the lowest x each position keeps), every x below it is -inf from step 2 on: the
    sample, entropy and soft embedding are those of the truncated distribution; the draft (the max stays) and the
    log-probabilities (raw logits) do not change.
    With `logprobs=n` (None: skipped, no cost), each block also feeds an online logsumexp of the *raw* logits
    (before temperature), their value at the block's argmax and their top n, for `raw_logprobs`' quantities.
    Every quantity is computed on whole blocks in a fixed order and reduced along the vocabulary only, so tokens,
    drafts, entropies and accept masks are bitwise the same for any batch a row sits in (given the same
    logits). A block of [N, 4096] fp32 temporaries stays in the CPU's cache between the ~10 elementwise passes
    over it; peak extra memory is a few of them.
    """
    N = rows * canvas_len
    block = _block(block, device, vocab)
    if block < 1:
        raise ValueError(f"block must be positive, got {block}")
    nb = n_blocks(vocab, block)
    temp = temperature(k_remaining, cfg, device).reshape(-1, 1).expand(rows, canvas_len).reshape(N, 1)

    # 1.
    if draws is None:
        if row_generators is None or len(row_generators) != rows:
            raise ValueError("fused_step needs one generator per row (or precomputed draws)")
        draws = draw_step_noise(row_generators, canvas_len, vocab, device, block)
    uniforms, noise_tokens = draws
    if uniforms.shape != (rows, canvas_len, nb + 1):
        raise ValueError(f"draws: uniforms must be [rows, canvas, n_blocks + 1] = {[rows, canvas_len, nb + 1]}, "
                         f"got {list(uniforms.shape)} (draw them with the same block size)")
    uniforms = uniforms.reshape(N, nb + 1)
    if floor is not None:
        floor = floor.reshape(N, 1).to(device=device, dtype=torch.float32)

    # 2.
    block_max = torch.empty(N, nb, dtype=torch.float32, device=device)
    block_arg = torch.empty(N, nb, dtype=torch.int64, device=device)
    block_sum = torch.empty(N, nb, dtype=torch.float32, device=device)
    block_sum_ed = torch.empty(N, nb, dtype=torch.float32, device=device)
    run_max = torch.full((N,), _F32_MIN, dtype=torch.float32, device=device)
    run_mass = torch.zeros(N, dtype=torch.float64, device=device)  # in units of exp(. - run_max)
    chunks = -(-block // CHUNK)  # the inverse CDF's first level: sums of CHUNK consecutive entries
    width = chunks * CHUNK
    kept = kept_sums = None  # e of the chosen block (zero-padded to `width`) and its chunk sums, from block 0 on
    kept_block = torch.zeros(N, dtype=torch.int64, device=device)
    if embedding is not None:
        sc_acc = torch.zeros(N, embedding.shape[1], dtype=torch.float32, device=device)
    if logprobs is not None:
        raw_max = torch.full((N,), _F64_MIN, dtype=torch.float64, device=device)  # running shift of the raw lse
        raw_sum = torch.zeros(N, dtype=torch.float64, device=device)  # in units of exp(. - raw_max)
        raw_ed = torch.zeros(N, dtype=torch.float64, device=device)  # sum of exp(l - raw_max) (l - raw_max), same
        raw_at_arg = torch.empty(N, nb, dtype=torch.float32, device=device)
        top_v = torch.empty(N, 0, dtype=torch.float32, device=device)
        top_i = torch.empty(N, 0, dtype=torch.int64, device=device)
    kept_logits = None if keep_rows is None else \
        torch.empty(len(keep_rows), vocab, dtype=torch.float32, device=device)
    cpu = runtime.host_reads_free(device)  # the CPU's choices below (tests patch it to run an accelerator's)
    for b in range(nb):
        lo, hi = b * block, min(b * block + block, vocab)
        raw = source(lo, hi)
        if keep_rows is not None:
            kept_logits[:, lo:hi] = raw[keep_rows]
        x = raw / temp
        shift_max = None
        if floor is not None:
            if logprobs is not None:  # the raw log-sum-exp's shift below is the block's max before the cut
                shift_max = x.amax(dim=-1)
            x.masked_fill_(x < floor, float("-inf"))
        if cpu:  # the max alone, its first index from d below (_first_zero): the same index, ~4x cheaper
            bmax = x.amax(dim=-1)
        else:  # one kernel on a GPU; max(dim) returns the first index of the max, like argmax
            bmax, barg = x.max(dim=-1)
        # Clamping the max keeps an all -inf block at e = 0 instead of NaN; clamping d makes e * d = 0 there.
        # d is (x - max) / ln 2, in log2 units: exp2 is exact to ~1 ulp and several times faster than exp on the
        # CPU, and the product's rounding moves e by < 2e-6 relative over the range that carries mass (|d| < 30
        # nats).
        m_b = bmax.clamp(min=_F32_MIN)
        d = x.sub_(m_b[:, None]).mul_(_LOG2E).clamp_(min=_F32_MIN)
        if cpu:
            barg = _first_zero(d)
        block_max[:, b], block_arg[:, b] = bmax, barg
        if logprobs is not None:
            raw_at_arg[:, b] = raw.gather(1, barg[:, None]).squeeze(1)
            # The block's max of x times T is its raw max (to rounding): a safe shift, with no pass for a max.
            shift = ((bmax if shift_max is None else shift_max) * temp[:, 0]).clamp(min=_F32_MIN)
            # fp32 in the block (exp2, as `_sum_exp`), combined in fp64 as above; for the raw entropy also the sum
            # of e * (l - shift), all shifted to the running max as the blocks come (-inf entries: e = 0, d finite)
            d_raw = (raw - shift[:, None]).clamp_(min=_F32_MIN)
            e_raw = torch.exp2(d_raw * _LOG2E)
            part, part_ed = e_raw.sum(-1).double(), torch.linalg.vecdot(e_raw, d_raw).double()
            new_rmax = torch.maximum(raw_max, shift.double())
            old_d, new_d = raw_max - new_rmax, shift.double() - new_rmax
            a, c = torch.exp(old_d), torch.exp(new_d)
            raw_ed = (raw_ed + old_d * raw_sum) * a + (part_ed + new_d * part) * c
            raw_sum = raw_sum * a + part * c
            raw_max = new_rmax
            if logprobs:
                v, i = raw.topk(min(logprobs, hi - lo), dim=-1)
                top_v, top_i = torch.cat([top_v, v], dim=1), torch.cat([top_i, i + lo], dim=1)
                top_v, keep = top_v.topk(min(logprobs, top_v.shape[1]), dim=-1)
                top_i = top_i.gather(1, keep)
        e = torch.exp2(d)
        chosen = e if hi - lo == width else F.pad(e, (0, width - (hi - lo)))  # padding has zero mass
        sums = chosen.view(N, chunks, CHUNK).sum(dim=-1)
        bsum = sums.sum(dim=-1)
        block_sum[:, b] = bsum
        new_max = torch.maximum(run_max, m_b)
        old_scale = torch.exp((run_max - new_max).double())
        mass_b = bsum.double() * torch.exp((m_b - new_max).double())
        run_mass = run_mass * old_scale + mass_b
        take = uniforms[:, b] * run_mass < mass_b
        if b == 0:  # every row with mass takes block 0 (u < 1), and a row without has e = 0 there
            kept, kept_sums = chosen, sums
        else:
            kept = _keep(kept, take, chosen, by_index=cpu)
            kept_sums = torch.where(take[:, None], sums, kept_sums)
        kept_block = torch.where(take, b, kept_block)
        if embedding is not None:
            part = (e.to(embedding.dtype) @ embedding[lo:hi]).float()
            sc_acc = sc_acc * old_scale.float()[:, None] + part * torch.exp(m_b - new_max)[:, None]
        block_sum_ed[:, b] = torch.linalg.vecdot(e, d)  # in log2 units (times ln 2 below)
        run_max = new_max

    # 3. Blocks are combined in fp64 relative to the global max m.
    global_max, best_block = block_max.max(dim=-1)
    argmax = best_block * block + block_arg.gather(-1, best_block[:, None]).squeeze(-1)
    delta = (block_max.double() - global_max.double()[:, None]).clamp(min=_F64_MIN)
    weight = torch.exp(delta)  # exp(block max - m), 0 for all -inf blocks
    block_sum = block_sum.double()
    total = (block_sum * weight).sum(-1)  # sum exp(x - m) >= 1: the max entry contributes exactly 1
    # H = log s - sum_v e_v (x_v - m) / s, where the per-block sums are shifted from block max to m.
    entropies = (torch.log(total) - (weight * (block_sum_ed.double() * _LN2 + delta * block_sum)).sum(-1) / total
                 ).float()

    # 4. Two levels: the chunk, then the entry within it.
    ends = torch.cumsum(kept_sums.double(), dim=-1)  # where each chunk's mass ends
    target = uniforms[:, nb:] * ends[:, -1:]
    c = _inverse_cdf(ends, target)  # [N, 1]
    target = target - torch.where(c > 0, ends.gather(1, (c - 1).clamp_(min=0)), 0.0)  # >= 0: ends[c - 1] <= target
    entries = kept.view(N, chunks, CHUNK).gather(1, c[:, :, None].expand(N, 1, CHUNK)).squeeze(1)
    i = _inverse_cdf(torch.cumsum(entries.double(), dim=-1), target)
    candidates = (kept_block * block + c.squeeze(1) * CHUNK + i.squeeze(1)).view(rows, canvas_len)

    # 5.
    entropies = entropies.view(rows, canvas_len)
    accepted = entropy_bound_accept(entropies, cfg.entropy_bound, stable=True)
    canvas = renoise(candidates, accepted, noise_tokens)
    sc = None
    if embedding is not None:
        # sc_acc is in units of exp(. - run_max) = exp(. - global max); divide by the total mass in those units.
        sc = (sc_acc / total.float()[:, None] * embed_scale).view(rows, canvas_len, -1)
    lp = top_ids = top_lp = raw_h = None
    if logprobs is not None:
        raw_h = (torch.log(raw_sum) - raw_ed / raw_sum).float().view(rows, canvas_len)
        lse = raw_max + torch.log(raw_sum)
        at = raw_at_arg.gather(-1, best_block[:, None]).squeeze(-1)
        lp = (at.double() - lse).float().view(rows, canvas_len)
        if logprobs:
            top_ids = top_i.view(rows, canvas_len, -1)
            top_lp = (top_v.double() - lse[:, None]).float().view(rows, canvas_len, -1)
    return FusedStep(canvas, candidates, argmax.view(rows, canvas_len), entropies, accepted, sc, lp, top_ids,
                     top_lp, kept_logits, raw_h)


def draw(probs: Tensor, generator: torch.Generator) -> int:
    """One token from `probs` [V] (non-negative, any positive sum), by inverse CDF in float64 on one uniform of
    `generator` (a CPU generator; probs may live on any device). A token of probability 0 is never drawn.
    Used where one token is drawn at a time (AR sampling, the grammar walk): `torch.multinomial` takes ~6.5 ms
    over 262,144 entries on this CPU, this ~0.3 ms."""
    cdf = probs.double().cumsum(0)
    u = torch.rand((), dtype=torch.float64, generator=generator).to(cdf.device)
    return int(torch.searchsorted(cdf, u * cdf[-1], right=True).clamp(max=probs.numel() - 1))


def truncate(probs: Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> Tensor:
    """`probs` [V] with the tail cut as vLLM cuts it for sampling, the rest left as it is (`draw` takes any
    positive sum), in vLLM's order: tokens at least `min_p` times the most likely one's probability, then the
    `top_k` most likely of those (0: all), then the fewest most likely of what is left whose share of its
    probability reaches `top_p` (the token that crosses it included). The most likely token always stays. Ties
    are ranked in index order, as argmax breaks them, so a cut to one token is greedy decoding."""
    keep = torch.ones_like(probs, dtype=torch.bool)
    if min_p > 0:
        keep &= probs >= min_p * probs.max()
    if top_k or top_p < 1:
        p, idx = probs.sort(descending=True, stable=True)  # ties in index order, as argmax breaks them
        rank_keep = keep[idx]
        if top_k:
            rank_keep[top_k:] = False
        if top_p < 1:
            left = p.double() * rank_keep
            before = left.cumsum(0) - left  # mass of the tokens left and ranked above each one
            rank_keep &= before < top_p * left.sum()
        keep = torch.zeros_like(keep).scatter(0, idx, rank_keep)
    keep[probs.argmax()] = True
    return probs.masked_fill(~keep, 0)


def truncation_floor(logits: Tensor, temperature: float | Tensor = 1.0, top_k: int = 0, top_p: float = 1.0,
                     min_p: float = 0.0) -> Tensor:
    """The lowest processed logit x = logits / temperature each position keeps under min_p, top_k and top_p
    (`truncate`'s cut, in its order), for a diffusion step: logits [N, V] fp32 -> [N] fp32 in x's units, -inf
    where nothing is cut. x is never materialised: its values are the logits' divided, bit for bit the step's.

    A diffusion step cuts every position of a canvas at once, so the cut is a threshold on x rather than a sorted
    list per position: a token whose x ties the floor stays (with ties at the boundary, top_k may keep more than
    k; vLLM's and transformers' top_k cut at the k-th value the same way). The position's max always stays.
    min_p is `x >= max + ln(min_p)`, top_k the k-th largest x; top_p then takes the fewest most likely of the
    tokens left whose share of their mass (exp(x - max)) reaches top_p, read off the top 64 values per position,
    then 512, 4,096 and 32,768 for the positions whose nucleus is wider, then all of them (a flat distribution's
    nucleus holds most of the vocabulary: top_p over a wide one is a sort per position). Growing by 8 was the
    fastest on the bench's random 262,144-vocabulary model (19 s a canvas against 25 s by 16 and 23 s by 4)."""
    N, n = logits.shape
    t = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device)
    m = logits.amax(dim=-1) / t  # the max of x (division by t > 0 keeps the order, and rounds monotonically)
    floor = torch.full_like(m, float("-inf"))
    if min_p > 0:
        floor = m + math.log(min_p)
    if 0 < top_k < n:
        floor = torch.maximum(floor, logits.topk(top_k, dim=-1).values[:, -1] / t)
    if top_p >= 1:
        return floor
    # the mass left, exp(x - max) summed (exp2 in fp32, as the step's own sums) over column blocks that stay in cache
    total = torch.zeros(N, dtype=torch.float64, device=logits.device)
    for lo in range(0, n, HEAD_BLOCK):
        xb = logits[:, lo:lo + HEAD_BLOCK] / t
        total += _sum_exp(xb.masked_fill_(xb < floor[:, None], float("-inf")), m[:, None]).double()
    target = top_p * total  # the share of it that the nucleus must reach
    todo = torch.arange(N, device=logits.device)
    k = min(64, n)
    while todo.numel():
        rows = logits if todo.numel() == N else logits[todo]  # (a copy of the rows still open)
        # descending; for a wide top k, torch's unsorted topk and a sort of its k values is ~25% cheaper
        v = (rows.topk(k, dim=-1).values if k <= 512 else
             rows.topk(k, dim=-1, sorted=False).values.sort(dim=-1, descending=True).values) / t
        w = torch.exp2((v - m[todo, None]).mul_(_LOG2E)).masked_fill_(v < floor[todo, None], 0).double()
        before = w.cumsum(-1) - w
        keep = before < target[todo, None]
        keep[:, 0] = True  # the most likely token always stays (top_p = 0 keeps it alone)
        done = ~keep[:, -1] if k < n else torch.ones_like(keep[:, -1])  # a prefix: ends inside the top k
        last = keep.sum(-1, keepdim=True) - 1
        ended = todo[done]
        floor[ended] = torch.maximum(floor[ended], v.gather(1, last).squeeze(1)[done])
        todo, k = todo[~done], min(8 * k, n)
    return floor


def raw_entropy(logits: Tensor) -> Tensor:
    """The entropy (nats) of the raw distribution softmax(logits) over materialised logits [..., V] (-inf entries
    carry no mass): H = log s - sum e d / s with d = l - max, e = exp(d), s = sum e. The fused step computes the same
    block by block for its draft positions (`FusedStep.raw_entropy`)."""
    x = logits.float()
    m = x.amax(dim=-1, keepdim=True).clamp(min=_F32_MIN)
    d = (x - m).clamp_(min=_F32_MIN)
    e = torch.exp2(d * _LOG2E)
    s = e.sum(-1).double()
    return (torch.log(s) - torch.linalg.vecdot(e, d).double() / s).float()


def raw_logprobs(logits: Tensor, tokens: Tensor, top: int = 0) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Log-probabilities under the raw logits (before temperature: the model's own distribution, as vLLM reports
    by default) over materialised logits [..., V]: of `tokens` [...], and the `top` most likely tokens
    ([..., top] ids and log-probabilities; None when top is 0). The fused step computes the same quantities
    block by block for its draft."""
    x = logits.float()
    # logsumexp as max + log(sum of exp(x - max)), summed in fp32 (`_sum_exp`) and combined in fp64: within ~1e-6
    # of fp64's logsumexp and ~2x faster than it on the CPU (prompt scoring runs this over [256, vocab] chunks). An
    # all -inf row stays -inf, as logsumexp's.
    m = x.amax(dim=-1, keepdim=True).clamp(min=_F32_MIN)
    lse = m.squeeze(-1).double() + torch.log(_sum_exp(x, m).double())
    lp = (x.gather(-1, tokens[..., None]).squeeze(-1).double() - lse).float()
    if not top:
        return lp, None, None
    v, i = x.topk(min(top, x.shape[-1]), dim=-1)
    return lp, i, (v.double() - lse[..., None]).float()
