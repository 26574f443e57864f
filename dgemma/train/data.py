"""Training data: JSONL records -> token-id examples -> block-layout batches for the objective (SPEC §5).

Accepted records, one JSON object per line (blank lines are skipped):
    {"prompt": str, "response": str}            prompt gets BOS; response gets the tokenizer's EOS
    {"messages": [{"role", "content"}, ...]}    the last message is the model's answer (the response); the ones
                                                before it go through the chat template with the generation prompt
    {"prompt_ids": [int], "response_ids": [int]}  already tokenized (no tokenizer needed)
A message's content may be a list of parts, text and images ({"type": "image", "image": PATH}, a path relative to
the JSONL file, or OpenAI's {"type": "image_url", "image_url": {"url": "data:..."}}), on a model with a vision
tower: the images go into the prompt as inference puts them (`Pipeline.chat_messages`); the tower stays frozen.
Every mistake names the file and line.

Layout of one example (T = canvas length, P = prompt length, R = response length including its terminator):
    response padded to a canvas boundary with copies of its terminator: blocks 0 .. n_blocks-1, n_blocks = ceil(R/T)
    encoder input  = prompt + response (clean)       -> KV cache and the next-token (AR) loss
    trained canvas = block `sel` of the padded response, starting at absolute position P + sel*T
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..vision import image_spans
from .noise import NoiseDraw, corrupt, draw

IGNORE = -100  # target id that cross-entropy skips


class DataError(ValueError):
    """A dataset that cannot be used, with the file and line at fault."""


@dataclass(frozen=True)
class Example:
    prompt: tuple[int, ...]
    response: tuple[int, ...]  # ends with its terminator (an EOS id); never empty
    # The last `fixed` response tokens stay clean in the noised canvas, as inference's fixed positions are (an
    # infill suffix at the canvas end): only in the block that holds them.
    fixed: int = 0
    # the prompt's images (`vision.Image`), in order, and the (start, end) of each one's placeholders in it
    images: tuple = ()
    spans: tuple[tuple[int, int], ...] = ()

    def n_blocks(self, canvas: int) -> int:
        return math.ceil(len(self.response) / canvas)

    def length(self, canvas: int) -> int:
        """Positions the example spans once its response is padded to a canvas boundary."""
        return len(self.prompt) + self.n_blocks(canvas) * canvas


# ---------------------------------------------------------------- reading
def _terminated(ids: list[int], eos: int, eos_set) -> tuple[int, ...]:
    return tuple(ids if ids and ids[-1] in eos_set else ids + [eos])


def _ids(value, where: str, field: str, vocab: int) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise DataError(f"{where}: field {field!r} must be a list of token ids")
    bad = [t for t in value if not 0 <= t < vocab]
    if bad:
        raise DataError(f"{where}: field {field!r} has token id {bad[0]} outside the vocabulary [0, {vocab})")
    return list(value)


def record_to_example(rec, where: str, tokenizer, *, vocab: int, eos: int, eos_set, pipe=None,
                      root: Path | None = None) -> Example:
    """One parsed JSON record -> Example (raises DataError naming `where` = "file:line"). pipe: a `Pipeline` of a
    model with a vision tower, for records with images (paths relative to `root`)."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "prompt_ids" in rec or "response_ids" in rec:
        for f in ("prompt_ids", "response_ids"):
            if f not in rec:
                raise DataError(f"{where}: missing field {f!r}")
        prompt = _ids(rec["prompt_ids"], where, "prompt_ids", vocab)
        if not prompt:
            raise DataError(f"{where}: field 'prompt_ids' is empty")
        response = _ids(rec["response_ids"], where, "response_ids", vocab)
        return Example(tuple(prompt), _terminated(response, eos, eos_set))
    if tokenizer is None:
        raise DataError(f"{where}: text records need a tokenizer (the model has none: pass --tokenizer)")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2:
            raise DataError(f"{where}: 'messages' must be a list of at least two messages (a prompt and an answer)")
        last = msgs[-1]
        if not isinstance(last, dict) or last.get("role") not in ("assistant", "model"):
            raise DataError(f"{where}: the last message must have role 'assistant' (it is the trained response)")
        if not isinstance(last.get("content"), str):
            raise DataError(f"{where}: the last message's 'content' must be a string")
        images: tuple = ()
        try:
            if any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in msgs[:-1]):
                prompt, images = _with_images(msgs[:-1], where, pipe, root)
            else:
                prompt = tokenizer.encode_chat(msgs[:-1], add_generation_prompt=True)
        except (ValueError, TypeError) as e:
            raise DataError(f"{where}: {e}") from None
        # A model turn ends with the end-of-turn token when the vocabulary has one (Gemma: <turn|>, an EOS id).
        end = tokenizer.token_to_id("<turn|>")
        end = end if end is not None and end in eos_set else eos
        spans = tuple(image_spans(prompt, pipe.model.cfg.image_token_id)) if images else ()
        return Example(tuple(prompt), _terminated(tokenizer.encode(last["content"]), end, eos_set), images=images,
                       spans=spans)
    missing = [f for f in ("prompt", "response") if f not in rec]
    if missing:
        raise DataError(f"{where}: missing field {missing[0]!r} "
                        "(expected {\"prompt\", \"response\"}, {\"messages\": [...]} "
                        "or {\"prompt_ids\", \"response_ids\"})")
    for f in ("prompt", "response"):
        if not isinstance(rec[f], str):
            raise DataError(f"{where}: field {f!r} must be a string, got {type(rec[f]).__name__}")
    prompt = tokenizer.encode(rec["prompt"], add_bos=tokenizer.bos_id is not None)
    if not prompt:
        raise DataError(f"{where}: the prompt is empty")
    return Example(tuple(prompt), _terminated(tokenizer.encode(rec["response"]), eos, eos_set))


