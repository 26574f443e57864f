"""The HTTP app: routes, auth, request bodies, SSE streaming and the web page.

    GET  /                      the live-canvas web page (static/)
    GET  /health                liveness and load, never behind the API key (also GET/POST /ping, SageMaker's)
    GET  /version               dgemma's version
    POST /reset_prefix_cache    forget the cached prefixes (vLLM's; --prefix-cache)
    GET  /metrics               Prometheus text format
    GET  /v1/models[/{model}]   the model this server serves, and its LoRA adapters (--lora)
    POST /v1/completions        text or token-id prompts, `suffix` fill-in-the-middle, `echo`
    POST /v1/chat/completions   the checkpoint's chat template, multi-turn
    POST /invocations           SageMaker's route (vLLM's): chat completions or completions, by the body's fields
    POST /v1/responses          OpenAI's Responses API, through the chat path (responses.py)
    POST /v1/messages           Anthropic's Messages API, through the chat path (messages.py), and its count_tokens
    POST /tokenize, /detokenize text or chat messages -> token ids, and back (vLLM's endpoints)
    POST /v1/load_lora_adapter, /v1/unload_lora_adapter   LoRA adapters at run time (--allow-runtime-lora)
    /v1/files, /v1/batches      OpenAI's Files and Batches APIs (--batch-dir; batch_api.py)
    /v1/conversations           OpenAI's Conversations API, for the Responses API's `conversation` (conversations.py)

Streaming (`stream: true`) sends OpenAI chunks as SSE and ends with `data: [DONE]`. With `stream_drafts: true`
it also sends, for every denoising step, a chunk whose only choice has an empty delta and which carries a
top-level `dgemma` object `{type: "draft", choice, canvas_index, step, canvas, pieces, text, accepted,
accepted_count, mean_entropy, fixed}`; the chunk that carries a finished canvas's text also carries
`dgemma: {type: "commit", choice, canvas_index, steps, tokens}`. OpenAI clients parse these as ordinary chunks
(extra fields are kept, the delta is empty), so they stream through them unchanged.

The handlers only parse and plan; the engine runs in `engine.Worker`'s thread. A client that disconnects gets
its rows cancelled: streaming through Starlette's disconnect listener (the generator is cancelled), and
non-streaming through a task that waits for `http.disconnect`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError

from .. import __version__
from ..generate import Commit, Done, Draft
from ..structured import ll_tokenizer
from ..tools import ToolError, check_tokenizer
from ..vision import has_vision, vision_tower
from . import errors
from .completions import (Plan, Planner, chunk, commit_event, draft_event, response, tool_call_deltas, usage,
                          with_prompt_logprobs, with_token_ids)
from .conversations import ConversationCreate, ConversationStore, ConversationUpdate, ItemsCreate
from .engine import Cancelled, Failed, Job, QueueFull, Unavailable, Worker
from .errors import APIError
from .metrics import Metrics
from .protocol import (BatchCreateRequest, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                       LoadLoRARequest, ModelCard, ModelList, TokenizeRequest, UnloadLoRARequest, items_page, page)
from . import messages as anthropic
from .messages import MessagesRequest
from .responses import (EventLog, Output, ResponsesRequest, ResponseStore, rename_param, response_object,
                        stream_events, to_chat, truncate)
from .settings import ServerSettings

log = logging.getLogger("dgemma.serve")
STATIC = Path(__file__).parent / "static"
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens",
             "/v1/models", "/tokenize", "/detokenize", "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
             "/v1/files", "/v1/batches", "/v1/conversations", "/health", "/ping", "/version", "/reset_prefix_cache",
             "/metrics", "/invocations", "/")


def _has_call_tokens(tokenizer) -> bool:
    try:
        check_tokenizer(tokenizer)
        return True
    except ToolError:
        return False


def _warm_grammar(tokenizer) -> None:
    try:
        ll_tokenizer(tokenizer)
    except Exception as e:  # a request that needs them reports the error itself
        log.warning("structured output unavailable: %s", e)


class State:
    """Everything the routes share: the pipeline, the worker thread, the planner, metrics and settings."""

    def __init__(self, pipeline, settings: ServerSettings, metrics: Metrics | None = None):
        self.pipe, self.settings = pipeline, settings
        self.metrics = metrics or Metrics()
        cfg = pipeline.model.cfg
        self.max_context = min(settings.max_context, cfg.max_position_embeddings)
        if settings.lora_modules and getattr(pipeline.model, "served_adapters", None) is None:
            from ..adapters import attach_adapters

            attach_adapters(pipeline.model, [path for _, path in settings.lora_modules])
        # LoRA module name -> (adapter index, directory): --lora at start, /v1/load_lora_adapter later
        self.adapters = {name: (i, path) for i, (name, path) in enumerate(settings.lora_modules, start=1)}
        engine = pipeline.engine(max_rows=settings.max_concurrency, max_len=self.max_context,
                                 prefix_cache=settings.prefix_cache, prefix_margin=settings.prefix_margin,
                                 adaptive_steps=settings.adaptive_steps, prefill_chunk=settings.prefill_chunk)
        self.worker = Worker(engine, max_queue=settings.max_queue, metrics=self.metrics,
                             priority=settings.scheduling_policy == "priority")
        self.planner = Planner(pipeline, self.worker, settings, self.adapters)
        self.batches = None  # the Files and Batches APIs' store (--batch-dir; create_app sets it)
        root = None if settings.responses_dir is None else Path(settings.responses_dir).expanduser()
        self.responses = ResponseStore(settings.responses_store, root and root / "responses")  # previous_response_id
        self.conversations = ConversationStore(settings.responses_store, root and root / "conversations")
        self.created = int(time.time())
        if pipeline.tokenizer is not None:
            # Structured output's token tables take ~3 s at Gemma's 262,144 tokens: built now, off the request path.
            threading.Thread(target=_warm_grammar, args=(pipeline.tokenizer,), daemon=True,
                             name="dgemma-grammar-tables").start()
        m = self.metrics
        m.gauge("dgemma_active_rows", "Rows in the engine now.", lambda: self.worker.load()[0])
        m.gauge("dgemma_queue_depth", "Rows waiting for a free engine row.", lambda: self.worker.load()[1])
        m.gauge("dgemma_max_rows", "Engine rows (--max-concurrency).", lambda: settings.max_concurrency)
        m.gauge("dgemma_up", "1 while the engine worker runs.", lambda: int(self.worker.alive))

    def model_cards(self) -> list[ModelCard]:
        """The base model's card, then one per LoRA module (vLLM's shape: `parent` names the base, `root` the
        adapter's directory)."""
        base = self.model_card()
        aliases = [base.model_copy(update={"id": name}) for name in self.settings.model_aliases]
        return [base, *aliases] + [ModelCard(id=name, created=self.created, root=path,
                                             parent=self.settings.model_name, max_model_len=base.max_model_len,
                                             dgemma=dict(base.dgemma, adapter=i))
                                   for name, (i, path) in list(self.adapters.items())]

    # ------------------------------------------------------------ LoRA adapters at run time
    def _runtime_lora(self) -> None:
        if not self.settings.allow_runtime_lora:
            raise APIError(403, "loading and unloading LoRA adapters at run time is off; start the server with "
                                "--allow-runtime-lora (it reads adapter directories on the server's host)",
                           code="runtime_lora_disabled")

    async def load_adapter(self, name: str, path: str) -> str:
        """vLLM's /v1/load_lora_adapter: read and check the adapter off the event loop, then add it between two
        engine steps; from then on requests may name it."""
        from ..adapters import AdapterError, install_adapter, read_adapter

        self._runtime_lora()
        bases = (self.settings.model_name, *self.settings.model_aliases)
        if not name.strip() or name in bases or name in self.adapters:
            raise APIError(400, f"The lora adapter '{name}' has already been loaded." if name in self.adapters
                           else "lora_name must be a new, non-empty name (not the base model's)", param="lora_name")
        try:
            check_lora_rank(path, self.settings.max_lora_rank)
            loaded = await asyncio.to_thread(read_adapter, self.pipe.model, Path(path).expanduser())
        except AdapterError as e:
            raise APIError(400, str(e), param="lora_path") from None
        except (OSError, ValueError) as e:  # a path the OS refuses (too long, a NUL byte), a file it cannot read
            raise APIError(400, f"cannot read the adapter at {path!r}: {e}", param="lora_path") from None
        if name in self.adapters:  # a concurrent load of the same name won
            raise APIError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")
        fut = self.worker.call(lambda: install_adapter(self.pipe.model, path, loaded))
        self.adapters[name] = (await asyncio.wrap_future(fut), path)
        log.info("loaded LoRA adapter %s from %s", name, path)
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload_adapter(self, name: str) -> str:
        """vLLM's /v1/unload_lora_adapter: new requests stop finding it at once; its tensors go between two steps,
        or the unload is a 409 while requests still run or wait on it (nothing is cut short)."""
        from ..adapters import remove_adapter

        self._runtime_lora()
        entry = self.adapters.pop(name, None)
        if entry is None:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name",
                           code="model_not_found")
        index = entry[0]

        def drop() -> int:
            busy = self.worker.uses(lambda p: p.adapter == index)
            if not busy:
                remove_adapter(self.pipe.model, index)
            return busy

        busy = await asyncio.wrap_future(self.worker.call(drop))
        if busy:
            self.adapters.setdefault(name, entry)
            raise APIError(409, f"The lora adapter '{name}' is in use by {busy} request(s); unload it when they "
                                "finish", param="lora_name", code="adapter_in_use")
        log.info("unloaded LoRA adapter %s", name)
        return f"Success: LoRA adapter '{name}' removed successfully."

    def keep_response(self, req: ResponsesRequest, obj: dict) -> None:
        """A response has ended: stored (unless store is false), and its items added to its conversation."""
        self.responses.keep(req, obj)
        self.conversations.finish(req, obj)

    def model_card(self) -> ModelCard:
        s = self.pipe.sampler
        return ModelCard(id=self.settings.model_name, created=self.created, max_model_len=self.max_context, dgemma={
            "canvas_length": self.pipe.model.cfg.canvas_length, "max_context": self.max_context,
            "max_tokens_limit": self.settings.max_tokens_limit, "default_max_tokens": self.pipe.max_new_tokens,
            "steps": s.max_denoising_steps, "entropy_bound": s.entropy_bound, "t_min": s.t_min, "t_max": s.t_max,
            "stability_threshold": s.stability_threshold, "confidence_threshold": s.confidence_threshold,
            # fill-in-the-middle tokens: `suffix` also works with ar: true (and the page starts in completion mode)
            "fim": self.pipe.has_fim(), "tools": _has_call_tokens(self.pipe.tokenizer),
            "vision": has_vision(self.pipe.model)})  # image_url parts work (the page shows its image picker)


