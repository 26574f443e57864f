"""What asking for log-probabilities costs a denoising canvas at the real vocabulary (each token's raw
log-probability, its top alternatives and, since session 18, its raw entropy, all computed inside the fused LM head).

    python bench/logprobs.py [--rounds 3] [--threads 2] [--out bench/results-logprobs.json]

The `bench-80m` preset (random weights, 262,144-token vocabulary, bf16 where the CPU has it), one 64-token prompt,
one 256-token canvas of 8 steps (`ignore_eos`), through `generate` as users call it. Variants, run in turn in each
round after one warm-up run: no logprobs; `logprobs=0` (the token's own); `logprobs=5` (and the 5 most likely).
Reported: median wall seconds per variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

VARIANTS = {"no logprobs": None, "logprobs=0": 0, "logprobs=5": 5}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the results as JSON")
    a = p.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    import bias  # the same model and run as the bias bench

    from dgemma.generate import GenerationParams, generate
    from dgemma.sampler import SamplerConfig

    model = bias._setup(a.threads)
    T = model.cfg.canvas_length
    prompt = [2] + [100 + i for i in range(63)]

    def run(n):
        params = GenerationParams(max_new_tokens=T, ignore_eos=True, seed=1, logprobs=n,
                                  sampler=SamplerConfig(max_denoising_steps=8))
        t0 = time.perf_counter()
        generate(model, [prompt], params)
        return time.perf_counter() - t0

    run(None)  # warm-up
    walls: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for r in range(a.rounds):
        for name, n in VARIANTS.items():
            walls[name].append(run(n))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in walls.items()), flush=True)
    rows = [{"variant": k, "wall_s": v, "median_s": statistics.median(v)} for k, v in walls.items()]
    print(f"\n{'variant':14s} {'median s':>9s}")
    for row in rows:
        print(f"{row['variant']:14s} {row['median_s']:9.2f}")
    if a.out:
        import torch

        Path(a.out).write_text(json.dumps({"torch": torch.__version__, "threads": a.threads, "dtype": str(model.dtype),
                                           "rounds": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
