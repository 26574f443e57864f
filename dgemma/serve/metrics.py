"""Prometheus metrics, hand-written in the text exposition format (no prometheus_client dependency).

Counters, histograms and gauges are updated from the event loop and from the engine thread, so every update
takes one lock. Gauges that mirror live state (queue depth, active rows) are read at scrape time.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Callable, Sequence

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
STEPS_PER_CANVAS_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    esc = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, esc)) + "}"


def _num(x: float) -> str:
    return repr(float(x)) if isinstance(x, float) and not float(x).is_integer() else str(int(x))


class Counter:
    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        self.name, self.help, self.labels = name, help, tuple(labels)
        # a counter without labels reads 0 from the start (a labelled one has a series per label value seen)
        self.values: dict[tuple, float] = {} if self.labels else {(): 0}

    def inc(self, *labels: str, by: float = 1) -> None:
        self.values[labels] = self.values.get(labels, 0) + by

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        out += [f"{self.name}{_labels(self.labels, k)} {_num(v)}" for k, v in sorted(self.values.items())]
        return out


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float], labels: Sequence[str] = ()):
        self.name, self.help, self.buckets, self.labels = name, help, tuple(buckets), tuple(labels)
        self.values: dict[tuple, list] = {}  # labels -> [counts per bucket (+Inf last), sum]

    def observe(self, value: float, *labels: str) -> None:
        counts, total = self.values.setdefault(labels, [[0] * (len(self.buckets) + 1), 0.0])
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self.values[labels][1] = total + value

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, (counts, total) in sorted(self.values.items()):
            cum = 0
            for le, c in zip([*map(_num, self.buckets), "+Inf"], counts):
                cum += c
                out.append(f"{self.name}_bucket{_labels((*self.labels, 'le'), (*key, le))} {cum}")
            out.append(f"{self.name}_sum{_labels(self.labels, key)} {_num(total)}")
            out.append(f"{self.name}_count{_labels(self.labels, key)} {cum}")
        return out


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = Counter("dgemma_requests_total", "HTTP requests by endpoint and status code.",
                                ("endpoint", "status"))
        self.latency = Histogram("dgemma_request_latency_seconds", "Time from request to the last byte sent.",
                                 LATENCY_BUCKETS, ("endpoint",))
        self.ttft = Histogram("dgemma_time_to_first_token_seconds", "Time from request to the first text sent "
                              "(streaming requests).", LATENCY_BUCKETS)
        self.queue_wait = Histogram("dgemma_queue_wait_seconds", "Time a row waited for a free engine row.",
                                    LATENCY_BUCKETS)
        self.step_time = Histogram("dgemma_engine_step_seconds", "Wall time of one engine step (all rows).",
                                   STEP_BUCKETS)
        self.steps_per_canvas = Histogram("dgemma_steps_per_canvas", "Denoising steps a canvas took.",
                                          STEPS_PER_CANVAS_BUCKETS)
        self.tokens = Counter("dgemma_generated_tokens_total", "Completion tokens generated, by decoding mode and "
                              "model (the base's name or a LoRA module's).", ("mode", "model"))
        self.prompt_tokens = Counter("dgemma_prompt_tokens_total", "Prompt tokens of the rows admitted.")
        self.cached_tokens = Counter("dgemma_prompt_tokens_cached_total",
                                     "Prompt tokens not encoded: held by the KV cache already (prefix caching) or "
                                     "shared with a row of the same prompt.")
        self.rows = Counter("dgemma_rows_total", "Engine rows (one per choice) by outcome and model.",
                            ("outcome", "model"))
        self.engine_steps = Counter("dgemma_engine_steps_total", "Engine steps run.")
        self.preemptions = Counter("dgemma_preemptions_total", "Running rows (none of their text sent) that gave "
                                   "their engine row to a job ranked before them, to start over later.")
        self.rejected = Counter("dgemma_rejected_total", "Requests turned away before running, by reason.",
                                ("reason",))
        self.gauges: list[tuple[str, str, Callable[[], float]]] = []
        self._peak_rss = 0

    def gauge(self, name: str, help: str, fn: Callable[[], float]) -> None:
        self.gauges.append((name, help, fn))

    # ------------------------------------------------------------ updates (any thread)
    def count_request(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests.inc(endpoint, str(status))
            self.latency.observe(seconds, endpoint)

    def observe(self, hist: Histogram, value: float) -> None:
        with self.lock:
            hist.observe(value)

    def inc(self, counter: Counter, *labels: str, by: float = 1) -> None:
        with self.lock:
            counter.inc(*labels, by=by)

    # ------------------------------------------------------------ exposition
    def rss(self) -> tuple[int, int]:
        """(current, peak) resident set size in bytes, from /proc (0 where unavailable)."""
        cur = peak = 0
        try:
            with open(f"/proc/{os.getpid()}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        cur = int(line.split()[1]) * 1024
                    elif line.startswith("VmHWM:"):
                        peak = int(line.split()[1]) * 1024
        except OSError:
            pass
        self._peak_rss = max(self._peak_rss, peak, cur)
        return cur, self._peak_rss

    def render(self) -> str:
        with self.lock:
            lines: list[str] = []
            for m in (self.requests, self.latency, self.ttft, self.queue_wait, self.step_time,
                      self.steps_per_canvas, self.tokens, self.prompt_tokens, self.cached_tokens, self.rows,
                      self.engine_steps, self.preemptions, self.rejected):
                lines += m.render()
        for name, help, fn in self.gauges:
            lines += [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {_num(fn())}"]
        cur, peak = self.rss()
        lines += ["# HELP process_resident_memory_bytes Resident memory size in bytes.",
                  "# TYPE process_resident_memory_bytes gauge", f"process_resident_memory_bytes {cur}",
                  "# HELP dgemma_peak_resident_memory_bytes Peak resident memory size in bytes (VmHWM).",
                  "# TYPE dgemma_peak_resident_memory_bytes gauge", f"dgemma_peak_resident_memory_bytes {peak}"]
        return "\n".join(lines) + "\n"