# ---------------------------------------------------------------- request plumbing
async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object: 413 past `limit` bytes, 400 if it is not a JSON object."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body is {int(length)} bytes; the limit is {limit}", code="body_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request ({e}). The body must be a JSON "
                            "object.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    return data


def parse(model, data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise errors.from_validation(e) from None


def make_auth(settings: ServerSettings):
    key = settings.api_key

    async def auth(request: Request) -> None:
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":  # Anthropic's clients send the key as x-api-key
            token = request.headers.get("x-api-key", "")
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer <key>' (or "
                           "'x-api-key: <key>').", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return auth


async def _wait_disconnect(request: Request) -> None:
    """Return when the client goes away (only after the body has been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# ---------------------------------------------------------------- running a plan
async def execute(request: Request, state: State, plan: Plan, responses: ResponsesRequest | None = None,
                  messages: MessagesRequest | None = None):
    """Queue a plan's rows and answer: a stream, or the whole response (a Responses object for `responses`, an
    Anthropic message for `messages`)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    background = state.batches is not None and state.batches.is_internal(request.headers)

    def sink(job: Job, events: list) -> None:  # worker thread -> event loop
        loop.call_soon_threadsafe(queue.put_nowait, (job.tag, events))

    for c in plan.choices:
        c.job = Job(c.prompt, c.params.replace(drafts=plan.drafts), sink, drafts=plan.drafts, tag=c.index,
                    model=plan.model, priority=plan.priority, background=background)
    try:
        state.worker.submit(plan.jobs)
    except QueueFull as e:
        state.metrics.inc(state.metrics.rejected, "queue_full")
        raise APIError(429, f"The server is busy ({e}). Retry after {state.settings.retry_after_s} s.",
                       code="queue_full", headers={"Retry-After": str(state.settings.retry_after_s)}) from None
    except Unavailable as e:
        state.metrics.inc(state.metrics.rejected, "unavailable")
        raise APIError(503, f"The server cannot take requests now ({e}).", code="unavailable") from None
    if responses is not None:
        state.conversations.hold(responses, plan.jobs)
    if responses is not None and responses.background:
        obj = response_object(plan, responses, Output(), state.pipe.tokenizer, status="queued")
        if plan.stream:  # its events are kept, so any client can read (or reread) them while it runs
            events = EventLog()
            task = loop.create_task(_background_stream(state, plan, queue, responses, events))
            state.responses.start(responses, obj, task, plan.jobs, events)
            return sse(events.follow())
        task = loop.create_task(_background(state, plan, queue, responses))
        state.responses.start(responses, obj, task, plan.jobs)
        return JSONResponse(obj)
    if plan.stream:
        events = stream_events(state, plan, queue, responses) if responses is not None else \
            anthropic.stream_events(state, plan, queue, messages) if messages is not None else \
            stream(state, plan, queue)
        return sse(events)
    await collect(request, state, plan, queue)
    tok = state.pipe.tokenizer
    if responses is not None:
        output = Output()
        output.finish(plan.choices[0], tok)
        obj = response_object(plan, responses, output, tok)
        state.keep_response(responses, obj)
        return JSONResponse(obj)
    if messages is not None:
        return JSONResponse(anthropic.message_object(plan, messages, tok))
    return JSONResponse(with_prompt_logprobs(plan, with_token_ids(plan, response(plan, tok).model_dump()), tok))


