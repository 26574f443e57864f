"""OpenAI requests -> engine jobs, and engine events -> OpenAI responses and SSE chunks.

A request becomes a `Plan`: one `Choice` per (prompt, n) pair, each with its own token ids and
`GenerationParams` (choice j of a prompt gets seed `seed + j`). Everything a client can get wrong is checked
here, before anything is queued, and raised as an `APIError` (400/404), so the engine only sees runnable rows.

Fill-in-the-middle (`suffix`, completions only)
-----------------------------------------------
The prompt is the prefix. The suffix's first tokens (a quarter-canvas at most) are pinned
(`GenerationParams.fixed`) to the LAST positions of the first canvas, so the canvas denoises the free positions in
front of them bidirectionally: the middle sees both the prefix (through the KV cache) and the suffix (inside the
canvas). Only that one canvas is generated, so the middle has at most `canvas_length - len(suffix tokens)` tokens.
The returned text is the middle alone: the canvas's tokens before the suffix, cut at the first EOS (the model
ending the middle early), then at `max_tokens` (finish_reason "length") and at a stop string ("stop"). Reaching the
suffix is "stop". With `ar: true` the request becomes a fill-in-the-middle prompt (<|fim_prefix|> prefix
<|fim_suffix|> suffix <|fim_middle|>) decoded left to right, for checkpoints whose tokenizer has those tokens (400
otherwise).

Log-probabilities (`logprobs`, chat `top_logprobs`)
--------------------------------------------------
Each returned token's log-probability under the model's raw distribution (before temperature, as vLLM reports by
default; after `logit_bias`) at the forward that produced it: for diffusion the last denoising step of its canvas,
whose draft is the output; for AR its own step. The alternatives are the most likely tokens at that position. In a
stream, a chunk carries the entries of the tokens its text completes. `echo` with `logprobs` (not streamed) adds
the prompt's own tokens, scored by the prefill's next-token distribution.
"""

from __future__ import annotations

import codecs
import json
import random
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from ..generate import AR, Commit, Done, GenerationError, GenerationParams, min_text, stop_cut, tokens_for_prefix
from ..structured import Grammar, GrammarError
from ..tokenizer import THOUGHT_OPEN, check_chat_template, split_thought
from ..tools import TOOL_CALL, ToolCall, ToolError, check_tokenizer, check_tools, read_reply, tool_grammar, tool_names
from ..vision import IMAGE_MARKER, ImageError, add_text, detail_tokens, has_vision, vision_tower
from .engine import Cancelled, Failed, Job
from .errors import APIError, from_generation, from_validation, invalid, unsupported
from .media import image_source
from .protocol import (SEED_LIMIT, AssistantMessage, ChatChoice, ChatCompletionRequest, ChatCompletionResponse,
                       CompletionChoice, CompletionRequest, CompletionResponse, StructuredOutputs, Usage, _Common)


