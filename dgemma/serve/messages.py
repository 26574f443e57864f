"""Anthropic's Messages API (`POST /v1/messages`), served through the chat path.

A Messages request becomes a chat completion request (`to_chat`): `system` is the system turn, `messages` the
conversation (text blocks; an assistant's `tool_use` blocks its tool calls; a user's `tool_result` blocks the tool
messages before its text), `tools` ({name, description, input_schema}) the chat tools, `tool_choice` (auto / any /
tool / none, `disable_parallel_tool_use`) the chat one, `thinking: {"type": "enabled"}` thinking on,
`stop_sequences` the stop strings, a last assistant message a prefill (the reply continues its text:
`continue_final_message`); dgemma's extra body fields (`steps`, `ar`, ...) pass through. The answer comes
back as Anthropic content blocks (`thinking`, `text`, `tool_use`) with its `stop_reason` (end_turn, max_tokens,
stop_sequence, tool_use), and a stream sends Anthropic's events (message_start, content_block_start /
_delta / _stop, message_delta, message_stop). Errors on this path use Anthropic's shape
(`{"type": "error", "error": {"type", "message"}}`), and the API key may come as `x-api-key`.

`POST /v1/messages/count_tokens` answers `{"input_tokens": N}`: the prompt a Messages request with those fields
would have (its `usage.input_tokens`).

Images come as `image` blocks (a base64 or url source: the chat endpoint's image_url parts, so a url is fetched
only where the server allows it). Not supported (a 400): documents, server tools (web search, code execution, ...).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field

from ..generate import Done
from .completions import Choice, Plan, chat_request, join_text, updates, usage
from .engine import Failed
from .errors import APIError, invalid, unsupported
from .protocol import ChatCompletionRequest, DiffusionOptions, _Strict

# Anthropic's error `type` per HTTP status.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
               429: "rate_limit_error", 499: "invalid_request_error", 500: "api_error", 503: "overloaded_error"}
_PARAMS = {"max_tokens": "max_tokens", "stop": "stop_sequences", "chat_template_kwargs": "thinking"}


class MessagesRequest(DiffusionOptions):
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[dict[str, Any]]
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)  # accepted; diffusion's schedule is fixed (as temperature)
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    seed: int | None = Field(None, ge=0)  # not in Anthropic's API; ours


class CountTokensRequest(_Strict):
    """`POST /v1/messages/count_tokens`: a Messages request's prompt fields, answered with its input token count."""

    model: str
    messages: list[dict[str, Any]]
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None

    def messages_request(self) -> MessagesRequest:
        return MessagesRequest(max_tokens=1, **self.model_dump(exclude_unset=True))


def error_body(e: APIError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(e.status, "invalid_request_error"),
                                       "message": e.message}}


# ---------------------------------------------------------------- request -> chat
def to_chat(req: MessagesRequest) -> ChatCompletionRequest:
    messages: list[dict[str, Any]] = []
    if req.system:
        messages.append({"role": "system", "content": _text(req.system, "system")})
    for i, m in enumerate(req.messages):
        _add(messages, m, f"messages.{i}")
    body: dict[str, Any] = {"model": req.model, "messages": messages, "max_tokens": req.max_tokens,
                            "stream": req.stream,
                            **req.model_dump(include=set(DiffusionOptions.model_fields), exclude_unset=True)}
    for name in ("temperature", "top_p", "top_k", "seed"):
        if getattr(req, name) is not None:
            body[name] = getattr(req, name)
    if req.stop_sequences:
        body["stop"] = req.stop_sequences
    if req.tools:
        body["tools"] = [_tool(t, f"tools.{i}") for i, t in enumerate(req.tools)]
    if req.tool_choice is not None:
        body["tool_choice"], parallel = _tool_choice(req.tool_choice)
        if parallel is not None:
            body["parallel_tool_calls"] = parallel
    if req.thinking is not None and req.thinking.get("type") == "enabled":
        body["chat_template_kwargs"] = {"enable_thinking": True}
    if messages and messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls"):
        body["continue_final_message"] = True  # a prefill: the reply goes on from the assistant's text
    return chat_request(body)