def sse(events) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _background_stream(state: State, plan: Plan, queue: asyncio.Queue, req: ResponsesRequest,
                             events: EventLog) -> None:
    """A background response created with stream: true: its events go to `events`, whoever reads them (the stream
    stores the response as it ends; cancelled, it is stored here)."""
    try:
        async for text in stream_events(state, plan, queue, req):
            events.add(text)
    except asyncio.CancelledError:  # POST /v1/responses/{id}/cancel
        state.keep_response(req, response_object(plan, req, Output(), state.pipe.tokenizer, status="cancelled"))
    finally:
        events.close()


async def _background(state: State, plan: Plan, queue: asyncio.Queue, req: ResponsesRequest) -> None:
    """A background response: wait for it as a request would (no client to go away), then store what it gave."""
    tok = state.pipe.tokenizer
    output = Output()
    try:
        await collect(None, state, plan, queue)
        output.finish(plan.choices[0], tok)
        obj = response_object(plan, req, output, tok)
    except APIError as e:
        obj = response_object(plan, req, output, tok, status="failed")
        obj["error"] = {"code": e.code or "generation_failed", "message": e.message}
    except asyncio.CancelledError:  # POST /v1/responses/{id}/cancel (the rows were cancelled on the way out)
        obj = response_object(plan, req, output, tok, status="cancelled")
    state.keep_response(req, obj)


