"""Offline batches in the OpenAI Batch file format (`dgemma run-batch`, as vLLM's `run-batch`).

Each input line is one request, `{"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body":
{...}}`; each output line answers one input line, in input order: `{"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}`. The requests go through the app `dgemma serve` runs, in this process (httpx's
ASGI transport, no port): the same validation, defaults, error JSON and batching of concurrent rows.

    a request the server answers      response {status_code, request_id, body}; error null on a 2xx, else
                                      {code, message} read from the body's error (OpenAI keeps it in the body,
                                      vLLM in `error`: both are there)
    a line that is not a request      response null, error {code, message}: not JSON, no custom_id, a custom_id
                                      seen before, a url this runs not, a method other than POST, stream: true

Output goes to `OUT.partial`, a line as soon as it and every line before it are answered, and becomes `OUT` in one
rename when all are: a kill leaves `OUT` as it was. Run the same command again and it resumes after the lines
`OUT.partial` holds (a line cut short by the kill is dropped), once it has checked they answer the same input.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io import commit_file
from .settings import ServerSettings

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages", "/tokenize",
        "/detokenize")


class BatchError(ValueError):
    """The batch as a whole cannot run (unreadable input, an OUT.partial of another input)."""


@dataclass
class BatchSummary:
    lines: int = 0  # input lines answered (blank lines are skipped), resumed ones included
    resumed: int = 0  # of them, answered by an earlier run (OUT.partial)
    ok: int = 0  # 2xx
    failed: int = 0  # requests the server refused or could not finish (4xx / 5xx)
    invalid: int = 0  # lines that are not a request
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)

    def count(self, out: dict, resumed: bool = False) -> None:
        self.lines += 1
        self.resumed += resumed
        resp = out.get("response")
        if resp is None:
            self.invalid += 1
            return
        status = int(resp.get("status_code", 0))
        self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
        if 200 <= status < 300:
            self.ok += 1
        else:
            self.failed += 1
        if resumed:
            return
        usage = (resp.get("body") or {}).get("usage") or {}
        self.prompt_tokens += int(usage.get("prompt_tokens", usage.get("input_tokens", 0)) or 0)
        self.completion_tokens += int(usage.get("completion_tokens", usage.get("output_tokens", 0)) or 0)

    def as_dict(self) -> dict:
        return asdict(self)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _invalid(custom_id, code: str, message: str) -> dict:
    return {"id": _new_id("batch_req"), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


def _answer(custom_id: str, status: int, body) -> dict:
    error = None
    if not 200 <= status < 300:
        err = body.get("error") if isinstance(body, dict) else None
        err = err if isinstance(err, dict) else {}
        error = {"code": err.get("code") or err.get("type") or str(status),
                 "message": err.get("message") or f"HTTP {status}"}
    rid = body.get("id") if isinstance(body, dict) and isinstance(body.get("id"), str) else None
    return {"id": _new_id("batch_req"), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": rid or _new_id("req"), "body": body}, "error": error}


def parse_line(text: str, lineno: int) -> tuple[str | None, tuple[str, dict] | None, dict | None]:
    """(custom_id, (url, body) to run, or the output line of an input line that is not a request)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, None, _invalid(None, "invalid_json", f"line {lineno}: not JSON ({e.msg} at column {e.colno})")
    if not isinstance(obj, dict):
        return None, None, _invalid(None, "invalid_request", f"line {lineno}: a request is a JSON object")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return None, None, _invalid(None, "invalid_request", f"line {lineno}: custom_id must be a non-empty string")
    method, url, body = obj.get("method", "POST"), obj.get("url"), obj.get("body")
    if not isinstance(method, str) or method.upper() != "POST":
        return cid, None, _invalid(cid, "invalid_method", f"line {lineno}: method must be POST, got {method!r}")
    if url not in URLS:
        return cid, None, _invalid(cid, "invalid_url", f"line {lineno}: url must be one of {', '.join(URLS)}; "
                                                      f"got {url!r}")
    if not isinstance(body, dict):
        return cid, None, _invalid(cid, "invalid_request", f"line {lineno}: body must be a JSON object")
    if body.get("stream"):
        return cid, None, _invalid(cid, "invalid_request", f"line {lineno}: stream is not supported in a batch "
                                                          "(each line gets one whole response)")
    return cid, (url, body), None


