"""OpenAI's Responses API (`POST /v1/responses`), served through the chat path.

A Responses request is translated into a chat completion request (`to_chat`): `instructions` becomes the system
turn, `input` (a string, or a list of messages, `function_call` and `function_call_output` items) the
conversation, flat function `tools` the chat shape, `text.format` the `response_format`, `reasoning` thinking on,
`max_output_tokens` max_tokens; dgemma's extra body fields (`steps`, `ar`, ...) pass through. It is then planned,
checked and decoded as a chat request, so every rule of the chat endpoint holds here too, and the result is written
back as Responses output items: a `reasoning` item (the thought channel, with thinking on), a `message` with
`output_text`, and one `function_call` item per tool call. A stream sends Responses' typed events
(`response.created`, `response.output_item.added`, `response.output_text.delta`, ..., `response.completed`).

Stored responses (`store`, on unless false, as OpenAI's): the server keeps the last --responses-store responses
in memory (`ResponseStore`), each with its conversation (the items before it, its input and its output), so a
request with `previous_response_id` continues it without sending it again, and `GET /v1/responses/{id}`,
`GET /v1/responses/{id}/input_items` and `DELETE /v1/responses/{id}` read and drop them. `instructions` are the
request's own (OpenAI does not carry them over either).

Background responses (`background: true`, stored): the request returns at once with status `queued`; the rows
run as any others (a client that goes away does not cancel them); `GET /v1/responses/{id}` shows `in_progress`,
then the finished response; `POST /v1/responses/{id}/cancel` stops it (`cancelled`). With `stream: true` its events
are kept (`EventLog`), and `GET /v1/responses/{id}?stream=true&starting_after=N` reads them from any point, live.

A response with `conversation` (conversations.py) starts from that conversation's items, and its input and output
items are added to it when it completes.

`input_image` parts (a data: URL) become the chat endpoint's image_url parts. Not supported (a 400 naming the
field): built-in tools (web search, file search, ...), files, an image by file_id, `n`-like fan-out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr

from ..generate import Done
from ..io import JsonRecords
from ..tokenizer import THOUGHT_CLOSE
from .completions import Choice, Plan, chat_request, join_text, logprobs_payload, updates, usage
from .engine import Failed
from .errors import APIError, invalid, unsupported
from .protocol import ChatCompletionRequest, DiffusionOptions

log = logging.getLogger("dgemma.serve")

# Chat fields named in errors, as this endpoint calls them.
_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format",
           "chat_template_kwargs": "reasoning"}


class ResponsesRequest(DiffusionOptions):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # diffusion: ignored (fixed schedule); AR: 0 = greedy
    top_p: float | None = Field(None, ge=0, le=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    stream: bool = False
    seed: int | None = Field(None, ge=0)  # not in OpenAI's API; vLLM's and ours
    store: bool | None = None  # kept for previous_response_id and GET /v1/responses/{id} unless false
    background: bool | None = None  # answer at once; poll GET /v1/responses/{id} (needs store)
    metadata: dict[str, Any] | None = None
    user: str | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None  # a conversation's id, or {"id": ...}
    truncation: str | None = None
    include: list[str] | None = None
    service_tier: str | None = None
    max_tool_calls: int | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # the items before `input`: previous_response_id's conversation, or the conversation's items
    _history: list[dict[str, Any]] = PrivateAttr(default_factory=list)
    _stored: bool = PrivateAttr(default=False)  # this response is kept (store, and a store with room)
    _conversation: Any = PrivateAttr(default=None)  # conversations.Conversation, for `conversation`
    _skip: int = PrivateAttr(default=0)  # truncation "auto": the first items of the conversation left out
    _items: list[dict[str, Any]] | None = PrivateAttr(default=None)

    def input_items(self) -> list[dict[str, Any]]:
        """`input` as Responses items, each with an id (the same ids every time: the stored response's
        `input_items` and its conversation's items)."""
        if self._items is None:
            items = [{"role": "user", "content": self.input}] if isinstance(self.input, str) else self.input
            self._items = [stored_item(item, f"input.{i}") for i, item in enumerate(items)]
        return self._items


KEPT_STREAMS = 64  # the finished background streams whose events are kept for GET ...?stream=true
LOGPROBS = "message.output_text.logprobs"  # the `include` entry that asks for the answer's logprobs


# ---------------------------------------------------------------- request -> chat
def to_chat(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion request this Responses request stands for (APIError where it cannot be one)."""
    if req.max_tool_calls is not None:
        raise unsupported("max_tool_calls is not supported", "max_tool_calls")
    if req.truncation not in (None, "disabled", "auto"):
        raise invalid("truncation must be 'auto' or 'disabled'", "truncation")
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    for item, where in _conversation_items(req)[req._skip:]:
        _add_item(messages, item, where)
    body: dict[str, Any] = {"messages": messages, "stream": req.stream, "parallel_tool_calls": req.parallel_tool_calls,
                            **req.model_dump(include=set(DiffusionOptions.model_fields), exclude_unset=True)}
    for name in ("model", "temperature", "top_p", "seed", "user", "metadata"):
        if getattr(req, name) is not None:
            body[name] = getattr(req, name)
    if req.max_output_tokens is not None:
        body["max_tokens"] = req.max_output_tokens
    if req.tools:
        body["tools"] = [_tool(t, f"tools.{i}") for i, t in enumerate(req.tools)]
    if req.tool_choice is not None:
        body["tool_choice"] = _tool_choice(req.tool_choice)
    fmt = (req.text or {}).get("format")
    if fmt is not None:
        body["response_format"] = _format(fmt)
    if req.reasoning is not None and req.reasoning.get("effort") not in ("none", "minimal"):
        body["chat_template_kwargs"] = {"enable_thinking": True}
    if LOGPROBS in (req.include or []) or req.top_logprobs is not None:
        body["logprobs"], body["top_logprobs"] = True, req.top_logprobs or 0
    return chat_request(body)


def _conversation_items(req: ResponsesRequest) -> list[tuple[Any, str]]:
    """The items the prompt renders, in order (the history's, checked when it was stored, then `input`'s), each
    with the field an error names."""
    where = "conversation" if req.conversation is not None else "previous_response_id"
    items = [(item, where) for item in req._history]
    if isinstance(req.input, str):
        return items + [({"type": "message", "role": "user", "content": req.input}, "input")]
    return items + [(item, f"input.{i}") for i, item in enumerate(req.input)]


def truncate(req: ResponsesRequest, plan: Callable[[], Any]) -> Any:
    """`plan()` for the request; with truncation "auto", a prompt too long for the context leaves out the
    conversation's first items, as few as fit (a tool call's output never without its call; the last item always
    stays), instead of failing. What is stored keeps every item."""
    try:
        return plan()
    except APIError as e:
        if req.truncation != "auto" or e.code != "context_length_exceeded":
            raise
        first = e
    items = _conversation_items(req)
    starts = [k for k in range(1, len(items)) if items[k][0].get("type") != "function_call_output"]
    found, lo, hi = None, 0, len(starts) - 1  # the fewest left out: the first start whose prompt fits
    while lo <= hi:
        mid = (lo + hi) // 2
        req._skip = starts[mid]
        try:
            found, hi = (plan(), mid), mid - 1
        except APIError as e:
            if e.code != "context_length_exceeded":
                raise
            lo = mid + 1
    if found is None:
        req._skip = 0
        raise first
    req._skip = starts[found[1]]
    return found[0]


def _text(content: Any, where: str) -> str:
    return join_text(content, where, text=("input_text", "output_text", "text"),
                     refused=("input_image", "input_file", "input_audio"))


def _parts(content: list, where: str) -> list[dict[str, Any]]:
    """A message's content with images, as chat content parts in order (input_image: an image_url, a data: URL
    inline; a file_id is refused)."""
    out = []
    for j, part in enumerate(content):
        if isinstance(part, dict) and part.get("type") == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise unsupported("an input_image needs image_url (a data: URL); file_id is not supported",
                                  f"{where}.{j}")
            out.append({"type": "image_url", "image_url": {"url": url, **({"detail": part["detail"]}
                                                                         if "detail" in part else {})}})
        else:
            out.append({"type": "text", "text": _text([part], f"{where}.{j}")})
    return out


def _add_item(messages: list[dict[str, Any]], item: Any, where: str) -> None:
    if not isinstance(item, dict):
        raise invalid("input items must be objects", where)
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise invalid(f"unknown role {role!r}", f"{where}.role")
        content = item.get("content")
        images = isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "input_image"
                                                   for p in content)
        messages.append({"role": role, "content": _parts(content, f"{where}.content") if images
                         else _text(content, f"{where}.content")})
    elif kind == "function_call":
        if not isinstance(item.get("name"), str) or not isinstance(item.get("call_id"), str):
            raise invalid("a function_call item needs name and call_id", where)
        call = {"id": item["call_id"], "type": "function",
                "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant" and not any(m["role"] == "tool" for m in messages[-1:]):
            last.setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        if not isinstance(item.get("call_id"), str):
            raise invalid("a function_call_output item needs call_id", where)
        messages.append({"role": "tool", "tool_call_id": item["call_id"],
                         "content": output if isinstance(output, str) else json.dumps(output)})
    elif kind == "reasoning":
        return  # earlier thoughts: the template drops them from earlier turns anyway
    else:
        raise unsupported(f"input items of type {kind!r} are not supported", where)


_ID_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def stored_item(item: Any, where: str) -> dict[str, Any]:
    """An input item as a stored response or a conversation lists it: checked as `input` would be (APIError
    naming `where`), with an id (its own, or a new one), a status, and a message's text content as a part."""
    _add_item([], item, where)
    if "id" in item and not isinstance(item["id"], str):
        raise invalid("an item's id must be a string", f"{where}.id")
    item = dict(item)
    kind = item.setdefault("type", "message")
    item.setdefault("id", _id(_ID_PREFIX.get(kind, "item")))
    item.setdefault("status", "completed")
    if kind == "message" and isinstance(item.get("content"), str):
        item["content"] = [{"type": "output_text", "text": item["content"], "annotations": []}
                           if item["role"] == "assistant" else {"type": "input_text", "text": item["content"]}]
    return item