async def collect(request: Request | None, state: State, plan: Plan, queue: asyncio.Queue) -> None:
    """Wait for every choice of a plan to finish (its events folded into the choices); a client that goes away
    cancels it (none for a background response)."""
    tok = state.pipe.tokenizer
    watcher = None
    if request is not None:
        watcher = asyncio.ensure_future(_wait_disconnect(request))

        def gone(task: asyncio.Task) -> None:
            if not task.cancelled():
                task.exception()  # retrieved, so asyncio does not log it; either way the client is gone
                state.worker.cancel(plan.jobs)

        watcher.add_done_callback(gone)
    try:
        pending = len(plan.choices)
        while pending:
            index, events = await queue.get()
            choice = plan.choices[index]
            for ev in events:
                if isinstance(ev, Commit):
                    choice.commit(ev)
                elif isinstance(ev, Done):
                    choice.finish(tok, ev)
                    pending -= 1
                elif isinstance(ev, Failed):
                    raise APIError(ev.status, ev.message, code="generation_failed" if ev.status >= 500 else None)
                elif isinstance(ev, Cancelled):
                    # Only a disconnect cancels a non-streaming request: nobody reads this answer.
                    raise APIError(499, "client closed the request", code="cancelled")
    finally:
        if watcher is not None:
            watcher.cancel()
        state.worker.cancel(plan.jobs)