def _text(content: Any, where: str) -> str:
    return join_text(content, where, text=("text",), refused=("image", "document", "search_result"))


def _add(messages: list[dict[str, Any]], m: Any, where: str) -> None:
    if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
        raise invalid("each message needs role 'user' or 'assistant'", f"{where}.role")
    content = m.get("content")
    if isinstance(content, str):
        messages.append({"role": m["role"], "content": content})
        return
    if not isinstance(content, list):
        raise invalid("content must be a string or a list of blocks", f"{where}.content")
    text, calls, results, parts = [], [], [], []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        at = f"{where}.content.{j}"
        if kind == "tool_use" and m["role"] == "assistant":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"), "arguments": block.get("input") or {}}})
        elif kind == "tool_result" and m["role"] == "user":
            body = block.get("content")
            body = _text(body, f"{at}.content") if body is not None else ""
            results.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                            "content": ("Error: " + body) if block.get("is_error") else body})
        elif kind in ("thinking", "redacted_thinking") and m["role"] == "assistant":
            continue  # earlier thoughts: the template drops them from earlier turns anyway
        elif kind == "text":
            text.append(_text([block], at))
            parts.append({"type": "text", "text": text[-1]})
        elif kind == "image" and m["role"] == "user":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block.get("source"), at)}})
        else:
            _text([block], at)  # raises: a document, or a block out of place
    messages.extend(results)
    if m["role"] == "assistant":
        message: dict[str, Any] = {"role": "assistant", "content": "\n".join(text)}
        if calls:
            message["tool_calls"] = calls
        messages.append(message)
    elif len(parts) > len(text):  # images among the text: the chat request's content parts, in order
        messages.append({"role": "user", "content": parts})
    elif text or not results:
        messages.append({"role": "user", "content": "\n".join(text)})


def _image_url(source: Any, where: str) -> str:
    """An image block's source as a chat image_url: base64 data inline (a `url` source is passed on, and refused
    there: the server fetches nothing)."""
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64" and isinstance(source.get("data"), str) and isinstance(source.get("media_type"), str):
        return f"data:{source['media_type']};base64,{source['data']}"
    if kind == "url" and isinstance(source.get("url"), str):
        return source["url"]
    raise invalid('an image block needs a source {"type": "base64", "media_type": "image/png", "data": ...}',
                  f"{where}.source")


def _tool(tool: Any, where: str) -> dict[str, Any]:
    if not isinstance(tool, dict):
        raise invalid("each tool must be an object", where)
    if tool.get("type") not in (None, "custom"):
        raise unsupported(f"server tools ({tool.get('type')!r}) are not supported: declare your own tools", where)
    if not isinstance(tool.get("name"), str):
        raise invalid("a tool needs a name", f"{where}.name")
    function = {"name": tool.get("name"), "parameters": tool.get("input_schema") or {"type": "object"}}
    if tool.get("description") is not None:
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _tool_choice(choice: dict[str, Any]) -> tuple[Any, bool | None]:
    kind = choice.get("type")
    parallel = False if choice.get("disable_parallel_tool_use") else None
    if kind in ("auto", "none"):
        return kind, parallel
    if kind == "any":
        return "required", parallel
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}, parallel
    raise invalid("tool_choice type must be 'auto', 'any', 'tool' (with a name) or 'none'", "tool_choice")


def rename_param(e: APIError) -> APIError:
    if e.param:
        head, _, rest = e.param.partition(".")
        if head in _PARAMS:
            e.param = _PARAMS[head] + ("." + rest if rest else "")
    return e


# ---------------------------------------------------------------- chat result -> message
def _stop_sequence(c: Choice, tok) -> str | None:
    """The stop sequence that ended the text, if one did: the full decoding goes on with it where the text ends."""
    if c.done is None or not c.stop or c.finish_reason != "stop":
        return None
    full = tok.decode(c.done.tokens)
    return next((s for s in c.stop if full.startswith(c.done.text + s)), None) if c.done.text is not None else None