@dataclass
class Choice:
    index: int
    prompt: list[int]
    params: GenerationParams
    seed: int
    echo: str = ""
    suffix_len: int = 0  # > 0: fill-in-the-middle, the first canvas's last suffix_len positions are fixed
    middle_len: int = 0  # canvas_length - suffix_len
    max_tokens: int = 0
    stop: tuple[str, ...] = ()
    job: Job | None = None
    tokens: list[int] = field(default_factory=list)  # committed so far
    logprobs: int | None = None  # alternatives asked per token (None: no logprobs)
    lps: list[float] = field(default_factory=list)  # per committed token
    tops: list = field(default_factory=list)
    ents: list[float] = field(default_factory=list)  # per committed token: the raw entropy its logprob is from
    lp_sent: int = 0  # tokens whose logprobs have been streamed
    ids_sent: int = 0  # tokens whose ids have been streamed (return_token_ids)
    sent: str = ""  # text already streamed (after `echo`)
    done: Done | None = None
    text: str | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0
    tool_names: list[str] | None = None  # tools the output may call ("auto", "required", a named function)
    parallel_tool_calls: bool = True
    tool_calls: list[ToolCall] = field(default_factory=list)
    thinking: bool = False  # chat with thinking on: the thought channel is returned apart, as reasoning_content
    reasoning: str | None = None
    reasoning_sent: str = ""

    # ------------------------------------------------------------ text assembly
    def visible(self, tok) -> str:
        """The part of the text so far that can be streamed now: cut at a stop string; without one, holding
        back a trailing U+FFFD (maybe half a UTF-8 character) and any tail that could start a stop string."""
        toks = self.tokens[:min(self.middle_len, self.max_tokens)] if self.suffix_len else self.tokens
        text = tok.decode(toks, skip_special=self.skip_special)
        after = self._min_text(tok, toks)
        if self.thinking:
            answer = split_thought(text)[1]  # the end of the text: min_tokens' text moves back with it
            text, after = answer, max(0, after - (len(text) - len(answer)))
        if self.tool_names is not None and TOOL_CALL in text:  # a call is sent whole, once it is parsed
            text = text[:text.index(TOOL_CALL)]
        cut = stop_cut(text, self.stop, after, self.include_stop)
        if cut is not None:
            return text[:cut]
        keep = len(text)
        while keep and text[keep - 1] == "\ufffd":
            keep -= 1
        for s in self.stop:
            for k in range(min(len(s) - 1, keep), 0, -1):
                if text[keep - k:keep] == s[:k]:
                    keep -= k
                    break
        return text[:keep]

    def _min_text(self, tok, toks: list[int]) -> int:
        return min_text(tok, toks, self.params.min_tokens if self.params is not None else 0, self.stop,
                        self.skip_special)

    @property
    def include_stop(self) -> bool:
        return self.params is not None and self.params.include_stop_str_in_output

    @property
    def skip_special(self) -> bool:
        """vLLM's skip_special_tokens: the text leaves out the special tokens written."""
        return self.params is not None and self.params.skip_special_tokens

    def reasoning_delta(self, tok) -> str:
        """The thought channel's text not yet streamed (thinking on), holding back a trailing U+FFFD."""
        if not self.thinking:
            return ""
        thought = split_thought(tok.decode(self.tokens))[0] or ""
        thought = thought.rstrip("\ufffd")
        if not thought.startswith(self.reasoning_sent):
            return ""
        d, self.reasoning_sent = thought[len(self.reasoning_sent):], thought
        return d

    def reasoning_rest(self) -> str:
        """After `finish`: the part of the thought channel not streamed yet."""
        thought = self.reasoning or ""
        rest = thought[len(self.reasoning_sent):] if thought.startswith(self.reasoning_sent) else ""
        self.reasoning_sent = thought
        return rest

    def advance(self, tok, ev) -> tuple[str, str]:
        """Fold a Commit or the Done into this choice: (thought, answer text) that can be streamed now."""
        if isinstance(ev, Done):
            text = self.finish(tok, ev)
            return self.reasoning_rest(), text
        self.commit(ev)
        return self.reasoning_delta(tok), self.delta(tok)

    def commit(self, ev) -> None:
        self.tokens.extend(ev.tokens)
        if ev.logprobs is not None:
            self.lps.extend(ev.logprobs)
            self.tops.extend(ev.top_logprobs)
            self.ents.extend(ev.entropies or [])

    def delta(self, tok) -> str:
        text = self.visible(tok)
        if not text.startswith(self.sent):
            return ""
        d, self.sent = text[len(self.sent):], text
        return d

    def _sent_tokens(self, tok, start: int, final: bool) -> int:
        """How many of the output's tokens the stream has sent the text of in full, from `start` on (after `finish`:
        all of them)."""
        if final:
            return self.completion_tokens
        toks = self.tokens[:min(self.middle_len, self.max_tokens)] if self.suffix_len else self.tokens
        ends, end = char_offsets(tok, toks, self.skip_special)[1:], start  # where each token's text ends
        while end < len(toks) and ends[end] <= len(self.sent):
            end += 1
        return end

    def stream_logprobs(self, tok, kind: str, final: bool = False) -> dict | None:
        """Logprobs of the tokens whose text the stream has now sent in full (after `finish`: all of them)."""
        if self.logprobs is None or (self.thinking and not final):  # offsets would count the thought: all at the end
            return None
        toks = self.tokens[:min(self.middle_len, self.max_tokens)] if self.suffix_len else self.tokens
        end = self._sent_tokens(tok, self.lp_sent, final)
        start, self.lp_sent = self.lp_sent, max(end, self.lp_sent)
        if end <= start:
            return None
        return logprobs_payload(kind, tok, toks, self.lps, self.tops, start, end, len(self.echo), self.ents,
                                self.skip_special)

    def stream_token_ids(self, tok, final: bool = False) -> list[int] | None:
        """return_token_ids in a stream: the ids of the tokens whose text this chunk completes (after `finish`: the
        rest), so the chunks' lists add up to the answer's `token_ids` even when a stop string cuts the text."""
        if self.thinking and not final:  # the answer's text does not count the thought: all at the end
            return None
        end = self._sent_tokens(tok, self.ids_sent, final)
        start, self.ids_sent = self.ids_sent, max(end, self.ids_sent)
        return self.tokens[start:end] if end > start else None

    def finish(self, tok, done: Done) -> str:
        """Final text, finish_reason and token count from the engine's Done; returns the unsent remainder."""
        self.done = done
        if self.suffix_len:
            middle = done.tokens[:self.middle_len]
            reason = "stop"
            if len(middle) > self.max_tokens:
                middle, reason = middle[:self.max_tokens], "length"
            text = tok.decode(middle, skip_special=self.skip_special)
            cut = stop_cut(text, self.stop, self._min_text(tok, middle), self.include_stop)
            if cut is not None:
                text, reason = text[:cut], "stop"
                middle = tokens_for_prefix(tok, middle, text, self.skip_special)
            self.text, self.finish_reason, self.completion_tokens = text, reason, len(middle)
        else:
            self.text, self.finish_reason = done.text or "", done.finish_reason
            self.completion_tokens = len(done.tokens)
            self.reasoning, self.text, self.tool_calls, self.finish_reason = read_reply(
                self.text, self.finish_reason, thinking=self.thinking, names=self.tool_names,
                parallel=self.parallel_tool_calls)
        self.tokens = list(done.tokens)
        if done.logprobs is not None:
            self.lps, self.tops = list(done.logprobs), list(done.top_logprobs)
            self.ents = list(done.entropies or [])
        rest = self.text[len(self.sent):] if self.text.startswith(self.sent) else ""
        self.sent = self.text
        return rest

    def stats(self) -> dict[str, Any]:
        s = self.done.stats if self.done else {}
        return {"index": self.index, "seed": self.seed, "mode": s.get("mode"),
                "steps_per_canvas": s.get("steps_per_canvas"), "restarts_per_canvas": s.get("restarts_per_canvas"),
                "tokens_per_forward": s.get("tokens_per_forward"),
                "final_mean_entropy_per_canvas": s.get("final_mean_entropy_per_canvas"),
                "ar_fallback_canvases": s.get("ar_fallback_canvases"),
                "wall_s": s.get("wall_s"), "time_to_first_commit_s": s.get("time_to_first_commit_s")}


@dataclass
class Plan:
    kind: str  # "completion" or "chat"
    model: str
    choices: list[Choice]
    prompt_tokens: int
    stream: bool
    drafts: bool
    include_usage: bool
    seed: int
    token_ids: bool = False  # vLLM's return_token_ids
    continuous_usage: bool = False  # vLLM's stream_options.continuous_usage_stats: usage on every chunk
    priority: int = 0  # vLLM's: admission order under --scheduling-policy priority
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs: alternatives per prompt token
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    t0: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        self.id = self.id or ("cmpl-" if self.kind == "completion" else "chatcmpl-") + uuid.uuid4().hex[:24]

    @property
    def jobs(self) -> list[Job]:
        return [c.job for c in self.choices if c.job is not None]


async def updates(state, plan: Plan, queue):
    """A one-choice plan's progress, for the streams of the other APIs: (thought, text, event) per Commit and for
    the Done (what can be sent now), or ("", "", Failed) last; a cancelled job just ends it. The caller cancels
    the plan's rows when its stream stops (a client that went away)."""
    c = plan.choices[0]
    while True:
        _, events = await queue.get()
        for ev in events:
            if isinstance(ev, (Commit, Done)):
                thought, text = c.advance(state.pipe.tokenizer, ev)
                yield thought, text, ev
                if isinstance(ev, Done):
                    return
            elif isinstance(ev, Failed):
                yield "", "", ev
                return
            elif isinstance(ev, Cancelled):
                return


def join_text(content: Any, where: str, *, text: tuple[str, ...], refused: tuple[str, ...]) -> str:
    """The text of a message's content in another API's shape: a string, or a list of parts whose `type` is one of
    `text` (joined by newlines); a part of a `refused` type (an image, a file) is a 400 saying so, any other an
    invalid value."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid("content must be a string or a list of parts", where)
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in text and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind in refused:
            raise unsupported(f"{kind} parts are not supported: send text", f"{where}.{j}")
        else:
            raise invalid(f"unexpected part {kind!r} here", f"{where}.{j}")
    return "\n".join(parts)


def chat_request(body: dict[str, Any]) -> ChatCompletionRequest:
    """A chat request built from another API's request, validated as a chat request is."""
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise from_validation(e) from None