def input_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line."""
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield n, line
    except UnicodeDecodeError as e:
        raise BatchError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_partial(path: Path) -> list[dict]:
    """The whole lines an earlier run wrote; the file is cut back to them (a kill may have cut the last short)."""
    if not path.exists():
        return []
    done: list[dict] = []
    keep = 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            if not isinstance(obj, dict) or "custom_id" not in obj:
                break
            done.append(obj)
            keep += len(raw)
    if keep != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(keep)
    return done


class _OrderedWriter:
    """Writes answers in input order: index i goes out once 0..i-1 have."""

    def __init__(self, f, start: int):
        self.f, self.next, self.buffer = f, start, {}

    def add(self, index: int, out: dict) -> None:
        self.buffer[index] = out
        while self.next in self.buffer:
            self.f.write(json.dumps(self.buffer.pop(self.next), ensure_ascii=False) + "\n")
            self.next += 1
        self.f.flush()


async def run_lines(app, inp: Path, partial: Path, summary: BatchSummary, inflight: int,
                    progress: Callable[[BatchSummary], None] | None = None, *, headers: dict | None = None,
                    stop: Callable[[], bool] | None = None, sem: asyncio.Semaphore | None = None) -> bool:
    """Answer the lines of `inp` through `app`, appending to `partial` (resuming after what it holds), at most
    `inflight` requests at a time (or as `sem` allows: one semaphore for several batches). `stop()` is asked before
    each new request: once it says so no more are sent, and those in flight are answered. A 429 (the server's
    queue is full of other clients' rows) is retried after its Retry-After. Returns whether every line was
    answered."""
    import httpx

    done = read_partial(partial)
    seen: dict[str, int] = {}
    tasks: set[asyncio.Task] = set()
    sem = sem or asyncio.Semaphore(inflight)
    complete = True
    send_headers = {"content-type": "application/json", **(headers or {})}
    last = [time.perf_counter()]

    def tick() -> None:
        if progress is not None and time.perf_counter() - last[0] >= 5:
            last[0] = time.perf_counter()
            progress(summary)

    with open(partial, "a", encoding="utf-8") as f:
        writer = _OrderedWriter(f, len(done))

        def finish(index: int, out: dict) -> None:
            writer.add(index, out)
            summary.count(out)
            tick()

        async def one(index: int, cid: str, url: str, body: dict) -> None:
            try:
                content = json.dumps(body)  # NaN and Infinity as the line had them (httpx's json= refuses them)
                while True:
                    r = await client.post(url, content=content, headers=send_headers)
                    if r.status_code != 429:
                        break
                    await asyncio.sleep(min(float(r.headers.get("retry-after", "1") or 1), 30.0))
                try:
                    payload = r.json()
                except ValueError:
                    payload = {"error": {"message": r.text, "type": "server_error"}}
                out = _answer(cid, r.status_code, payload)
            except Exception as e:  # the app answers every request; this is a fault of the batch runner itself
                out = _answer(cid, 500, {"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error"}})
            finally:
                sem.release()
            finish(index, out)

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://dgemma-batch", timeout=None) as client:
            index = 0
            try:
                for lineno, text in input_lines(inp):
                    cid, request, out = parse_line(text, lineno)
                    if cid is not None:
                        if cid in seen:
                            request, out = None, _invalid(cid, "duplicate_custom_id", f"line {lineno}: custom_id "
                                                          f"{cid!r} is already used on line {seen[cid]}")
                        else:
                            seen[cid] = lineno
                    if index < len(done):
                        if done[index].get("custom_id") != cid:
                            raise BatchError(
                                f"{partial} does not answer {inp}: its line {index + 1} is for custom_id "
                                f"{done[index].get('custom_id')!r}, the input's is {cid!r}. It holds an earlier run "
                                "on other input: delete it to start over, or write to another output file")
                        summary.count(done[index], resumed=True)
                    elif stop is not None and stop():
                        complete = False
                        break
                    elif request is None:
                        finish(index, out)
                    else:
                        await sem.acquire()
                        task = asyncio.create_task(one(index, cid, *request))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                    index += 1
                if complete and index < len(done):
                    raise BatchError(f"{partial} holds {len(done)} answers but {inp} has {index} requests: it holds "
                                     "an earlier run on other input; delete it to start over, or write to another "
                                     "output file")
                if tasks:
                    await asyncio.gather(*tasks)
            finally:
                if tasks:  # stopped half way (cancelled, an error): the requests in flight go too
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
    return complete


def run_batch(pipeline, settings: ServerSettings, input_path: str | Path, output_path: str | Path, *,
              progress: Callable[[BatchSummary], None] | None = None) -> BatchSummary:
    """Answer every request of `input_path` into `output_path` (see the module's docstring); returns the counts."""
    from .app import create_app

    inp, out = Path(input_path), Path(output_path)
    if not inp.is_file():
        raise BatchError(f"{inp}: no such file")
    if out.is_dir():
        raise BatchError(f"{out} is a directory; name the output file")
    if not out.parent.is_dir():
        raise BatchError(f"{out.parent}: no such directory")
    partial = out.with_name(out.name + ".partial")
    app = create_app(pipeline, settings)
    # every row of the batch may wait: its requests are bounded here, not by the server's 429
    app.state.dgemma.worker.max_queue = 1 << 30
    summary = BatchSummary()
    inflight = 2 * settings.max_concurrency

    async def main() -> None:
        async with app.router.lifespan_context(app):
            await run_lines(app, inp, partial, summary, inflight, progress)

    t0 = time.perf_counter()
    asyncio.run(main())
    summary.wall_s = time.perf_counter() - t0
    commit_file(partial, out)
    return summary


__all__ = ["run_batch", "run_lines", "parse_line", "input_lines", "read_partial", "BatchSummary", "BatchError",
           "URLS"]