async def stream(state: State, plan: Plan, queue: asyncio.Queue):
    tok = state.pipe.tokenizer
    first_text = True
    try:
        for c in plan.choices:
            if plan.kind == "chat":
                yield chunk(plan, c.index, text="", role=True)
            if c.echo:
                yield chunk(plan, c.index, text=c.echo)
        pending = {c.index for c in plan.choices}
        while pending:
            index, events = await queue.get()
            choice = plan.choices[index]
            for ev in events:
                if isinstance(ev, Draft):
                    yield chunk(plan, index, dgemma=draft_event(tok, choice, ev))
                elif isinstance(ev, Commit):
                    choice.commit(ev)
                    thought = choice.reasoning_delta(tok)
                    if thought:
                        yield chunk(plan, index, reasoning=thought)
                    delta = choice.delta(tok)
                    lp = choice.stream_logprobs(tok, plan.kind)
                    if delta or lp or (plan.drafts and not ev.partial):
                        if delta and first_text:
                            first_text = False
                            state.metrics.observe(state.metrics.ttft, time.perf_counter() - plan.t0)
                        yield chunk(plan, index, text=delta, logprobs=lp,
                                    dgemma=commit_event(choice, ev) if plan.drafts and not ev.partial else None,
                                    token_ids=choice.stream_token_ids(tok) if plan.token_ids else None)
                elif isinstance(ev, Done):
                    rest = choice.finish(tok, ev)
                    thought = choice.reasoning_rest()
                    if thought:
                        yield chunk(plan, index, reasoning=thought)
                    lp = choice.stream_logprobs(tok, plan.kind, final=True)
                    if rest or lp:
                        yield chunk(plan, index, text=rest, logprobs=lp)
                    if choice.tool_calls:
                        yield chunk(plan, index, tool_calls=tool_call_deltas(choice))
                    yield chunk(plan, index, finish_reason=choice.finish_reason, prompt_ids=True,
                                token_ids=choice.stream_token_ids(tok, final=True) if plan.token_ids else None)
                    pending.discard(index)
                elif isinstance(ev, Failed):
                    yield errors_sse(APIError(ev.status, ev.message, code="generation_failed"))
                    return
                elif isinstance(ev, Cancelled):
                    return
        if plan.include_usage:
            yield chunk(plan, None, usage_=usage(plan))
        yield "data: [DONE]\n\n"
    finally:
        state.worker.cancel(plan.jobs)


def errors_sse(e: APIError) -> str:
    return "data: " + json.dumps(e.body()) + "\n\n"


# ---------------------------------------------------------------- the app
class MetricsMiddleware:
    """Counts every response by endpoint and status and times it to the last byte (streams included)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        prefixes = ("/v1/models", "/v1/files", "/v1/batches", "/v1/responses", "/v1/conversations", "/static")
        endpoint = path if path in ENDPOINTS else next((p for p in prefixes if path.startswith(p + "/")), "other")
        t0, status = time.perf_counter(), [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.count_request(endpoint, status[0], time.perf_counter() - t0)


def check_lora_rank(path, max_rank: int | None) -> None:
    """vLLM's --max-lora-rank: an AdapterError for an adapter of a higher rank (a directory that is no adapter is
    left to read_adapter to name)."""
    from ..adapters import AdapterError
    from ..train.lora import LoRAError, read_adapter_config

    if max_rank is None:
        return
    try:
        rank = int(read_adapter_config(Path(path).expanduser())["r"])
    except (LoRAError, OSError, ValueError):
        return
    if rank > max_rank:
        raise AdapterError(f"the adapter at {path} has rank {rank}, above this server's --max-lora-rank {max_rank}")


class RequestIdMiddleware:
    """`X-Request-Id` on every response, as OpenAI's API sends it (the openai client's `_request_id`) and vLLM's
    `--enable-request-id-headers`: the client's own when it sent a usable one, else a new one."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or ()).get(b"x-request-id", b"")
        rid = given if 0 < len(given) <= 128 and given.isascii() and given.decode().isprintable() else \
            f"req_{uuid.uuid4().hex}".encode()

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid)]
            await send(message)

        await self.app(scope, receive, send_wrapper)


