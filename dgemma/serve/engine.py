"""The batching worker: one thread owns the `Engine` and steps it; the event loop only submits and cancels.

    event loop (FastAPI)                         worker thread
    --------------------                         -------------
    submit(jobs)  -> waiting deque  ---lock--->  admit waiting jobs while the engine has free rows
    cancel(jobs)  -> cancel list    ---lock--->  drop them from the deque or `Engine.cancel` their rows
                                                 events = engine.step()   (one forward of each kind, all rows)
    job.sink(...) <- call_soon_threadsafe <----  route each Draft / Commit / Done to its job

Requests join and leave the batch between steps; each row keeps its own seed and options (the engine is
batch-invariant). Memory is bounded: at most `max_rows` rows in the engine and `max_queue` rows waiting;
`submit` refuses anything beyond that (the app answers 429 with Retry-After). Every job ends with exactly one
terminal event: the engine's `Done`, `Failed` (engine error, shutdown) or `Cancelled`, so nothing waits forever.

An engine step that raises fails the rows that had already sent text (a Commit): their clients have part of an
answer. The others start again, one at a time and alone in the engine, so the row that makes the engine fail
fails alone and the rows batched with it by chance finish as if nothing had happened (the same seed gives the
same tokens). Nothing else is admitted meanwhile; each row is retried once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..generate import Commit, Done, Draft, Engine, GenerationError, GenerationParams
from .metrics import Metrics

log = logging.getLogger("dgemma.serve")


@dataclass
class Failed:
    """The job could not finish: `status` 500 for an engine fault, 503 when the server shuts down."""

    status: int
    message: str


@dataclass
class Cancelled:
    pass


class QueueFull(Exception):
    """No room: the engine rows and the waiting queue are all taken."""


class Unavailable(Exception):
    """The worker is not running (shutting down, or it died)."""


@dataclass(eq=False)
class Job:
    """One engine row: a prompt, its params and where its events go.

    `sink(job, events)` is called from the worker thread with the job's events of one engine step (Draft events
    only when `drafts` is set); the app makes it hand them to the event loop."""

    prompt: list[int]
    params: GenerationParams
    sink: Callable[["Job", list], None]
    drafts: bool = False
    tag: Any = None
    model: str = ""  # the model name the request asked for (the base's or a LoRA module's): a metrics label
    rid: int | None = None
    state: str = "new"  # new -> waiting -> running -> done (or cancelled / failed)
    priority: int = 0  # with priority scheduling: waiting jobs of lower value are admitted first
    background: bool = False  # a Batch API request: admitted only when no other job waits
    commits: int = 0  # Commit events sent: text the client has (a row with none can start again unseen)
    retried: bool = False  # started again, alone, after an engine fault
    preempted: int = 0  # times its row was given to a job ranked before it (it had sent no text)
    t_submit: float = field(default_factory=time.perf_counter)

    @property
    def finished(self) -> bool:
        return self.state in ("done", "cancelled", "failed")


class Worker:
    def __init__(self, engine: Engine, *, max_queue: int, metrics: Metrics | None = None,
                 priority: bool = False):
        self.engine = engine
        # vLLM's scheduling policies: "fcfs" admits waiting jobs in arrival order; priority=True (--scheduling-policy
        # priority) admits the lowest `Job.priority` first, arrival order among equals. When no row is free, a
        # waiting job preempts a running one that would be admitted after it (a lower priority, or a batch's row
        # for a client's), if that one has sent no text yet: its row is freed and it waits again, to start over
        # with the same seed (as vLLM recomputes a preempted request). Rows that have sent text always finish.
        self.priority = priority
        self.max_rows = len(engine.free) + len(engine.rows)
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._suspects: deque[Job] = deque()  # rows of a failed step, to run again one at a time, alone
        self._alone: Job | None = None  # the suspect running now
        self._cancels: list[Job] = []
        self._calls: list[tuple[Callable[[], Any], Future]] = []  # run on the worker thread between two steps
        self._running: dict[int, Job] = {}  # engine request id -> job (worker thread only)
        self._active = 0  # len(_running), readable under the lock
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.error: str | None = None  # set if the thread died

    # ------------------------------------------------------------ event-loop side
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dgemma-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop

    def check(self, prompt: Sequence[int], params: GenerationParams) -> None:
        """Raise GenerationError if the engine could never run this row (read-only, safe from any thread)."""
        self.engine.check(prompt, params)

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue all of `jobs` or none: QueueFull when engine rows plus queue would overflow."""
        with self._cond:
            if not self.alive:
                raise Unavailable("the engine is not running")
            if self._active + len(self._waiting) + len(self._suspects) + len(jobs) > self.max_rows + self.max_queue:
                raise QueueFull(f"{self._active} rows running and {len(self._waiting)} waiting (limits: "
                                f"{self.max_rows} rows, {self.max_queue} waiting)")
            for job in jobs:
                job.state, job.t_submit = "waiting", time.perf_counter()
                self._waiting.append(job)
            self._cond.notify_all()

    def cancel(self, jobs: Sequence[Job]) -> None:
        """Ask the worker to drop these jobs (a client went away). Finished jobs are ignored."""
        with self._cond:
            todo = [j for j in jobs if not j.finished and j.state != "new"]
            if todo:
                self._cancels.extend(todo)
                self._cond.notify_all()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the worker thread between two engine steps (changing the model under a running engine,
        e.g. adding a LoRA adapter); the future holds its result or its exception."""
        fut: Future = Future()
        with self._cond:
            if not self.alive:
                raise Unavailable("the engine is not running")
            self._calls.append((fn, fut))
            self._cond.notify_all()
        return fut

    def uses(self, pred: Callable[[Any], bool]) -> int:
        """Rows running or waiting whose params match `pred` (from a `call`, where nothing moves meanwhile)."""
        return sum(pred(j.params) for j in list(self._waiting) + list(self._suspects) + list(self._running.values()))

    def load(self) -> tuple[int, int]:
        """(rows running, rows waiting)."""
        with self._cond:
            return self._active, len(self._waiting) + len(self._suspects)

    # ------------------------------------------------------------ worker thread
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._stop or self._waiting or self._suspects or self._cancels or self._running
                               or self._calls):
                        self._cond.wait()
                    if self._stop:
                        break
                    # between two steps, before this pass admits anything (quick calls: under the lock)
                    calls, self._calls = self._calls, []
                    for fn, fut in calls:
                        try:
                            fut.set_result(fn())
                        except Exception as e:  # the caller's to handle
                            fut.set_exception(e)
                    # A job may be cancelled twice (disconnect watcher and handler cleanup): once is enough.
                    cancels, self._cancels = list(dict.fromkeys(self._cancels)), []
                    for job in cancels:
                        if job.state == "waiting":
                            (self._suspects if job in self._suspects else self._waiting).remove(job)
                    admitted, preempted = [], []
                    # Cancelled rows free their slots below, before the admitted rows take theirs.
                    stopping = sum(j.state == "running" for j in cancels)
                    room = len(self.engine.free) + stopping
                    if self._alone is not None and self._alone.finished:
                        self._alone = None
                    if self._suspects or self._alone is not None:  # after an engine fault: one row at a time
                        if self._alone is None and len(self._running) == stopping:
                            self._alone = self._suspects.popleft()
                            admitted.append(self._alone)
                    else:
                        while self._waiting and len(admitted) < room:
                            admitted.append(self._next())
                        preempted = self._preempt(set(cancels), admitted)
                    self._active = len(self._running) + len(admitted)
                for job in cancels:
                    if job.state == "running":
                        self.engine.cancel(job.rid)
                        self._running.pop(job.rid, None)
                    if job.state in ("waiting", "running"):
                        self._finish(job, "cancelled", Cancelled())
                for job in preempted:  # back to waiting (already queued again, under the lock)
                    self.engine.cancel(job.rid)
                    self._running.pop(job.rid, None)
                    job.rid = None
                    self.metrics.inc(self.metrics.preemptions)
                for job in admitted:
                    self._admit(job)
                with self._cond:
                    self._active = len(self._running)
                if self._running:
                    self._step()
                    with self._cond:
                        self._active = len(self._running)
        except BaseException as e:  # the thread must never die silently: fail everything it holds
            log.exception("engine worker died")
            self.error = f"{type(e).__name__}: {e}"
        finally:
            with self._cond:
                self._stop = True
                left = list(self._waiting) + list(self._suspects) + list(self._running.values())
                self._waiting.clear()
                self._suspects.clear()
                self._active = 0
                calls, self._calls = self._calls, []
            for _, fut in calls:
                fut.set_exception(Unavailable("the engine stopped"))
            for job in left:
                if job.rid is not None:
                    self.engine.cancel(job.rid)
                self._finish(job, "failed", Failed(503, "the server is shutting down"
                                                   if self.error is None else "the engine stopped"))
            self._running.clear()

    def _next(self) -> Job:
        """The waiting job to admit next (under the lock): the first, or with priority scheduling the first of
        the lowest priority; a background job (a batch's) only when no other waits."""
        if not self.priority and not self._waiting[0].background:
            return self._waiting.popleft()
        best = min(range(len(self._waiting)), key=lambda i: (self._waiting[i].background,
                                                             self._waiting[i].priority if self.priority else 0, i))
        job = self._waiting[best]
        del self._waiting[best]
        return job

    @staticmethod
    def _rank(job: Job, priority: bool) -> tuple:
        """Admission order: a client's rows before a batch's, then (priority scheduling) the lower priority."""
        return job.background, job.priority if priority else 0

    def _preempt(self, cancels: set, admitted: list[Job]) -> list[Job]:
        """(Under the lock.) While jobs wait and no row is free, the running job that would be admitted last, if
        it has sent no text and ranks after the job next in line, gives its row to that job: it is queued again
        (in front of its equals) and returned, for the worker to free its engine row."""
        out = []
        while self._waiting:
            nxt = min(self._waiting, key=lambda j: self._rank(j, self.priority))
            pool = [j for j in self._running.values() if j.state == "running" and not j.commits
                    and j not in cancels and j is not self._alone]
            if not pool:
                break
            victim = max(pool, key=lambda j: (self._rank(j, self.priority), j.t_submit))
            if not self._rank(nxt, self.priority) < self._rank(victim, self.priority):
                break
            admitted.append(self._next())
            victim.state, victim.preempted = "waiting", victim.preempted + 1
            self._waiting.appendleft(victim)
            out.append(victim)
            cancels.add(victim)  # not a victim twice in one pass
        return out

    def _admit(self, job: Job) -> None:
        try:
            job.rid = self.engine.add(job.prompt, job.params)
        except GenerationError as e:  # checked at submit, so only a race with the context limit lands here
            self._finish(job, "failed", Failed(400, str(e)))
            return
        job.state = "running"
        self._running[job.rid] = job
        if not job.retried and not job.preempted:
            self.metrics.observe(self.metrics.queue_wait, time.perf_counter() - job.t_submit)
            self.metrics.inc(self.metrics.prompt_tokens, by=len(job.prompt))

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            events = self.engine.step()
        except Exception as e:  # an engine fault fails the rows it was running, never the server
            log.exception("engine step failed with %d rows", len(self._running))
            several, again = len(self._running) > 1, []
            for rid, job in list(self._running.items()):
                self.engine.cancel(rid)
                if several and not job.commits and not job.retried:
                    job.retried, job.rid, job.state = True, None, "waiting"
                    again.append(job)
                else:
                    self._finish(job, "failed", Failed(500, f"generation failed: {type(e).__name__}: {e}"))
            self._running.clear()
            if again:
                log.warning("running %d rows of the failed step again, one at a time", len(again))
                with self._cond:
                    self._suspects.extend(again)
            return
        self.steps += 1
        self.metrics.observe(self.metrics.step_time, time.perf_counter() - t0)
        self.metrics.inc(self.metrics.engine_steps)
        per_job: dict[int, list] = {}
        for ev in events:
            job = self._running.get(ev.request)
            if job is None or (isinstance(ev, Draft) and not job.drafts):
                continue
            per_job.setdefault(ev.request, []).append(ev)
        for rid, evs in per_job.items():
            job = self._running[rid]
            if isinstance(evs[-1], Done):
                del self._running[rid]
                self._record(evs[-1], job)
                job.state = "done"
            self._emit(job, evs)

    def _record(self, done: Done, job: Job) -> None:
        m = self.metrics
        with m.lock:
            m.tokens.inc(done.stats["mode"], job.model, by=done.stats["completion_tokens"])
            m.cached_tokens.inc(by=done.stats["cached_prompt_tokens"])
            m.rows.inc("done", job.model)
            for s in done.stats["steps_per_canvas"]:
                m.steps_per_canvas.observe(s)

    def _finish(self, job: Job, state: str, event) -> None:
        job.state = state
        self.metrics.inc(self.metrics.rows, state, job.model)
        self._emit(job, [event])

    def _emit(self, job: Job, events: list) -> None:
        job.commits += sum(isinstance(ev, Commit) for ev in events)
        try:
            job.sink(job, events)
        except Exception:  # a sink must not take the engine down (e.g. its event loop has closed)
            log.debug("dropping events for a job whose sink failed", exc_info=True)


__all__ = ["Worker", "Job", "Failed", "Cancelled", "QueueFull", "Unavailable", "Commit", "Done", "Draft"]
