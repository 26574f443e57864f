"""Host syncs and kernel counts of one denoising step, as the CPU runs it and as an accelerator would.

    python bench/host_syncs.py [--vocabs 8192,262144] [--rows 1,4] [--dtype bfloat16] [--out syncs.json]

The `small` preset with random weights (at 262,144 entries: the ~80M-parameter bench model), a 64-token prompt in
the cache, one engine-shaped step per row count: the canvas forward (lengths known on the host, as the engine
passes them) and the fused sampler step (LM head fused in, self-conditioning on). Counted with
`dgemma.runtime.HostSyncs`: host syncs (reads of tensor values on the host, each a wait for the device on a GPU)
and aten ops that compute (about one kernel launch each on a GPU). Two policies, on this CPU:

  cpu          what the CPU runs: host reads are free there, so some paths use them; 4,096-entry vocab blocks
  accelerator  what CUDA runs (`runtime.host_reads_free` False, `model.vocab_block` 16,384): no reads at all

Nothing is timed: a GPU's launch costs are not a CPU's. It is the count a GPU's step time is bound by when the
model is this small (BENCHMARKS.md, "On CUDA").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def step_counts(model, rows: int) -> dict:
    import torch

    from dgemma import sampler as S
    from dgemma.runtime import HostSyncs

    cfg = model.cfg
    V, T = cfg.vocab_size, cfg.canvas_length
    g = torch.Generator().manual_seed(0)
    cache = model.new_cache(rows, 64 + T)
    gens = [torch.Generator().manual_seed(r) for r in range(rows)]
    with torch.no_grad():
        model.encode(torch.randint(3, V, (rows, 64), generator=g), cache, known_lengths=[0] * rows)
        canvas = torch.randint(0, V, (rows, T), generator=g)
        sc = torch.randn(rows, T, cfg.hidden_size, generator=g).to(model.dtype)
        draws = S.draw_step_noise(gens, T, V)
        scale = float(model.embed_scale())  # a CPU tensor even on a GPU: the engine reads it the same way
        with HostSyncs() as fwd:
            h = model.denoise(canvas, cache, sc=sc, head=False, known_lengths=[64] * rows)
        with HostSyncs() as smp:
            S.fused_head_step(h, model.embed_tokens.weight, cfg.final_logit_softcapping, torch.full((rows,), 8),
                              S.SamplerConfig(), draws=draws, embed_scale=scale)
    return {"forward_kernels": fwd.kernels, "forward_syncs": len(fwd.found), "step_kernels": smp.kernels,
            "step_syncs": len(smp.found), "syncs": sorted(set(fwd.found + smp.found))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocabs", default="8192,262144")
    p.add_argument("--rows", default="1,4")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--out", help="write the rows as JSON")
    a = p.parse_args()
    import torch

    import dgemma.model as M
    import dgemma.sampler as S
    from dgemma import runtime
    from dgemma.config import preset
    from dgemma.weights import init_random

    torch.set_num_threads(2)
    cpu_policy = (runtime.host_reads_free, M.vocab_block)
    out = []
    print(f"{'vocab':>8} {'rows':>4} {'policy':<12} {'block':>6} {'forward kernels':>16} {'step kernels':>13} "
          f"{'host syncs':>11}  which")
    for vocab in map(int, a.vocabs.split(",")):
        model = init_random(preset("small").replace(vocab_size=vocab), seed=0).eval().to(getattr(torch, a.dtype))
        for rows in map(int, a.rows.split(",")):
            for policy in ("cpu", "accelerator"):
                reads, block = cpu_policy if policy == "cpu" else \
                    ((lambda device: False), (lambda device: M.ACCEL_HEAD_BLOCK))
                runtime.host_reads_free, M.vocab_block, S.vocab_block = reads, block, block
                try:
                    row = {"vocab": vocab, "rows": rows, "policy": policy, "dtype": a.dtype,
                           "block": block("cpu"), **step_counts(model, rows)}
                finally:
                    runtime.host_reads_free, M.vocab_block, S.vocab_block = *cpu_policy, cpu_policy[1]
                out.append(row)
                syncs = row["forward_syncs"] + row["step_syncs"]
                print(f"{vocab:>8} {rows:>4} {policy:<12} {row['block']:>6} {row['forward_kernels']:>16} "
                      f"{row['step_kernels']:>13} {syncs:>11}  {', '.join(row['syncs']) or '-'}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"torch": torch.__version__, "rows": out}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