# ---------------------------------------------------------------- planning
class Planner:
    """Turns validated request objects into Plans, with every check that needs the model or the settings."""

    def __init__(self, pipeline, worker, settings, adapters: dict[str, tuple[int, str]] | None = None):
        self.pipe, self.worker, self.settings = pipeline, worker, settings
        self.adapters = adapters if adapters is not None else {}  # LoRA module name -> (index, path), live
        self.canvas = pipeline.model.cfg.canvas_length
        # --seed: unseeded requests' seeds from one generator (plans are made on several threads: one at a time)
        self._seeds = random.Random(settings.seed) if settings.seed is not None else None
        self._seeds_lock = threading.Lock()

    def fresh_seed(self) -> int:
        """The seed of a request that names none."""
        if self._seeds is None:
            return secrets.randbelow(2**31)
        with self._seeds_lock:
            return self._seeds.randrange(2**31)

    def completion(self, req: CompletionRequest) -> Plan:
        self._common(req)
        if req.logprobs is not None and req.echo and req.stream:
            raise unsupported("echo with logprobs (the prompt's logprobs) is not supported when streaming",
                              "stream")
        if req.suffix and req.logprobs is not None and req.echo:
            raise unsupported("echo with logprobs is not supported with suffix", "echo")
        if req.best_of not in (None, 1):
            raise unsupported("best_of is not supported; use n and pick yourself", "best_of")
        prompts = self._prompts(req.prompt)
        if req.suffix and req.ar:
            prompts, suffix_ids = self._fim(req, prompts), []
        else:
            suffix_ids = self._suffix(req) if req.suffix else []
        return self._plan("completion", req, prompts, suffix_ids, echo=req.echo, param="prompt",
                          logprobs=req.logprobs, skip_special=bool(req.skip_special_tokens))

    def chat(self, req: ChatCompletionRequest) -> Plan:
        if req.max_tokens is not None and req.max_completion_tokens is not None \
                and req.max_tokens != req.max_completion_tokens:
            raise invalid("max_tokens and max_completion_tokens disagree; send one", "max_completion_tokens")
        if req.max_completion_tokens is not None:
            req.max_tokens = req.max_completion_tokens
        self._common(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
        if req.functions or req.function_call not in (None, "none"):
            raise unsupported("the deprecated functions / function_call fields are not supported: send tools and "
                              "tool_choice", "functions" if req.functions else "function_call")
        tools, tool_grammar_, tool_names = self._tools(req)
        prompt, images = self._encode_chat(req, tools)  # checks chat_template_kwargs and chat_template
        thinking = bool((req.chat_template_kwargs or {}).get("enable_thinking")) and \
            self.pipe.tokenizer.token_to_id(THOUGHT_OPEN) is not None
        grammar = tool_grammar_
        if grammar is None and thinking:  # structured output holds the answer, after the thought
            grammar = self._grammar(req, suffix=False)
            grammar = grammar.after_thought(self.pipe.tokenizer) if grammar is not None else None
        # the thought channel and tool calls are read from their special tokens, so with either the text keeps
        # them (as vLLM's reasoning and tool parsers turn skip_special_tokens off); what the reply holds apart from
        # them has none
        skip = bool(req.skip_special_tokens) and tool_names is None and not thinking
        plan = self._plan("chat", req, [(prompt, None)], [], echo=False, param="messages",
                          logprobs=(req.top_logprobs or 0) if req.logprobs else None, grammar=grammar,
                          skip_special=skip, images=images)
        for c in plan.choices:
            c.tool_names, c.parallel_tool_calls = tool_names, req.parallel_tool_calls is not False
            c.thinking = thinking
        return plan

    def _messages(self, req: ChatCompletionRequest) -> tuple[list[dict[str, Any]], list]:
        """The request's messages as the chat template takes them (text parts joined by newlines, tool fields
        kept; an image part is the `<|image|>` marker), and the images, read, in order."""
        messages, images = [], []
        for i, m in enumerate(req.messages):
            content = m.content
            if isinstance(content, list):
                text = ""
                for j, part in enumerate(content):
                    where = f"messages.{i}.content.{j}"
                    if part.type == "image_url":
                        limit = self.settings.limit_images
                        if limit is not None and len(images) >= limit:  # before this one is read or fetched
                            raise invalid(f"at most {limit} image(s) may be sent in one request on this server "
                                          "(--limit-mm-per-prompt)", where)
                        images.append(self._image(getattr(part, "image_url", None), where))
                        text += IMAGE_MARKER
                    elif part.type != "text" or part.text is None:
                        raise unsupported(f"content parts of type {part.type!r} (audio, files) are not supported: "
                                          "send text and images", where)
                    else:
                        text = add_text(text, part.text)
                content = text
            message = {"role": m.role, "content": content if content is not None else ""}
            if m.tool_calls:
                message["tool_calls"] = m.tool_calls
            for key in ("tool_call_id", "name"):
                if getattr(m, key) is not None:
                    message[key] = getattr(m, key)
            messages.append(message)
        return messages, images

    def _image(self, spec: Any, where: str):
        """An image_url part's image: a base64 data: URL, or an http(s) / file:// URL where the server allows those
        (media.py); `detail` "low" reads it in 70 tokens, "high" in up to 1120, "auto" in the checkpoint's default."""
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str):
            raise invalid('an image_url part needs {"url": "data:image/...;base64,..."}', where)
        try:
            budget = detail_tokens(spec.get("detail") if isinstance(spec, dict) else None)
        except ImageError as e:
            raise invalid(str(e), where + ".image_url.detail") from None
        st = self.settings
        if not has_vision(self.pipe.model):  # before anything is fetched
            raise unsupported(f"model {st.model_name!r} has no vision tower, so it takes text only", where)
        try:
            src = image_source(url, domains=st.allowed_media_domains, local_root=st.allowed_local_media_path)
        except ImageError as e:
            raise unsupported(str(e), where) from None
        try:
            return self.pipe.image(src, budget)
        except GenerationError as e:
            raise invalid(str(e), where) from None

    @staticmethod
    def _continuation(req) -> dict[str, bool]:
        """vLLM's add_generation_prompt / continue_final_message, checked as vLLM checks them."""
        if req.continue_final_message and req.add_generation_prompt and \
                "add_generation_prompt" in req.model_fields_set:
            raise invalid("continue_final_message and add_generation_prompt cannot both be true",
                          "continue_final_message")
        return {"add_generation_prompt": req.add_generation_prompt and not req.continue_final_message,
                "continue_final_message": req.continue_final_message}

    def _template_kwargs(self, req) -> dict[str, Any]:
        kw = dict(req.chat_template_kwargs or {})
        if set(kw) - {"enable_thinking"}:
            raise invalid(f"chat_template_kwargs: only enable_thinking is supported, got {sorted(kw)}",
                          "chat_template_kwargs")
        if "enable_thinking" in kw and not isinstance(kw["enable_thinking"], bool):
            raise invalid("chat_template_kwargs.enable_thinking must be a boolean", "chat_template_kwargs")
        if req.chat_template is not None:  # vLLM's rule: only where the server was told to trust them
            if not self.settings.trust_request_chat_template:
                raise invalid("chat_template was sent, but this server renders with its own template only (start "
                              "it with --trust-request-chat-template to allow templates in requests)", "chat_template")
            try:
                check_chat_template(req.chat_template)
            except ValueError as e:
                raise invalid(str(e), "chat_template") from None
            kw["chat_template"] = req.chat_template
        return kw

    def _tools(self, req: ChatCompletionRequest) -> tuple[list | None, Grammar | None, list[str] | None]:
        """(tools for the template, the grammar that forces a call or None, the names a reply may call or None)
        from `tools` and `tool_choice`. "none" leaves the tools out of the prompt, so the model answers in text."""
        choice = req.tool_choice
        if not req.tools:
            if choice is not None:
                raise invalid("tool_choice is only allowed when tools are given", "tool_choice")
            return None, None, None
        try:
            tools = check_tools(req.tools)
        except ToolError as e:
            raise invalid(str(e), "tools") from None
        names = tool_names(tools)
        name = None
        if isinstance(choice, dict):
            f = choice.get("function")
            name = f.get("name") if choice.get("type") == "function" and isinstance(f, dict) else None
            if not isinstance(name, str):
                raise invalid('tool_choice must be "none", "auto", "required" or {"type": "function", '
                              '"function": {"name": ...}}', "tool_choice")
            if name not in names:
                raise invalid(f"tool_choice names {name!r}, which is not among the tools ({', '.join(names)})",
                              "tool_choice")
        elif choice not in (None, "none", "auto", "required"):
            raise invalid('tool_choice must be "none", "auto", "required" or {"type": "function", '
                          '"function": {"name": ...}}', "tool_choice")
        if choice == "none":
            return None, None, None
        try:
            check_tokenizer(self.pipe.tokenizer)
        except ToolError as e:
            raise invalid(str(e), "tools") from None
        if req.response_format is not None and req.response_format.get("type") != "text" \
                or req.structured_outputs is not None:
            raise invalid("structured output cannot be combined with tools (a reply is a call or text); send "
                          "tool_choice: \"none\" to use both", "response_format" if req.response_format else
                          "structured_outputs")
        if choice is None or choice == "auto":
            return tools, None, names
        try:
            thinking = bool((req.chat_template_kwargs or {}).get("enable_thinking"))
            grammar = tool_grammar(tools, self.pipe.tokenizer, name=name, thinking=thinking,
                                   parallel=name is None and req.parallel_tool_calls is not False)
            grammar.check(self.pipe.tokenizer)
        except (ToolError, GrammarError) as e:
            raise invalid(f"cannot build the tool-call grammar: {e}", "tools") from None
        if req.ignore_eos:
            raise invalid("ignore_eos cannot be combined with a required tool call, which ends where the call does",
                          "ignore_eos")
        return tools, grammar, names

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        """The prompt ids a chat request becomes, as `chat` encodes them, without planning it (Anthropic's
        count_tokens)."""
        self._adapter(req.model)
        return self._encode_chat(req, self._tools(req)[0])[0]

    def _encode_chat(self, req: ChatCompletionRequest, tools) -> tuple[list[int], list]:
        """The prompt ids of a chat request, and its images."""
        messages, images = self._messages(req)
        try:
            return self.pipe.encode_chat(messages, tools=tools, images=images, **self._template_kwargs(req),
                                         **self._continuation(req)), images
        except GenerationError as e:
            raise invalid(str(e), "messages") from None

    def tokenize(self, req) -> list[int]:
        """/tokenize: the ids a text prompt (as /v1/completions encodes it) or chat messages (as
        /v1/chat/completions renders them) become."""
        self._adapter(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise invalid("send one of prompt and messages", "prompt")
        if self.pipe.tokenizer is None:
            raise invalid("this checkpoint has no tokenizer", "prompt")
        if req.prompt is not None:
            return self.pipe.encode(req.prompt, add_bos=req.add_special_tokens)
        chat = ChatCompletionRequest(messages=req.messages, tools=req.tools,
                                     chat_template_kwargs=req.chat_template_kwargs, chat_template=req.chat_template)
        tools, kw = self._tools(chat)[0], self._template_kwargs(chat)
        messages, images = self._messages(chat)
        try:
            return self.pipe.encode_chat(messages, tools=tools, images=images, **kw, **self._continuation(req))
        except (GenerationError, TypeError) as e:
            raise invalid(str(e), "messages") from None

    def detokenize(self, req) -> str:
        self._adapter(req.model)
        if self.pipe.tokenizer is None:
            raise invalid("this checkpoint has no tokenizer", "tokens")
        vocab = self.pipe.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise invalid(f"tokens must be ids in the vocabulary (0..{vocab - 1})", "tokens")
        return self.pipe.decode(req.tokens)

    # ------------------------------------------------------------ pieces
    def _adapter(self, model: str | None) -> int:
        """The LoRA adapter a request's `model` names (0: the base model); 404 for a model not served here."""
        if model is None or model == self.settings.model_name or model in self.settings.model_aliases:
            return 0
        i = self.adapters.get(model, (None,))[0]
        if i is None:
            served = ", ".join(f"`{n}`" for n in [self.settings.model_name, *self.settings.model_aliases,
                                                   *self.adapters])
            raise APIError(404, f"The model `{model}` does not exist. This server serves {served}.", param="model",
                           code="model_not_found")
        return i

    def _common(self, req: _Common) -> None:
        self._adapter(req.model)
        if req.max_tokens is not None and req.max_tokens > self.settings.max_tokens_limit:
            raise invalid(f"max_tokens is {req.max_tokens}; this server allows at most "
                          f"{self.settings.max_tokens_limit}", "max_tokens", code="max_tokens_exceeded")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 16 or any(not s for s in stops):
            raise invalid("stop must be up to 16 non-empty strings", "stop")
        if req.stream_options is not None and not req.stream:
            raise invalid("stream_options is only allowed with stream: true", "stream_options")
        if req.priority and self.settings.scheduling_policy != "priority":
            raise invalid("priority needs priority scheduling: start the server with --scheduling-policy priority",
                          "priority")
        if req.stream_drafts and req.ar:
            raise invalid("stream_drafts needs diffusion decoding: AR decoding has no draft canvas",
                          "stream_drafts")

    def _prompts(self, prompt) -> list[tuple[list[int], str | None]]:
        """(token ids, text as given) per prompt; text prompts get BOS, token-id prompts are taken as they are."""
        if isinstance(prompt, str):
            return [(self._encode(prompt), prompt)]
        if not prompt:
            raise invalid("prompt is empty", "prompt")
        if isinstance(prompt[0], str):
            return [(self._encode(p), p) for p in prompt]
        if isinstance(prompt[0], int):
            return [(list(prompt), None)]
        return [(list(p), None) for p in prompt]

    def _encode(self, text: str) -> list[int]:
        try:
            return self.pipe.encode(text)
        except GenerationError as e:
            raise invalid(str(e), "prompt") from None

    def _suffix(self, req: CompletionRequest) -> list[int]:
        """The suffix tokens pinned at the canvas end (`Pipeline.suffix_ids`: the first quarter-canvas)."""
        if self.pipe.tokenizer is None:
            raise invalid("this checkpoint has no tokenizer, so suffix cannot be used", "suffix")
        try:
            return self.pipe.suffix_ids(req.suffix)
        except Exception as e:
            raise invalid(f"cannot tokenize suffix: {e}", "suffix") from None

    def _fim(self, req: CompletionRequest, prompts):
        """ar: true with a suffix: each prompt becomes a fill-in-the-middle prompt, decoded left to right."""
        try:
            return [(self.pipe.fim_prompt(ids, req.suffix), text) for ids, text in prompts]
        except GenerationError as e:
            raise invalid(str(e), "suffix") from None

    def _plan(self, kind: str, req: _Common, prompts: list[tuple[list[int], str | None]], suffix_ids: list[int],
              *, echo: bool, param: str, logprobs: int | None = None, grammar: Grammar | None = None,
              skip_special: bool = False, images: list | None = None) -> Plan:
        n_rows = len(prompts) * req.n
        room = self.worker.max_rows + self.worker.max_queue
        if n_rows > room:
            raise invalid(f"this request needs {n_rows} rows (prompts x n) but the server holds at most {room}",
                          "n")
        if logprobs is not None and self.pipe.tokenizer is None:
            raise invalid("this checkpoint has no tokenizer, so logprobs cannot name their tokens", "logprobs")
        seed = req.seed if req.seed is not None else self.fresh_seed()
        if seed + req.n - 1 >= SEED_LIMIT:
            raise invalid("seed + n - 1 must be below 2**63", "seed")
        stops = tuple([req.stop] if isinstance(req.stop, str) else (req.stop or []))
        cut = self._truncate(req, prompts)
        if images and any(len(a) != len(b) for (a, _), (b, _) in zip(cut, prompts)):
            raise invalid("truncate_prompt_tokens cannot cut a prompt with images", "truncate_prompt_tokens")
        prompts = cut
        if req.prompt_logprobs is not None:
            if echo and logprobs is not None:
                raise invalid("send one of echo with logprobs and prompt_logprobs", "prompt_logprobs")
            if req.stream:
                raise unsupported("prompt_logprobs is not supported when streaming", "prompt_logprobs")
            if self.pipe.tokenizer is None:
                raise invalid("this checkpoint has no tokenizer, so logprobs cannot name their tokens",
                              "prompt_logprobs")
        base = dict(req.sampler_options(), ignore_eos=req.ignore_eos, logprobs=logprobs,
                    presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                    repetition_penalty=req.repetition_penalty, min_tokens=req.min_tokens,
                    stop_token_ids=self._token_ids(req.stop_token_ids, "stop_token_ids"),
                    allowed_token_ids=self._token_ids(req.allowed_token_ids, "allowed_token_ids", empty=False),
                    bad_words=self._bad_words(req),
                    include_stop_str_in_output=req.include_stop_str_in_output, skip_special_tokens=skip_special,
                    ar_fallback=req.ar_fallback, adapter=self._adapter(req.model), cache_salt=req.cache_salt,
                    adaptive_steps=req.steps is None,  # steps named in the request are kept under load
                    logit_bias=self._logit_bias(req.logit_bias),
                    prompt_logprobs=logprobs if echo and logprobs is not None else req.prompt_logprobs,
                    grammar=grammar or self._grammar(req, suffix=bool(suffix_ids)))
        # the sampling cut, for AR sampling and diffusion steps alike (vLLM's; its top_k -1 is "all")
        base.update(top_p=req.top_p, top_k=max(req.top_k, 0) if req.top_k is not None else None, min_p=req.min_p)
        if req.ar:
            base["ar_temperature"] = 1.0 if req.temperature is None else req.temperature
        fixed = None
        if suffix_ids:
            fixed = {self.canvas - len(suffix_ids) + k: t for k, t in enumerate(suffix_ids)}
        base["init_canvas"] = self._draft(req, self.canvas - len(suffix_ids))
        base["prediction"] = self._prediction(req)
        base["images"] = tuple(images) if images else None
        choices = []
        for p_i, (prompt, text) in enumerate(prompts):
            if not prompt:
                raise invalid("prompt is empty", param)
            text_echo = "" if not echo else text if text is not None else self.pipe.decode(prompt)
            if echo and logprobs is not None:  # the text the prompt's tokens spell, so their offsets land in it
                text_echo = self.pipe.tokenizer.decode(prompt, skip_special=True)
            max_tokens = self._max_tokens(req, prompt, base, fixed, param)
            if req.min_tokens > max_tokens:
                raise invalid(f"min_tokens ({req.min_tokens}) must be at most max_tokens ({max_tokens})",
                              "min_tokens")
            for j in range(req.n):
                opts = dict(base, seed=seed + j)
                if suffix_ids:
                    opts.update(max_new_tokens=self.canvas, fixed=fixed)
                else:
                    opts.update(max_new_tokens=max_tokens, stop=stops)
                params = self._params(req.ar, opts)
                self._check(prompt, params, param)
                choices.append(Choice(index=p_i * req.n + j, prompt=prompt, params=params, seed=seed + j,
                                      echo=text_echo, suffix_len=len(suffix_ids),
                                      middle_len=self.canvas - len(suffix_ids), max_tokens=max_tokens,
                                      stop=stops, logprobs=logprobs))
        for img in images or ():  # the tower runs here, in the planning thread, beside the engine's steps
            vision_tower(self.pipe.model).features(img)  # (cached: the engine's prefill finds it)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        model = self.settings.model_name if req.model in (None, *self.settings.model_aliases) else req.model
        return Plan(kind=kind, model=model, choices=choices,
                    prompt_tokens=sum(len(p) for p, _ in prompts), stream=req.stream, drafts=req.stream_drafts,
                    include_usage=include_usage, seed=seed, token_ids=req.return_token_ids,
                    continuous_usage=include_usage and req.stream_options.continuous_usage_stats,
                    priority=req.priority, prompt_logprobs=req.prompt_logprobs)

    def _grammar(self, req: _Common, suffix: bool) -> Grammar | None:
        """The output's grammar from response_format (OpenAI) or structured_outputs (vLLM), or None."""
        fmt, so = req.response_format, req.structured_outputs
        if fmt is not None and so is not None:
            raise invalid("send one of response_format and structured_outputs", "response_format")
        param = "response_format" if fmt is not None else "structured_outputs"
        try:
            grammar = self._format_grammar(fmt) if fmt is not None else \
                self._structured_grammar(so) if so is not None else None
            if grammar is None:
                return None
            if self.pipe.tokenizer is None:
                raise GrammarError("this checkpoint has no tokenizer, so its output cannot be held to a grammar")
            grammar.check(self.pipe.tokenizer)
        except GrammarError as e:
            raise invalid(str(e), param) from None
        if suffix:
            raise unsupported("structured output is not supported with suffix (infill)", param)
        if req.ignore_eos:
            raise invalid("ignore_eos cannot be combined with structured output, which ends where the grammar "
                          "does", param)
        return grammar

    @staticmethod
    def _format_grammar(fmt: dict) -> Grammar | None:
        kind = fmt.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return Grammar.json_object()
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict):
                raise GrammarError("response_format json_schema needs a json_schema object: {\"name\": ..., "
                                   "\"schema\": {...}}")
            schema = spec.get("schema", {})  # OpenAI's schema is optional: without one, any JSON value
            return Grammar.json_schema(schema)
        raise GrammarError(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}")

    @staticmethod
    def _structured_grammar(so: StructuredOutputs) -> Grammar:
        given = {k: v for k, v in so.model_dump(by_alias=True).items() if v is not None and v is not False}
        if len(given) != 1:
            raise GrammarError("structured_outputs needs exactly one of json, json_object, regex, choice and "
                               f"grammar, got {sorted(given) or 'none'}")
        [(kind, value)] = given.items()
        if kind == "json":
            return Grammar.json_schema(value if value is not True else {})
        if kind == "json_object":
            return Grammar.json_object()
        return {"regex": Grammar.regex, "choice": Grammar.choice, "grammar": Grammar.lark}[kind](value)

    def _draft(self, req: _Common, room: int) -> list[int] | None:
        """The `draft` extra field: the first canvas's starting tokens (text is tokenized without BOS), at most
        `room` of them (the canvas, less a suffix's pinned positions)."""
        if req.draft is None:
            return None
        if req.ar:
            raise invalid("draft needs diffusion decoding: AR decoding has no canvas to start from", "draft")
        if isinstance(req.draft, str):
            if self.pipe.tokenizer is None:
                raise invalid("this checkpoint has no tokenizer: send the draft as token ids", "draft")
            ids = self.pipe.encode(req.draft, add_bos=False)
        else:
            ids = list(self._token_ids(req.draft, "draft"))
        if not ids:
            raise invalid("draft is empty", "draft")
        if len(ids) > room:
            raise invalid(f"draft is {len(ids)} tokens; the first canvas has room for {room}", "draft")
        return ids

    def _prediction(self, req: _Common) -> list[int] | None:
        """OpenAI's Predicted Outputs (`prediction`, chat's and here completions' too): the predicted text's tokens
        (no BOS)."""
        pred = req.prediction
        if pred is None:
            return None
        if pred.get("type") != "content":
            raise invalid('prediction must be {"type": "content", "content": ...}', "prediction.type")
        text = join_text(pred.get("content"), "prediction.content", text=("text",), refused=())
        if req.ar:
            raise invalid("prediction needs diffusion decoding: AR decoding has no canvas to start from",
                          "prediction")
        if self.pipe.tokenizer is None:
            raise invalid("this checkpoint has no tokenizer to read the prediction with", "prediction")
        ids = self.pipe.encode(text, add_bos=False)
        if not ids:
            raise invalid("prediction is empty", "prediction.content")
        return ids

    def _bad_words(self, req: _Common) -> tuple[tuple[int, ...], ...]:
        """vLLM's bad_words as token sequences (`Pipeline.bad_words_ids`)."""
        if not req.bad_words:
            return ()
        if self.pipe.tokenizer is None:
            raise invalid("this checkpoint has no tokenizer, so bad_words cannot be spelled in tokens", "bad_words")
        try:
            ids = self.pipe.bad_words_ids(req.bad_words)
        except GenerationError as e:
            raise invalid(str(e), "bad_words") from None
        return ids

    def _token_ids(self, ids: list[int] | None, param: str, empty: bool = True) -> tuple[int, ...] | None:
        """vLLM's stop_token_ids / allowed_token_ids: token ids in the vocabulary (None: not given)."""
        if ids is None:
            return None
        vocab = self.pipe.model.cfg.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise invalid(f"{param} has token ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}", param)
        if not ids and not empty:
            raise invalid(f"{param} must name at least one token", param)
        return tuple(ids)

    def _truncate(self, req: _Common, prompts: list[tuple[list[int], str | None]]
                  ) -> list[tuple[list[int], str | None]]:
        """vLLM's truncate_prompt_tokens: each prompt's last k tokens (-1: as many as the context holds); a prompt
        that was cut loses its text (echo then shows the tokens kept)."""
        k = req.truncate_prompt_tokens
        if k is None:
            return prompts
        if k == 0:
            raise invalid("truncate_prompt_tokens must be -1 or at least 1", "truncate_prompt_tokens")
        if k == -1:
            k = self.worker.engine.max_len
        return [(p[-k:], text if len(p) <= k else None) for p, text in prompts]

    def _logit_bias(self, bias: dict[str, float] | None) -> dict[int, float] | None:
        """OpenAI's logit_bias: token ids (as JSON object keys) -> a bias from -100 to 100."""
        if not bias:
            return None
        out = {}
        vocab = self.pipe.model.cfg.vocab_size
        for key, value in bias.items():
            try:
                tid = int(key)
            except ValueError:
                raise invalid(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
            if not 0 <= tid < vocab:
                raise invalid(f"logit_bias token {tid} is outside the vocabulary (0..{vocab - 1})", "logit_bias")
            if not -100 <= value <= 100:
                raise invalid(f"logit_bias[{key}] must be from -100 to 100, got {value}", "logit_bias")
            out[tid] = float(value)
        return out

    def _params(self, ar: bool, opts: dict) -> GenerationParams:
        try:
            return self.pipe.params(ar=ar, **opts)
        except GenerationError as e:
            raise from_generation(e) from None

    def _check(self, prompt: list[int], params: GenerationParams, param: str) -> None:
        try:
            self.worker.check(prompt, params)
        except GenerationError as e:
            raise from_generation(e, param) from None

    def _max_tokens(self, req: _Common, prompt: list[int], base: dict, fixed, param: str) -> int:
        """The client's max_tokens, or the default (the checkpoint's max_new_tokens, capped by the server's
        limit and shrunk to what the context still holds after this prompt)."""
        if req.max_tokens is not None:
            return req.max_tokens
        default = min(self.pipe.max_new_tokens, self.settings.max_tokens_limit)
        if fixed:
            return default

        def fits(m: int) -> bool:
            try:
                # min_tokens is checked against the result (a 400 that names it), not folded into the search
                self.worker.check(prompt, self._params(req.ar, dict(base, max_new_tokens=m, min_tokens=0)))
                return True
            except GenerationError:
                return False

        if fits(default):
            return default
        lo, hi = 0, default  # fits(lo) or lo == 0; not fits(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        if lo == 0:
            self._check(prompt, self._params(req.ar, dict(base, max_new_tokens=1, min_tokens=0)), param)  # why
        return lo


# ---------------------------------------------------------------- responses
def usage(plan: Plan) -> Usage:
    done = [c for c in plan.choices if c.done is not None]
    steps = [s for c in done for s in c.done.stats["steps_per_canvas"]]
    passes = sum(c.done.stats["decoder_passes"] if c.done.stats["mode"] != AR else c.done.stats["encoder_passes"]
                 for c in done)
    generated = sum(len(c.done.tokens) for c in done)
    # a stream's running usage (continuous_usage_stats) counts the tokens committed so far of unfinished choices
    completion = sum(c.completion_tokens if c.done is not None else len(c.tokens) for c in plan.choices)
    # a prompt counts once however many choices share it; the choices that copied its keys from the one that
    # encoded it are not cached tokens, what that one found in the cache is
    cached: dict[int, int] = {}
    for c in done:
        n = c.done.stats["cached_prompt_tokens"]
        cached[id(c.prompt)] = min(n, cached.get(id(c.prompt), n))
    details = None
    if any(c.params.prediction is not None for c in plan.choices):
        details = {k: sum(c.done.stats[k] for c in done)
                   for k in ("accepted_prediction_tokens", "rejected_prediction_tokens")}
    return Usage(prompt_tokens=plan.prompt_tokens, completion_tokens=completion,
                 total_tokens=plan.prompt_tokens + completion,
                 prompt_tokens_details={"cached_tokens": sum(cached.values())},
                 steps_per_canvas=round(sum(steps) / len(steps), 3) if steps else None,
                 tokens_per_forward=round(generated / passes, 3) if passes else None,
                 forward_passes=passes, canvases=len(steps), completion_tokens_details=details)


def response(plan: Plan, tok=None) -> CompletionResponse | ChatCompletionResponse:
    extra = {"seed": plan.seed, "choices": [c.stats() for c in plan.choices]}
    lp = {c.index: None if c.logprobs is None else
          logprobs_payload(plan.kind, tok, c.tokens, c.lps, c.tops, 0, c.completion_tokens, len(c.echo), c.ents,
                           c.skip_special)
          for c in plan.choices}
    for c in plan.choices:
        if c.logprobs is not None and c.done is not None and c.done.prompt_logprobs is not None \
                and plan.prompt_logprobs is None:  # echo with logprobs: the prompt's entries lead
            head = prompt_logprobs_payload(tok, c.prompt, c.done.prompt_logprobs, c.done.prompt_top_logprobs)
            lp[c.index] = {k: head[k] + lp[c.index][k] for k in head if k in lp[c.index]}
    if plan.kind == "completion":
        choices = [CompletionChoice(index=c.index, text=c.echo + (c.text or ""), finish_reason=c.finish_reason,
                                    logprobs=lp[c.index]) for c in plan.choices]
        return CompletionResponse(id=plan.id, created=plan.created, model=plan.model, choices=choices,
                                  usage=usage(plan), dgemma=extra)
    choices = [ChatChoice(index=c.index, message=_message(c), finish_reason=c.finish_reason, logprobs=lp[c.index])
               for c in plan.choices]
    return ChatCompletionResponse(id=plan.id, created=plan.created, model=plan.model, choices=choices,
                                  usage=usage(plan), dgemma=extra)


def with_token_ids(plan: Plan, body: dict, index: int | None = None) -> dict:
    """vLLM's return_token_ids on a response (or on one choice's final stream chunk, `index`): each choice's
    output ids (`token_ids`) and the prompt's (`prompt_token_ids`: per choice on completions, on the response for
    chat, whose choices share one prompt). Unchanged without it."""
    if not plan.token_ids:
        return body
    by_index = {c.index: c for c in plan.choices}
    for ch in body["choices"]:
        c = by_index[ch["index"]]
        ch["token_ids"] = c.tokens[:c.completion_tokens]
        if plan.kind == "completion":
            ch["prompt_token_ids"] = c.prompt
    if plan.kind == "chat":
        body["prompt_token_ids"] = plan.choices[0].prompt
    return body


def with_prompt_logprobs(plan: Plan, body: dict, tok) -> dict:
    """vLLM's prompt_logprobs on a response: per prompt token (None for the first), {token id: {logprob, rank,
    decoded_token}} for the token itself and the most likely ones there; on each completion choice, on the
    response for chat (its choices share one prompt). Unchanged without it."""
    if plan.prompt_logprobs is None:
        return body

    def entries(c: Choice) -> list[dict[str, Any] | None]:
        d = c.done
        out: list[dict[str, Any] | None] = [None]
        for i in range(1, len(c.prompt)):
            t = c.prompt[i]
            e = {str(t): {"logprob": d.prompt_logprobs[i], "rank": d.prompt_ranks[i], "decoded_token": tok.decode([t])}}
            for k, (a, v) in enumerate(d.prompt_top_logprobs[i], start=1):
                e.setdefault(str(a), {"logprob": v, "rank": k, "decoded_token": tok.decode([a])})
            out.append(e)
        return out

    by_index = {c.index: c for c in plan.choices}
    if plan.kind == "chat":
        body["prompt_logprobs"] = entries(plan.choices[0])
    else:
        for ch in body["choices"]:
            ch["prompt_logprobs"] = entries(by_index[ch["index"]])
    return body


def _message(c: Choice) -> AssistantMessage:
    if c.tool_calls:
        return AssistantMessage(content=c.text or None, tool_calls=[t.openai() for t in c.tool_calls],
                                reasoning_content=c.reasoning)
    return AssistantMessage(content=c.text or "", reasoning_content=c.reasoning)


def tool_call_deltas(c: Choice) -> list[dict[str, Any]]:
    """A stream's tool calls, each whole in one delta entry (OpenAI's clients concatenate the pieces)."""
    return [{"index": k, **t.openai()} for k, t in enumerate(c.tool_calls)]


# ---------------------------------------------------------------- SSE chunks
def sse(obj: dict) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def chunk(plan: Plan, index: int | None, *, text: str | None = None, role: bool = False,
          finish_reason: str | None = None, dgemma: dict | None = None, usage_: Usage | None = None,
          logprobs: dict | None = None, tool_calls: list | None = None, reasoning: str | None = None,
          token_ids: list[int] | None = None, prompt_ids: bool = False) -> str:
    """One streaming chunk. `index=None` gives `choices: []` (the usage chunk). With vLLM's return_token_ids:
    `token_ids`, the ids of the tokens whose text this chunk completes; prompt_ids, the prompt's ids too (on the
    choice's finish chunk)."""
    obj: dict[str, Any] = {"id": plan.id, "created": plan.created, "model": plan.model}
    if plan.kind == "completion":
        obj["object"] = "text_completion"
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
    else:
        obj["object"] = "chat.completion.chunk"
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        if reasoning:
            delta["reasoning_content"] = reasoning
        if tool_calls:
            delta["tool_calls"] = tool_calls
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    obj["choices"] = [] if index is None else [choice]
    if usage_ is None and plan.continuous_usage and index is not None:
        usage_ = usage(plan)
    if usage_ is not None:
        obj["usage"] = usage_.model_dump()
    if dgemma is not None:
        obj["dgemma"] = dgemma
    if plan.token_ids and index is not None:
        choice["token_ids"] = token_ids or []
        if prompt_ids:
            (choice if plan.kind == "completion" else obj)["prompt_token_ids"] = plan.choices[index].prompt
    return sse(obj)


def char_offsets(tok, ids: list[int], skip_special: bool = False) -> list[int]:
    """Characters of the decoded text before each token, and the total (len(ids) + 1 entries), in one pass over the
    tokens' bytes: a token that starts inside a character (part of a UTF-8 sequence) gets that character's start.
    Decoding every prefix instead would cost O(n^2) (1.8 s for 4,096 tokens)."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out, n = [0], 0
    for t in ids:
        if not (skip_special and tok.decode([t], skip_special=True) == ""):
            n += len(dec.decode(tok.token_bytes(t)))
        out.append(n)
    out[-1] += len(dec.decode(b"", final=True))
    return out


def _by_text(tok, top) -> dict[str, float]:
    """Completions' alternatives, keyed by text: two tokens that decode alike keep the likelier one's value."""
    d: dict[str, float] = {}
    for t, v in top:
        d.setdefault(tok.decode([t]), v)
    return d


def logprobs_payload(kind: str, tok, ids: list[int], lps: list[float], tops: list, start: int, end: int,
                     offset: int = 0, ents: list[float] | None = None, skip_special: bool = False
                     ) -> dict[str, Any]:
    """OpenAI's logprobs object for tokens [start, end) of a choice: chat's `content` entries (token, logprob,
    bytes, top_logprobs), or completions' parallel lists (tokens, token_logprobs, top_logprobs, text_offset;
    offsets count from the start of the returned text, `offset` being the echoed prompt's length). dgemma adds
    each token's raw entropy (`ents`): an `entropy` in each chat entry, an `entropies` list for completions."""
    ents = ents if ents and len(ents) >= end else None
    if kind == "chat":
        def entry(t: int, v: float) -> dict[str, Any]:
            return {"token": tok.decode([t]), "logprob": v, "bytes": list(tok.token_bytes(t))}

        return {"content": [{**entry(ids[i], lps[i]), "top_logprobs": [entry(t, v) for t, v in tops[i]],
                             **({"entropy": ents[i]} if ents else {})}
                            for i in range(start, end)], "refusal": None}
    out = {"tokens": [tok.decode([t]) for t in ids[start:end]], "token_logprobs": lps[start:end],
           "top_logprobs": [_by_text(tok, tops[i]) for i in range(start, end)],
           "text_offset": [offset + o for o in char_offsets(tok, ids[:end], skip_special)[start:end]]}
    if ents:
        out["entropies"] = ents[start:end]
    return out


def prompt_logprobs_payload(tok, ids: list[int], lps: list, tops: list) -> dict[str, Any]:
    """Completions' logprobs lists for an echoed prompt: the first token has no logprob (None), as in OpenAI's
    legacy API; offsets index the prompt's text as its tokens spell it (special tokens take no room)."""
    return {"tokens": [tok.decode([t]) for t in ids], "token_logprobs": list(lps),
            "top_logprobs": [None] + [_by_text(tok, tops[i]) for i in range(1, len(ids))],
            "text_offset": char_offsets(tok, ids, skip_special=True)[:len(ids)], "entropies": [None] * len(ids)}


def draft_event(tok, choice: Choice, ev) -> dict[str, Any]:
    """The `dgemma` object of a draft chunk: one denoising step of one choice's canvas."""
    pieces = tok.backend.decode_batch([[t] for t in ev.tokens], skip_special_tokens=False) if tok else []
    return {"type": "draft", "choice": choice.index, "canvas_index": ev.canvas, "step": ev.step, "attempt": ev.attempt,
            "canvas": ev.tokens, "pieces": pieces, "text": tok.decode(ev.tokens) if tok else "",
            "accepted": ev.accepted, "accepted_count": sum(ev.accepted), "mean_entropy": ev.mean_entropy,
            "entropies": [round(h, 4) for h in ev.entropies] if ev.entropies is not None else None,
            "fixed": choice.suffix_len if ev.canvas == 0 else 0}


def commit_event(choice: Choice, ev) -> dict[str, Any]:
    return {"type": "commit", "choice": choice.index, "canvas_index": ev.canvas, "steps": ev.steps,
            "tokens": ev.tokens}
