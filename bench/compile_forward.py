"""Is `torch.compile` worth it for the canvas forward? Eager vs `--compile` denoiser pass, and the compile time.

    python bench/compile_forward.py [--vocab 8192] [--dtype float32|bfloat16] [--threads 2] [--out compile.json]

The `small` preset with random weights, a 64-token prompt in the cache, one 256-token canvas, attention over the
row's filled slots as the engine runs it; the LM head is left out (it is one matmul plus a softcap either way).
Compiled: `DiffusionGemma.compile_denoiser`, what `--compile` runs (each layer's fixed-shape regions through Inductor;
attention over the cache and the experts' dispatch eager). Reports the best of 9 forwards each way, alternating,
the compile time and whether the compiled pass gave the eager pass's bits."""

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
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--out", help="write the result as JSON")
    a = p.parse_args()
    import torch

    from dgemma.config import preset
    from dgemma.weights import init_random

    torch.set_num_threads(a.threads)
    model = init_random(preset("small").replace(vocab_size=a.vocab), seed=0).eval().to(getattr(torch, a.dtype))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, a.vocab, (1, 64), generator=g)
    canvas = torch.randint(0, a.vocab, (1, model.cfg.canvas_length), generator=g)
    cache = model.new_cache(1, 64 + model.cfg.canvas_length)

    def timed(f):
        t = time.perf_counter()
        f()
        return time.perf_counter() - t

    def use(flag):
        for layer in model.layers:
            layer.compiled = flag

    with torch.no_grad():
        model.encode(prompt, cache, known_lengths=[0])
        run = lambda: model.denoise(canvas, cache, head=False, known_lengths=[64])  # noqa: E731
        ref = run()
        t = time.perf_counter()
        model.compile_denoiser()  # what --compile does: compiles here, on a one-row canvas
        compile_s = time.perf_counter() - t
        out = run()
        times = {False: [], True: []}
        for _ in range(9):  # alternating, so the VM's drift hits both alike
            for flag in (False, True):
                use(flag)
                times[flag].append(timed(run))
        eager, compiled = min(times[False]), min(times[True])
    row = {"vocab": a.vocab, "dtype": a.dtype, "threads": a.threads, "torch": torch.__version__,
           "eager_forward_s": eager, "compiled_forward_s": compiled, "speedup": eager / compiled,
           "compile_s": compile_s, "same_bits": torch.equal(out, ref)}
    print(f"eager {eager * 1e3:.1f} ms, compiled {compiled * 1e3:.1f} ms ({eager / compiled:.2f}x), "
          f"compile {compile_s:.1f} s, same bits as eager: {row['same_bits']}")
    if a.out:
        Path(a.out).write_text(json.dumps(row, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