def _with_images(msgs: list, where: str, pipe, root: Path | None) -> tuple[list[int], tuple]:
    """The prompt ids and images of messages with content parts, as `Pipeline.chat` builds them."""
    if pipe is None:
        raise DataError(f"{where}: image parts need a model with a vision tower (this one takes text only)")
    fixed = []
    for m in msgs:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and root is not None:
            content = [_rooted(p, root) for p in content]
        fixed.append({**m, "content": content} if isinstance(m, dict) else m)
    from ..generate import GenerationError

    try:
        messages, images = pipe.chat_messages(fixed)
        return pipe.encode_chat(messages, images=images, add_generation_prompt=True), tuple(images)
    except GenerationError as e:
        raise DataError(f"{where}: {e}") from None


def _rooted(part, root: Path):
    """An image part whose path is relative, made relative to the data file's directory."""
    if not isinstance(part, dict) or part.get("type") != "image":
        return part
    key = next((k for k in ("image", "path") if isinstance(part.get(k), str)), None)
    if key is None or part[key].startswith("data:") or Path(part[key]).is_absolute():
        return part
    return {**part, key: str(root / part[key])}


def iter_jsonl(path: Path):
    """(where, record) for each non-blank line of a JSONL file; `where` is "file:line" for error messages."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None


def load_jsonl(path: str | Path, tokenizer=None, *, vocab: int, eos: int, eos_set=(), canvas: int,
               max_len: int, quiet: bool = False, pipe=None) -> list[Example]:
    """Read and tokenize a JSONL file. Examples longer than `max_len` positions (after canvas padding) are skipped
    with a note on stderr; a malformed line is an error naming its line number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset not found: {path}")
    eos_set = frozenset(eos_set) | {eos}
    out, skipped = [], 0
    for where, rec in iter_jsonl(path):
        ex = record_to_example(rec, where, tokenizer, vocab=vocab, eos=eos, eos_set=eos_set, pipe=pipe,
                               root=path.parent)
        if ex.length(canvas) > max_len:
            skipped += 1
            continue
        out.append(ex)
    if skipped and not quiet:
        print(f"dgemma train: skipped {skipped} example(s) of {path} longer than {max_len} positions", file=sys.stderr)
    if not out:
        raise DataError(f"{path} has no usable examples" + (f" ({skipped} longer than {max_len})" if skipped else ""))
    return out


def fingerprint(dataset) -> str:
    """A hash of a dataset's tokens, stored in checkpoints so a resume can tell if the data changed."""
    h = hashlib.sha256()
    h.update(str(len(dataset)).encode())
    for i in range(len(dataset)) if len(dataset) <= 200_000 else range(0, len(dataset), len(dataset) // 200_000):
        ex = dataset[i]
        h.update(repr((ex.prompt, ex.response)).encode())
        if ex.images:  # (text datasets keep the fingerprints they had)
            h.update(" ".join(img.digest for img in ex.images).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- order
class Order:
    """The data order: a fresh permutation of the dataset per epoch, from (seed, epoch) alone.

    The global batch of optimizer step s is items s*B .. s*B+B-1 of the endless concatenation of epochs, so the
    position in the data is a pure function of the step and a resume needs nothing but the step.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def _perm_of(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            from .noise import mix_seed

            g = torch.Generator().manual_seed(mix_seed(self.seed, 0x5EED, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def indices(self, step: int, batch: int) -> list[tuple[int, int]]:
        """(dataset index, epoch) of each item of step `step`'s global batch."""
        out = []
        for pos in range(step * batch, (step + 1) * batch):
            epoch = pos // self.n
            out.append((int(self._perm_of(epoch)[pos % self.n]), epoch))
        return out


# ---------------------------------------------------------------- batches
@dataclass
class Batch:
    """One micro-batch in block layout (B rows, L encoder positions, T canvas length)."""

    enc_ids: torch.Tensor  # [B, L] clean prompt + response, right-padded with pad
    enc_len: torch.Tensor  # [B] real tokens per row
    ar_targets: torch.Tensor  # [B, L] next-token targets, IGNORE where not supervised
    canvas_start: torch.Tensor  # [B] absolute position of the trained canvas = P + sel*T
    clean: torch.Tensor  # [B, T] the canvas's clean tokens (the targets)
    noisy: torch.Tensor  # [B, T] x_t
    corrupted: torch.Tensor  # [B, T] bool, positions resampled by the noise
    t: torch.Tensor  # [B] noise level
    self_condition: torch.Tensor  # [B] bool
    # per row, (offset in enc_ids, vision.Image) of each image of its prompt; None when no row has one
    images: list | None = None

    def to(self, device) -> "Batch":
        return Batch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()})

    @property
    def rows(self) -> int:
        return self.clean.shape[0]


