"""Generation: block-autoregressive diffusion decoding (and autoregressive decoding of the same weights).

For each request (one *row*):
  1. prefill   encode the prompt causally into the KV cache
  2. canvas    start a canvas of uniform random tokens (or the caller's warm-start canvas)
  3. denoise   each step: decoder pass with self-conditioning -> sampler step (accept, renoise, draft, stop)
  4. emit      when the canvas is stable and confident, or its steps are spent: its argmax, cut after the
               first EOS, is the canvas's output
  5. commit    unless the row is finished (EOS, max_new_tokens, a stop string), encode that argmax canvas into
               the cache (positions continue) and go to 2
Rows are independent: each keeps its own cache row, step count, seed and options, so rows join and leave the
batch between steps and a row's tokens never depend on what else is in the batch. Every engine step runs at
most one prefill, one denoise and one commit forward over all rows that need it.

Randomness: by default each row owns a torch.Generator, reseeded per canvas (`sampler.canvas_seed`), and the
fused, block-by-block sampler step draws from it. `rng="reference"` instead replays transformers'
`generate` draw for draw from the global torch RNG (exact for one prompt at a time; see the sampler module).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import sampler as S
from .model import DiffusionGemma
from .runtime import tune_cpu_allocator
from .sampler import SamplerConfig
from .structured import Grammar, GrammarError
from .vision import ImageError, has_vision, image_spans, vision_tower

DIFFUSION, AR = "diffusion", "ar"
LOGITS_BUDGET = 64 * 2**20  # bytes of fp32 logits per step above which the LM head is fused (auto)
MAX_TOP = 20  # most alternatives GenerationParams.logprobs may ask for per token (OpenAI's top_logprobs limit)


class GenerationError(ValueError):
    """A request that cannot be run as given (reported to the caller, never a crash)."""


class ContextLengthError(GenerationError):
    """The prompt plus max_new_tokens does not fit the engine's context."""


