"""What quantizing the embedding / tied LM head (`dgemma quantize --embeddings`) costs and saves, at the real
vocabulary.

    python bench/quant_embedding.py [--preset bench-80m] [--rounds 5] [--threads 2]

One process, one random model of the preset (the bench's 80M model: 262,144 x 256, the embedding is 67M of its
80.6M parameters), quantized four ways: int8 and int4 g128, each without and with the embedding. Every round
generates 256 tokens (8 steps per canvas, ignore_eos, the same seed) with each model in turn, so a drift of this
VM's speed hits all four alike; the table gives each one's median wall time over the rounds, its weights' bytes
(codes and scales as stored, the rest in the dtype) and whether its tokens equal the same scheme without the
embedding quantized. JSON: bench/results-quant-embedding.json.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import write_results  # noqa: E402

from dgemma.config import preset  # noqa: E402
from dgemma.generate import GenerationParams, generate  # noqa: E402
from dgemma.pipeline import default_dtype  # noqa: E402
from dgemma.quant import QuantConfig, quantize_model, weight_bytes  # noqa: E402
from dgemma.sampler import SamplerConfig  # noqa: E402
from dgemma.weights import init_random  # noqa: E402

VARIANTS = [QuantConfig("int8"), QuantConfig("int8", embeddings=True), QuantConfig("int4"),
            QuantConfig("int4", embeddings=True)]


def tag(q: QuantConfig) -> str:
    return q.scheme + (f" g{q.group_size}" if q.group_size else "") + (" + embedding" if q.embeddings else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench-80m")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--out", default="bench/results-quant-embedding.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = default_dtype(torch.device("cpu"))
    cfg = preset(args.preset)
    base = init_random(cfg, seed=0)
    with torch.no_grad():  # sharper logits than the 0.02 init, as `dgemma bench --embed-gain` does
        base.embed_tokens.weight.mul_(40.0)
    models = {tag(q): quantize_model(copy.deepcopy(base), q).to(dtype).eval() for q in VARIANTS}
    del base
    prompt = torch.randint(3, 30_000, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    params = GenerationParams(max_new_tokens=args.tokens, seed=0, ignore_eos=True,
                              sampler=SamplerConfig(max_denoising_steps=8))
    for m in models.values():  # warm-up: allocator, thread pool
        generate(m, [prompt], params.replace(max_new_tokens=8, sampler=SamplerConfig(max_denoising_steps=1)))
    times: dict[str, list[float]] = {k: [] for k in models}
    tokens: dict[str, list[int]] = {}
    for r in range(args.rounds):
        for k, m in models.items():
            t = time.perf_counter()
            tokens[k] = generate(m, [prompt], params)[0].tokens
            times[k].append(time.perf_counter() - t)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
              file=sys.stderr, flush=True)
    rows = []
    print(f"\n{args.preset}, {str(dtype)[6:]}, {args.threads} threads, {args.tokens} tokens, 8 steps per canvas, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'weights':<22}{'MiB':>8}{'wall s':>9}{'tok/s':>8}{'vs without':>12}  same tokens as without")
    for q in VARIANTS:
        k = tag(q)
        plain = tag(QuantConfig(q.scheme, q.group_size))
        wall = statistics.median(times[k])
        row = {"weights": k, "scheme": q.scheme, "group_size": q.group_size, "embeddings": q.embeddings,
               "weights_mib": weight_bytes(cfg, q, dtype) / 2**20, "wall_s": wall, "walls": times[k],
               "tokens_per_s": len(tokens[k]) / wall}
        if q.embeddings:
            row["time_vs_without"] = wall / statistics.median(times[plain])
            row["same_tokens_as_without"] = tokens[k] == tokens[plain]
        rows.append(row)
        print(f"{k:<22}{row['weights_mib']:>8.1f}{wall:>9.2f}{row['tokens_per_s']:>8.1f}"
              f"{row.get('time_vs_without', 1.0):>11.2f}x  {row.get('same_tokens_as_without', '-')}")
    write_results(args.out, "quant_embedding.py", None, args.threads, preset=args.preset, dtype=str(dtype)[6:],
                  rounds=args.rounds, rows=rows)


if __name__ == "__main__":
    main()
