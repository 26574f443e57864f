"""Offline batch throughput (`dgemma run-batch`) against the engine rows it may batch.

    python bench/run_batch.py [--model dgemma/models/code] [--requests 48] [--max-tokens 128]
                              [--concurrency 1,4,8,16] [--dtype D] [--out bench/results-run-batch.json]

One input file of `--requests` completions (Python function headers as prompts, one seed each), answered by the
real command, `dgemma run-batch MODEL -i IN -o OUT --max-concurrency C`, once per C, each in its own process.
Wall seconds are the runner's own (model load excluded, from --summary-json); tokens are the completion tokens
the answers report. A seed's tokens do not depend on the rows batched beside it, so every C must give the same
texts as C = 1: the table says whether it did.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

NAMES = ["add", "mean", "is_prime", "reverse_words", "flatten", "fibonacci", "count_vowels", "merge_sorted",
         "parse_date", "chunks", "unique", "clamp"]
ARGS = ["a, b", "values", "n", "text", "items", "n", "s", "left, right", "text", "seq, size", "items", "x, lo, hi"]


def requests(n: int, max_tokens: int) -> list[dict]:
    out = []
    for i in range(n):
        name, args = NAMES[i % len(NAMES)], ARGS[i % len(ARGS)]
        out.append({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions",
                    "body": {"prompt": f"def {name}({args}):\n", "max_tokens": max_tokens, "seed": i}})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="dgemma/models/code")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--dtype", help="passed to run-batch (default: the device's)")
    ap.add_argument("--out", default="bench/results-run-batch.json")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    rows, texts = [], {}
    with tempfile.TemporaryDirectory() as d:
        inp = Path(d) / "in.jsonl"
        inp.write_text("".join(json.dumps(r) + "\n" for r in requests(args.requests, args.max_tokens)))
        for c in levels:
            out, summary = Path(d) / f"out-{c}.jsonl", Path(d) / f"summary-{c}.json"
            subprocess.run([sys.executable, "-m", "dgemma.cli", "run-batch", args.model, "-i", str(inp), "-o",
                            str(out), "--max-concurrency", str(c), "--quiet", "--summary-json", str(summary)]
                           + (["--dtype", args.dtype] if args.dtype else []), check=True)
            s = json.loads(summary.read_text())
            answers = [json.loads(line) for line in out.read_text().splitlines()]
            texts[c] = [a["response"]["body"]["choices"][0]["text"] for a in answers]
            rows.append({"concurrency": c, "requests": s["lines"], "ok": s["ok"], "wall_s": round(s["wall_s"], 2),
                         "completion_tokens": s["completion_tokens"],
                         "tok_per_s": round(s["completion_tokens"] / s["wall_s"], 1),
                         "requests_per_s": round(s["lines"] / s["wall_s"], 2),
                         "same_texts_as_first": texts[c] == texts[levels[0]]})
            r = rows[-1]
            print(f"concurrency {c:>3}: {r['wall_s']:>7.2f} s  {r['tok_per_s']:>7.1f} tok/s  "
                  f"{r['requests_per_s']:>5.2f} req/s  ok {r['ok']}/{r['requests']}  "
                  f"same texts {r['same_texts_as_first']}", flush=True)
    base = rows[0]["tok_per_s"]
    print("\n| max concurrency | wall s | tok/s | req/s | vs first | same texts |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['wall_s']:.2f} | {r['tok_per_s']:.1f} | {r['requests_per_s']:.2f} | "
              f"{r['tok_per_s'] / base:.2f}x | {'yes' if r['same_texts_as_first'] else 'no'} |")
    import platform

    import torch

    from dgemma.pipeline import default_dtype

    dtype = args.dtype or str(default_dtype(torch.device("cpu"))).removeprefix("torch.")
    result = {"model": args.model, "dtype": dtype, "requests": args.requests, "max_tokens": args.max_tokens,
              "runs": rows,
              "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__}}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
