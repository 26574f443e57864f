"""Chunked prefill: what a long prompt's arrival costs the requests already denoising, with and without
`--prefill-chunk` (the engine's `prefill_chunk`).

    python bench/chunked_prefill.py [--prompt-tokens 4096] [--chunks none,1024,512,256] [--threads 2]

The shipped code model, one engine of 4 rows. Three rows are denoising (512 tokens each, 16 steps a canvas, no
early stop, so every step is a full one); after 5 steps a 4th request arrives with a prompt of held-out standard-
library code (`--prompt-tokens` long) and asks for one canvas. Every engine step is timed. Reported per setting:
the longest step while the long prompt goes in (the pause each streaming request sees between two of its
denoising steps), the median step, the long request's time from its arrival to its first committed canvas, and
the wall time until every request is done. Each setting runs twice; the second run counts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _results import write_results  # noqa: E402
from dgemma.generate import Commit  # noqa: E402
from dgemma.pipeline import Pipeline  # noqa: E402
from dgemma.tasks.code import is_held_out, list_files  # noqa: E402


def long_prompt(pipe, n: int) -> list[int]:
    ids: list[int] = []
    for rel, text in list_files(sysconfig.get_paths()["stdlib"]):
        if is_held_out(rel):
            ids += pipe.encode(text, add_bos=not ids)
            if len(ids) >= n:
                return ids[:n]
    raise SystemExit(f"not {n} tokens of held-out code here")


def run(pipe, chunk: int | None, prompt: list[int]) -> dict:
    engine = pipe.engine(max_rows=4, max_len=len(prompt) + 1024, prefill_chunk=chunk)
    steady = {"steps": 16, "confidence_threshold": 0}  # no early stop: every step a full one
    streams = [engine.add(pipe.encode(f"def f{i}(x):\n"), pipe.params(max_new_tokens=512, ignore_eos=True, seed=i,
                                                                       **steady)) for i in range(3)]
    times: list[float] = []

    def step() -> list:
        t0 = time.perf_counter()
        events = engine.step()
        times.append(time.perf_counter() - t0)
        return events

    for _ in range(5):
        step()
    t_add = time.perf_counter()
    long = engine.add(prompt, pipe.params(max_new_tokens=256, ignore_eos=True, seed=9, **steady))
    first = None
    window = len(times)
    t_all = time.perf_counter()
    while engine.busy:
        for ev in step():
            if ev.request == long and isinstance(ev, Commit) and first is None:
                first = time.perf_counter() - t_add
                window = len(times) - window
        if first is not None and not any(r in engine.rows for r in streams):
            break
    done_s = time.perf_counter() - t_all
    during = times[5:5 + window]
    return {"max_step_s": max(during), "median_step_s": statistics.median(times), "steps_to_first_commit": window,
            "time_to_first_commit_s": first, "wall_s": done_s, "steps": len(times)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="dgemma/models/code", help="a checkpoint (relative: to the repository)")
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--chunks", default="none,1024,512,256")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results-chunked-prefill.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = Pipeline.load(str(ROOT / args.model), quiet=True)
    prompt = long_prompt(pipe, args.prompt_tokens)
    dtype = str(next(pipe.model.parameters()).dtype).replace("torch.", "")
    results = {}
    print(f"{len(prompt)}-token prompt arriving beside 3 denoising rows; {dtype}, {args.threads} threads")
    print(f"{'chunk':>6}{'longest step s':>16}{'median step s':>15}{'steps to commit':>17}{'first commit s':>16}"
          f"{'wall s':>8}")
    for c in args.chunks.split(","):
        chunk = None if c == "none" else int(c)
        run(pipe, chunk, prompt)  # warm-up: the allocator and kernels at these shapes
        r = results[c] = run(pipe, chunk, prompt)
        print(f"{c:>6}{r['max_step_s']:>16.3f}{r['median_step_s']:>15.3f}{r['steps_to_first_commit']:>17}"
              f"{r['time_to_first_commit_s']:>16.2f}{r['wall_s']:>8.2f}", flush=True)
    write_results(args.out, "chunked_prefill.py", argv, args.threads, dtype=dtype, model=args.model,
                  prompt_tokens=len(prompt), results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