def blocks(c: Choice) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if c.reasoning is not None:
        out.append({"type": "thinking", "thinking": c.reasoning, "signature": ""})
    if c.text or not c.tool_calls:
        out.append({"type": "text", "text": c.text or ""})
    for call in c.tool_calls:
        out.append({"type": "tool_use", "id": "toolu_" + call.id.removeprefix("call_"), "name": call.name,
                    "input": json.loads(call.arguments)})
    return out


def stop_reason(c: Choice, tok) -> str:
    if c.tool_calls:
        return "tool_use"
    if c.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if _stop_sequence(c, tok) is not None else "end_turn"


def _usage(u) -> dict[str, int]:
    """Anthropic's usage: `input_tokens` are those not read from the cache (prefix caching)."""
    cached = u.prompt_tokens_details["cached_tokens"]
    return {"input_tokens": u.prompt_tokens - cached, "output_tokens": u.completion_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def message_object(plan: Plan, req: MessagesRequest, tok) -> dict[str, Any]:
    c = plan.choices[0]
    u = usage(plan)
    return {"id": "msg_" + plan.id.split("-", 1)[-1], "type": "message", "role": "assistant", "model": req.model,
            "content": blocks(c), "stop_reason": stop_reason(c, tok), "stop_sequence": _stop_sequence(c, tok),
            "usage": _usage(u),
            "dgemma": {"seed": plan.seed, "choices": [c.stats()], "steps_per_canvas": u.steps_per_canvas,
                       "tokens_per_forward": u.tokens_per_forward, "forward_passes": u.forward_passes,
                       "canvases": u.canvases}}


# ---------------------------------------------------------------- streaming events
def _event(kind: str, **fields: Any) -> str:
    data = json.dumps({"type": kind, **fields}, ensure_ascii=False, separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n"


async def stream_events(state, plan: Plan, queue, req: MessagesRequest):
    """Anthropic's event stream of a one-choice plan: thinking and text blocks as they come, tool_use blocks whole
    at the end (their input as one input_json_delta)."""
    tok = state.pipe.tokenizer
    c = plan.choices[0]
    open_block: list[str | None] = [None]  # the kind of the block being streamed
    index = [-1]

    def start(kind: str):
        out = ""
        if open_block[0] is not None:
            out += _event("content_block_stop", index=index[0])
        index[0] += 1
        open_block[0] = kind
        block = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else \
            {"type": "text", "text": ""}
        return out + _event("content_block_start", index=index[0], content_block=block)

    yield _event("message_start", message={
        "id": "msg_" + plan.id.split("-", 1)[-1], "type": "message", "role": "assistant", "model": req.model,
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": plan.prompt_tokens, "output_tokens": 0}})
    try:
        async for thought, text, ev in updates(state, plan, queue):
            if isinstance(ev, Failed):
                yield _event("error", error={"type": ERROR_TYPES.get(ev.status, "api_error"), "message": ev.message})
                return
            if thought:
                if open_block[0] != "thinking":
                    yield start("thinking")
                yield _event("content_block_delta", index=index[0],
                             delta={"type": "thinking_delta", "thinking": thought})
            if text:
                if open_block[0] != "text":
                    yield start("text")
                yield _event("content_block_delta", index=index[0], delta={"type": "text_delta", "text": text})
            if not isinstance(ev, Done):
                continue
            if open_block[0] is None and not c.tool_calls:
                yield start("text")  # an empty answer is still one text block
            if open_block[0] is not None:
                yield _event("content_block_stop", index=index[0])
            for block in blocks(c):
                if block["type"] != "tool_use":
                    continue
                index[0] += 1
                yield _event("content_block_start", index=index[0], content_block=dict(block, input={}))
                yield _event("content_block_delta", index=index[0],
                             delta={"type": "input_json_delta", "partial_json": json.dumps(block["input"])})
                yield _event("content_block_stop", index=index[0])
            yield _event("message_delta", usage=_usage(usage(plan)),
                         delta={"stop_reason": stop_reason(c, tok), "stop_sequence": _stop_sequence(c, tok)})
            yield _event("message_stop")
    finally:
        state.worker.cancel(plan.jobs)
