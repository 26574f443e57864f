"""What prefix caching (`dgemma serve --prefix-cache`, `Engine(prefix_cache=True)`) and prompt sharing (n rows of
one prompt encode it once; always on) save, through the engine as the server drives it.

    python bench/prefix_cache.py [--prompt-tokens 2048] [--turns 4] [--rounds 3] [--vocabs 262144,8192]
                                 [--threads 2] [--out bench/results-prefix-cache.json]

Model: the `small` preset (6 layers, hidden 256, 8 experts top-2) with random weights at each vocabulary in turn
(262,144: the ~80M bench model; at 8,192 the LM head is cheap and the prefill a larger share), in the device's dtype (bf16 where the CPU has it), embeddings sharpened as
`dgemma bench` does. Every request decodes one 256-token canvas in 8 steps (`ignore_eos`).

- shared prefix: `turns` requests in a row through one engine row (one user's chat, an agent's loop), each a
  shared `--prompt-tokens` prefix (a system prompt, the conversation so far) plus a 32-token question of its own.
  Prefix cache off, then on (a fresh engine each); the first request of each run finds nothing cached, so the
  table reports the later ones: median wall seconds per request, median time to the first commit, and prompt
  tokens encoded per request.
- n samples: one `--prompt-tokens` prompt with n = 4 seeds in one engine call (encoded once, the other rows copy
  its keys), against 4 prompts of the same length that differ in their last token (each encoded).

Variants alternate within each round (this VM is noisy); medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def _model(vocab: int, threads: int):
    import torch

    from dgemma.config import preset
    from dgemma.pipeline import default_dtype
    from dgemma.runtime import tune_cpu_allocator
    from dgemma.weights import init_random

    torch.set_num_threads(threads)
    tune_cpu_allocator()
    model = init_random(preset("small").replace(vocab_size=vocab), seed=0)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(8.0)  # as `dgemma bench` sharpens its random model
    return model.to(default_dtype("cpu")).eval()


def _tokens(n: int, seed: int, vocab: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(3, vocab, (n - 1,), generator=g).tolist()


def _params(seed: int = 1):
    from dgemma.generate import GenerationParams
    from dgemma.sampler import SamplerConfig

    return GenerationParams(max_new_tokens=256, ignore_eos=True, seed=seed,
                            sampler=SamplerConfig(max_denoising_steps=8))


def shared_prefix(model, prefix: list[int], turns: int, cache: bool) -> list[dict]:
    from dgemma.generate import Done, Engine

    vocab = model.cfg.vocab_size
    engine = Engine(model, max_rows=1, max_len=len(prefix) + 32 + 512, prefix_cache=cache)
    out = []
    for t in range(turns):
        prompt = prefix + _tokens(33, 1000 + t, vocab)[1:]
        t0 = time.perf_counter()
        done = [ev for ev in engine.run([prompt], _params()) if isinstance(ev, Done)][0]
        out.append({"wall_s": time.perf_counter() - t0, "ttfc_s": done.stats["time_to_first_commit_s"],
                    "encoded": len(prompt) - done.stats["cached_prompt_tokens"]})
    return out


def n_samples(model, prompt: list[int], n: int, shared: bool) -> dict:
    from dgemma.generate import generate

    prompts = [prompt if shared else prompt[:-1] + [3 + i] for i in range(n)]
    t0 = time.perf_counter()
    done = generate(model, prompts, [_params(seed=s) for s in range(n)])
    return {"wall_s": time.perf_counter() - t0,
            "ttfc_s": max(d.stats["time_to_first_commit_s"] for d in done),
            "encoded": sum(len(p) for p in prompts) - sum(d.stats["cached_prompt_tokens"] for d in done)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--vocabs", default="262144,8192")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results-prefix-cache.json")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dgemma.bench import machine
    from dgemma.io import atomic_write_text

    results = [_one(int(v), args) for v in args.vocabs.split(",")]
    atomic_write_text(args.out, json.dumps({"machine": machine(), "args": vars(args), "runs": results,
                                            "date": time.strftime("%Y-%m-%d")}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


def _one(vocab: int, args) -> dict:
    model = _model(vocab, args.threads)
    prefix = _tokens(args.prompt_tokens, 0, vocab)
    shared_prefix(model, prefix[:64], 2, True)  # warm-up
    runs: dict[str, list] = {"prefix cache off": [], "prefix cache on": [], "n rows, distinct prompts": [],
                             "n rows, one prompt (shared)": []}
    for r in range(args.rounds):
        for name, cache in (("prefix cache off", False), ("prefix cache on", True)):
            runs[name].extend(shared_prefix(model, prefix, args.turns, cache)[1:])
        for name, shared in (("n rows, distinct prompts", False), ("n rows, one prompt (shared)", True)):
            runs[name].append(n_samples(model, prefix, args.n, shared))
        print(f"vocabulary {vocab}: round {r + 1}/{args.rounds} done", file=sys.stderr)
    rows = []
    for name, xs in runs.items():
        rows.append({"variant": name, "runs": len(xs),
                     "wall_s": statistics.median(x["wall_s"] for x in xs),
                     "ttfc_s": statistics.median(x["ttfc_s"] for x in xs),
                     "encoded_tokens": statistics.median(x["encoded"] for x in xs)})
    print(f"\nsmall preset, vocabulary {vocab:,}, prompt {args.prompt_tokens} tokens, one 256-token canvas of "
          f"8 steps per row, {args.threads} threads; medians")
    print(f"{'variant':30s} {'runs':>5s} {'wall s':>8s} {'first commit s':>15s} {'tokens encoded':>15s}")
    for row in rows:
        print(f"{row['variant']:30s} {row['runs']:5d} {row['wall_s']:8.3f} {row['ttfc_s']:15.3f} "
              f"{row['encoded_tokens']:15.0f}")
    return {"vocab": vocab, "rows": rows, "raw": runs}


if __name__ == "__main__":
    raise SystemExit(main())