def create_app(pipeline, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app serving `pipeline`. The engine worker starts and stops with the app's lifespan."""
    settings = settings or ServerSettings()
    if has_vision(pipeline.model):
        vision_tower(pipeline.model)  # read now: the first image request does not wait, a bad tower fails the start
    state = State(pipeline, settings)

    @asynccontextmanager
    async def lifespan(app):
        state.worker.start()
        if state.batches is not None:
            state.batches.start()
        try:
            yield
        finally:
            if state.batches is not None:
                await state.batches.stop()
            state.worker.stop()

    app = FastAPI(title="dgemma", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.dgemma = state
    if settings.batch_dir is not None:
        from .batch_api import BatchStore

        # batches leave a quarter of the rows (at least one, where there are two) to live traffic
        rows = settings.max_concurrency
        state.batches = BatchStore(Path(settings.batch_dir).expanduser(), app, api_key=settings.api_key,
                                   inflight=max(1, rows - max(1, rows // 4)),
                                   max_file_bytes=settings.batch_max_file_bytes)
        state.metrics.gauge("dgemma_batches_running", "Batches (/v1/batches) running now.",
                            lambda: len(state.batches.running))
        log.info("Files and Batches APIs on: files and batches under %s, batches use at most %d of %d rows",
                 state.batches.root, state.batches.inflight, rows)
    errors.install(app)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.add_middleware(RequestIdMiddleware)

    api = APIRouter(dependencies=[Depends(make_auth(settings))])

    @api.get("/v1/models")
    async def list_models():
        return ModelList(data=state.model_cards()).model_dump(exclude_none=True)

    @api.get("/v1/models/{model:path}")
    async def get_model(model: str):
        card = next((c for c in state.model_cards() if c.id == model), None)
        if card is None:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return card.model_dump(exclude_none=True)

    @api.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        req = parse(LoadLoRARequest, await read_json(request, settings.max_body_bytes))
        return PlainTextResponse(await state.load_adapter(req.lora_name, req.lora_path))

    @api.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        req = parse(UnloadLoRARequest, await read_json(request, settings.max_body_bytes))
        return PlainTextResponse(await state.unload_adapter(req.lora_name))

    @api.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await read_json(request, settings.max_body_bytes))
        # Planning tokenizes, renders templates and compiles grammars (a large JSON schema: 100 ms or more): off
        # the event loop, so that other requests' streams keep flowing meanwhile.
        return await execute(request, state, await asyncio.to_thread(state.planner.completion, req))

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse(ChatCompletionRequest, await read_json(request, settings.max_body_bytes))
        return await execute(request, state, await asyncio.to_thread(state.planner.chat, req))

    @api.post("/invocations")
    async def invocations(request: Request):
        """SageMaker's inference route (vLLM's): a chat completion when the body has `messages`, a completion when
        it has `prompt`."""
        body = await read_json(request, settings.max_body_bytes)
        if isinstance(body, dict) and "messages" in body:
            req, plan = parse(ChatCompletionRequest, body), state.planner.chat
        elif isinstance(body, dict) and "prompt" in body:
            req, plan = parse(CompletionRequest, body), state.planner.completion
        else:
            raise APIError(400, "/invocations takes a chat completion request (with messages) or a completion "
                                "request (with prompt)", code="invalid_value")
        return await execute(request, state, await asyncio.to_thread(plan, req))

    @api.post("/v1/responses")
    async def responses(request: Request):
        req = parse(ResponsesRequest, await read_json(request, settings.max_body_bytes))
        state.responses.history(req)
        state.conversations.open(req)
        try:
            try:
                plan = await asyncio.to_thread(truncate, req, lambda: state.planner.chat(to_chat(req)))
            except APIError as e:
                raise rename_param(e) from None
            return await execute(request, state, plan, responses=req)
        except BaseException:  # an error, or a client gone: the conversation is free again
            state.conversations.release(req)
            raise

    @api.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, stream: bool = False, starting_after: int | None = None):
        if not stream:
            return state.responses.get(response_id)[0]
        return sse(state.responses.events(response_id).follow(-1 if starting_after is None else starting_after))

    @api.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(response_id: str):
        return state.responses.cancel(response_id)

    @api.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str):
        return state.responses.delete(response_id)

    @api.get("/v1/responses/{response_id}/input_items")
    async def response_input_items(response_id: str, limit: int = 20, order: str = "desc", after: str | None = None):
        return items_page(state.responses.get(response_id)[1], limit, order, after)

    @api.post("/v1/messages")
    async def messages(request: Request):
        req = parse(MessagesRequest, await read_json(request, settings.max_body_bytes))
        try:
            plan = await asyncio.to_thread(state.planner.chat, anthropic.to_chat(req))
        except APIError as e:
            raise anthropic.rename_param(e) from None
        return await execute(request, state, plan, messages=req)

    @api.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        req = parse(anthropic.CountTokensRequest, await read_json(request, settings.max_body_bytes))
        try:
            ids = await asyncio.to_thread(state.planner.chat_prompt, anthropic.to_chat(req.messages_request()))
        except APIError as e:
            raise anthropic.rename_param(e) from None
        return {"input_tokens": len(ids)}

    @api.post("/tokenize")
    async def tokenize(request: Request):
        req = parse(TokenizeRequest, await read_json(request, settings.max_body_bytes))
        ids = await asyncio.to_thread(state.planner.tokenize, req)
        out = {"count": len(ids), "max_model_len": state.max_context, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = [state.pipe.tokenizer.id_to_token(i) for i in ids]
        return out

    @api.post("/detokenize")
    async def detokenize(request: Request):
        req = parse(DetokenizeRequest, await read_json(request, settings.max_body_bytes))
        return {"prompt": state.planner.detokenize(req)}

    @api.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        """vLLM's: forget the cached prefixes (say between two benchmark runs)."""
        if not settings.prefix_cache:
            raise errors.invalid("prefix caching is off (start the server with --prefix-cache)", None)
        try:
            slots = await asyncio.wrap_future(state.worker.call(state.worker.engine.reset_prefix_cache))
        except Unavailable as e:
            raise APIError(503, f"The server cannot take requests now ({e}).", code="unavailable") from None
        return {"reset": True, "slots": slots}

    _batch_routes(api, state)
    _conversation_routes(api, state)
    app.include_router(api)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.api_route("/ping", methods=["GET", "POST"])
    @app.get("/health")
    async def health():
        active, waiting = state.worker.load()
        body = {"status": "ok" if state.worker.alive else "unavailable", "model": settings.model_name,
                "active_rows": active, "queued_rows": waiting, "max_concurrency": settings.max_concurrency,
                "max_queue": settings.max_queue, "engine_steps": state.worker.steps}
        if state.worker.error:
            body["error"] = state.worker.error
        return JSONResponse(body, status_code=200 if state.worker.alive else 503)

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _conversation_routes(api: APIRouter, state: State) -> None:
    """OpenAI's Conversations API (conversations.py)."""
    conversations, limit = state.conversations, state.settings.max_body_bytes

    @api.post("/v1/conversations")
    async def create_conversation(request: Request):
        return conversations.create(parse(ConversationCreate, await read_json(request, limit)))

    @api.get("/v1/conversations/{conversation_id}")
    async def get_conversation(conversation_id: str):
        return conversations.get(conversation_id).object()

    @api.post("/v1/conversations/{conversation_id}")
    async def update_conversation(conversation_id: str, request: Request):
        return conversations.update(conversation_id, parse(ConversationUpdate, await read_json(request, limit)))

    @api.delete("/v1/conversations/{conversation_id}")
    async def delete_conversation(conversation_id: str):
        return conversations.delete(conversation_id)

    @api.get("/v1/conversations/{conversation_id}/items")
    async def list_conversation_items(conversation_id: str, limit: int = 20, order: str = "desc",
                                      after: str | None = None):
        return conversations.list_items(conversation_id, limit, order, after)

    @api.post("/v1/conversations/{conversation_id}/items")
    async def add_conversation_items(conversation_id: str, request: Request):
        return conversations.add_items(conversation_id, parse(ItemsCreate, await read_json(request, limit)))

    @api.get("/v1/conversations/{conversation_id}/items/{item_id}")
    async def get_conversation_item(conversation_id: str, item_id: str):
        return conversations.item(conversation_id, item_id)

    @api.delete("/v1/conversations/{conversation_id}/items/{item_id}")
    async def delete_conversation_item(conversation_id: str, item_id: str):
        return conversations.delete_item(conversation_id, item_id)


def _batch_routes(api: APIRouter, state: State) -> None:
    """OpenAI's Files and Batches APIs (batch_api.py), a 403 that says how to turn them on without --batch-dir."""

    def store():
        if state.batches is None:
            raise APIError(403, "the Files and Batches APIs are off; start the server with --batch-dir DIR (where "
                                "uploaded files, batch state and outputs are kept)", code="batch_api_disabled")
        return state.batches

    @api.post("/v1/files")
    async def create_file(request: Request):
        s = store()
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > s.max_file_bytes + (64 << 10):
            raise APIError(413, f"the upload is {int(length)} bytes; files here are at most {s.max_file_bytes}",
                           param="file", code="file_too_large")
        try:
            form = await request.form(max_files=1, max_fields=16)
        except (AssertionError, ImportError) as e:  # Starlette without python-multipart
            raise APIError(501, f"file uploads need python-multipart: pip install 'dgemma[serve]' ({e})",
                           code="not_supported") from None
        try:
            purpose = form.get("purpose")
            return await s.create_file(form.get("file"), purpose if isinstance(purpose, str) else None)
        finally:
            await form.close()

    @api.get("/v1/files")
    async def list_files(purpose: str | None = None):
        return page(store().list_files(purpose))

    @api.get("/v1/files/{file_id}")
    async def get_file(file_id: str):
        return store().get_file(file_id)

    @api.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str):
        s = store()
        meta = s.get_file(file_id)
        return FileResponse(s.file_path(file_id), media_type="application/octet-stream", filename=meta["filename"])

    @api.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str):
        return store().delete_file(file_id)

    @api.post("/v1/batches")
    async def create_batch(request: Request):
        s = store()
        req = parse(BatchCreateRequest, await read_json(request, state.settings.max_body_bytes))
        return s.create_batch(req.model_dump())

    @api.get("/v1/batches")
    async def list_batches(limit: int = 20, after: str | None = None):
        return items_page(store().list_batches(), limit, "asc", after)  # newest first already

    @api.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str):
        return store().get_batch(batch_id)

    @api.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str):
        return store().cancel_batch(batch_id)


