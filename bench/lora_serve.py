"""What serving LoRA adapters unmerged costs (`dgemma serve --lora NAME=PATH`, `dgemma.adapters`), against the base
model and against one adapter folded into the weights (`--adapter`, the merged form).

    python bench/lora_serve.py [--rank 16] [--rounds 3] [--vocabs 8192,262144] [--threads 2]
                               [--out bench/results-lora-serve.json]

Model: the `small` preset (6 layers, hidden 256, 8 experts top-2) with random weights, in the device's dtype, 4
adapters of rank `--rank` on every target (`all`: attention, dense and self-conditioning MLPs, experts) with random
non-zero B. Each variant generates 4 rows of one 256-token canvas in 8 steps (`ignore_eos`) from 4 distinct 64-token
prompts, in one `generate` call:
- base: the plain model;
- served, all rows adapter 0: the wrapped model, no adapter in the batch (the wrapper's own cost);
- served, 1 adapter: every row on adapter 1;
- served, 4 adapters: rows on adapters 1-4, one each (the multi-LoRA case);
- merged: adapter 1 folded into the weights (what `--adapter` serves: one adapter, the base's speed).
Variants alternate within each round; medians over rounds.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _setup(vocab: int, rank: int, threads: int, tmp: Path):
    import torch

    from dgemma.adapters import attach_adapters
    from dgemma.config import preset
    from dgemma.pipeline import default_dtype
    from dgemma.runtime import tune_cpu_allocator
    from dgemma.train.lora import LoRAConfig, apply_lora, load_adapter, merge_lora, save_adapter
    from dgemma.weights import init_random

    torch.set_num_threads(threads)
    tune_cpu_allocator()
    base = init_random(preset("small").replace(vocab_size=vocab), seed=0)
    with torch.no_grad():
        base.embed_tokens.weight.mul_(8.0)  # as `dgemma bench` sharpens its random model
    paths = []
    for i in range(4):
        m = copy.deepcopy(base)
        apply_lora(m, LoRAConfig(rank=rank, alpha=2.0 * rank), seed=i)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith(("lora_B", "_B")):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        paths.append(str(save_adapter(m, tmp / f"adapter{i}")))
    dt = default_dtype("cpu")
    merged = merge_lora(load_adapter(copy.deepcopy(base), paths[0]))
    served = copy.deepcopy(base).to(dt).eval()
    attach_adapters(served, paths)
    return {"base": base.to(dt).eval(), "served": served, "merged": merged.to(dt).eval()}


def _run(model, adapters: list[int]) -> float:
    import torch

    from dgemma.generate import GenerationParams, generate
    from dgemma.sampler import SamplerConfig

    g = torch.Generator().manual_seed(0)
    prompts = [[2] + torch.randint(3, model.cfg.vocab_size, (63,), generator=g).tolist() for _ in adapters]
    params = [GenerationParams(max_new_tokens=256, ignore_eos=True, seed=s, adapter=a,
                               sampler=SamplerConfig(max_denoising_steps=8)) for s, a in enumerate(adapters)]
    t0 = time.perf_counter()
    generate(model, prompts, params)
    return time.perf_counter() - t0


VARIANTS = {"base": ("base", [0, 0, 0, 0]), "served, all rows adapter 0": ("served", [0, 0, 0, 0]),
            "served, 1 adapter": ("served", [1, 1, 1, 1]), "served, 4 adapters": ("served", [1, 2, 3, 4]),
            "merged (one adapter folded)": ("merged", [0, 0, 0, 0])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--vocabs", default="8192,262144")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results-lora-serve.json")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dgemma.bench import machine
    from dgemma.io import atomic_write_text

    results = []
    for vocab in (int(v) for v in args.vocabs.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            models = _setup(vocab, args.rank, args.threads, Path(tmp))
        _run(models["served"], [1, 2, 3, 4])  # warm-up
        times: dict[str, list[float]] = {k: [] for k in VARIANTS}
        for r in range(args.rounds):
            for name, (which, adapters) in VARIANTS.items():
                times[name].append(_run(models[which], adapters))
            print(f"vocabulary {vocab}: round {r + 1}/{args.rounds} done", file=sys.stderr)
        base = statistics.median(times["base"])
        rows = [{"variant": k, "wall_s": statistics.median(v), "vs_base": statistics.median(v) / base, "runs": v}
                for k, v in times.items()]
        print(f"\nsmall preset, vocabulary {vocab:,}, 4 rows x one 256-token canvas of 8 steps, LoRA rank "
              f"{args.rank} on every target, {args.threads} threads; medians of {args.rounds}")
        print(f"{'variant':30s} {'wall s':>8s} {'vs base':>8s}")
        for row in rows:
            print(f"{row['variant']:30s} {row['wall_s']:8.3f} {row['vs_base']:7.2f}x")
        results.append({"vocab": vocab, "rows": rows})
    atomic_write_text(args.out, json.dumps({"machine": machine(), "args": vars(args), "runs": results,
                                            "date": time.strftime("%Y-%m-%d")}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
