"""Interactive latency beside a running batch (`dgemma serve --batch-dir`): background rows against the same load
sent as ordinary requests.

    python bench/batch_api.py [--model dgemma/models/code] [--rows 4] [--batch 64] [--probes 8]
                              [--max-tokens 128] [--out bench/results-batch-api.json]

Starts `dgemma serve MODEL --batch-dir TMP --max-concurrency ROWS` and times `--probes` interactive completions,
one after another (a user at a prompt), in three conditions:
- alone: nothing else runs;
- batch: a `--batch`-request batch runs through /v1/batches (background rows, at most ROWS in flight);
- clients: the same requests sent as ordinary concurrent requests, ROWS at a time (what a batch would be without
  background rows: a script looping over the file with a thread pool);
- priority: the same clients, the probes sent with a lower `priority` (the server runs `--scheduling-policy
  priority`): a probe preempts a client's row that has sent no text yet, instead of queueing for a free row.
The table gives the probes' median and worst latency, and what the load got done meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

NAMES = ["add", "mean", "is_prime", "reverse_words", "flatten", "fibonacci", "count_vowels", "merge_sorted"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body(i: int, max_tokens: int) -> dict:
    return {"prompt": f"def {NAMES[i % len(NAMES)]}_{i}(x):\n", "max_tokens": max_tokens, "seed": i}


def probe(http, i: int, max_tokens: int, **extra) -> float:
    t0 = time.perf_counter()
    r = http.post("/v1/completions", json={**body(10_000 + i, max_tokens), **extra})
    r.raise_for_status()
    return time.perf_counter() - t0


def probes(http, n: int, max_tokens: int, **extra) -> list[float]:
    time.sleep(1.0)  # let the load fill the rows first
    return [probe(http, i, max_tokens, **extra) for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    import httpx
    from openai import OpenAI

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="dgemma/models/code")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", default="bench/results-batch-api.json")
    args = ap.parse_args(argv)
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        server = subprocess.Popen([sys.executable, "-m", "dgemma.cli", "serve", args.model, "--port", str(port),
                                   "--max-concurrency", str(args.rows), "--batch-dir", d, "--max-queue", "256",
                                   "--scheduling-policy", "priority",  # every priority 0 but the last condition's
                                   "--log-level", "warning"], env=dict(os.environ))
        try:
            url = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=url, timeout=600) as http:
                deadline = time.time() + 120
                while True:
                    try:
                        if http.get("/health").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if time.time() > deadline or server.poll() is not None:
                        raise SystemExit("the server did not start")
                    time.sleep(0.5)
                client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
                probe(http, -1, args.max_tokens)  # warm-up
                rows = []

                def record(name, lat, done, wall):
                    rows.append({"condition": name, "probe_median_s": round(statistics.median(lat), 3),
                                 "probe_max_s": round(max(lat), 3), "load_requests_done": done,
                                 "load_requests_per_s": round(done / wall, 2) if wall else None})
                    r = rows[-1]
                    print(f"{name:>8}: probes median {r['probe_median_s']:.2f} s, worst {r['probe_max_s']:.2f} s; "
                          f"load {done} requests done ({r['load_requests_per_s']} req/s)", flush=True)

                record("alone", probes(http, args.probes, args.max_tokens), 0, 0)

                text = "".join(json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/completions",
                                           "body": body(i, args.max_tokens)}) + "\n" for i in range(args.batch))
                f = client.files.create(file=("load.jsonl", text.encode()), purpose="batch")
                t0 = time.perf_counter()
                b = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
                lat = probes(http, args.probes, args.max_tokens)
                wall = time.perf_counter() - t0
                done = client.batches.retrieve(b.id).request_counts.completed
                record("batch", lat, done, wall)
                client.batches.cancel(b.id)
                while client.batches.retrieve(b.id).status not in ("cancelled", "completed"):
                    time.sleep(0.2)

                for name, extra in (("clients", {}), ("priority", {"priority": -1})):
                    stop, count = threading.Event(), [0]

                    def loop(k: int) -> None:
                        i = k
                        with httpx.Client(base_url=url, timeout=600) as h:
                            while not stop.is_set():
                                h.post("/v1/completions", json=body(i, args.max_tokens)).raise_for_status()
                                count[0] += 1
                                i += args.rows

                    with ThreadPoolExecutor(args.rows) as pool:
                        t0 = time.perf_counter()
                        futures = [pool.submit(loop, k) for k in range(args.rows)]
                        lat = probes(http, args.probes, args.max_tokens, **extra)
                        wall = time.perf_counter() - t0
                        done = count[0]
                        stop.set()
                        for fut in futures:
                            fut.result()
                    record(name, lat, done, wall)
                metrics = http.get("/metrics").text
                preempted = next((float(line.split()[-1]) for line in metrics.splitlines()
                                  if line.startswith("dgemma_preemptions_total")), 0.0)
                print(f"preemptions: {preempted:.0f}")
        finally:
            server.terminate()
            server.wait(30)
    print("\n| load beside the probes | probe median s | probe worst s | load req/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['condition']} | {r['probe_median_s']:.2f} | {r['probe_max_s']:.2f} | "
              f"{r['load_requests_per_s'] if r['load_requests_per_s'] is not None else '-'} |")
    import platform

    import torch

    Path(args.out).write_text(json.dumps({
        "model": args.model, "rows": args.rows, "batch": args.batch, "probes": args.probes,
        "max_tokens": args.max_tokens, "runs": rows, "preemptions": preempted,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__}}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