# ---------------------------------------------------------------- running
def check_port(host: str, port: int) -> None:
    """Fail early, as one line, when the address cannot be bound (uvicorn would log a traceback-ish error)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def check_dirs(settings: ServerSettings) -> None:
    """Fail early, as one line, when --batch-dir or --responses-dir cannot be a directory the server writes in, or
    --allowed-local-media-path is not a directory."""
    import tempfile

    for flag, path in (("--batch-dir", settings.batch_dir), ("--responses-dir", settings.responses_dir)):
        if path is None:
            continue
        root = Path(path).expanduser()
        if root.exists() and not root.is_dir():
            raise ValueError(f"{flag} {path}: not a directory")
        try:
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=root):
                pass
        except OSError as e:
            raise ValueError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    media = settings.allowed_local_media_path
    if media is not None and not Path(media).expanduser().is_dir():
        raise ValueError(f"--allowed-local-media-path {media}: not a directory")
    if (settings.ssl_keyfile is None) != (settings.ssl_certfile is None):
        raise ValueError("--ssl-keyfile and --ssl-certfile go together")
    for flag, path in (("--ssl-keyfile", settings.ssl_keyfile), ("--ssl-certfile", settings.ssl_certfile)):
        if path is not None and not Path(path).expanduser().is_file():
            raise ValueError(f"{flag} {path}: no such file")


def run(pipeline, settings: ServerSettings, log_level: str = "info") -> None:
    import uvicorn

    check_port(settings.host, settings.port)
    logging.basicConfig(level="DEBUG" if log_level == "trace" else log_level.upper(),  # trace: uvicorn's, below debug
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the batches' in-process requests, one line each
    if settings.api_key is None and settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without --api-key: anyone who can reach this port can use the model",
                    settings.host)
    app = create_app(pipeline, settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level, timeout_graceful_shutdown=5,
                root_path=settings.root_path, ssl_keyfile=settings.ssl_keyfile, ssl_certfile=settings.ssl_certfile,
                access_log=settings.access_log)
