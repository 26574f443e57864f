"""OpenAI's Files and Batches APIs on the running server (`dgemma serve --batch-dir DIR`).

    POST   /v1/files                  upload a JSONL file (multipart: file, purpose=batch)
    GET    /v1/files[/{id}]           list / one File object;  GET /v1/files/{id}/content: its bytes
    DELETE /v1/files/{id}
    POST   /v1/batches                {input_file_id, endpoint, completion_window: "24h", metadata}
    GET    /v1/batches[/{id}]         list (limit, after) / one Batch object
    POST   /v1/batches/{id}/cancel

A batch runs in the server's own event loop: its lines go through the same app as any client's request (in
process, `batch.run_lines`), as background rows: the engine admits a waiting client's row before a batch's, and
the server's batches together have at most `inflight` requests in flight (create_app leaves a quarter of the rows
to live traffic), so a client finds a free row and batches fill the rest. Its life follows OpenAI's:
validating (every line a POST to the batch's endpoint with a unique custom_id, else `failed` with the lines'
errors) -> in_progress -> finalizing -> completed; or cancelling -> cancelled, or expired after its 24 h window,
both with the answers so far. The output file holds the 2xx answers, the error file the others, each line as
`dgemma run-batch` writes it.

Everything lives under DIR (files/, batches/), written atomically: a batch interrupted by a restart or a kill
resumes where its answers stop when the server starts again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..io import atomic_path, atomic_write_text
from .batch import URLS, BatchError, BatchSummary, input_lines, parse_line, read_partial, run_lines
from .errors import APIError, invalid

log = logging.getLogger("dgemma.serve")

ENDPOINTS = tuple(u for u in URLS if u.startswith("/v1/"))  # what a batch may run (OpenAI's, and Messages)
MAX_REQUESTS = 50_000  # per batch, as OpenAI
MAX_ERRORS = 100  # validation errors reported per batch
WINDOW_S = 24 * 3600
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
INTERNAL_HEADER = "x-dgemma-batch"


def _now() -> int:
    return int(time.time())


@dataclass
class _Running:
    task: asyncio.Task
    summary: BatchSummary
    cancelling: bool = False


class BatchStore:
    """The files and batches of one server, on disk under `root`, and the tasks running its batches."""

    def __init__(self, root: Path, app, *, api_key: str | None, inflight: int, max_file_bytes: int):
        self.root = Path(root)
        self.files_dir, self.batches_dir = self.root / "files", self.root / "batches"
        self.app = app
        self.max_file_bytes = max_file_bytes
        self.token = secrets.token_hex(16)  # marks the requests a batch sends (background rows)
        self.headers = {INTERNAL_HEADER: self.token}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"
        self.inflight = inflight
        self.sem: asyncio.Semaphore | None = None
        self.running: dict[str, _Running] = {}
        self.lock = asyncio.Lock()

    # ------------------------------------------------------------ life
    def start(self) -> None:
        """On the event loop, at server start: create the folders and resume the batches a stop interrupted."""
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.batches_dir.mkdir(parents=True, exist_ok=True)
        self.sem = asyncio.Semaphore(self.inflight)
        for path in sorted(self.batches_dir.glob("batch_*.json")):
            b = self._read_json(path)
            if b is not None and b.get("status") in ACTIVE:
                log.info("resuming batch %s (%s)", b["id"], b["status"])
                self._launch(b)

    async def stop(self) -> None:
        """At shutdown: stop the running batches where they are (they resume at the next start)."""
        tasks = [r.task for r in self.running.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def is_internal(self, headers) -> bool:
        return secrets.compare_digest(headers.get(INTERNAL_HEADER, ""), self.token)

    # ------------------------------------------------------------ files
    def _file_meta(self, fid: str) -> Path:
        return self.files_dir / f"{fid}.json"

    def file_path(self, fid: str) -> Path:
        return self.files_dir / f"{fid}.jsonl"

    @staticmethod
    def _read_json(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def get_file(self, fid: str) -> dict:
        meta = self._read_json(self._file_meta(fid)) if _safe_id(fid, "file-") else None
        if meta is None:
            raise APIError(404, f"No such File object: {fid}", param="file_id", code="file_not_found")
        return meta

    async def create_file(self, upload, purpose: str | None) -> dict:
        if purpose != "batch":
            raise invalid(f"purpose must be 'batch' (the only use of files here), got {purpose!r}", "purpose")
        if upload is None or not hasattr(upload, "read"):
            raise invalid("send the file as the multipart field 'file'", "file")
        fid = f"file-{uuid.uuid4().hex[:24]}"
        size = 0
        with atomic_path(self.file_path(fid)) as tmp:
            with open(tmp, "wb") as f:
                while chunk := await upload.read(1 << 20):
                    size += len(chunk)
                    if size > self.max_file_bytes:
                        raise APIError(413, f"the file exceeds the limit of {self.max_file_bytes} bytes",
                                       param="file", code="file_too_large")
                    f.write(chunk)
        return self._register(fid, upload.filename or "upload.jsonl", "batch", size)

    def _register(self, fid: str, filename: str, purpose: str, size: int) -> dict:
        meta = {"id": fid, "object": "file", "bytes": size, "created_at": _now(), "filename": filename,
                "purpose": purpose, "status": "processed", "expires_at": None, "status_details": None}
        atomic_write_text(self._file_meta(fid), json.dumps(meta))
        return meta

    def list_files(self, purpose: str | None = None) -> list[dict]:
        metas = [m for p in self.files_dir.glob("file-*.json") if (m := self._read_json(p)) is not None]
        metas = [m for m in metas if purpose is None or m.get("purpose") == purpose]
        return sorted(metas, key=lambda m: (m["created_at"], m["id"]), reverse=True)

    def delete_file(self, fid: str) -> dict:
        self.get_file(fid)
        users = [b["id"] for b in self._batches() if b.get("input_file_id") == fid and b.get("status") in ACTIVE]
        if users:
            raise APIError(409, f"{fid} is the input of batch {users[0]}, which is still running; cancel it first",
                           param="file_id", code="file_in_use")
        for p in (self.file_path(fid), self._file_meta(fid)):
            p.unlink(missing_ok=True)
        return {"id": fid, "object": "file", "deleted": True}

    # ------------------------------------------------------------ batches
    def _batch_path(self, bid: str) -> Path:
        return self.batches_dir / f"{bid}.json"

    def _partial(self, bid: str) -> Path:
        return self.batches_dir / f"{bid}.partial.jsonl"

    def _batches(self) -> list[dict]:
        return [b for p in self.batches_dir.glob("batch_*.json") if (b := self._read_json(p)) is not None]

    def _save(self, b: dict) -> None:
        atomic_write_text(self._batch_path(b["id"]), json.dumps(b))

    def get_batch(self, bid: str) -> dict:
        b = self._read_json(self._batch_path(bid)) if _safe_id(bid, "batch_") else None
        if b is None:
            raise APIError(404, f"No such Batch object: {bid}", param="batch_id", code="batch_not_found")
        return self._live(b)

    def _live(self, b: dict) -> dict:
        """A saved batch with the counts of its run so far (they are saved only now and then)."""
        run = self.running.get(b["id"])
        if run is not None and b["status"] in ("in_progress", "cancelling"):
            b["request_counts"] = _counts(run.summary, b["request_counts"]["total"])
        return b

    def list_batches(self) -> list[dict]:
        return sorted(map(self._live, self._batches()), key=lambda b: (b["created_at"], b["id"]), reverse=True)

    def create_batch(self, body: dict) -> dict:
        fid, endpoint = body["input_file_id"], body["endpoint"]
        if endpoint not in ENDPOINTS:
            raise invalid(f"endpoint must be one of {', '.join(ENDPOINTS)}; got {endpoint!r}", "endpoint")
        if body["completion_window"] != "24h":
            raise invalid(f"completion_window must be '24h', got {body['completion_window']!r}", "completion_window")
        meta = self.get_file(fid)
        if meta.get("purpose") != "batch":
            raise invalid(f"{fid} has purpose {meta.get('purpose')!r}; a batch's input needs purpose 'batch'",
                          "input_file_id")
        now = _now()
        b = {"id": f"batch_{uuid.uuid4().hex[:24]}", "object": "batch", "endpoint": endpoint, "errors": None,
             "input_file_id": fid, "completion_window": "24h", "status": "validating", "output_file_id": None,
             "error_file_id": None, "created_at": now, "in_progress_at": None, "expires_at": now + WINDOW_S,
             "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
             "cancelling_at": None, "cancelled_at": None, "request_counts": {"total": 0, "completed": 0, "failed": 0},
             "metadata": body.get("metadata"), "usage": _usage([])}
        self._save(b)
        self._launch(b)
        return b

    def cancel_batch(self, bid: str) -> dict:
        b = self.get_batch(bid)
        if b["status"] in ("cancelling", "cancelled"):
            return b
        if b["status"] not in ("validating", "in_progress"):
            raise APIError(409, f"batch {bid} is {b['status']}; only a validating or in-progress batch can be "
                                "cancelled", param="batch_id", code="batch_not_cancellable")
        b["status"], b["cancelling_at"] = "cancelling", _now()
        self._save(b)
        if bid in self.running:
            self.running[bid].cancelling = True
        return b

    def _launch(self, b: dict) -> None:
        summary = BatchSummary()
        task = asyncio.get_running_loop().create_task(self._run(b["id"], summary), name=f"dgemma-{b['id']}")
        self.running[b["id"]] = _Running(task, summary)
        task.add_done_callback(lambda t, bid=b["id"]: self._ended(bid, t))

    def _ended(self, bid: str, task: asyncio.Task) -> None:
        self.running.pop(bid, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("batch %s stopped", bid, exc_info=task.exception())

    async def _run(self, bid: str, summary: BatchSummary) -> None:
        b = self.get_batch(bid)
        inp = self.file_path(b["input_file_id"])
        try:
            if b["status"] == "validating":
                errors, total = await asyncio.to_thread(_validate, inp, b["endpoint"])
                b = self.get_batch(bid)  # a cancel may have come meanwhile
                if b["status"] == "cancelling":
                    return self._finish(b, "cancelled", summary)
                if errors:
                    b.update(status="failed", failed_at=_now(),
                             errors={"object": "list", "data": errors[:MAX_ERRORS]})
                    b["request_counts"]["total"] = total
                    return self._save(b)
                b.update(status="in_progress", in_progress_at=_now())
                b["request_counts"]["total"] = total
                self._save(b)
            if b["status"] in ("in_progress", "cancelling"):
                last, total, run = [time.monotonic()], b["request_counts"]["total"], self.running[bid]

                def stop() -> bool:
                    if time.monotonic() - last[0] > 2:  # the counts so far, on disk now and then
                        last[0] = time.monotonic()
                        cur = self._read_json(self._batch_path(bid))
                        if cur is not None and cur["status"] == "in_progress":
                            cur["request_counts"] = _counts(summary, total)
                            self._save(cur)
                    return run.cancelling or time.time() >= b["expires_at"]

                if b["status"] == "cancelling" or stop():
                    complete = False
                else:
                    complete = await run_lines(self.app, inp, self._partial(bid), summary, self.inflight,
                                               headers=self.headers, stop=stop, sem=self.sem)
                b = self.get_batch(bid)
                if not complete:
                    expired = time.time() >= b["expires_at"] and b["status"] != "cancelling"
                    return self._finish(b, "expired" if expired else "cancelled", summary)
                b.update(status="finalizing", finalizing_at=_now())
                self._save(b)
            if b["status"] == "finalizing":
                self._finish(b, "completed", summary)
        except asyncio.CancelledError:  # the server stops: the batch resumes at the next start
            raise
        except Exception as e:  # a fault of ours (disk full, a file removed under us): the batch fails, visibly
            log.exception("batch %s failed", bid)
            b = self._read_json(self._batch_path(bid)) or b
            b.update(status="failed", failed_at=_now(), errors={"object": "list", "data": [
                {"code": "server_error", "message": f"{type(e).__name__}: {e}", "param": None, "line": None}]})
            self._save(b)

    def _finish(self, b: dict, status: str, summary: BatchSummary) -> None:
        """Split the answers into the output file (2xx) and the error file (the rest), register them, and close
        the batch with `status`."""
        partial = self._partial(b["id"])
        answers = read_partial(partial)
        good = [bool(a.get("response")) and 200 <= a["response"].get("status_code", 0) < 300 for a in answers]
        ok = [a for a, g in zip(answers, good) if g]
        bad = [a for a, g in zip(answers, good) if not g]
        for key, rows, name in (("output_file_id", ok, "output"), ("error_file_id", bad, "errors")):
            if rows and b.get(key) is None:
                fid = f"file-{uuid.uuid4().hex[:24]}"
                text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                atomic_write_text(self.file_path(fid), text)
                self._register(fid, f"{b['id']}_{name}.jsonl", "batch_output", len(text.encode()))
                b[key] = fid
        b["request_counts"] = {"total": b["request_counts"]["total"], "completed": len(ok), "failed": len(bad)}
        b["usage"] = _usage(answers)
        b["status"] = status
        b[{"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}[status]] = _now()
        self._save(b)
        partial.unlink(missing_ok=True)


def _counts(summary: BatchSummary, total: int) -> dict:
    return {"total": total, "completed": summary.ok, "failed": summary.failed + summary.invalid}


def _usage(answers: list[dict]) -> dict:
    """OpenAI's batch usage: the tokens of every answer, whichever API's usage shape it has."""
    n = {"in": 0, "out": 0, "cached": 0, "reasoning": 0}
    for a in answers:
        u = ((a.get("response") or {}).get("body") or {}).get("usage")
        if not isinstance(u, dict):
            continue
        n["in"] += int(u.get("prompt_tokens", u.get("input_tokens", 0)) or 0)
        n["out"] += int(u.get("completion_tokens", u.get("output_tokens", 0)) or 0)
        details = u.get("prompt_tokens_details") or u.get("input_tokens_details") or {}
        n["cached"] += int(details.get("cached_tokens", u.get("cache_read_input_tokens", 0)) or 0)
        details = u.get("completion_tokens_details") or u.get("output_tokens_details") or {}
        n["reasoning"] += int(details.get("reasoning_tokens", 0) or 0)
    return {"input_tokens": n["in"], "input_tokens_details": {"cached_tokens": n["cached"]},
            "output_tokens": n["out"], "output_tokens_details": {"reasoning_tokens": n["reasoning"]},
            "total_tokens": n["in"] + n["out"]}


def _safe_id(value: str, prefix: str) -> bool:
    """An id of ours (no path tricks: it names a file under the store)."""
    rest = value[len(prefix):] if value.startswith(prefix) else ""
    return bool(rest) and rest.isalnum()


def _validate(path: Path, endpoint: str) -> tuple[list[dict], int]:
    """OpenAI's checks of a batch's input, every line: (errors with their line numbers, requests)."""
    errors: list[dict] = []
    seen: set[str] = set()
    total = 0
    try:
        lines = list(input_lines(path))
    except BatchError as e:
        return [{"code": "invalid_file", "message": str(e), "param": None, "line": None}], 0
    for lineno, text in lines:
        total += 1
        cid, request, out = parse_line(text, lineno)
        message = out["error"]["message"] if out is not None else None
        if request is not None and request[0] != endpoint:
            message = f"line {lineno}: url {request[0]!r} is not this batch's endpoint {endpoint!r}"
        elif cid is not None and cid in seen:
            message = f"line {lineno}: custom_id {cid!r} is used twice"
        if cid is not None:
            seen.add(cid)
        if message is not None:
            errors.append({"code": "invalid_request" if out is None else out["error"]["code"], "message": message,
                           "param": None, "line": lineno})
    if total == 0:
        errors.append({"code": "empty_file", "message": "the input file holds no requests", "param": None,
                       "line": None})
    elif total > MAX_REQUESTS:
        errors.append({"code": "too_many_requests", "message": f"{total} requests; a batch takes at most "
                       f"{MAX_REQUESTS}", "param": None, "line": None})
    return errors, total


__all__ = ["BatchStore", "ENDPOINTS", "INTERNAL_HEADER", "MAX_REQUESTS"]
