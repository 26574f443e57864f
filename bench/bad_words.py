"""What a bad word of several tokens costs a diffusion row: the canvas committed left to right under the ban
(`WordBans`) against free denoising, on the shipped code model.

    python bench/bad_words.py [--cases 8] [--tokens 256] [--threads 2]

`--cases` functions of held-out standard-library files (as bench/prediction.py picks them: the file up to the def
line as the prompt), `--tokens` new tokens each (`ignore_eos`, seed 0, the model's defaults). Variants: free
denoising; bad_words with a word of one token (a -inf bias, still free denoising); with words of several tokens
(the row walks its canvas left to right); and AR with the same words, for scale. Reported per variant: wall
tokens/s over all cases, denoising steps per canvas, and how many outputs hold a banned word (the several-token
words are the free outputs' three most common pairs of non-blank tokens, so the free run holds them).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _results import write_results  # noqa: E402
from dgemma.generate import generate  # noqa: E402
from dgemma.pipeline import Pipeline  # noqa: E402
from prediction import cases  # noqa: E402


def holds(tokens: list[int], words) -> bool:
    return any(tuple(tokens[i:i + len(w)]) == w for w in words for i in range(len(tokens)))


def run(pipe, prompts, params) -> dict:
    t = time.perf_counter()
    outs = [generate(pipe.model, [p], params, tokenizer=pipe.tokenizer)[0] for p in prompts]
    wall = time.perf_counter() - t
    steps = [s for d in outs for s in d.stats.get("steps_per_canvas") or []]
    return {"outs": outs, "wall_s": wall, "tokens": sum(len(d.tokens) for d in outs),
            "steps_per_canvas": sum(steps) / len(steps) if steps else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="dgemma/models/code")
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results-bad-words.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = Pipeline.load(str(ROOT / args.model), quiet=True)
    prompts = [p for p, _, _ in cases(pipe, args.cases, args.tokens)]
    base = pipe.params(max_new_tokens=args.tokens, ignore_eos=True, seed=0)
    generate(pipe.model, [prompts[0]], base.replace(max_new_tokens=pipe.model.cfg.canvas_length))  # warm-up
    free = run(pipe, prompts, base)
    ends = set(pipe.tokenizer.eos_ids)
    plain = lambda t: t not in ends and pipe.decode([t]).strip() != ""  # noqa: E731 (no EOS, no blank piece)
    pairs = Counter(pair for d in free["outs"] for pair in zip(d.tokens, d.tokens[1:]) if all(map(plain, pair)))
    words = tuple(p for p, _ in pairs.most_common(3))
    single = (Counter(t for d in free["outs"] for t in d.tokens if plain(t)).most_common(1)[0][0],)
    variants = {"free": (base, free), "1-token word": (base.replace(bad_words=(single,)), None),
                "3 two-token words": (base.replace(bad_words=words), None),
                "AR, 3 two-token words": (base.replace(bad_words=words, mode="ar"), None)}
    print(f"{len(prompts)} prompts x {args.tokens} tokens, {args.threads} threads; banned pairs "
          f"{[pipe.decode(list(w)) for w in words]}, single {pipe.decode(list(single))!r}")
    print(f"{'variant':>24}{'tok/s':>9}{'steps/canvas':>14}{'outputs with a banned word':>28}")
    results = {}
    for name, (params, done) in variants.items():
        r = done or run(pipe, prompts, params)
        banned = [w for w in params.bad_words] or list(words)
        n_with = sum(holds(d.tokens, banned) for d in r["outs"])
        results[name] = {"tok_s": r["tokens"] / r["wall_s"], "steps_per_canvas": r["steps_per_canvas"],
                         "outputs_with_banned": n_with, "outputs": len(r["outs"])}
        spc = f"{r['steps_per_canvas']:.1f}" if r["steps_per_canvas"] is not None else "-"
        print(f"{name:>24}{results[name]['tok_s']:>9.1f}{spc:>14}{n_with:>22} of {len(r['outs'])}", flush=True)
    write_results(args.out, "bad_words.py", argv, args.threads, model=args.model, words=[list(w) for w in words],
                  single=list(single), results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
