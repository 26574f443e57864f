"""Load test for `dgemma serve`: N concurrent streaming clients for a fixed time, at N = 1, 4, 16, 64.

    python bench/load_test.py                          # starts a server on a random `tiny` model, then measures
    python bench/load_test.py --model small --duration 20
    python bench/load_test.py --model path/to/checkpoint --max-concurrency 8
    python bench/load_test.py --url http://127.0.0.1:8000 --api-key KEY    # a server that is already running

Each client sends streaming requests back to back (`stream: true`, usage in the last chunk, `ignore_eos` so every
request produces exactly `--max-tokens` tokens) until the time is up; requests still in flight then finish and
count. Reported per N: completed requests, output tokens/s and requests/s over the whole window (wall clock, not
per-canvas decode speed), end-to-end latency and time to first text (p50/p99), the server's mean steps per canvas,
its peak RSS, rejected requests (429, deliberate when --max-queue is small: the client waits Retry-After and
retries) and errors (anything else; should be 0). Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


# ---------------------------------------------------------------- a random checkpoint to serve
def random_checkpoint(preset_name: str, out: Path, steps: int) -> Path:
    from dgemma.config import preset
    from dgemma.tokenizer import byte_level
    from dgemma.weights import init_random, save_model

    cfg = preset(preset_name)
    model = init_random(cfg, seed=0)
    gen = {"max_denoising_steps": steps, "max_new_tokens": 256, "eos_token_id": [1, 106, 50]}
    return save_model(model, out, generation_config=gen, tokenizer=byte_level(cfg.vocab_size))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "dgemma.cli", "serve", str(ckpt), "--port", str(port), "--log-level", "warning",
           "--max-concurrency", str(args.max_concurrency), "--max-queue", str(args.max_queue),
           "--model-name", "bench"] + ([f"--adaptive-steps={args.adaptive_steps}"] if args.adaptive_steps else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().strip()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start within 120 s")


# ---------------------------------------------------------------- one load level
def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


async def one_request(client: httpx.AsyncClient, body: dict, rec: dict) -> None:
    t0 = time.perf_counter()
    ttft, usage = None, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code == 429:
            rec["rejected"] += 1
            await r.aread()
            await asyncio.sleep(float(r.headers.get("retry-after", "1")))
            return
        if r.status_code != 200:
            rec["errors"].append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                rec["errors"].append(f"stream error: {chunk['error'].get('message')}")
                return
            if ttft is None and any(c.get("text") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - t0
            usage = chunk.get("usage") or usage
    if usage is None:
        rec["errors"].append("stream ended without usage")
        return
    rec["latency"].append(time.perf_counter() - t0)
    rec["ttft"].append(ttft if ttft is not None else time.perf_counter() - t0)
    rec["tokens"] += usage["completion_tokens"]
    rec["completed"] += 1
    if usage.get("steps_per_canvas") is not None:
        rec["steps_per_canvas"].append(usage["steps_per_canvas"])


async def run_level(url: str, n: int, duration: float, body: dict, headers: dict) -> dict:
    rec = {"completed": 0, "tokens": 0, "rejected": 0, "errors": [], "latency": [], "ttft": [],
           "steps_per_canvas": []}
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(600, connect=10)) as client:
        t0 = time.perf_counter()
        deadline = t0 + duration

        async def worker(i: int) -> None:
            k = 0
            while time.perf_counter() < deadline:
                try:
                    await one_request(client, {**body, "seed": i * 100_000 + k}, rec)
                except (httpx.HTTPError, json.JSONDecodeError) as e:
                    rec["errors"].append(f"{type(e).__name__}: {e}")
                k += 1

        await asyncio.gather(*(worker(i) for i in range(n)))
        elapsed = time.perf_counter() - t0
    return {
        "clients": n, "elapsed_s": round(elapsed, 2), "completed": rec["completed"],
        "output_tokens": rec["tokens"], "tokens_per_s": round(rec["tokens"] / elapsed, 1),
        "requests_per_s": round(rec["completed"] / elapsed, 3),
        "latency_p50_s": _r(pct(rec["latency"], 50)), "latency_p99_s": _r(pct(rec["latency"], 99)),
        "ttft_p50_s": _r(pct(rec["ttft"], 50)), "ttft_p99_s": _r(pct(rec["ttft"], 99)),
        "steps_per_canvas": _r(statistics.fmean(rec["steps_per_canvas"])) if rec["steps_per_canvas"] else None,
        "rejected_429": rec["rejected"], "errors": len(rec["errors"]), "error_samples": rec["errors"][:5],
    }


def _r(x):
    return None if x is None else round(x, 3)


def server_memory(url: str, headers: dict, proc: subprocess.Popen | None) -> dict:
    """Peak and current RSS of the server: from /proc when we started it, else from its /metrics."""
    out = {}
    if proc is not None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith(("VmHWM:", "VmRSS:")):
                    out["peak_rss_mib" if line.startswith("VmHWM") else "rss_mib"] = int(line.split()[1]) / 1024
        except OSError:
            pass
    if not out:
        try:
            text = httpx.get(url + "/metrics", headers=headers, timeout=5).text
            for line in text.splitlines():
                if line.startswith("dgemma_peak_resident_memory_bytes "):
                    out["peak_rss_mib"] = float(line.split()[1]) / 2**20
                elif line.startswith("process_resident_memory_bytes "):
                    out["rss_mib"] = float(line.split()[1]) / 2**20
        except httpx.HTTPError:
            pass
    return {k: round(v, 1) for k, v in out.items()}


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (default: start one)")
    p.add_argument("--api-key", default=os.environ.get("DGEMMA_API_KEY"))
    p.add_argument("--model", default="tiny", help="when starting a server: a preset for a random model (tiny, "
                   "small) or a checkpoint directory (default tiny)")
    p.add_argument("--levels", default="1,4,16,64", help="numbers of concurrent clients (default 1,4,16,64)")
    p.add_argument("--duration", type=float, default=10, help="seconds of load per level (default 10)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (forced with ignore_eos)")
    p.add_argument("--steps", type=int, default=8, help="denoising steps per canvas (random models never stop "
                   "early, so this fixes the work per canvas); 0: not sent, the model's own (which a server's "
                   "--adaptive-steps may shorten)")
    p.add_argument("--adaptive-steps", metavar="ROWS[:MIN_STEPS]", help="start the server with this load-adaptive "
                   "step budget (with --steps 0)")
    p.add_argument("--ar", action="store_true", help="autoregressive decoding instead of diffusion")
    p.add_argument("--max-concurrency", type=int, default=8, help="engine rows of the started server")
    p.add_argument("--max-queue", type=int, default=64, help="queue of the started server")
    p.add_argument("--out", default="load_test.json", help="JSON results (default load_test.json)")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    proc, tmp = None, None
    if args.url:
        url, model = args.url.rstrip("/"), "(remote)"
    else:
        if Path(args.model).is_dir():
            ckpt, model = Path(args.model), args.model
        else:
            tmp = Path(tempfile.mkdtemp(prefix="dgemma-load-"))
            ckpt, model = random_checkpoint(args.model, tmp / args.model, args.steps or 8), f"random {args.model}"
        proc, url = start_server(ckpt, args)
    try:
        card = httpx.get(url + "/v1/models", headers=headers, timeout=10).json()["data"][0]
        body = {"model": card["id"], "prompt": PROMPT, "max_tokens": args.max_tokens, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True}
        if args.ar:
            body.update(ar=True, temperature=0)
        elif args.steps:
            body["steps"] = args.steps
        # one warm-up request (first-call allocations, lazy imports)
        asyncio.run(run_level(url, 1, 0.01, body, headers))
        results = []
        for n in levels:
            r = asyncio.run(run_level(url, n, args.duration, body, headers))
            r.update(server_memory(url, headers, proc))
            results.append(r)
            print(f"  N={n:<3} {r['tokens_per_s']:>8.1f} tok/s  {r['completed']:>4} requests  "
                  f"p50 {r['latency_p50_s']} s  errors {r['errors']}  429s {r['rejected_429']}", file=sys.stderr)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(15)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    meta = {"model": model, "canvas_length": card.get("dgemma", {}).get("canvas_length"),
            "mode": "ar" if args.ar else "diffusion", "steps": None if args.ar else args.steps,
            "max_tokens": args.max_tokens, "duration_s": args.duration,
            "server": {"max_concurrency": args.max_concurrency, "max_queue": args.max_queue,
                       "adaptive_steps": args.adaptive_steps} if proc else url,
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "python": platform.python_version()}}
    cols = [("N", "clients", "{}"), ("done", "completed", "{}"), ("tok/s", "tokens_per_s", "{:.1f}"),
            ("req/s", "requests_per_s", "{:.2f}"), ("p50 s", "latency_p50_s", "{:.2f}"),
            ("p99 s", "latency_p99_s", "{:.2f}"), ("TTFT p50", "ttft_p50_s", "{:.2f}"),
            ("TTFT p99", "ttft_p99_s", "{:.2f}"), ("steps/cv", "steps_per_canvas", "{:.1f}"),
            ("peak RSS MiB", "peak_rss_mib", "{:.0f}"), ("429", "rejected_429", "{}"), ("errors", "errors", "{}")]
    rows = [[h for h, _, _ in cols]] + [[("-" if r.get(k) is None else f.format(r[k])) for _, k, f in cols]
                                        for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    print(f"dgemma serve load test: {meta['model']} ({meta['mode']}, {args.max_tokens} tokens/request, "
          f"{args.duration:g} s per level)")
    for i, row in enumerate(rows):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