# ---------------------------------------------------------------- requests and events
@dataclass
class GenerationParams:
    """Everything one request may set. Unset sampler options come from the checkpoint's generation_config."""

    max_new_tokens: int = 256
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    seed: int = 0
    stop: tuple[str, ...] = ()
    mode: str = DIFFUSION  # or AR: autoregressive decoding through the encoder, the baseline
    ar_temperature: float = 0.0  # AR only: 0 = greedy
    # The sampling cut, as vLLM applies it, in its order: tokens at least min_p times the likeliest one's
    # probability, the top_k most likely of those (0: all), the fewest of what is left reaching top_p of its
    # probability. AR sampling (ar_temperature > 0) draws from what is left; a diffusion step samples, measures
    # entropy and self-conditions on it (the draft, its argmax, is unchanged), as vLLM's diffusion sampler does.
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    fixed: dict[int, int] | None = None  # first canvas: position -> token kept fixed (infill / edit)
    # first canvas (AR: the first canvas_length tokens): position -> the only tokens that may be sampled there
    allowed: dict[int, Sequence[int]] | None = None
    # first canvas's starting tokens (transformers' decoder_input_ids): a draft to correct, at positions 0..n-1 (n
    # up to the canvas length; the positions after it start from the usual noise)
    init_canvas: Sequence[int] | None = None
    # OpenAI's Predicted Outputs: the output expected, or most of it (a file being edited). Diffusion only: every
    # canvas starts from the prediction's tokens that follow the output so far (found again after a canvas that
    # inserted or dropped tokens: `predicted_draft`), a draft the model keeps where it agrees; the first canvas's
    # init_canvas, if any, goes first
    prediction: Sequence[int] | None = None
    # the prompt's images (`vision.Image`), in order: the prompt holds one run of the model's image_token_id per
    # image, as long as its soft tokens (`vision.image_ids`), whose embeddings become the vision tower's features
    images: Sequence[Any] | None = None
    # token -> bias added to its logit at every position of every canvas (every AR step), OpenAI's logit_bias:
    # -100 all but bans a token, +100 all but forces it (the logits themselves are soft-capped at 30)
    logit_bias: dict[int, float] | None = None
    # OpenAI's penalties, -2..2, subtracted from a token's logit: presence once if it is in the output so far,
    # frequency times its count there. "So far" is, for diffusion, the canvases committed before the current one
    # (a canvas denoises all its positions at once), for AR the tokens before this one.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's (and transformers'): a token of the prompt or of the output so far has its logit divided by this when
    # positive, multiplied by it when negative (> 1 discourages repeats; 1: off). Applied after logit_bias, before
    # the two penalties above, in vLLM's order; "so far" as for them.
    repetition_penalty: float = 1.0
    # vLLM's: until the output holds this many tokens, EOS (unless ignore_eos) and stop_token_ids cannot be
    # sampled (diffusion: at the canvas positions before it) and stop strings do not match
    min_tokens: int = 0
    # vLLM's: tokens that end the output as EOS does; the first one sampled stays in the output unless it is a
    # special token (as EOS is), and the finish reason is "stop"
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False  # vLLM's: keep the stop string that ended the text
    # vLLM's: the text (`Done.text`, what stop strings match) leaves out the special tokens the model writes (the
    # tokens keep them); False keeps them in the text too
    skip_special_tokens: bool = False
    # vLLM's: only these tokens can be sampled, at every position of every canvas (every AR step); None: all
    allowed_token_ids: tuple[int, ...] | None = None
    # vLLM's bad_words as token-id sequences (`Pipeline.bad_words_ids` spells words as vLLM does): a one-token
    # word is never sampled; a longer one (AR only: a canvas writes its tokens together) cannot end after its
    # first tokens, so the output never holds it
    bad_words: tuple[tuple[int, ...], ...] = ()
    # Diffusion: a canvas that ends (after its restarts) with a mean entropy above this is not used; its span is
    # decoded autoregressively by the same weights instead (up to canvas_length tokens, at ar_temperature), then
    # denoising resumes with the next canvas. None: never. The model's own uncertainty routes the hard spans.
    ar_fallback: float | None = None
    ignore_eos: bool = False  # keep generating past EOS (benchmarks that force a length)
    rng: str = "row"  # "row": per-row generators (batch-invariant); "reference": transformers' global draws
    drafts: bool | None = None  # emit Draft events for this row (None: the engine's `drafts` setting)
    # None: off. n >= 0: every output token's log-probability under the raw logits (the model's distribution
    # before temperature; after logit_bias and `allowed`) at the step that emitted it, plus the n most likely
    # tokens there (at most MAX_TOP)
    logprobs: int | None = None
    # None: off. n >= 0: each prompt token's log-probability given the tokens before it (the encoder's next-token
    # distribution, as the prefill computes it; None for the first token) and the n most likely tokens there
    prompt_logprobs: int | None = None
    # structured output: the text must match this grammar (a JSON schema, a regex, ...; see structured.py)
    grammar: Grammar | None = None
    # the LoRA adapter this row runs with, on a model serving several (`adapters.attach_adapters`); 0 = the base
    adapter: int = 0
    # prefix caching (`Engine(prefix_cache=True)`): a row reuses only keys left by a row of the same salt (vLLM's
    # cache_salt: users of a shared server cannot tell from timing which prompts the others sent)
    cache_salt: str | None = None
    # whether an engine's load-adaptive step budget (`Engine(adaptive_steps=...)`) may shorten this row's canvases
    # (the server turns it off for a request that names its `steps`)
    adaptive_steps: bool = True

    @property
    def bad_tokens(self) -> frozenset[int]:
        """The bad_words of one token: never sampled."""
        return frozenset(w[0] for w in self.bad_words if len(w) == 1)

    @property
    def truncates(self) -> bool:
        """Whether min_p, top_k or top_p cut anything."""
        return self.top_k > 0 or self.top_p < 1 or self.min_p > 0

    def validate(self, canvas: int, vocab: int) -> None:
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) \
                or self.max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens must be a non-negative integer, got {self.max_new_tokens!r}")
        if self.mode not in (DIFFUSION, AR):
            raise GenerationError(f"mode must be {DIFFUSION!r} or {AR!r}, got {self.mode!r}")
        if self.rng not in ("row", "reference"):
            raise GenerationError(f"rng must be 'row' or 'reference', got {self.rng!r}")
        if self.ar_temperature < 0:
            raise GenerationError("ar_temperature must be >= 0")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise GenerationError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 <= self.top_p <= 1:
            raise GenerationError(f"top_p must be in [0, 1], got {self.top_p!r}")
        if not 0 <= self.min_p <= 1:
            raise GenerationError(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_TOP):
                raise GenerationError(f"{name} must be an integer from 0 to {MAX_TOP}, got {n!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise GenerationError("stop strings must be non-empty strings")
        for pos, tok in (self.fixed or {}).items():
            if not 0 <= pos < canvas:
                raise GenerationError(f"fixed position {pos} is outside the canvas (0..{canvas - 1})")
            if not 0 <= tok < vocab:
                raise GenerationError(f"fixed token {tok} is outside the vocabulary")
        for pos, toks in (self.allowed or {}).items():
            if not isinstance(pos, int) or not 0 <= pos < canvas:
                raise GenerationError(f"allowed position {pos!r} is outside the canvas (0..{canvas - 1})")
            if isinstance(toks, (str, bytes)) or not toks or \
                    any(not isinstance(t, int) or not 0 <= t < vocab for t in toks):
                raise GenerationError(f"allowed[{pos}] must be a non-empty list of token ids in the vocabulary")
        for tok, bias in (self.logit_bias or {}).items():
            if not isinstance(tok, int) or isinstance(tok, bool) or not 0 <= tok < vocab:
                raise GenerationError(f"logit_bias token {tok!r} is not a token id in the vocabulary")
            if not isinstance(bias, (int, float)) or isinstance(bias, bool) or not -100 <= bias <= 100:
                raise GenerationError(f"logit_bias[{tok}] must be a number from -100 to 100, got {bias!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not -2 <= value <= 2:
                raise GenerationError(f"{name} must be a number from -2 to 2, got {value!r}")
        rp = self.repetition_penalty
        if not isinstance(rp, (int, float)) or isinstance(rp, bool) or not 0 < rp < float("inf"):
            raise GenerationError(f"repetition_penalty must be a number > 0, got {rp!r}")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or self.min_tokens < 0:
            raise GenerationError(f"min_tokens must be a non-negative integer, got {self.min_tokens!r}")
        if self.min_tokens > self.max_new_tokens:
            raise GenerationError(f"min_tokens ({self.min_tokens}) must be at most max_new_tokens "
                                  f"({self.max_new_tokens})")
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("allowed_token_ids", self.allowed_token_ids)):
            if ids is None:
                continue
            if isinstance(ids, (str, bytes)) or any(not isinstance(t, int) or isinstance(t, bool)
                                                    or not 0 <= t < vocab for t in ids):
                raise GenerationError(f"{name} must be token ids in the vocabulary (0..{vocab - 1})")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise GenerationError("allowed_token_ids must name at least one token")
        if isinstance(self.bad_words, (str, bytes)) or any(
                isinstance(w, (str, bytes)) or not w or any(not isinstance(t, int) or isinstance(t, bool)
                                                            or not 0 <= t < vocab for t in w) for w in self.bad_words):
            raise GenerationError(f"bad_words must be non-empty sequences of token ids in the vocabulary "
                                  f"(0..{vocab - 1})")
        if self.ar_fallback is not None:
            if not isinstance(self.ar_fallback, (int, float)) or isinstance(self.ar_fallback, bool) \
                    or self.ar_fallback < 0:
                raise GenerationError(f"ar_fallback must be a mean entropy >= 0, got {self.ar_fallback!r}")
            if self.mode != DIFFUSION or self.grammar is not None or self.fixed:
                raise GenerationError("ar_fallback applies to free diffusion decoding (not AR, a grammar or infill)")
        if self.init_canvas is not None:
            if not 0 < len(self.init_canvas) <= canvas:
                raise GenerationError(f"init_canvas must hold 1 to {canvas} tokens, got {len(self.init_canvas)}")
            if any(not 0 <= t < vocab for t in self.init_canvas):
                raise GenerationError("init_canvas has a token outside the vocabulary")
        if self.prediction is not None:
            if self.mode != DIFFUSION:
                raise GenerationError("prediction needs diffusion decoding: AR decoding has no canvas to start from")
            if not len(self.prediction) or any(not 0 <= t < vocab for t in self.prediction):
                raise GenerationError(f"prediction must be a non-empty sequence of token ids in the vocabulary "
                                      f"(0..{vocab - 1})")
        if self.grammar is not None:
            if not isinstance(self.grammar, Grammar):
                raise GenerationError(f"grammar must be a dgemma.structured.Grammar, got {type(self.grammar)}")
            for name, clash in (("fixed", self.fixed), ("allowed", self.allowed), ("ignore_eos", self.ignore_eos),
                                ("min_tokens", self.min_tokens),
                                ("allowed_token_ids", self.allowed_token_ids is not None),
                                ("bad_words", bool(self.bad_words))):
                if clash:
                    raise GenerationError(f"a grammar cannot be combined with {name}")
            if self.rng != "row":
                raise GenerationError("a grammar needs rng='row': transformers' generate has no grammar to replay")

    def replace(self, **kw) -> "GenerationParams":
        return dataclasses.replace(self, **kw)


@dataclass
class Draft:
    """One denoising step of one row: the argmax canvas, which positions were accepted, the mean entropy (and
    each position's: the sampler's entropy at the step's temperature, what EntropyBound accepted by)."""

    request: int
    canvas: int
    step: int
    tokens: list[int]
    accepted: list[bool]
    mean_entropy: float
    attempt: int = 0  # 0, then 1, 2, ... for each restart of this canvas from fresh noise (SamplerConfig.restarts)
    entropies: list[float] | None = None


TopLogprobs = list[tuple[int, float]]  # (token, log-probability), most likely first


@dataclass
class Commit:
    """A finished canvas (or, for AR, one token): the tokens it adds to the output, and with `logprobs` asked
    for, each token's log-probability and the most likely alternatives at its position. partial=True: the run of
    a grammar row's canvas that one step committed (final, as left-to-right decoding makes its tokens); the
    canvas's own Commit then carries only the tokens after the last partial one."""

    request: int
    canvas: int
    tokens: list[int]
    steps: int
    logprobs: list[float] | None = None
    top_logprobs: list[TopLogprobs] | None = None
    partial: bool = False
    entropies: list[float] | None = None  # with logprobs: each token's raw entropy (see Done)


@dataclass
class Done:
    request: int
    tokens: list[int]
    text: str | None
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    stats: dict[str, Any]
    logprobs: list[float] | None = None  # one per token, with GenerationParams.logprobs
    top_logprobs: list[TopLogprobs] | None = None
    prompt_logprobs: list[float | None] | None = None  # one per prompt token (None first), with prompt_logprobs
    prompt_top_logprobs: list[TopLogprobs] | None = None
    # with logprobs: per token, the entropy (nats) of the distribution its log-probability is of (the raw logits at
    # the forward that emitted it): how spread the model was there, not only how sure of the token it kept
    entropies: list[float] | None = None
    prompt_ranks: list[int | None] | None = None  # with prompt_logprobs: each prompt token's rank (1: likeliest)


Event = Draft | Commit | Done


# ---------------------------------------------------------------- per-row state
class _Row:
    def __init__(self, rid: int, slot: int, prompt: list[int], params: GenerationParams, vocab: int, canvas: int):
        self.id, self.slot, self.prompt, self.p = rid, slot, prompt, params
        self.sampler = params.sampler  # as asked; a load-adaptive budget sets each canvas's own in self.p
        self.phase = "prefill"
        self.prefilled: int | None = None  # prompt tokens in the cache so far (None: its prefill has not begun)
        self.gen = torch.Generator().manual_seed(params.seed)
        self.canvas_idx = 0
        self.step = 0
        self.canvas: torch.Tensor | None = None
        self.argmax: torch.Tensor | None = None
        self.sc: torch.Tensor | None = None  # [T, H] soft embedding, or None on a canvas's first step
        self.sc_logits: torch.Tensor | None = None  # reference rng: processed logits of the last step
        self.history: list[torch.Tensor] = []
        self.out: list[int] = []
        # logprobs of the current canvas's draft: (lp [T], top ids, top lps, raw entropies [T]) or None
        self.lp: tuple | None = None
        self.out_lp: list[float] = []
        self.out_top: list[TopLogprobs] = []
        self.out_ent: list[float] = []
        self.prompt_lp: list[float | None] | None = None
        self.prompt_top: list[TopLogprobs] | None = None
        self.prompt_rank: list[int | None] | None = None
        self.steps_per_canvas: list[int] = []  # every attempt's steps, restarts included
        self.restarts_per_canvas: list[int] = []
        self.attempt = 0  # restarts of the current canvas so far
        self.spent = 0  # steps its earlier attempts took
        self.best: tuple | None = None  # (mean entropy, draft, logprobs) of its most confident unfinished attempt
        self.mean_entropy = 0.0  # of the current canvas's last step
        self.entropy_per_canvas: list[float] = []  # the mean entropy each canvas ended with
        self.decoder_passes = 0
        self.encoder_passes = 0
        self.cached = 0  # tokens of this row in the KV cache (host copy of cache.lengths[slot])
        # prefix caching: the tokens whose K/V the row's slot holds, in order (None once a failed write may have
        # left the slot inconsistent); `reused` of the prompt's first tokens were there already when it came
        self.held: list[int] | None = []
        self.spans: list[tuple[int, int]] = []  # (start, end) of each image's placeholders in the prompt
        self.reused = 0
        # prediction: where the current canvas's draft starts in it, that draft, and its tokens the output kept
        self.pred_at, self.pred_draft, self.pred_accepted = 0, [], 0
        self.source: "_Row | None" = None  # a row of the same prefill with the same prompt, whose K/V it copies
        self.finished: str | None = None
        self.t0 = time.perf_counter()
        self.t_first: float | None = None
        fixed = params.fixed or {}
        self.fixed_pos = torch.tensor(sorted(fixed), dtype=torch.long)
        self.fixed_tok = torch.tensor([fixed[k] for k in sorted(fixed)], dtype=torch.long)
        allowed = params.allowed or {}
        self.allowed_pos = torch.tensor(sorted(allowed), dtype=torch.long)
        self.banned = torch.ones(len(allowed), vocab, dtype=torch.bool)  # [constrained positions, V]
        for j, pos in enumerate(sorted(allowed)):
            self.banned[j, list(allowed[pos])] = False
        self.penalized = bool(params.presence_penalty or params.frequency_penalty)
        self.counts: Counter = Counter()  # penalties: how often each token is in out[:counted]
        self.counted = 0
        self.vocab = vocab
        # repetition_penalty: the tokens in the prompt or in out[:counted]
        self.seen: torch.Tensor | None = None
        self.seen_ids: torch.Tensor | None = None  # its token ids, sorted, on the host (`dense_adjust`)
        if params.repetition_penalty != 1:
            self.seen = torch.zeros(vocab, dtype=torch.bool)
            self.seen[torch.tensor(prompt, dtype=torch.long)] = True
        self.allow = params.allowed_token_ids
        # bad_words: one-token words are a -inf logit_bias; longer ones, last token -> the tokens before it (AR; a
        # diffusion row's are a WordBans matcher)
        self.bad_after: dict[int, list[tuple[int, ...]]] = {}
        for w in params.bad_words:
            if len(w) > 1:
                self.bad_after.setdefault(w[-1], []).append(tuple(w[:-1]))
        self.stop_ids = frozenset(params.stop_token_ids)
        self.ends: frozenset[int] = self.stop_ids  # tokens that end the output (Engine.add adds EOS)
        self.ban_ids: list[int] = []  # min_tokens: the `ends`, banned until the output holds min_tokens
        self._set_bias({**(params.logit_bias or {}), **dict.fromkeys(params.bad_tokens, float("-inf"))}, {})
        self.matcher = None  # structured.Matcher with a grammar (set by Engine.add)
        self.frontier = 0  # grammar: positions of the current canvas committed, left to right
        self.cut_at: int | None = None  # ... and where the walk ended the text in it, if it did
        self.limit = canvas  # grammar: positions of the current canvas that can reach the output
        self.g_tok = torch.zeros(canvas, dtype=torch.long)  # grammar: the committed tokens
        self.g_lp: tuple | None = None  # grammar + logprobs: (lp [T], top ids, top lps) at each commit
        self.sent = 0  # grammar: tokens of the current canvas already in `out` (sent by partial Commits)
        self.ar_left: int | None = None  # ar_fallback: tokens of the current span still to decode AR
        self.last_h: torch.Tensor | None = None  # ar_fallback: hidden state [H] of the last token in the cache
        self.fallbacks = 0  # canvases whose span was decoded AR instead
        self.ar_steps = 0  # ar_fallback: encoder forwards that decoded a token of such a span

    def _set_bias(self, pre: dict[int, float], post: dict[int, float]) -> None:
        """The additive biases: `pre` (logit_bias) before the repetition penalty, `post` (presence and frequency
        penalties) after it. Without a repetition penalty they are one sparse bias."""
        self._pre, self._post = pre, post
        bias = dict(pre)
        for tok, v in post.items():
            bias[tok] = bias.get(tok, 0.0) + v
        self.bias_ids = torch.tensor(sorted(bias), dtype=torch.long)
        self.bias = torch.tensor([float(bias[t]) for t in sorted(bias)], dtype=torch.float32)
        self._dense = None  # dense_adjust, made again when asked

    @property
    def adjusted(self) -> bool:
        """Whether this row's logits are changed at every position (`add_bias`)."""
        return bool(len(self.bias_ids)) or self.seen is not None or self.allow is not None

    def refresh_penalties(self) -> None:
        """The penalties over the output so far (`out`), for the next canvas or AR token."""
        if not (self.penalized or self.seen is not None) or self.counted == len(self.out):
            return
        new = self.out[self.counted:]  # only the tokens added since the last refresh
        self.counted = len(self.out)
        if self.seen is not None:
            self.seen[torch.tensor(new, dtype=torch.long)] = True
        post = self._post
        if self.penalized:
            self.counts.update(new)
            post = {tok: -(self.p.presence_penalty + self.p.frequency_penalty * n) for tok, n in self.counts.items()}
        self._set_bias(self._pre, post)

    def dense_adjust(self, device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """This row's logit adjustment: (bias [V], repetition ids, after [V]): l + bias; then at the tokens seen
        (`repetition ids`, sorted), l / penalty where l > 0, else l * penalty; then + after. Zero where a token has
        no bias: x + 0.0 is x, so rows and positions without one are unchanged bit for bit. Made once per bias
        (logit_bias: per request; penalties: per canvas), not per step."""
        if self._dense is None or self._dense[0].device != torch.device(device):
            sep = self.seen is not None
            bias = _dense(self._pre, self.vocab) if sep else torch.zeros(self.vocab, dtype=torch.float32)
            if not sep:
                bias[self.bias_ids] = self.bias
            if self.allow is not None:
                banned = torch.ones(self.vocab, dtype=torch.bool)
                banned[torch.tensor(self.allow, dtype=torch.long)] = False
                bias[banned] = float("-inf")
            rep = after = None
            if sep:
                rep = self.seen_ids = self.seen.nonzero()[:, 0]  # on the host too: the blocks' spans need no sync
                if self._post:
                    after = _dense(self._post, self.vocab)
            self._dense = tuple(None if x is None else x.to(device) for x in (bias, rep, after))
        return self._dense

    def add_bias(self, logits: torch.Tensor) -> None:
        """logit_bias, allowed_token_ids and the penalties, in place, on logits [..., V] (every position: they
        have no position)."""
        if self.seen is None and self.allow is None:
            if len(self.bias_ids):
                logits[..., self.bias_ids.to(logits.device)] += self.bias.to(logits.device)
            return
        bias, rep, after = self.dense_adjust(logits.device)
        logits += bias
        if rep is not None:
            logits[..., rep] = S.repetition_penalty(logits[..., rep], self.p.repetition_penalty)
        if after is not None:
            logits += after

    def bad_next(self) -> list[int]:
        """bad_words of several tokens: the tokens that would end one after the output so far (AR)."""
        out = self.out
        return [t for t, heads in self.bad_after.items()
                if any(len(h) <= len(out) and tuple(out[len(out) - len(h):]) == h for h in heads)]

    def early_bans(self) -> int:
        """min_tokens: how many positions from the next output token on may not end the output."""
        return max(0, self.p.min_tokens - len(self.out)) if self.ban_ids else 0

    def ban_early(self, logits: torch.Tensor) -> None:
        """min_tokens, in place, on logits [n, V] of the output positions from the next one on."""
        n = self.early_bans()
        if n:
            logits[:n, self.ban_ids] = float("-inf")

    def pins(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(positions, tokens) of the current canvas that are certain, as one-hot logits make them: infill's fixed
        positions on the first canvas, and a grammar's committed run."""
        out = []
        if self.canvas_idx == 0 and len(self.fixed_pos):
            out.append((self.fixed_pos, self.fixed_tok))
        if self.matcher is not None and self.frontier:
            out.append((torch.arange(self.frontier), self.g_tok[:self.frontier]))
        return out

    def constrain(self, logits: torch.Tensor, first: int = 0) -> None:
        """Ban, in place, the tokens `allowed` excludes: logits [n, V] of output positions first..first+n-1."""
        if not len(self.allowed_pos):
            return
        sel = (self.allowed_pos >= first) & (self.allowed_pos < first + logits.shape[0])
        if bool(sel.any()):
            pos = (self.allowed_pos[sel] - first).to(logits.device)
            logits[pos] = logits[pos].masked_fill(self.banned[sel].to(logits.device), float("-inf"))


# ---------------------------------------------------------------- the engine
class Engine:
    """Runs many requests through one model and one KV cache, one step at a time.

    `add` queues a request; `step` advances every live row by one forward of each kind it needs and returns the
    events; `run` drives both until all given requests are done.
    """

    def __init__(self, model: DiffusionGemma, tokenizer=None, *, max_rows: int = 8, max_len: int | None = None,
                 eos_ids: Iterable[int] | None = None, drafts: bool = False,
                 fused_head: bool | None = None, prefix_cache: bool = False, prefix_margin: int | None = None,
                 adaptive_steps: tuple[int, int] | None = None, prefill_chunk: int | None = None):
        self.model = model.eval()
        if model.device.type == "cpu":
            tune_cpu_allocator()  # every step's temporaries reused, not page-faulted in anew (runtime.py)
        self.tok = tokenizer
        cfg = model.cfg
        self.cfg = cfg
        self.T = cfg.canvas_length
        self.V = cfg.vocab_size
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        # Prefix caching (opt-in): a slot a finished row leaves keeps that row's K/V, and the next prompt that
        # starts with the same tokens takes that slot and encodes only the rest (`_pick_slot`). The sliding rings
        # get a margin (default one canvas) so that a context can be cut back that far: a chat's next turn drops
        # the empty thought channel and the unfinished last canvas of the turn before. Off by default: keys
        # encoded in two pieces differ from those encoded at once by float rounding (~1e-6 in fp32, attention's
        # reductions split differently), and a denoising canvas amplifies that, so a seed's tokens would depend on
        # what ran before. Rows of one prefill with the same prompt always share its encoding (that is exact).
        self.prefix_cache = prefix_cache
        margin = (self.T if prefix_margin is None else prefix_margin) if prefix_cache else 0
        self.cache = model.new_cache(max_rows, self.max_len, margin=margin)
        self.free = list(range(max_rows))  # least recently freed first: the slot a new prompt evicts
        self.held: list[list[int] | None] = [[] for _ in range(max_rows)]  # per free slot: the tokens it holds
        self.held_adapter = [0] * max_rows  # ... and the LoRA adapter whose keys they are
        self.held_salt: list[str | None] = [None] * max_rows  # ... and the cache salt of the row that left them
        self.rows: dict[int, _Row] = {}
        self.next_id = 0
        eos = eos_ids if eos_ids is not None else (tokenizer.eos_ids if tokenizer is not None else cfg.eos_token_id)
        self.eos = torch.tensor(sorted(set(eos)), dtype=torch.long)
        self._eos_set = frozenset(self.eos.tolist())
        self.pad = cfg.pad_token_id
        self.drafts = drafts
        # fused_head=False is the plain path: materialise the logits, then run the sampler over them. None (auto)
        # fuses only when a step's logits would pass LOGITS_BUDGET bytes: at small vocabularies one head matmul
        # is as fast as the per-block loop, at 262,144 the logits of one 256-canvas row alone are 256 MiB. Both
        # paths give the same tokens bit for bit.
        self.fused_head = fused_head
        self._logits_buf: torch.Tensor | None = None  # the plain path's logits, reused from step to step
        # Load-adaptive step budget (opt-in), (rows R, floor M): a canvas that starts while more than R diffusion
        # rows are in the engine gets at most round(N * R / rows) of its N steps, never fewer than M (nor more
        # than N). Past a few rows a denoising step costs in proportion to its rows (the forward is compute-
        # bound), so the steps a round of canvases costs stay about R * N as the load rises: latency and
        # throughput hold up, each canvas has fewer steps to converge in. A row's tokens then depend on the load
        # it met; rows with `adaptive_steps=False` keep their steps.
        if adaptive_steps is not None:
            r_, m_ = adaptive_steps
            if not (isinstance(r_, int) and isinstance(m_, int) and r_ >= 1 and m_ >= 1):
                raise GenerationError(f"adaptive_steps must be (rows >= 1, min steps >= 1), got {adaptive_steps!r}")
        self.adaptive_steps = adaptive_steps
        # Chunked prefill (opt-in): a step encodes at most this many of a new row's prompt tokens, so a long prompt
        # is encoded over several steps while the other rows go on denoising (otherwise the step that encodes it
        # at once holds them all up). A chunk's keys differ from those of one pass by float rounding, so a seed's
        # tokens depend on this setting (not on the batch: a row's chunks are cut at the same places whatever
        # runs beside it). Rows that score their prompt (prompt_logprobs) encode it at once.
        if prefill_chunk is not None and not (isinstance(prefill_chunk, int) and prefill_chunk >= 1):
            raise GenerationError(f"prefill_chunk must be a positive number of tokens, got {prefill_chunk!r}")
        self.prefill_chunk = prefill_chunk

    # ------------------------------------------------------------ requests
    def check(self, prompt: Sequence[int], params: GenerationParams) -> None:
        if len(prompt) == 0:
            raise GenerationError("the prompt is empty")
        if any(not 0 <= t < self.V for t in prompt):
            raise GenerationError("the prompt has a token outside the vocabulary")
        params.validate(self.T, self.V)
        if params.adapter:
            names = getattr(getattr(self.model, "served_adapters", None), "names", [])
            a = params.adapter
            if not isinstance(a, int) or not 0 < a <= len(names) or names[a - 1] is None:
                live = [i for i, n in enumerate(names, start=1) if n is not None]
                raise GenerationError(f"adapter must be 0 (the base) or one this model serves ({live}), got {a!r}")
        if params.stop and self.tok is None:
            raise GenerationError("stop strings need a tokenizer")
        self._check_images(prompt, params)
        self._check_choices(params)
        if params.grammar is not None:
            if self.tok is None:
                raise GenerationError("a grammar needs a tokenizer")
            try:
                params.grammar.check(self.tok)
            except GrammarError as e:
                raise GenerationError(str(e)) from None
        # The last canvas is never committed, so the cache must hold the prompt plus all canvases but one.
        commits = -(-params.max_new_tokens // self.T) - 1 if params.mode == DIFFUSION else params.max_new_tokens - 1
        need = len(prompt) + max(0, commits * self.T if params.mode == DIFFUSION else commits)
        positions = len(prompt) + params.max_new_tokens
        if need > self.max_len or positions > self.cfg.max_position_embeddings:
            raise ContextLengthError(
                f"prompt ({len(prompt)} tokens) plus max_new_tokens ({params.max_new_tokens}) exceeds the context "
                f"of {min(self.max_len, self.cfg.max_position_embeddings)} tokens"
            )

    def _check_images(self, prompt: Sequence[int], params: GenerationParams) -> None:
        """Every image has its run of placeholders in the prompt, of its length, and the model can see images."""
        images = list(params.images or ())
        if not images and not has_vision(self.model):  # a text model: its ids are text, whatever their value
            return
        spans = image_spans(prompt, self.cfg.image_token_id)
        if not images and not spans:
            return
        if images:
            try:
                vision_tower(self.model)  # built here, on first use, so that a checkpoint's problem is this error
            except ImageError as e:
                raise GenerationError(str(e)) from None
        if len(spans) != len(images):
            raise GenerationError(f"the prompt has {len(spans)} image placeholder run(s) (token "
                                  f"{self.cfg.image_token_id}) but {len(images)} image(s) came with it")
        for k, ((a, b), img) in enumerate(zip(spans, images)):
            if b - a != img.tokens:
                raise GenerationError(f"image {k} takes {img.tokens} tokens but its placeholder run in the prompt "
                                      f"has {b - a}")

    def _check_choices(self, params: GenerationParams) -> None:
        """A position whose every token is banned has nothing to sample: allowed_token_ids (and a first-canvas
        position's `allowed`) holding only tokens that end the output while min_tokens bans those there, or an
        `allowed` list outside allowed_token_ids."""
        ends = set(params.stop_token_ids) | (set() if params.ignore_eos else self._eos_set)
        banned = params.bad_tokens
        # the tokens left everywhere (None: the vocabulary less `banned`, never built: counting is enough)
        left = set(params.allowed_token_ids) - banned if params.allowed_token_ids is not None else None
        if (not left) if left is not None else len(banned) >= self.V:
            raise GenerationError("allowed_token_ids and bad_words leave no token to write")
        if params.min_tokens and (left <= ends if left is not None else len(banned | ends) >= self.V):
            what = "allowed_token_ids less the bad_words" if banned else "allowed_token_ids"
            raise GenerationError(f"{what} holds only tokens that end the output (EOS, stop tokens), so min_tokens "
                                  "leaves nothing to write before its end")
        for pos, toks in (params.allowed or {}).items():
            ok = set(toks) - banned if left is None else set(toks) & left
            if not ok - (ends if pos < params.min_tokens else set()):
                raise GenerationError(f"allowed[{pos}] leaves no token to write there (with allowed_token_ids and "
                                      "min_tokens)")

    def add(self, prompt: Sequence[int], params: GenerationParams) -> int:
        self.check(prompt, params)
        if not self.free:
            raise GenerationError("the engine is full")
        rid = self.next_id
        self.next_id += 1
        slot, keep = self._pick_slot(prompt, params)
        self.free.remove(slot)
        row = _Row(rid, slot, list(prompt), params, self.V, self.T)
        held, self.held[slot] = self.held[slot], None  # the record goes with the row until it leaves
        # prefix caching only: the tokens the slot holds, kept up to date as the row writes more
        row.held = (list(held[:keep]) if keep else []) if self.prefix_cache else None
        row.reused = keep
        if params.images:
            # the image's placeholders are the same ids whatever the image: a slot that held them would match
            # another image's prompt, so a row with images leaves no prefix record behind
            row.held = None
            row.spans = image_spans(row.prompt, self.cfg.image_token_id)
        if params.grammar is not None:
            row.matcher = params.grammar.matcher(self.tok, self.V)
        if params.mode == DIFFUSION and any(len(w) > 1 for w in params.bad_words):
            # a word of several tokens is banned where its last token would complete it, so the canvas is
            # committed left to right, as under a grammar (with it, if there is one)
            row.matcher = WordBans(params.bad_words, self.V, row.matcher)
        if not params.ignore_eos:
            row.ends = row.ends | self._eos_set
        if params.min_tokens:
            row.ban_ids = sorted(row.ends)
        self.rows[rid] = row
        return rid

    def cancel(self, rid: int) -> None:
        row = self.rows.pop(rid, None)
        if row is not None:
            self.held[row.slot] = row.held
            self.held_adapter[row.slot] = row.p.adapter
            self.held_salt[row.slot] = row.p.cache_salt
            self.free.append(row.slot)

    def _pick_slot(self, prompt: Sequence[int], params: GenerationParams) -> tuple[int, int]:
        """The free slot to run a new prompt in, and how many of the prompt's first tokens it holds already:
        the slot with the longest usable common prefix, else the least recently freed one."""
        best = (self.free[0], 0)
        if not self.prefix_cache or params.prompt_logprobs is not None:  # prompt scoring needs every position
            return best
        # AR and ar_fallback need the hidden state of the prompt's last token: it is always encoded
        limit = len(prompt) - (params.mode == AR or params.ar_fallback is not None)
        if params.images:  # text before the first image only (an image's features are not in its ids)
            limit = min(limit, image_spans(prompt, self.cfg.image_token_id)[0][0])
        for slot in self.free:
            held = self.held[slot]
            if not held or self.held_adapter[slot] != params.adapter or self.held_salt[slot] != params.cache_salt:
                continue
            n = common_prefix(held, prompt, limit)
            if n > best[1] and self.cache.can_rewind(len(held), n):
                best = (slot, n)
        return best

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix: the free slots' and the running rows' (their K/V are not kept when they
        end). Returns how many slots held one. Between two steps only."""
        n = sum(bool(h) for h in self.held) + sum(bool(r.held) for r in self.rows.values())
        self.held = [None if h is None else [] for h in self.held]
        for r in self.rows.values():
            r.held = None
        return n

    @property
    def busy(self) -> bool:
        return bool(self.rows)

    # ------------------------------------------------------------ one engine step
    @torch.no_grad()
    def step(self) -> list[Event]:
        events: list[Event] = []
        rows = list(self.rows.values())
        try:
            self._prefill([r for r in rows if r.phase == "prefill"], events)
            self._resume([r for r in rows if r.phase == "resume"])
            self._denoise([r for r in rows if r.phase == "denoise"], events)
            self._ar([r for r in rows if r.phase == "ar" and r.finished is None], events)
            ended = [r for r in rows if r.phase == "emit"]
            if ended:
                self._emit(ended, events)
        except BaseException:  # a write may have stopped half way: no slot of this step is reused
            for r in rows:
                r.held = None
            raise
        for r in rows:
            if r.finished is not None:
                events.append(self._done(r))
                self.cancel(r.id)
        return events

    def run(self, prompts: Sequence[Sequence[int]], params: GenerationParams | Sequence[GenerationParams]
            ) -> Iterator[Event]:
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise GenerationError("one GenerationParams per prompt, or one for all")
        for p, prm in zip(prompts, plist):
            self.check(p, prm)
        if len(prompts) > len(self.free):
            raise GenerationError(f"{len(prompts)} prompts but the engine has room for {len(self.free)}")
        ids = [self.add(p, prm) for p, prm in zip(prompts, plist)]
        if any(prm.rng == "reference" for prm in plist):
            if len(ids) != 1:
                raise GenerationError("rng='reference' replays transformers' global draws: one prompt at a time")
            torch.manual_seed(plist[0].seed)
        mine = set(ids)
        while mine & set(self.rows):
            for ev in self.step():
                if ev.request in mine:
                    yield ev

    # ------------------------------------------------------------ phases
    def _view(self, rows: list[_Row]):
        if len(rows) == self.cache.rows and [r.slot for r in rows] == list(range(self.cache.rows)):
            return self.cache
        return self.cache.select(torch.tensor([r.slot for r in rows]))

    def _prefill(self, rows: list[_Row], events) -> None:
        """Encode each new row's prompt into its slot: only the tokens after those the slot holds already
        (prefix caching), and once for rows of this prefill with the same prompt (n samples of one prompt:
        the others copy its K/V and hidden states). With `prefill_chunk`, at most that many tokens of a row per
        step: a row whose prompt is not all in yet stays in this phase (the rows sharing its prompt wait too)."""
        if not rows:
            return
        groups: dict[tuple, list[_Row]] = {}
        for r in rows:
            if r.source is not None and r.source.id not in self.rows:  # the row it waited on was cancelled
                r.source = None
            if r.prefilled is not None:  # a chunked prefill going on: its group was formed when it began
                continue
            self.cache.rewind(r.slot, r.reused)
            r.prefilled = r.reused
            if r.p.prompt_logprobs is None:
                key = (tuple(r.prompt), r.p.adapter, r.p.mode == AR or r.p.ar_fallback is not None,
                       tuple(img.digest for img in r.p.images or ()), r.p.cache_salt)
                groups.setdefault(key, []).append(r)
        for group in groups.values():
            src = max(group, key=lambda r: r.reused)  # the one with the least left to encode
            for r in group:
                r.source = src if r is not src else None
        enc = [r for r in rows if r.source is None and r.prefilled < len(r.prompt)]
        h = n = None
        if enc:
            n = torch.tensor([self._chunk_end(r) - r.prefilled for r in enc])
            ids = torch.full((len(enc), int(n.max())), self.pad, dtype=torch.long)
            for i, r in enumerate(enc):
                ids[i, :n[i]] = torch.tensor(r.prompt[r.prefilled:r.prefilled + int(n[i])])
            h = self.model.encode(ids.to(self.model.device), self._view(enc), n_valid=n.to(self.model.device),
                                  head=False, known_lengths=[r.prefilled for r in enc],
                                  adapters=_adapters(enc), valid_lengths=n.tolist(),
                                  images=self._image_inputs(enc, n.tolist()))
            for i, r in enumerate(enc):
                if r.held is not None:
                    r.held.extend(r.prompt[r.prefilled:r.prefilled + int(n[i])])
                r.prefilled += int(n[i])
                r.encoder_passes += 1
        at = {r.id: i for i, r in enumerate(enc)}
        done = [r for r in rows if (r.source or r).prefilled == len((r.source or r).prompt)]
        for r in done:
            if r.source is not None:
                self.cache.copy_row(r.source.slot, r.slot, len(r.prompt))
                r.reused = r.prefilled = len(r.prompt)  # all of it came from the cache
                r.held = list(r.prompt) if self.prefix_cache else None
            r.cached = len(r.prompt)
        last: dict[int, torch.Tensor] = {}  # hidden state of the prompt's last token, for the rows that need it
        for r in done:
            src = r.source or r
            if src.id in at and (r.p.ar_fallback is not None or r.p.mode == AR):
                i = at[src.id]
                last[r.id] = h[i, int(n[i]) - 1]
            if r.p.ar_fallback is not None:
                r.last_h = last[r.id].clone()
            if r.p.prompt_logprobs is not None:
                self._prompt_logprobs(r, h[at[r.id], :len(r.prompt) - 1])
            if r.p.max_new_tokens == 0:  # the prompt alone (scoring it): no canvas, no token
                r.finished = "length"
        ar_rows = [r for r in done if r.p.mode == AR and r.finished is None]
        if ar_rows:
            logits = self.model.logits(torch.stack([last[r.id] for r in ar_rows]))  # never [rows, prompt, V]
            for j, r in enumerate(ar_rows):
                self._ar_token(r, logits[j], events)
        for r in done:
            r.source = None
        for r in done:
            if r.p.mode == DIFFUSION and r.finished is None:
                self._new_canvas(r, first=True)

    def _chunk_end(self, r: _Row) -> int:
        """Where this step's piece of a row's prompt ends: all of it, or `prefill_chunk` tokens on, moved to the
        end of an image span it would cut (an image's tokens attend to each other both ways: one forward)."""
        left = len(r.prompt) - r.prefilled
        if self.prefill_chunk is None or r.p.prompt_logprobs is not None or left <= self.prefill_chunk:
            return len(r.prompt)
        end = r.prefilled + self.prefill_chunk
        for a, b in r.spans:
            if a < end < b:
                return b
        return end

    def _image_inputs(self, rows: list[_Row], n: list[int]) -> list | None:
        """Per row, the (offset, features) of the images whose spans lie in this step's piece of its prompt; the
        features are computed (the vision tower) the first time a row needs them."""
        if not any(r.spans for r in rows):
            return None
        out = []
        for r, k in zip(rows, n):
            lo, hi, mine = r.prefilled, r.prefilled + k, []
            for j, (a, b) in enumerate(r.spans):
                if lo <= a and b <= hi:
                    mine.append((a - lo, vision_tower(self.model).features(r.p.images[j])))
            out.append(mine)
        return out

    PROMPT_CHUNK = 256  # prompt positions per LM-head call for prompt logprobs: [256, V] logits at a time

    def _prompt_logprobs(self, r: _Row, h: torch.Tensor) -> None:
        """Each prompt token's log-probability given those before it, from the prefill's hidden states h [L-1, H]
        (the encoder is trained on next-token prediction), PROMPT_CHUNK positions at a time."""
        n = r.p.prompt_logprobs
        targets = torch.tensor(r.prompt[1:], dtype=torch.long, device=h.device)
        lps: list[float | None] = [None]
        tops: list[TopLogprobs] = [[]]
        ranks: list[int | None] = [None]
        for lo in range(0, h.shape[0], self.PROMPT_CHUNK):
            logits, t = self.model.logits(h[lo:lo + self.PROMPT_CHUNK]), targets[lo:lo + self.PROMPT_CHUNK]
            lp, ids, tlp = S.raw_logprobs(logits, t, n)
            lps += lp.tolist()
            tops += _top_lists(ids, tlp, lp.shape[0])
            # the token's rank among the vocabulary (1: the likeliest; ties share the best rank), vLLM's `rank`
            ranks += ((logits > logits.gather(-1, t[:, None])).sum(-1) + 1).tolist()
        r.prompt_lp, r.prompt_top, r.prompt_rank = lps, tops, ranks

    def _new_canvas(self, r: _Row, first: bool = False, attempt: int = 0) -> None:
        """Start canvas `r.canvas_idx` from noise; attempt > 0: restart it from fresh noise (`_restart`)."""
        r.phase, r.step, r.sc, r.sc_logits, r.history = "denoise", 0, None, None, []
        if self.adaptive_steps is not None and r.p.adaptive_steps:
            r.p = r.p.replace(sampler=r.sampler.replace(max_denoising_steps=self._step_budget(r.sampler)))
        r.attempt = attempt
        r.refresh_penalties()
        if not attempt:
            r.spent, r.best = 0, None
        if r.p.rng == "reference":
            canvas = S.reference_init_canvas(1, self.T, self.V)[0]
        else:
            seed = S.canvas_seed(r.p.seed, r.canvas_idx)
            r.gen.manual_seed(S.canvas_seed(seed, attempt) if attempt else seed)
            canvas = S.fused_init_canvas([r.gen], self.T, self.V)[0]
        if r.p.prediction is not None and not attempt:
            r.pred_at, r.pred_draft = predicted_draft(r.p.prediction, r.out, r.pred_at, self.T)
            if r.pred_draft:
                canvas[:len(r.pred_draft)] = torch.tensor(r.pred_draft, dtype=torch.long)
        if first and not attempt and r.p.init_canvas is not None:
            init = torch.tensor(list(r.p.init_canvas), dtype=torch.long)
            canvas[:len(init)] = init
        if first and len(r.fixed_pos):
            canvas[r.fixed_pos] = r.fixed_tok
        r.canvas = canvas
        r.argmax = canvas.clone()
        if r.matcher is not None:
            r.frontier, r.sent, r.limit = 0, 0, min(self.T, r.p.max_new_tokens - len(r.out))
            r.cut_at = None
            if r.p.logprobs is not None:
                n = r.p.logprobs
                r.g_lp = (torch.zeros(self.T), torch.zeros(self.T, n, dtype=torch.long) if n else None,
                          torch.full((self.T, n), float("-inf")) if n else None, torch.zeros(self.T))

    def _step_budget(self, cfg: SamplerConfig) -> int:
        """The steps a canvas starting now may take under the load-adaptive budget (see __init__)."""
        n = cfg.max_denoising_steps
        R, floor = self.adaptive_steps
        rows = sum(x.p.mode == DIFFUSION and x.finished is None for x in self.rows.values())
        if rows <= R:
            return n
        return min(n, max(floor, round(n * R / rows)))

    def _denoise(self, rows: list[_Row], events) -> None:
        if not rows:
            return
        m = self.model
        canvas = torch.stack([r.canvas for r in rows]).to(m.device)
        sc = None
        if any(r.sc is not None or r.sc_logits is not None for r in rows):
            sc = torch.zeros(len(rows), self.T, self.cfg.hidden_size, dtype=m.dtype, device=m.device)
            for i, r in enumerate(rows):
                if r.sc is not None:
                    sc[i] = r.sc
                elif r.sc_logits is not None:
                    sc[i] = m.soft_embed(r.sc_logits[None])[0]
        # Rows sharing sampler options share one sampler call; per-row randomness keeps them independent.
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault((r.p.sampler, r.p.rng), []).append(i)
        fused = self.fused_head if self.fused_head is not None else \
            len(rows) * self.T * self.V * 4 > LOGITS_BUDGET
        # The sampler's inputs from the host (steps remaining, the rows' draws) go to the device before the forward
        # is queued: a copy from pageable host memory waits for the device, which is idle only now.
        dev = m.device
        sel = {key: None if len(idx) == len(rows) else torch.tensor(idx, device=dev) for key, idx in groups.items()}
        inputs = {key: self._step_inputs([rows[i] for i in idx], key[0]) for key, idx in groups.items()
                  if key[1] == "row"}
        # `allowed` masks need the logits; biases (logit_bias, penalties) are added to the fused head's blocks
        constrained = any(r.canvas_idx == 0 and len(r.allowed_pos) for r in rows)
        # A cut (min_p / top_k / top_p) needs each position's whole distribution before the step: the logits
        truncated = any(r.p.truncates for r in rows)
        if fused and not constrained and not truncated and all(rng == "row" for _, rng in groups):
            # The default path: the LM head is fused into the sampler step, logits are never materialised.
            h = m.denoise(canvas, self._view(rows), sc=sc, head=False, known_lengths=[r.cached for r in rows],
                          adapters=_adapters(rows))
            for key, idx in groups.items():
                self._fused_group(h if sel[key] is None else h[sel[key]], [rows[i] for i in idx], key[0], events,
                                  inputs[key])
            return
        # Replaying transformers' draws needs its logits bit for bit: one lm_head matmul over the vocabulary.
        reference = any(rng == "reference" for _, rng in groups)
        h = m.denoise(canvas, self._view(rows), sc=sc, head=False, known_lengths=[r.cached for r in rows],
                      adapters=_adapters(rows))
        logits = m.logits(h, blocked=False) if reference else m.logits(h, out=self._logits_out(len(rows)))
        for i, r in enumerate(rows):
            r.add_bias(logits[i])
            r.ban_early(logits[i])
            if r.canvas_idx == 0:
                r.constrain(logits[i])  # banned tokens get -inf: no mass, no entropy, never drawn
            if r.matcher is not None:
                self._grammar_walk(r, logits[i].__getitem__)
            for pos, tok in r.pins():
                # A fixed or committed position is certain: one-hot logits give it zero entropy, so it is always
                # accepted, costs nothing in the entropy budget, and its draft and sample are its token.
                pos, tok = pos.to(logits.device), tok.to(logits.device)
                logits[i, pos] = float("-inf")
                logits[i, pos, tok] = 0.0
        for (cfg, rng), idx in groups.items():
            sub = logits if sel[(cfg, rng)] is None else logits[sel[(cfg, rng)]]
            floor = self._floors([rows[i] for i in idx], cfg, sub) if truncated else None
            if rng == "reference":
                assert len(idx) == 1
                r = rows[idx[0]]
                k = cfg.max_denoising_steps - r.step
                # the cut as transformers applies a logits processor: the cut tokens' logits are -inf
                cut = sub if floor is None else \
                    sub.masked_fill(sub / S.temperature(k, cfg, sub.device) < floor[..., None], float("-inf"))
                out = S.reference_step(cut, k, cfg, r.canvas[None].to(sub.device), sc_dtype=m.dtype)
                r_lp = None if r.p.logprobs is None else \
                    (*S.raw_logprobs(sub[0], out.argmax[0], r.p.logprobs), S.raw_entropy(sub[0]))
                self._after_step(r, cfg, out.canvas[0].cpu(), out.argmax[0].cpu(), out.entropies[0],
                                 out.accepted[0], None, out.sc_logits[0], events, r_lp)
            else:
                self._fused_group(None, [rows[i] for i in idx], cfg, events, inputs[(cfg, rng)], logits=sub,
                                  floor=floor)
        del logits

    def _floors(self, rows: list[_Row], cfg: SamplerConfig, logits: torch.Tensor) -> torch.Tensor:
        """Each position's lowest kept processed logit under its row's min_p / top_k / top_p (-inf for a row
        without a cut), from the step's final logits [rows, canvas, V] (biases, bans and pins applied), in the
        step's units x = l / T_k."""
        floor = torch.full(logits.shape[:2], float("-inf"), dtype=torch.float32, device=logits.device)
        for i, r in enumerate(rows):
            if r.p.truncates:
                t = S.temperature(cfg.max_denoising_steps - r.step, cfg, logits.device)
                floor[i] = S.truncation_floor(logits[i].float(), t, r.p.top_k, r.p.top_p, r.p.min_p)
        return floor

    SUBSET = 4096  # grammar walk: at most this many allowed tokens, and the softmax runs over them alone
    KEEP = 8  # grammar walk on the fused path: positions from the frontier whose logits the head pass keeps

    def _grammar_walk(self, r: _Row, logits_at) -> None:
        """Commit the next run of a grammar row's canvas (structured.py). `logits_at(j)`: this step's fp32 logits
        [V] at canvas position j (after logit_bias). From the frontier rightwards, each position is sampled at the
        step's temperature from its logits masked to what the grammar allows there, and committed while the run's
        entropies stay within the EntropyBound budget (sum - max <= entropy_bound; the first always is). The
        canvas's last budgeted step commits every position left, those past the budget at their masked argmax.
        Sets `r.frontier` and `r.g_tok`; the caller makes the committed positions one-hot (zero entropy, always
        accepted, kept as the draft and conditioned on)."""
        cfg = r.p.sampler
        k = cfg.max_denoising_steps - r.step
        t = S.temperature(k, cfg)
        spent = top = 0.0
        j = first = r.frontier
        ended = False  # the grammar is complete (or EOS was drawn): EOS from here on
        while j < r.limit:
            allowed = None if r.matcher.done else r.matcher.allowed()
            # Complete; or (never seen) a dead end, where the tokenizer cannot spell what the grammar needs next
            # (the check before the request only knows that something can begin it): end the text here.
            if allowed is None or not bool(allowed.any()):
                ended = True
                break
            row = logits_at(j).float()
            allowed = allowed.to(row.device)
            ids = allowed.nonzero()[:, 0] if int(allowed.sum()) <= self.SUBSET else None
            # Few tokens allowed (JSON's punctuation, keys, literals): work on those alone, not the vocabulary.
            sub = row[ids] if ids is not None else row.masked_fill(~allowed, float("-inf"))
            if not bool(torch.isfinite(sub).any()):  # what the matcher allows, the row's bans exclude (bad_words
                ended = True  # of several tokens with allowed_token_ids): the text ends here, as AR's does
                break
            lp = torch.log_softmax(sub / t.to(row.device), dim=-1)
            p = lp.exp()
            if r.p.truncates:  # the cut over what the grammar allows, as AR sampling cuts
                p = S.truncate(p, r.p.top_k, r.p.top_p, r.p.min_p)
                p = p / p.sum()
                lp = torch.log(p)
            h = float(-(p * lp.clamp(min=torch.finfo(lp.dtype).min)).sum())
            over = j > first and spent + h - max(top, h) > cfg.entropy_bound
            if over and k > 1:
                break
            spent, top = spent + h, max(top, h)
            # Within the budget a position takes a sample, as an accepted one does; past it, on the canvas's last
            # step, it takes the masked argmax, as the output of a canvas without a grammar is its argmax draft.
            tok = int(sub.argmax()) if over else S.draw(p, r.gen)
            tok = int(ids[tok]) if ids is not None else tok
            if r.g_lp is not None:  # over the whole vocabulary, the banned tokens at -inf
                masked = sub if ids is None else row.masked_fill(~allowed, float("-inf"))
                lps, top_ids, top_lp = S.raw_logprobs(masked[None], torch.tensor([tok], device=row.device),
                                                      r.p.logprobs)
                r.g_lp[0][j] = lps[0].cpu()
                r.g_lp[3][j] = S.raw_entropy(masked)
                if top_ids is not None:
                    r.g_lp[1][j], r.g_lp[2][j] = top_ids[0].cpu(), top_lp[0].cpu()
            r.g_tok[j] = tok
            j += 1
            if tok in r.ends:  # EOS (unless ignore_eos) or a stop token the grammar allowed ends the text too
                ended = True
                break
            r.matcher.consume(tok)
        if ended:
            r.g_tok[j:] = int(self.eos[0])
            r.cut_at, j = j, self.T  # the output ends at j (the EOS after it may be text, with ignore_eos)
        r.frontier = j

    def _step_inputs(self, rows: list[_Row], cfg: SamplerConfig) -> tuple[torch.Tensor, tuple]:
        """A fused step's inputs made on the host, on the device: each row's steps remaining, and its draws."""
        dev = self.model.device
        k = torch.tensor([cfg.max_denoising_steps - r.step for r in rows], device=dev)
        return k, S.draw_step_noise([r.gen for r in rows], self.T, self.V, dev)

    def _logits_out(self, rows: int) -> torch.Tensor:
        """The plain path's logits buffer `[rows, canvas, V]`, kept between steps: a fresh one each step is new
        memory from the OS, and at 262,144 entries its page faults cost ~90 ms a row (the fused path, the default
        there, never allocates it)."""
        need = rows * self.T * self.V
        buf = self._logits_buf
        if buf is None or buf.numel() < need or buf.device != self.model.device:
            buf = self._logits_buf = torch.empty(need, dtype=torch.float32, device=self.model.device)
        return buf[:need].view(rows, self.T, self.V)

    def _fused_group(self, h, rows: list[_Row], cfg: SamplerConfig, events, inputs, logits=None,
                     floor=None) -> None:
        """One fused sampler step for rows that share sampler options (from hidden states, or from logits, with
        their cuts' `floor`), with their `_step_inputs`."""
        m = self.model
        k, draws = inputs
        scale = float(m.embed_scale())
        E = m.embedding()
        want = [r.p.logprobs for r in rows if r.p.logprobs is not None]
        top = max(want) if want else None
        # A canvas's last budgeted step conditions no further step (a restart or the next canvas starts without
        # self-conditioning): skip its soft embedding, a [canvas, V] x [V, H] matmul.
        want_sc = any(r.step + 1 < cfg.max_denoising_steps for r in rows)
        if logits is None:
            # A grammar row's walk reads the logits of the positions from its frontier on: the first KEEP of them
            # are copied out of the fused head's blocks as they pass, any further ones computed (_WalkLogits).
            walks = {j: list(range(r.frontier, min(r.frontier + self.KEEP, r.limit))) for j, r in enumerate(rows)
                     if r.matcher is not None}
            keep = [j * self.T + p for j, ps in walks.items() for p in ps]
            out = S.fused_head_step(h, E, self.cfg.final_logit_softcapping, k, cfg, draws=draws, embed_scale=scale,
                                    logprobs=top, self_conditioning=want_sc,
                                    keep=torch.tensor(keep, device=m.device) if keep else None,
                                    **self._adjustments(rows))
            at = 0
            for j, ps in walks.items():
                self._grammar_walk(rows[j], _WalkLogits(m, h[j], ps, out.kept_logits[at:at + len(ps)],
                                                        rows[j].add_bias))
                at += len(ps)
        else:
            out = S.fused_step(logits, k, cfg, draws=draws, embedding=E if want_sc else None, embed_scale=scale,
                               logprobs=top, floor=floor)
        canvas, cand, draft, ent, acc, sc = out.canvas, out.candidates, out.argmax, out.entropies, out.accepted, \
            out.sc_embedding
        lp, top_ids, top_lp, raw_h = out.logprob, out.top_ids, out.top_logprobs, out.raw_entropy
        pinned = [(i, pos, tok) for i, r in enumerate(rows) for pos, tok in r.pins()]
        if pinned and logits is None:
            # Fixed (infill) and committed (grammar) positions, exactly as if their logits were one-hot: zero
            # entropy (so the accept set is recomputed with it), the token as draft and sample, its embedding as
            # self-conditioning.
            cand, draft, ent = cand.clone(), draft.clone(), ent.clone()
            sc = None if sc is None else sc.clone()
            if lp is not None:
                lp, raw_h = lp.clone(), raw_h.clone()
                top_ids, top_lp = (top_ids.clone(), top_lp.clone()) if top_ids is not None else (None, None)
            for i, pos, tok in pinned:
                pos, tok = pos.to(m.device), tok.to(m.device)
                cand[i, pos], draft[i, pos], ent[i, pos] = tok, tok, 0.0
                if sc is not None:
                    sc[i, pos] = E[tok].float() * torch.tensor(scale, dtype=torch.float32)
                if lp is not None:  # one-hot logits: the fixed token is certain, nothing else is possible
                    lp[i, pos], raw_h[i, pos] = 0.0, 0.0
                    if top_ids is not None:
                        top_ids[i, pos, 0], top_lp[i, pos, 0], top_lp[i, pos, 1:] = tok, 0.0, float("-inf")
            acc = S.entropy_bound_accept(ent, cfg.entropy_bound, stable=True)
            canvas = S.renoise(cand, acc, draws[1])
        # What the stop decision reads, brought to the host once for all rows (on a GPU: one wait per step, not
        # three per row; on the CPU these are the same tensors).
        canvas, draft, ent, acc = canvas.cpu(), draft.cpu(), ent.cpu(), acc.cpu()
        for j, r in enumerate(rows):
            r_lp = None if r.p.logprobs is None else \
                (lp[j], None if top_ids is None else top_ids[j, :, :r.p.logprobs],
                 None if top_lp is None else top_lp[j, :, :r.p.logprobs], raw_h[j])
            self._after_step(r, cfg, canvas[j], draft[j], ent[j], acc[j],
                             None if sc is None else sc[j].to(m.dtype), None,
                             events, r_lp)

    def _adjustments(self, rows: list[_Row]) -> dict[str, Any]:
        """The rows' logit adjustments for `fused_head_step` (its bias, repetition, after and bans): the additive
        ones stacked over the rows, zero for rows without; {} when no row has any."""
        out: dict[str, Any] = {}
        dev = self.model.device
        if any(r.adjusted for r in rows):
            dense = [r.dense_adjust(dev) if r.adjusted else (None, None, None) for r in rows]
            for j, name in ((0, "bias"), (2, "after")):
                if any(d[j] is not None for d in dense):
                    out[name] = torch.stack([d[j] if d[j] is not None else
                                             torch.zeros(self.V, dtype=torch.float32, device=dev) for d in dense])
            reps = [(i, d[1], float(r.p.repetition_penalty), r.seen_ids)
                    for i, (r, d) in enumerate(zip(rows, dense)) if d[1] is not None]
            if reps:
                out["repetition"] = reps
        bans = [(i, r.early_bans(), r.ban_ids) for i, r in enumerate(rows) if r.early_bans()]
        if bans:
            out["bans"] = bans
        return out

    def _after_step(self, r: _Row, cfg: SamplerConfig, nxt, draft, ent, acc, sc_emb, sc_log, events, lp=None
                    ) -> None:
        r.step += 1
        r.decoder_passes += 1
        r.canvas, r.argmax, r.sc, r.sc_logits, r.lp = nxt, draft, sc_emb, sc_log, lp
        mean_t = ent.float().mean()  # compared in float32, as the reference does
        mean_h = r.mean_entropy = float(mean_t)
        if r.p.drafts if r.p.drafts is not None else self.drafts:
            events.append(Draft(r.id, r.canvas_idx, r.step, draft.tolist(), acc.cpu().tolist(), mean_h, r.attempt,
                                ent.float().cpu().tolist()))
        if r.matcher is not None:
            # A grammar's canvas ends when every position that can reach the output is committed (the walk
            # commits them all by the last budgeted step), whatever the early stop would say.
            if r.g_lp is not None:
                r.lp = r.g_lp
            self._emit_partial(r, events)
            if r.frontier >= r.limit:
                r.phase = "emit"
            return
        # StableAndConfident: the draft equals each of the last `stability_threshold` drafts (none yet at the
        # first step, so the earliest stop is step 2) and the mean entropy is under the threshold.
        s = cfg.stability_threshold
        stable = len(r.history) >= s and all(torch.equal(h, draft) for h in r.history[-s:]) if s else True
        r.history = (r.history + [draft])[-s:] if s else []
        stopped = stable and bool(mean_t < cfg.confidence_threshold)
        if stopped or r.step >= cfg.max_denoising_steps:
            if stopped or not self._restart(r, cfg):
                r.phase = "emit"

    def _restart(self, r: _Row, cfg: SamplerConfig) -> bool:
        """A canvas spent its whole budget without the early stop: the model never became sure of it. With
        `cfg.restarts` left (and the early stop on, so that 'sure' has a meaning; never for transformers' rng,
        whose generate has no restarts) start it again from fresh noise and return True. Otherwise make the
        canvas the most confident of its attempts (lowest mean entropy at the last step) and return False."""
        if r.best is None or r.mean_entropy < r.best[0]:
            r.best = (r.mean_entropy, r.argmax, r.lp)
        if r.attempt < cfg.restarts and cfg.confidence_threshold > 0 and r.p.rng == "row":
            r.spent += r.step
            self._new_canvas(r, first=r.canvas_idx == 0, attempt=r.attempt + 1)
            return True
        r.mean_entropy, r.argmax, r.lp = r.best
        return False

    def _emit(self, rows: list[_Row], events) -> None:
        """Steps 4 and 5: output each ended canvas, then commit the rows that go on, in one encoder pass."""
        go_on = []
        for r in rows:
            toks = r.argmax.clone()
            steps = r.spent + r.step  # every attempt's
            r.steps_per_canvas.append(steps)
            r.restarts_per_canvas.append(r.attempt)
            r.entropy_per_canvas.append(r.mean_entropy)
            if r.t_first is None:
                r.t_first = time.perf_counter()
            cut = toks.tolist()
            hit_eos = False
            if r.cut_at is not None:  # the commit walk ended the text there (a grammar complete, nothing allowed)
                cut, hit_eos = cut[:r.cut_at], True
            if r.ends:  # EOS (unless ignore_eos) and stop_token_ids
                first = next((i for i, t in enumerate(cut) if t in r.ends), None)
                if first is not None:
                    cut, hit_eos = cut[:first + self._kept(r, cut[first])], True
            if r.p.ar_fallback is not None and r.mean_entropy > r.p.ar_fallback:
                self._fall_back(r, events)
                continue
            room = r.p.max_new_tokens - (len(r.out) - r.sent)  # from the canvas's start
            added = cut[:room][r.sent:]  # a grammar row sent the first r.sent already (`_emit_partial`)
            if r.pred_draft:  # the prediction's tokens this canvas kept where they were
                kept = sum(a == b for a, b in zip(r.pred_draft, cut[:room]))
                r.pred_accepted += kept
                r.pred_at += len(cut[:room])  # where the output ends had it followed the prediction: a hint
            lps = self._take_logprobs(r, len(added), start=r.sent)
            r.out.extend(added)
            events.append(Commit(r.id, r.canvas_idx, added, steps, **lps))
            r.canvas_idx += 1
            if hit_eos or (r.matcher is not None and r.matcher.done):
                r.finished = "stop"
            elif len(r.out) >= r.p.max_new_tokens:
                r.finished = "length"
            elif self._stop_string(r):
                r.finished = "stop"
            else:
                go_on.append((r, toks))
        if go_on:
            rs = [r for r, _ in go_on]
            ids = torch.stack([t for _, t in go_on]).to(self.model.device)
            h = self.model.encode(ids, self._view(rs), head=False, known_lengths=[r.cached for r in rs],
                                  adapters=_adapters(rs))
            for i, (r, toks) in enumerate(go_on):
                if r.p.ar_fallback is not None:
                    r.last_h = h[i, -1].clone()
                if r.held is not None:
                    r.held.extend(toks.tolist())
                r.cached += self.T
                r.encoder_passes += 1
                self._new_canvas(r)

    def _kept(self, r: _Row, tok: int) -> bool:
        """Whether a token that ended the output stays in it: a stop_token_ids token that is not special."""
        if tok not in r.stop_ids:
            return False
        return self.tok is None or self.tok.decode([tok], skip_special=True) != "" or self.tok.decode([tok]) == ""

    def _fall_back(self, r: _Row, events) -> None:
        """ar_fallback: the canvas the model was unsure of is dropped and its span decoded AR, from the logits of
        the last token in the cache (its hidden state, kept from the pass that wrote it: a prefill, a commit or a
        resume), as AR decoding takes its next token; then token by token (`_ar`)."""
        r.fallbacks += 1
        r.ar_left = min(self.T, r.p.max_new_tokens - len(r.out))
        self._ar_token(r, self.model.logits(r.last_h[None])[0], events)

    def _resume(self, rows: list[_Row]) -> None:
        """ar_fallback: the span is decoded; its last token goes into the cache, and denoising resumes."""
        if not rows:
            return
        ids = torch.tensor([[r.out[-1]] for r in rows], device=self.model.device)
        h = self.model.encode(ids, self._view(rows), head=False, known_lengths=[r.cached for r in rows],
                              adapters=_adapters(rows))
        for i, r in enumerate(rows):
            r.cached += 1
            if r.held is not None:
                r.held.append(r.out[-1])
            r.encoder_passes += 1
            r.canvas_idx += 1
            r.last_h = h[i, 0].clone()
            self._new_canvas(r)

    def _emit_partial(self, r: _Row, events) -> None:
        """A grammar row's newly committed run, up to an EOS, sent at once as a partial Commit: the walk never
        takes a committed token back, so it can be streamed before its canvas ends."""
        stop = min(r.frontier, r.limit, r.cut_at if r.cut_at is not None else r.limit)
        run = r.g_tok[r.sent:stop].tolist() if stop > r.sent else []
        end = next((i for i, t in enumerate(run) if t in r.ends), None)
        if end is not None:
            run = run[:end + self._kept(r, run[end])]
        if not run:
            return
        lps = self._take_logprobs(r, len(run), start=r.sent)
        r.sent += len(run)
        r.out.extend(run)
        if r.t_first is None:
            r.t_first = time.perf_counter()
        events.append(Commit(r.id, r.canvas_idx, run, r.spent + r.step, partial=True, **lps))

    @staticmethod
    def _take_logprobs(r: _Row, n: int, start: int = 0) -> dict[str, list | None]:
        """Positions start..start+n-1's logprobs (and raw entropies) of the row's last step (`r.lp`), appended to
        its output's: Commit's logprobs, top_logprobs and entropies."""
        if r.p.logprobs is None or r.lp is None:
            return {}
        lp, ids, tlp, ent = r.lp
        sl = slice(start, start + n)
        lps = lp[sl].tolist()
        tops = _top_lists(None if ids is None else ids[sl], None if tlp is None else tlp[sl], len(lps))
        ents = ent[sl].tolist()
        r.out_lp.extend(lps)
        r.out_top.extend(tops)
        r.out_ent.extend(ents)
        return {"logprobs": lps, "top_logprobs": tops, "entropies": ents}

    def _ar(self, rows: list[_Row], events) -> None:
        if not rows:
            return
        ids = torch.tensor([[r.out[-1]] for r in rows], device=self.model.device)
        logits = self.model.encode(ids, self._view(rows), known_lengths=[r.cached for r in rows],
                                   adapters=_adapters(rows))[:, 0]
        for i, r in enumerate(rows):
            r.cached += 1
            if r.held is not None:
                r.held.append(r.out[-1])
            r.encoder_passes += 1
            r.ar_steps += r.p.mode == DIFFUSION
            self._ar_token(r, logits[i], events)

    def _ar_token(self, r: _Row, logits: torch.Tensor, events) -> None:
        r.refresh_penalties()
        bad = r.bad_next() if r.bad_after else []
        if r.adjusted or r.early_bans() or (len(r.allowed_pos) and len(r.out) < self.T) or bad:
            logits = logits.clone()
            r.add_bias(logits)
            r.ban_early(logits[None])
            r.constrain(logits[None], first=len(r.out))
            logits[bad] = float("-inf")
        if r.matcher is not None:
            logits = logits.masked_fill(~r.matcher.allowed().to(logits.device), float("-inf"))
        if bad and not bool(torch.isfinite(logits).any()):  # every token left would finish a bad word: end here
            r.phase, r.finished = "ar", "stop"
            events.append(Commit(r.id, len(r.out), [], 1))
            return
        if r.p.ar_temperature > 0:
            probs = torch.softmax(logits.float() / r.p.ar_temperature, dim=-1)
            if r.p.truncates:
                probs = S.truncate(probs, r.p.top_k, r.p.top_p, r.p.min_p)
            tok = S.draw(probs, r.gen)
        else:
            tok = int(torch.argmax(logits))
        if r.p.logprobs is not None:
            lp, ids, tlp = S.raw_logprobs(logits[None], torch.tensor([tok], device=logits.device), r.p.logprobs)
            r.lp = (lp, ids, tlp, S.raw_entropy(logits[None]))
        if r.t_first is None:
            r.t_first = time.perf_counter()
        r.phase = "ar"
        if tok in r.ends and not self._kept(r, tok):
            r.finished = "stop"
            events.append(Commit(r.id, len(r.out), [], 1))
            return
        r.out.append(tok)
        lps = self._take_logprobs(r, 1)
        if r.p.mode == AR:
            events.append(Commit(r.id, len(r.out) - 1, [tok], 1, **lps))
        else:  # ar_fallback: a token of the span that replaces an unsure canvas, final as it is written
            events.append(Commit(r.id, r.canvas_idx, [tok], 1, partial=True, **lps))
        if r.matcher is not None:
            r.matcher.consume(tok)
        if (r.matcher is not None and r.matcher.done) or tok in r.ends:
            r.finished = "stop"
        elif len(r.out) >= r.p.max_new_tokens:
            r.finished = "length"
        elif self._stop_string(r):
            r.finished = "stop"
        elif r.ar_left is not None:
            r.ar_left -= 1
            if r.ar_left == 0:  # the span is done: back to denoising (`_resume` caches its last token first)
                r.ar_left, r.phase = None, "resume"

    # ------------------------------------------------------------ endings
    def _stop_string(self, r: _Row) -> bool:
        if not r.p.stop:
            return False
        skip = r.p.skip_special_tokens
        after = min_text(self.tok, r.out, r.p.min_tokens, r.p.stop, skip)
        return stop_cut(self.tok.decode(r.out, skip_special=skip), r.p.stop, after) is not None

    def _done(self, r: _Row) -> Done:
        tokens, text = r.out, None
        if self.tok is not None:
            skip = r.p.skip_special_tokens
            text = self.tok.decode(tokens, skip_special=skip)
            after = min_text(self.tok, tokens, r.p.min_tokens, r.p.stop, skip)
            cut = stop_cut(text, r.p.stop, after, r.p.include_stop_str_in_output)
            if cut is not None:
                text = text[:cut]
                tokens = tokens_for_prefix(self.tok, tokens, text, skip)
        wall = time.perf_counter() - r.t0
        stats = {
            "mode": r.p.mode,
            "prompt_tokens": len(r.prompt),
            "cached_prompt_tokens": r.reused,  # prefix caching: prompt tokens not encoded for this request
            "completion_tokens": len(tokens),
            "canvases": len(r.steps_per_canvas),
            "steps_per_canvas": r.steps_per_canvas,  # all of a canvas's steps, over its restarts too
            "restarts_per_canvas": r.restarts_per_canvas,
            # the sampler's mean entropy over each canvas at its last step: how sure the model was when it stopped
            "final_mean_entropy_per_canvas": r.entropy_per_canvas,
            "mean_steps_per_canvas": (sum(r.steps_per_canvas) / len(r.steps_per_canvas)
                                      if r.steps_per_canvas else None),
            "ar_fallback_canvases": r.fallbacks,  # canvases whose span was decoded AR instead (ar_fallback)
            # prediction: its tokens the output kept where a canvas's draft put them, and the rest (OpenAI's
            # accepted / rejected_prediction_tokens)
            "accepted_prediction_tokens": r.pred_accepted,
            "rejected_prediction_tokens": len(r.p.prediction) - r.pred_accepted if r.p.prediction else 0,
            "decoder_passes": r.decoder_passes,
            "encoder_passes": r.encoder_passes,
            # transformers' definition: generated (non-pad) tokens per decoder forward pass (with ar_fallback, the
            # forwards that decoded its AR spans count too)
            # (no forward at all: max_tokens 0 on a prompt the prefix cache held whole)
            "tokens_per_forward": len(r.out) / max((r.decoder_passes + r.ar_steps) or r.encoder_passes, 1),
            "wall_s": wall,
            "time_to_first_commit_s": (r.t_first - r.t0) if r.t_first else None,
            "tokens_per_s": len(tokens) / wall if wall > 0 else None,
        }
        lps = tops = ents = None
        if r.p.logprobs is not None:
            lps, tops, ents = r.out_lp[:len(tokens)], r.out_top[:len(tokens)], r.out_ent[:len(tokens)]
        return Done(r.id, tokens, text, r.finished or "length", stats, lps, tops, r.prompt_lp, r.prompt_top, ents,
                    r.prompt_rank)


class _WalkLogits:
    """`logits_at(j)` for the grammar walk on the fused path: one row's logits at canvas position j. Positions
    `kept` come with their logits from the fused head's pass (`kept_logits`, the plain path's bits); others are
    computed from the row's hidden states [T, H] by the LM head `CHUNK` positions at a time, never fewer than the
    canvas allows: a matmul over one or two rows takes another kernel on this CPU, whose fp32 bits differ."""

    CHUNK = 4

    def __init__(self, model: DiffusionGemma, h: torch.Tensor, kept: list[int], kept_logits: torch.Tensor,
                 add_bias=None):
        self.model, self.h, self.add_bias = model, h, add_bias
        self.kept = {p: i for i, p in enumerate(kept)}
        self.kept_logits = kept_logits
        self.lo, self.block = 0, None

    def __call__(self, j: int) -> torch.Tensor:
        if j in self.kept:
            return self.kept_logits[self.kept[j]]
        if self.block is None or not self.lo <= j < self.lo + self.CHUNK:
            self.lo = max(0, min(j, self.h.shape[0] - self.CHUNK))
            self.block = self.model.logits(self.h[self.lo:self.lo + self.CHUNK])
            if self.add_bias is not None:  # as the plain path adds it (the kept rows have it from the head's pass)
                self.add_bias(self.block)
        return self.block[j - self.lo]


class WordBans:
    """bad_words of several tokens on a diffusion row, as a grammar matcher (`structured.Matcher`'s interface) that
    the engine's left-to-right commit walk consults: after the output so far, a word's last token is not allowed
    where the tokens before it end the output (vLLM's rule for AR decoding, here for each committed position). Wraps
    the row's grammar matcher, if any: both must allow a token."""

    def __init__(self, words, vocab: int, inner=None):
        self.words = [tuple(w) for w in words if len(w) > 1]
        self.vocab, self.inner = vocab, inner
        self.keep = max(len(w) for w in self.words) - 1
        self.tail: list[int] = []  # the output's last tokens, as many as the longest word less one

    @property
    def done(self) -> bool:
        return self.inner is not None and self.inner.done

    @property
    def accepting(self) -> bool:
        return self.inner is None or self.inner.accepting

    def allowed(self) -> torch.Tensor:
        mask = self.inner.allowed().clone() if self.inner is not None else torch.ones(self.vocab, dtype=torch.bool)
        for w in self.words:
            n = len(w) - 1
            if len(self.tail) >= n and tuple(self.tail[len(self.tail) - n:]) == w[:-1]:
                mask[w[-1]] = False
        return mask

    def consume(self, token: int) -> None:
        if self.inner is not None:
            self.inner.consume(token)
        self.tail = (self.tail + [int(token)])[-self.keep:]


def _adapters(rows) -> list[int] | None:
    """Each row's LoRA adapter for a forward, or None when every row runs the base (the plain path)."""
    ids = [r.p.adapter for r in rows]
    return ids if any(ids) else None


def predicted_draft(prediction: Sequence[int], out: Sequence[int], hint: int, length: int
                    ) -> tuple[int, list[int]]:
    """Where the output so far ends in `prediction`, and the (up to) `length` predicted tokens after it: the next
    canvas's draft. The output's last tokens (16, else 8, else 4) are looked for in the prediction, the match
    ending nearest `hint` (where the output would end had it followed the prediction) winning; none found, the
    hint is trusted. An output that left the prediction behind gets what follows the hint, which the model is free
    to overwrite; past the prediction's end, no draft."""
    at = min(max(hint, 0), len(prediction))
    if out:
        pred = list(prediction)
        for m in (16, 8, 4):
            if len(out) < m:
                continue
            tail = list(out[-m:])
            ends = [i + m for i in range(len(pred) - m + 1) if pred[i:i + m] == tail]
            if ends:
                at = min(ends, key=lambda e: (abs(e - hint), e))
                break
    return at, list(prediction[at:at + length])


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int | None = None) -> int:
    """Length of the longest common prefix of two token lists (at most `limit`): slice compares in C, then a
    scan of the first block that differs."""
    n = min(len(a), len(b), len(b) if limit is None else limit)
    lo, block = 0, 256
    while lo < n:
        hi = min(lo + block, n)
        if a[lo:hi] != b[lo:hi]:
            while a[lo] == b[lo]:
                lo += 1
            return lo
        lo = hi
    return n


def _top_lists(ids: torch.Tensor | None, lps: torch.Tensor | None, n: int) -> list[TopLogprobs]:
    """Per position, the (token, log-probability) alternatives of `raw_logprobs`' top tensors [n, k] (n empty
    lists when none were asked). -inf entries are tokens ruled out (a fixed or constrained position): dropped."""
    if ids is None:
        return [[] for _ in range(n)]
    return [[(t, v) for t, v in zip(ti, tv) if v != float("-inf")] for ti, tv in zip(ids.tolist(), lps.tolist())]


def _dense(bias: dict[int, float], vocab: int) -> torch.Tensor:
    """A {token: value} map as a [V] fp32 vector, 0.0 elsewhere."""
    out = torch.zeros(vocab, dtype=torch.float32)
    out[torch.tensor(sorted(bias), dtype=torch.long)] = torch.tensor([float(bias[t]) for t in sorted(bias)])
    return out


def min_text(tok, tokens: Sequence[int], min_tokens: int, stops: Sequence[str], skip_special: bool = False) -> int:
    """min_tokens: the characters of text the output's first min_tokens tokens spell, within which no stop string
    may end (0 without min_tokens or stop strings)."""
    return len(tok.decode(tokens[:min_tokens], skip_special=skip_special)) if min_tokens and stops else 0


def stop_cut(text: str, stops: Sequence[str], after: int = 0, include: bool = False) -> int | None:
    """Where a text ends at its stop strings: before the first match that ends past `after` characters (min_tokens'
    text), or after it with `include` (vLLM's include_stop_str_in_output); None without a match."""
    best = None
    for s in stops:
        i = text.find(s, max(0, after - len(s) + 1))
        if i >= 0 and (best is None or i < best[0]):
            best = (i, len(s))
    if best is None:
        return None
    return best[0] + best[1] if include else best[0]


def tokens_for_prefix(tok, tokens: list[int], text: str, skip_special: bool = False) -> list[int]:
    """The longest prefix of `tokens` whose decoding is a prefix of `text` (after a stop-string cut)."""
    for n in range(len(tokens), -1, -1):
        if text.startswith(tok.decode(tokens[:n], skip_special=skip_special)):
            return tokens[:n]
    return []


# ---------------------------------------------------------------- one-call API
def generate(model: DiffusionGemma, prompts: Sequence[Sequence[int]],
             params: GenerationParams | Sequence[GenerationParams] | None = None, *, tokenizer=None,
             drafts: bool = False, events: bool = False,
             fused_head: bool | None = None):
    """Generate for a batch of token-id prompts. Returns a list of `Done` (or, with events=True, an iterator)."""
    params = params if params is not None else GenerationParams()
    plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    longest = max((len(p) + prm.max_new_tokens + model.cfg.canvas_length for p, prm in zip(prompts, plist)),
                  default=1)
    engine = Engine(model, tokenizer, max_rows=max(len(prompts), 1), drafts=drafts,
                    max_len=min(longest, model.cfg.max_position_embeddings), fused_head=fused_head)
    stream = engine.run(prompts, plist)
    if events:
        return stream
    done = {ev.request: ev for ev in stream if isinstance(ev, Done)}
    return [done[i] for i in sorted(done)]
