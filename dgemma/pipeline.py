"""Pipeline: a loaded model with its tokenizer and its checkpoint's generation defaults.

The one object the CLI, the server and the benchmarks share: it turns text (or chat messages) and per-call
options into token ids and `GenerationParams`, and runs them through an `Engine`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .generate import AR, DIFFUSION, Done, Engine, GenerationError, GenerationParams, generate
from .model import DiffusionGemma
from .quant import QuantConfig
from .runtime import cpu_dtype
from .sampler import SamplerConfig
from .vision import (DEFAULT_SOFT_TOKENS, IMAGE_MARKER, VISION_DEFAULTS, Image, ImageError, add_text, detail_tokens,
                     has_vision, image_ids, load_image, preprocess)
from .weights import CheckpointError, load_model, read_generation_config, resolve

SAMPLER_OPTIONS = {f.name for f in dataclasses.fields(SamplerConfig)}
# Short names users type (CLI flags, server body fields) for the sampler's options.
ALIASES = {"steps": "max_denoising_steps", "stability": "stability_threshold",
           "confidence": "confidence_threshold"}
PARAM_OPTIONS = {"max_new_tokens", "seed", "stop", "ar_temperature", "fixed", "init_canvas", "prediction",
                 "ignore_eos", "rng", "drafts", "logprobs", "logit_bias", "prompt_logprobs", "grammar",
                 "presence_penalty", "frequency_penalty", "ar_fallback", "adapter", "top_k", "top_p", "min_p", "adaptive_steps",
                 "repetition_penalty", "min_tokens", "stop_token_ids", "include_stop_str_in_output",
                 "allowed_token_ids", "skip_special_tokens", "bad_words", "images", "cache_salt"}
FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The fastest dtype the device runs the model in: bf16 on CUDA, and on CPUs with a native bf16 dot product
    (`runtime.cpu_bf16_native`); fp32 on other CPUs, where bf16 matmuls are emulated and slower than fp32.
    DGEMMA_CPU_DTYPE=float32|bfloat16 pins the CPU's choice."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return cpu_dtype()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Pipeline:
    def __init__(self, model: DiffusionGemma, tokenizer=None, generation_config: Mapping[str, Any] | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.set_generation_config(generation_config or {})

    def set_generation_config(self, generation_config: Mapping[str, Any]) -> None:
        """The defaults every call starts from (generation_config.json's keys: the sampler's and max_new_tokens);
        ValueError for a value the sampler refuses, before anything changes."""
        sampler = SamplerConfig.from_generation_config(dict(generation_config))
        self.generation_config = dict(generation_config)
        self.sampler = sampler
        self.max_new_tokens = int(self.generation_config.get("max_new_tokens") or 256)

    @classmethod
    def load(cls, path_or_id: str, *, adapter: str | None = None, dtype: torch.dtype | None = None,
             device: str | None = None, quiet: bool = False, compile: bool = False,
             quantization: QuantConfig | str | None = None, revision: str | None = None,
             download_dir: str | None = None, tokenizer: str | None = None) -> "Pipeline":
        """A checkpoint (directory or hub id) with its tokenizer and generation defaults. `adapter`: a LoRA
        adapter directory (`dgemma train --lora-rank`), folded into the weights as they load (kept unmerged over a
        quantized checkpoint: QLoRA). An adapter directory given as the checkpoint itself loads the base it records
        (`base_model_name_or_path`).
        compile: torch.compile the denoiser (`DiffusionGemma.compile_denoiser`), compiled here, before use.
        quantization: a scheme ("int8", "int4", "fp8", "nvfp4") or a QuantConfig: weight-only quantization of a
        full-precision checkpoint as it loads (vLLM's `quantization`), one weight at a time.
        revision: a branch, tag or commit of a hub id (default: main). download_dir: the huggingface_hub cache
        directory hub ids are fetched into (default: its own). tokenizer: a directory or hub id whose tokenizer to
        use instead of the checkpoint's (vLLM's `tokenizer`)."""
        from .tokenizer import Tokenizer

        device = device or default_device()
        ckpt = resolve(path_or_id, revision, download_dir)
        if adapter is None and (ckpt / "adapter_config.json").is_file() and not (ckpt / "config.json").is_file():
            ckpt, adapter = adapter_base(ckpt), ckpt
        tok = None  # read before the model: a wrong --tokenizer fails at once
        source = ckpt if tokenizer is None else resolve(tokenizer, cache_dir=download_dir)
        if (source / "tokenizer.json").exists():
            tok = Tokenizer.from_dir(source)
        elif tokenizer is not None:
            raise CheckpointError(f"tokenizer {tokenizer!r}: no tokenizer.json in {source}")
        if isinstance(quantization, str):
            quantization = QuantConfig(quantization)
        if quantization is None and adapter is not None:  # an adapter trained over a base quantized as it loaded
            quantization = _adapter_base_quantization(adapter, ckpt)
        model = load_model(ckpt, dtype=dtype or default_dtype(device), device=device, quiet=quiet,
                           quantize=quantization)
        if adapter is not None:
            _fold_adapter(model, adapter)
        if compile:
            model.compile_denoiser()
        if tok is not None and tokenizer is not None and tok.vocab_size > model.cfg.vocab_size:
            raise CheckpointError(f"tokenizer {tokenizer!r} has {tok.vocab_size} tokens; the model's embedding has "
                                  f"{model.cfg.vocab_size}")
        return cls(model, tok, read_generation_config(ckpt))

    # ------------------------------------------------------------ options
    def params(self, *, ar: bool = False, **options: Any) -> GenerationParams:
        """Per-call options on top of the checkpoint's defaults. Unknown options are a clear error."""
        sampler_kw, param_kw = {}, {}
        for key, value in options.items():
            if value is None:
                continue
            name = ALIASES.get(key, key)
            if name in SAMPLER_OPTIONS:
                sampler_kw[name] = value
            elif name in PARAM_OPTIONS:
                param_kw[name] = value
            else:
                known = sorted(SAMPLER_OPTIONS | PARAM_OPTIONS | set(ALIASES) | {"ar"})
                raise GenerationError(f"unknown option {key!r}; known options: {', '.join(known)}")
        param_kw.setdefault("max_new_tokens", self.max_new_tokens)
        if "stop" in param_kw:
            stop = param_kw["stop"]
            param_kw["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        try:
            sampler = self.sampler.replace(**sampler_kw)
        except (TypeError, ValueError) as e:
            raise GenerationError(str(e)) from None
        return GenerationParams(sampler=sampler, mode=AR if ar else DIFFUSION, **param_kw)

    # ------------------------------------------------------------ prompts
    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise GenerationError("this checkpoint has no tokenizer.json: pass token ids instead of text")
        return self.tokenizer

    def encode(self, text: str, add_bos: bool = True, images: Sequence[Image] | None = None) -> list[int]:
        """Token ids of `text`; with `images`, each `<|image|>` marker in it becomes that image's ids, in order
        (as many markers as images)."""
        tok = self._need_tokenizer()
        if not images:
            return tok.encode(text, add_bos=add_bos)
        pieces = text.split(IMAGE_MARKER)
        if len(pieces) - 1 != len(images):
            raise GenerationError(f"the prompt marks {len(pieces) - 1} image(s) with {IMAGE_MARKER} but "
                                  f"{len(images)} came with it")
        ids = tok.encode(pieces[0], add_bos=add_bos) if pieces[0] or add_bos else []
        for img, piece in zip(images, pieces[1:]):
            ids += image_ids(self.model.cfg, img)
            if piece:
                ids += tok.encode(piece, add_bos=False)
        return ids

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], *, images: Sequence[Image] | None = None,
                    **kw) -> list[int]:
        """The chat template over `messages`, tokenized. With `images`, each `<|image|>` marker in the rendered
        prompt (`chat_messages` writes one per image part) becomes that image's ids (`vision.image_ids`)."""
        try:
            if not images:
                return self._need_tokenizer().encode_chat(messages, **kw)
            return self.encode(self._need_tokenizer().apply_chat_template(messages, **kw), add_bos=False,
                               images=images)
        except ValueError as e:
            raise GenerationError(str(e)) from None

    def image(self, src: Any, max_soft_tokens: int | None = None) -> Image:
        """One image, read (a path, encoded bytes, a data: URL or a PIL image; a `vision.Image` is taken as it is)
        and preprocessed for this model, in at most `max_soft_tokens` tokens (70, 140, 280, 560 or 1120; default
        the checkpoint's `vision_soft_tokens_per_image`, 280 for the released model).
        A model without a vision tower is a GenerationError."""
        if not has_vision(self.model):
            raise GenerationError("this model has no vision tower, so it takes text only (its checkpoint carries "
                                  "no model.encoder.vision_tower.* tensors)")
        if isinstance(src, Image):
            return src
        if src is None or src == "":
            raise GenerationError("no image given")
        c = {**VISION_DEFAULTS, **(self.model.cfg.vision_config or {})}
        kw = dict(patch=c["patch_size"], kernel=c["pooling_kernel_size"], max_soft_tokens=max_soft_tokens
                  or self.model.cfg.vision_soft_tokens_per_image or DEFAULT_SOFT_TOKENS)
        try:
            if hasattr(src, "convert") and hasattr(src, "size"):  # a PIL image
                return preprocess(src.convert("RGB"), **kw)
            return load_image(src, **kw)
        except ImageError as e:
            raise GenerationError(str(e)) from None

    def chat_messages(self, messages: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[Image]]:
        """Messages whose content may be a list of parts, as transformers and OpenAI write them, made into what the
        chat template takes: text parts joined by newlines, each image part (`{"type": "image", "image": path,
        bytes or PIL image}`, `{"type": "image", "url" | "path": ...}` or OpenAI's `{"type": "image_url",
        "image_url": {"url": "data:...", "detail": ...}}`) the `<|image|>` marker (Gemma 4's template writes it
        before the text, no newline); and the images, read, in order. An image's token budget: its part's
        `max_soft_tokens`, or OpenAI's `detail` ("low" 70, "high" 1120, "auto" the checkpoint's default)."""
        out, images = [], []
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, Mapping) else None
            if not isinstance(content, list):
                out.append(dict(m) if isinstance(m, Mapping) else m)
                continue
            text = ""
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, Mapping) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    text = add_text(text, part["text"])
                elif kind in ("image", "image_url"):
                    src = part.get("image", part.get("path", part.get("url"))) if kind == "image" else \
                        part.get("image_url")
                    detail = part.get("detail")
                    if isinstance(src, Mapping):
                        src, detail = src.get("url"), src.get("detail", detail)
                    if src is None:
                        raise GenerationError(f"messages[{i}].content[{j}]: an image part needs its image")
                    try:
                        budget = part.get("max_soft_tokens") or detail_tokens(detail)
                    except ImageError as e:
                        raise GenerationError(f"messages[{i}].content[{j}]: {e}") from None
                    images.append(self.image(src, budget))
                    text += IMAGE_MARKER
                else:
                    raise GenerationError(f"messages[{i}].content[{j}]: parts are text or images, got {kind!r}")
            out.append({**m, "content": text})
        return out, images

    def decode(self, ids: Sequence[int]) -> str:
        return self._need_tokenizer().decode(ids)

    # ------------------------------------------------------------ running
    def engine(self, max_rows: int = 8, max_len: int | None = None, **kw) -> Engine:
        return Engine(self.model, self.tokenizer, max_rows=max_rows, max_len=max_len, **kw)

    def suffix_ids(self, suffix: str) -> list[int]:
        """The suffix tokens an infill uses: its first quarter-canvas (the rest is too far away to matter)."""
        T = self.model.cfg.canvas_length
        return (self.encode(suffix, add_bos=False) if suffix else [])[:max(T // 4, 1)]

    def bad_words_ids(self, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
        """vLLM's bad_words as token-id sequences, spelled as vLLM spells them: each word without its leading
        spaces, and with one leading space where that is as many tokens and starts with another token."""
        out: list[tuple[int, ...]] = []
        for word in words:
            if not isinstance(word, str) or not word.strip():
                raise GenerationError(f"bad_words must be non-empty strings, got {word!r}")
            bare = tuple(self.encode(word.lstrip(), add_bos=False))
            spaced = tuple(self.encode(" " + word.lstrip(), add_bos=False))
            out.append(bare)
            if len(spaced) == len(bare) and spaced[0] != bare[0]:
                out.append(spaced)
        return tuple(dict.fromkeys(out))

    def has_fim(self) -> bool:
        tok = self.tokenizer
        return tok is not None and all(tok.token_to_id(t) is not None for t in FIM_TOKENS)

    def fim_prompt(self, prefix_ids: Sequence[int], suffix: str) -> list[int]:
        """<bos><|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|>: infill as a prompt, for checkpoints
        trained with those tokens (the shipped code model is); autoregressive decoding infills this way."""
        tok = self._need_tokenizer()
        ids = [tok.token_to_id(t) for t in FIM_TOKENS]
        if None in ids:
            raise GenerationError("autoregressive infill needs fill-in-the-middle tokens (" + ", ".join(FIM_TOKENS)
                                  + ") that this checkpoint's tokenizer lacks; infill with diffusion instead")
        fp, fs, fm = ids
        body = list(prefix_ids[1:] if prefix_ids[:1] == [tok.bos_id] else prefix_ids)
        return [tok.bos_id, fp, *body, fs, *self.suffix_ids(suffix), fm]

    def infill_request(self, prefix: str, suffix: str, *, ar: bool = False, **options: Any
                       ) -> tuple[list[int], GenerationParams, int]:
        """Fill the middle between `prefix` and `suffix`. Returns (prompt ids, params, suffix tokens in the canvas).

        Diffusion: the prefix is the prompt (encoded into the cache); the suffix's first tokens (`suffix_ids`) are
        fixed at the END of the first canvas, so the denoiser sees them bidirectionally while it fills the
        positions before them. The answer is one canvas; `trim_infill` keeps the middle (up to the first EOS, or
        up to the suffix). ar=True: the FIM prompt (`fim_prompt`), decoded left to right up to EOS.
        """
        T = self.model.cfg.canvas_length
        options["max_new_tokens"] = T
        if ar:
            return self.fim_prompt(self.encode(prefix), suffix), self.params(ar=True, **options), 0
        sids = self.suffix_ids(suffix)
        fixed = {T - len(sids) + i: t for i, t in enumerate(sids)}
        return self.encode(prefix), self.params(fixed=fixed, **options), len(sids)

    def trim_infill(self, done: Done, n_suffix: int, skip_special: bool = False) -> Done:
        """The middle of an infill's canvas (`skip_special`: its text without the special tokens written)."""
        n = self.model.cfg.canvas_length - n_suffix
        middle = done.tokens[:n]
        text = self.tokenizer.decode(middle, skip_special=skip_special) if self.tokenizer is not None else None
        lps, tops = (done.logprobs[:n], done.top_logprobs[:n]) if done.logprobs is not None else (None, None)
        ents = done.entropies[:n] if done.entropies is not None else None
        return dataclasses.replace(done, tokens=middle, text=text, finish_reason="stop", logprobs=lps,
                                   top_logprobs=tops, entropies=ents)

    def infill(self, prefix: str, suffix: str, **options: Any) -> Done:
        prompt, params, n = self.infill_request(prefix, suffix, **options)
        return self.trim_infill(generate(self.model, [prompt], params, tokenizer=self.tokenizer)[0], n,
                                params.skip_special_tokens)

    def generate(self, prompts: Sequence[str | Sequence[int]], **options: Any) -> list[Done]:
        """Text (or token-id) prompts in, `Done` results (with `.text`) out."""
        ids = [self.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        ar = bool(options.pop("ar", False))
        return generate(self.model, ids, self.params(ar=ar, **options), tokenizer=self.tokenizer)

    def chat(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
             tool_choice: str = "auto", parallel_tool_calls: bool = True, enable_thinking: bool = False,
             continue_final_message: bool = False, ar: bool = False, **options: Any) -> ChatReply:
        """One assistant turn: the chat template over `messages` (OpenAI's shape, tool calls and results
        included), decoded, and read back as the server reads it: the thought channel apart (`enable_thinking`),
        tool calls parsed out (`tools`; `tool_choice` "auto", "required", "none" or a tool's name, the last two
        forced by the call grammar). A `grammar` option (structured output) holds the answer after any thought.
        continue_final_message: the last message is the assistant's reply so far, which the turn continues (the
        reply holds the continuation). A message's content may be a list of text and image parts
        (`chat_messages`), on a model with a vision tower."""
        from .tools import ToolError, read_reply, tool_setup

        tok = self._need_tokenizer()
        names = forced = None
        if tools:
            try:
                tools, names, forced = tool_setup(tools, tool_choice, tok, parallel=parallel_tool_calls,
                                                  thinking=enable_thinking)
            except ToolError as e:
                raise GenerationError(str(e)) from None
        if forced is not None:
            if options.get("grammar") is not None:
                raise GenerationError("a forced tool call cannot be combined with a grammar")
            options["grammar"] = forced
        elif options.get("grammar") is not None and enable_thinking:
            options["grammar"] = options["grammar"].after_thought(tok)
        messages, images = self.chat_messages(messages)
        prompt = self.encode_chat(messages, tools=tools, enable_thinking=enable_thinking,
                                  continue_final_message=continue_final_message, images=images)
        if images:
            options["images"] = tuple(images)
        [done] = generate(self.model, [prompt], self.params(ar=ar, **options), tokenizer=tok)
        thought, content, calls, reason = read_reply(done.text or "", done.finish_reason, thinking=enable_thinking,
                                                      names=names, parallel=parallel_tool_calls)
        return ChatReply(content=content, tool_calls=calls, reasoning=thought, finish_reason=reason, done=done)


@dataclasses.dataclass
class ChatReply:
    """One assistant turn read back (`Pipeline.chat`): its answer, its tool calls (`dgemma.tools.ToolCall`, with
    JSON arguments), its thought channel (thinking on), why it ended ("stop", "length" or "tool_calls"), and the
    engine's `Done` (tokens, stats, logprobs)."""

    content: str
    tool_calls: list
    reasoning: str | None
    finish_reason: str
    done: Done

    def message(self) -> dict[str, Any]:
        """The turn as an assistant message to append to the conversation."""
        out: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.openai() for c in self.tool_calls]
        return out


def save_pipeline(pipe: Pipeline, out_dir: str | Path) -> Path:
    """Model, tokenizer and generation defaults as one checkpoint directory."""
    from .weights import save_model

    gen = {**pipe.generation_config, **pipe.sampler.to_generation_config(), "max_new_tokens": pipe.max_new_tokens}
    return save_model(pipe.model, out_dir, generation_config=gen, tokenizer=pipe.tokenizer)


def _adapter_base_quantization(adapter, base: Path) -> QuantConfig | None:
    """The quantization an adapter's base was given as it loaded for training (`dgemma train --quantization`), or
    None; none for a base that is a quantized checkpoint already (it loads as it is)."""
    from .train.lora import BASE_QUANTIZATION, read_adapter_config
    from .weights import load_config

    q = read_adapter_config(adapter).get(BASE_QUANTIZATION)
    if q is None or QuantConfig.of(load_config(base)) is not None:
        return None
    return QuantConfig.from_dict(q)


def adapter_base(adapter: Path) -> Path:
    """The base checkpoint an adapter directory names, resolved like any checkpoint (a directory that is not an
    adapter is an error)."""
    from .train.lora import read_adapter_config
    from .weights import CheckpointError

    base = read_adapter_config(adapter).get("base_model_name_or_path")
    if not base:
        raise CheckpointError(f"{adapter} is a LoRA adapter that does not name its base model; give the base and "
                              f"the adapter: MODEL --adapter {adapter}")
    try:
        return resolve(base)
    except CheckpointError as e:
        raise CheckpointError(f"{adapter} is a LoRA adapter for {base!r}, which cannot be loaded ({e}); give the "
                              f"base and the adapter: MODEL --adapter {adapter}") from None


def _fold_adapter(model: DiffusionGemma, adapter: str | Path) -> None:
    """Apply a LoRA adapter and merge it into the weights in place: the result runs at the base's speed. Over a
    quantized base the adapter stays unmerged (`train.lora.LoRALinear` beside each quantized layer)."""
    from .quant import QuantConfig
    from .train.lora import load_adapter, merge_lora

    with torch.no_grad():
        load_adapter(model, adapter)
        if QuantConfig.of(model.cfg) is None:
            merge_lora(model)
        # a quantized base (an adapter trained over it: QLoRA) keeps the adapter unmerged: folding it in would
        # need its weights in floats (and requantized, other numbers than those it was trained against)