def _tool(tool: Any, where: str) -> dict[str, Any]:
    if not isinstance(tool, dict):
        raise invalid("each tool must be an object", where)
    if tool.get("type") != "function":
        raise unsupported(f"built-in tools ({tool.get('type')!r}) are not supported: declare functions", where)
    function = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
    return {"type": "function", "function": function}


def _tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise invalid('tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...}',
                          "tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _format(fmt: Any) -> dict[str, Any]:
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise invalid("text.format type must be 'text', 'json_object' or 'json_schema'", "text.format")
    if fmt["type"] != "json_schema":
        return {"type": fmt["type"]}
    return {"type": "json_schema", "json_schema": {"name": fmt.get("name", "output"), "schema": fmt.get("schema", {}),
                                                   "strict": fmt.get("strict")}}


def rename_param(e: APIError) -> APIError:
    """An error from the chat path, with its field named as this endpoint names it."""
    if e.param:
        head, _, rest = e.param.partition(".")
        if head in _PARAMS:
            e.param = _PARAMS[head] + ("." + rest if rest and head != "response_format" else "")
    return e


# ---------------------------------------------------------------- chat result -> response
def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class Output:
    """The output items of one choice, built as its text arrives (a stream) or at once (`finish`)."""

    def __init__(self):
        self.items: list[dict[str, Any]] = []
        self.reasoning: dict[str, Any] | None = None
        self.message: dict[str, Any] | None = None

    def open_reasoning(self) -> dict[str, Any]:
        self.reasoning = {"type": "reasoning", "id": _id("rs"), "summary": [],
                          "content": [{"type": "reasoning_text", "text": ""}], "status": "in_progress"}
        self.items.append(self.reasoning)
        return self.reasoning

    def open_message(self) -> dict[str, Any]:
        self.message = {"type": "message", "id": _id("msg"), "status": "in_progress", "role": "assistant",
                        "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]}
        self.items.append(self.message)
        return self.message

    def call(self, call) -> dict[str, Any]:
        item = {"type": "function_call", "id": _id("fc"), "call_id": call.id, "name": call.name,
                "arguments": call.arguments, "status": "completed"}
        self.items.append(item)
        return item

    def finish(self, c: Choice, tok=None) -> None:
        """Every item final, from the choice's finished text (the non-streaming path fills them all here)."""
        if c.reasoning is not None:
            item = self.reasoning or self.open_reasoning()
            item["content"][0]["text"], item["status"] = c.reasoning, "completed"
        if c.text or not c.tool_calls:
            item = self.message or self.open_message()
            item["content"][0]["text"], item["status"] = c.text or "", "completed"
            item["content"][0]["logprobs"] = _answer_logprobs(c, tok)
        for call in c.tool_calls:
            self.call(call)


def response_object(plan: Plan, req: ResponsesRequest, output: Output, tok, status: str | None = None
                    ) -> dict[str, Any]:
    c = plan.choices[0]
    status = status or ("incomplete" if c.finish_reason == "length" else "completed")
    u = usage(plan) if c.done is not None else None
    return {
        "id": "resp_" + plan.id.split("-", 1)[-1], "object": "response", "created_at": plan.created, "status": status,
        "model": plan.model, "output": output.items,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None, "error": None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id, "reasoning": req.reasoning, "store": req._stored,
        "conversation": None if req._conversation is None else {"id": req._conversation.id},
        "background": bool(req.background),
        "temperature": req.temperature, "top_p": req.top_p,
        "text": req.text or {"format": {"type": "text"}}, "tool_choice": req.tool_choice or "auto",
        "tools": req.tools or [], "truncation": req.truncation or "disabled", "metadata": req.metadata or {}, "user": req.user,
        "usage": None if u is None else {
            "input_tokens": u.prompt_tokens, "input_tokens_details": dict(u.prompt_tokens_details),
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": _thought(c, tok)},
            "total_tokens": u.total_tokens},
        "dgemma": {"seed": plan.seed, "choices": [c.stats()],
                   **({} if u is None else {"steps_per_canvas": u.steps_per_canvas,
                                            "tokens_per_forward": u.tokens_per_forward,
                                            "forward_passes": u.forward_passes, "canvases": u.canvases})},
    }


def _answer_logprobs(c: Choice, tok) -> list[dict[str, Any]]:
    """The answer's logprob entries (chat's shape, with dgemma's `entropy`): its tokens after any thought channel;
    [] when not asked."""
    if c.logprobs is None or tok is None or c.done is None:
        return []
    return logprobs_payload("chat", tok, c.tokens, c.lps, c.tops, _thought(c, tok), c.completion_tokens, 0,
                            c.ents)["content"]


def _thought(c: Choice, tok) -> int:
    """The thought channel's tokens: those up to and including `<channel|>` (all of them if it never closed)."""
    if c.reasoning is None:
        return 0
    close = tok.token_to_id(THOUGHT_CLOSE)
    return c.done.tokens.index(close) + 1 if close in c.done.tokens else len(c.done.tokens)


# ---------------------------------------------------------------- streaming events
class EventWriter:
    """Responses' SSE events (`event: TYPE` + `data: {...}`), numbered in order."""

    def __init__(self):
        self.seq = 0

    def __call__(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


class EventLog:
    """The SSE events of a background response created with `stream: true`, kept while the response is, so that
    any client can read them from any point, live: `GET /v1/responses/{id}?stream=true&starting_after=N` (an
    event's index here is its sequence_number)."""

    def __init__(self):
        self.events: list[str] = []
        self.done = False
        self._wake = asyncio.Event()

    def add(self, text: str) -> None:
        self.events += [e + "\n\n" for e in text.split("\n\n") if e]  # one text may hold several events
        self._notify()

    def close(self) -> None:
        self.done = True
        self._notify()

    def _notify(self) -> None:
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()

    async def follow(self, after: int = -1):
        """The events after sequence number `after`, then each new one as it comes, until the response ends."""
        i = max(after + 1, 0)
        while True:
            if i < len(self.events):
                yield self.events[i]
                i += 1
            elif self.done:
                return
            else:
                await self._wake.wait()


async def stream_events(state, plan: Plan, queue, req: ResponsesRequest):
    """The Responses event stream of a one-choice plan, from the engine's events."""
    tok = state.pipe.tokenizer
    send, out, c = EventWriter(), Output(), plan.choices[0]
    at = out.items.index

    def added(item, index):
        yield send("response.output_item.added", output_index=index, item=item)
        if item["type"] == "message":
            yield send("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                       part=dict(item["content"][0]))

    if req.background:  # as OpenAI's: created and queued, then in progress
        yield send("response.created", response=response_object(plan, req, out, tok, status="queued"))
        yield send("response.queued", response=response_object(plan, req, out, tok, status="queued"))
    else:
        yield send("response.created", response=response_object(plan, req, out, tok, status="in_progress"))
    yield send("response.in_progress", response=response_object(plan, req, out, tok, status="in_progress"))
    try:
        async for thought, text, ev in updates(state, plan, queue):
            if isinstance(ev, Failed):
                failed = response_object(plan, req, out, tok, status="failed")
                failed["error"] = {"code": "generation_failed" if ev.status >= 500 else "invalid_request",
                                   "message": ev.message}
                state.keep_response(req, failed)
                yield send("response.failed", response=failed)
                return
            if thought:
                if out.reasoning is None:
                    yield "".join(added(out.open_reasoning(), len(out.items) - 1))
                yield send("response.reasoning_text.delta", item_id=out.reasoning["id"], output_index=at(out.reasoning),
                           content_index=0, delta=thought)
            if text:
                if out.message is None:
                    yield "".join(added(out.open_message(), len(out.items) - 1))
                # the entries of the tokens this delta completes (with thinking: all of them in the done event)
                lp = None if c.thinking else c.stream_logprobs(tok, "chat", final=isinstance(ev, Done))
                yield send("response.output_text.delta", item_id=out.message["id"], output_index=at(out.message),
                           content_index=0, delta=text, logprobs=lp["content"] if lp else [])
            if isinstance(ev, Done):
                for event in _close(send, out, c, added, tok):
                    yield event
                # Ended by max_output_tokens too: status "incomplete" inside, as vLLM sends it (the openai client's
                # stream helper waits for response.completed, whatever the status).
                final = response_object(plan, req, out, tok)
                state.keep_response(req, final)
                yield send("response.completed", response=final)
    finally:
        state.worker.cancel(plan.jobs)
        state.conversations.release(req)


def _close(send, out: Output, c: Choice, added, tok=None):
    """The done events of every item, in order, once the choice has finished (new items announced first)."""
    known = len(out.items)
    out.finish(c, tok)
    for item in out.items[known:]:
        if item["type"] == "function_call":
            yield from added(dict(item, arguments="", status="in_progress"), known)
            yield send("response.function_call_arguments.delta", item_id=item["id"], output_index=known,
                       delta=item["arguments"])
            yield send("response.function_call_arguments.done", item_id=item["id"], output_index=known,
                       arguments=item["arguments"])
        else:
            yield from added(item, known)
        known += 1
    for k, item in enumerate(out.items):
        if item["type"] == "reasoning":
            yield send("response.reasoning_text.done", item_id=item["id"], output_index=k, content_index=0,
                       text=item["content"][0]["text"])
        elif item["type"] == "message":
            part = item["content"][0]
            yield send("response.output_text.done", item_id=item["id"], output_index=k, content_index=0,
                       text=part["text"], logprobs=part["logprobs"])
            yield send("response.content_part.done", item_id=item["id"], output_index=k, content_index=0, part=part)
        yield send("response.output_item.done", output_index=k, item=item)


# ---------------------------------------------------------------- stored responses
class ResponseStore:
    """The last `size` stored responses (the event loop's only): id -> (response object, the items its conversation
    holds before its output). In memory, and with `root` (--responses-dir) also one JSON file each under it, read
    back at start, so they outlive a restart; a background response that a restart interrupted comes back
    `failed`."""

    def __init__(self, size: int, root: Path | None = None):
        self.size = size
        self.entries: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = OrderedDict()
        self.running: dict[str, tuple[Any, list]] = {}  # background responses: id -> (task, jobs)
        # background responses created with stream: true: their events, while they run and for the last
        # KEPT_STREAMS that ended (a stream with every draft can hold megabytes)
        self.streams: OrderedDict[str, EventLog] = OrderedDict()
        self.disk = None if root is None or not size else JsonRecords(root)
        if self.disk is not None:
            for rid, record in self.disk.load(log):
                try:
                    obj, items = record["response"], list(record["items"])
                    status = obj["status"]
                except (KeyError, TypeError):
                    log.warning("skipping a stored response not in dgemma's format: %s.json", rid)
                    continue
                if status in ("queued", "in_progress"):
                    obj.update(status="failed", error={"code": "server_restarted", "message":
                                                       "the server stopped before this background response finished"})
                    self.disk.save(rid, record)
                self.entries[rid] = (obj, items)
            self._trim()

    def _trim(self) -> None:
        """Drop the oldest responses past `size` (not running ones)."""
        for rid in list(self.entries):
            if len(self.entries) <= self.size:
                break
            if rid not in self.running:
                del self.entries[rid]
                self.streams.pop(rid, None)
                if self.disk is not None:
                    self.disk.remove(rid)

    def history(self, req: ResponsesRequest) -> None:
        """Resolve `previous_response_id` into the conversation the request continues (404 if not kept)."""
        req._stored = req.store is not False and self.size > 0
        if req.previous_response_id is not None and req.conversation is not None:
            raise invalid("previous_response_id and conversation cannot be used together: a response continues "
                          "one or the other", "conversation")
        if req.background and not req._stored:
            raise invalid("background responses are kept until read: they need store (not false) and a server "
                          "that keeps responses (--responses-store above 0)", "background")
        if req.previous_response_id is None:
            return
        entry = self.entries.get(req.previous_response_id)
        if entry is None:
            raise APIError(404, f"Previous response with id '{req.previous_response_id}' not found."
                           + ("" if self.size else " This server keeps no responses (--responses-store 0)."),
                           param="previous_response_id", code="previous_response_not_found")
        obj, items = entry
        req._history = items + [item for item in obj["output"] if item["type"] != "reasoning"]

    def keep(self, req: ResponsesRequest, obj: dict[str, Any]) -> None:
        """Keep a response (a finished one; a background one from its start, `queued`), the oldest finished ones
        going past `size`."""
        if not req._stored or obj["status"] not in ("completed", "incomplete", "queued", "failed", "cancelled"):
            return
        if req.background and obj["status"] != "queued" and obj["id"] not in self.entries:
            return  # deleted while it ran: not brought back by its end
        self.entries[obj["id"]] = (obj, req._history + req.input_items())
        if self.disk is not None:
            self.disk.save(obj["id"], {"response": obj, "items": self.entries[obj["id"]][1]})
        self._trim()

    def start(self, req: ResponsesRequest, obj: dict[str, Any], task, jobs: list, events: EventLog | None = None
              ) -> None:
        self.keep(req, obj)
        self.running[obj["id"]] = (task, jobs)
        if events is not None:
            self.streams[obj["id"]] = events
            ended = [rid for rid, log_ in self.streams.items() if log_.done]
            for rid in ended[:max(0, len(ended) - KEPT_STREAMS)]:
                del self.streams[rid]
        task.add_done_callback(lambda _t, rid=obj["id"]: self.running.pop(rid, None))

    def get(self, rid: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        entry = self.entries.get(rid)
        if entry is None:
            raise APIError(404, f"Response with id '{rid}' not found.", param="response_id",
                           code="response_not_found")
        obj, items = entry
        if rid in self.running and obj["status"] == "queued" and any(j.state != "waiting"
                                                                     for j in self.running[rid][1]):
            obj = dict(obj, status="in_progress")
        return obj, items

    def events(self, rid: str) -> EventLog:
        """The event log of a background response created with stream: true (404 / 400 otherwise)."""
        self.get(rid)
        if rid not in self.streams:
            raise invalid(f"only a background response created with stream: true can be streamed, while it runs "
                          f"and for the last {KEPT_STREAMS} that ended (not across a restart): GET it without "
                          "stream", "stream")
        return self.streams[rid]

    def cancel(self, rid: str) -> dict[str, Any]:
        obj, _ = self.get(rid)
        if not obj.get("background"):
            raise invalid("only background responses can be cancelled", "response_id")
        if rid in self.running:
            self.running[rid][0].cancel()
            obj = dict(obj, status="cancelled")  # the task stores it so as it unwinds
        return obj

    def delete(self, rid: str) -> dict[str, Any]:
        self.get(rid)
        if rid in self.running:
            self.running.pop(rid)[0].cancel()
        self.entries.pop(rid, None)
        self.streams.pop(rid, None)
        if self.disk is not None:
            self.disk.remove(rid)
        return {"id": rid, "object": "response", "deleted": True}