def ar_count(ex: Example, ar_on_prompt: bool) -> int:
    """Next-token targets of one example: the response (with its terminator), plus the prompt if asked."""
    return len(ex.response) + (len(ex.prompt) - 1 - sum(b - a for a, b in ex.spans) if ar_on_prompt else 0)


def make_batch(examples: Sequence[Example], draws: Sequence[NoiseDraw], *, canvas: int, pad: int,
               with_ar: bool = True, ar_on_prompt: bool = False) -> Batch:
    """Lay out examples for the objective. `draws` carry each example's noise (see noise.draw).

    with_ar=False encodes only what the trained canvas needs (prompt + earlier blocks), which is cheaper.
    """
    rows = []
    for ex, d in zip(examples, draws):
        P, R, sel = len(ex.prompt), len(ex.response), d.block
        padded = list(ex.response) + [ex.response[-1]] * (ex.n_blocks(canvas) * canvas - R)
        enc = list(ex.prompt) + (list(ex.response) if with_ar else padded[:sel * canvas])
        targets = [IGNORE] * len(enc)
        if with_ar:
            first = 0 if ar_on_prompt else P - 1
            for i in range(first, len(enc) - 1):
                targets[i] = enc[i + 1]
            for a, b in ex.spans if ar_on_prompt else ():  # an image's placeholders are not text to predict
                targets[a - 1:b - 1] = [IGNORE] * (b - a)
        rows.append((enc, targets, P + sel * canvas, padded[sel * canvas:(sel + 1) * canvas]))
    B, L = len(rows), max(len(r[0]) for r in rows)
    enc_ids = torch.full((B, L), pad, dtype=torch.long)
    ar_targets = torch.full((B, L), IGNORE, dtype=torch.long)
    for i, (enc, targets, _, _) in enumerate(rows):
        enc_ids[i, :len(enc)] = torch.tensor(enc, dtype=torch.long)
        ar_targets[i, :len(targets)] = torch.tensor(targets, dtype=torch.long)
    clean = torch.tensor([r[3] for r in rows], dtype=torch.long)
    t = torch.tensor([d.t for d in draws], dtype=torch.float64)
    noisy, hit = corrupt(clean, t[:, None], torch.stack([d.uniforms for d in draws]),
                         torch.stack([d.tokens for d in draws]))
    for i, (ex, d) in enumerate(zip(examples, draws)):
        if ex.fixed:  # response positions R-fixed .. R-1, as positions of the selected block
            lo, hi = len(ex.response) - ex.fixed - d.block * canvas, len(ex.response) - d.block * canvas
            lo, hi = max(lo, 0), min(hi, canvas)
            if lo < hi:
                noisy[i, lo:hi], hit[i, lo:hi] = clean[i, lo:hi], False
    images = [[(a, img) for (a, _), img in zip(ex.spans, ex.images)] for ex in examples]
    return Batch(enc_ids=enc_ids, enc_len=torch.tensor([len(r[0]) for r in rows]), ar_targets=ar_targets,
                 canvas_start=torch.tensor([r[2] for r in rows]), clean=clean, noisy=noisy, corrupted=hit,
                 t=t.float(), self_condition=torch.tensor([d.self_condition for d in draws]),
                 images=images if any(images) else None)


def draw_for(examples: Sequence[Example], gens, *, canvas: int, vocab: int, eps: float, sc_prob: float
             ) -> list[NoiseDraw]:
    return [draw(g, ex.n_blocks(canvas), canvas, vocab, eps, sc_prob) for ex, g in zip(examples, gens)]
