"""Is `torch.compile` worth it for the canvas forward? Eager vs compiled denoiser pass, and the compile time.

    python bench/compile_forward.py [--vocab 8192] [--threads 2] [--out compile.json]

The `small` preset with random weights, a 64-token prompt in the cache, one 256-token canvas; the LM head is left
out (it is one matmul plus a softcap either way). Compiled: each layer's attention and dense MLP (the parts
without host syncs; the MoE dispatch sizes its matmuls on the host) with Inductor, static shapes. Reports the
best of 5 forwards each way, the first compiled call's wall time, and the largest hidden-state difference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the result as JSON")
    a = p.parse_args()
    import torch

    from dgemma.config import preset
    from dgemma.weights import init_random

    torch.set_num_threads(a.threads)
    model = init_random(preset("small").replace(vocab_size=a.vocab), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, a.vocab, (1, 64), generator=g)
    canvas = torch.randint(0, a.vocab, (1, model.cfg.canvas_length), generator=g)
    cache = model.new_cache(1, 64 + model.cfg.canvas_length)

    def best(f, n=5):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return min(times)

    with torch.no_grad():
        model.encode(prompt, cache)
        ref = model.denoise(canvas, cache, head=False)
        eager = best(lambda: model.denoise(canvas, cache, head=False))
        for layer in model.layers:
            layer.self_attn.forward = torch.compile(layer.self_attn.forward, dynamic=False)
            layer.mlp.forward = torch.compile(layer.mlp.forward, dynamic=False)
        t = time.perf_counter()
        out = model.denoise(canvas, cache, head=False)
        compile_s = time.perf_counter() - t
        compiled = best(lambda: model.denoise(canvas, cache, head=False))
    row = {"vocab": a.vocab, "threads": a.threads, "torch": torch.__version__, "eager_forward_s": eager,
           "compiled_forward_s": compiled, "speedup": eager / compiled, "first_call_s": compile_s,
           "max_abs_diff": float((out - ref).abs().max())}
    print(f"eager {eager * 1e3:.1f} ms, compiled {compiled * 1e3:.1f} ms ({eager / compiled:.2f}x), "
          f"first compiled call {compile_s:.1f} s, max |diff| {row['max_abs_diff']:.2e}")
    if a.out:
        Path(a.out).write_text(json.dumps(row, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
