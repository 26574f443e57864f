"""Training's first self-conditioning pass at a wide vocabulary: the soft embedding from the logits
(`soft_embed(denoise(...))`, the `[rows, canvas, V]` logits and their softmax held) against the one accumulated
block by block (`soft_embed_hidden`, what `train.loss.objective` uses above a 16,384-token vocabulary).

    python bench/sc_pass_memory.py [--preset bench-80m] [--rows 2] [--threads 2]

Each mode runs in a fresh process: a random model of the preset, a 64-token prompt encoded, then the pass over a
random canvas under no_grad. Reported: the peak RSS before and after the pass, and its seconds. JSON:
bench/results-sc-pass-memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import write_results  # noqa: E402


def worker(a) -> dict:
    import time

    import torch

    from dgemma.bench import peak_rss_mib
    from dgemma.config import preset
    from dgemma.weights import init_random

    torch.set_num_threads(a.threads)
    cfg = preset(a.preset)
    m = init_random(cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    canvas = torch.randint(0, cfg.vocab_size, (a.rows, cfg.canvas_length), generator=g)
    prompt = torch.randint(0, cfg.vocab_size, (a.rows, 64), generator=g)
    peak = peak_rss_mib
    with torch.no_grad():
        cache = m.new_cache(a.rows, 64 + cfg.canvas_length)
        m.encode(prompt, cache)
        before, t = peak(), time.perf_counter()
        if a.worker == "logits":
            m.soft_embed(m.denoise(canvas, cache))
        else:
            m.soft_embed_hidden(m.denoise(canvas, cache, head=False))
        seconds = time.perf_counter() - t
    return {"mode": a.worker, "peak_before_mib": before, "peak_after_mib": peak(), "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench-80m")
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="bench/results-sc-pass-memory.json")
    p.add_argument("--worker", choices=("logits", "blocked"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    rows = []
    for _ in range(a.repeats):
        for mode in ("logits", "blocked"):
            r = subprocess.run([sys.executable, __file__, "--worker", mode, "--preset", a.preset, "--rows",
                                str(a.rows), "--threads", str(a.threads)], check=True, stdout=subprocess.PIPE,
                               text=True)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"{a.preset}, {a.rows} rows x one canvas, {a.threads} threads")
    print(f"{'mode':<9}{'peak before MiB':>16}{'peak after MiB':>15}{'seconds':>9}")
    for r in rows:
        print(f"{r['mode']:<9}{r['peak_before_mib']:>16.0f}{r['peak_after_mib']:>15.0f}{r['seconds']:>9.2f}")
    write_results(a.out, "sc_pass_memory.py", None, a.threads, preset=a.preset, rows_per_pass=a.rows, rows=rows)


if __name__ == "__main__":
    main()
