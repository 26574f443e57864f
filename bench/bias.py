"""What a logit bias or a penalty costs a denoising canvas at the real vocabulary: fused into the LM head's blocks
(the engine's path since session 15) against materialising the logits to add it (the path before).

    python bench/bias.py [--rounds 3] [--threads 2] [--repetition] [--out bench/results-bias.json]

The `bench-80m` preset (random weights, 262,144-token vocabulary, bf16 where the CPU has it), one 64-token prompt,
one 256-token canvas of 8 steps (`ignore_eos`), through `generate` as users call it. Variants, run in turn in each
round: no bias; `logit_bias` on 2 tokens, fused (the default); the same on the plain path (`fused_head=False`);
presence + frequency penalties over two canvases (the second canvas carries the bias), fused; vLLM's extras, fused:
repetition_penalty over two canvases (every canvas carries it: the prompt's tokens count), the same with the
penalties and logit_bias, allowed_token_ids (1,000 tokens) and min_tokens (EOS banned at all 256 positions).
Reported: median wall seconds, and how far the resident memory rises above its level before the run (sampled every
2 ms), measured per variant in a fresh subprocess after one unbiased warm-up run.

--repetition: what the penalties do to text, on the shipped code model (trained, 8,192 tokens): 4 canvases (1,024
tokens, `ignore_eos`) from a function signature, seeds 0-4, at frequency penalties 0, 0.5 and 1 (diffusion: each
canvas is pushed away from the tokens of the canvases before it) and repetition penalties 1.2 and 1.5 (from the
prompt's and the earlier canvases' tokens). Reported: the share of non-blank lines that
repeat an earlier line of the same output, and the share of distinct tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {"none": {}, "logit_bias, fused": {"logit_bias": {5: 3.0, 9: -100.0}},
            "logit_bias, materialised": {"logit_bias": {5: 3.0, 9: -100.0}, "fused_head": False},
            "penalties, fused (2 canvases)": {"presence_penalty": 0.5, "frequency_penalty": 0.5, "canvases": 2},
            "none (2 canvases)": {"canvases": 2},
            "repetition_penalty, fused (2 canvases)": {"repetition_penalty": 1.2, "canvases": 2},
            "repetition + penalties + logit_bias, fused (2 canvases)": {
                "repetition_penalty": 1.2, "presence_penalty": 0.5, "frequency_penalty": 0.5,
                "logit_bias": {5: 3.0, 9: -100.0}, "canvases": 2},
            "allowed_token_ids (1,000), fused": {"allowed_token_ids": tuple(range(1000, 2000))},
            "min_tokens 256, fused": {"min_tokens": 256, "ignore_eos": False}}


def _setup(threads: int):
    import torch

    from dgemma.config import preset
    from dgemma.pipeline import default_dtype
    from dgemma.runtime import tune_cpu_allocator
    from dgemma.weights import init_random

    torch.set_num_threads(threads)
    tune_cpu_allocator()
    model = init_random(preset("bench-80m"), seed=0)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(8.0)  # as `dgemma bench` sharpens its random model
    return model.to(default_dtype("cpu")).eval()


def _run(model, variant: dict) -> float:
    from dgemma.generate import GenerationParams, generate
    from dgemma.sampler import SamplerConfig

    v = dict(variant)
    fused = v.pop("fused_head", None)
    canvases = v.pop("canvases", 1)
    T = model.cfg.canvas_length
    params = GenerationParams(max_new_tokens=canvases * T, ignore_eos=v.pop("ignore_eos", True), seed=1,
                              sampler=SamplerConfig(max_denoising_steps=8), **v)
    prompt = [2] + [100 + i for i in range(63)]
    t0 = time.perf_counter()
    generate(model, [prompt], params, fused_head=fused)
    return time.perf_counter() - t0


def _rss_mib() -> float:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_growth(model, variant: dict) -> float:
    """The most the resident memory grows above its level before the run (MiB), sampled every 2 ms."""
    import threading

    base, peak, done = _rss_mib(), [0.0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.002)

    t = threading.Thread(target=watch)
    t.start()
    try:
        _run(model, variant)
    finally:
        done.set()
        t.join()
    return max(peak[0], _rss_mib()) - base


def _peak(name: str, threads: int) -> float:
    """Peak RSS growth (MiB) of one run of a variant, in a fresh process (after the model is built and warm)."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bias as B; "
            f"m = B._setup({threads}); B._run(m, {{}}); "
            f"print(B._peak_growth(m, B.VARIANTS[{name!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def repetition(threads: int) -> list[dict]:
    import torch

    from dgemma.assets import shipped_model
    from dgemma.pipeline import Pipeline

    torch.set_num_threads(threads)
    pipe = Pipeline.load(str(shipped_model()), device="cpu", dtype=torch.float32, quiet=True)
    T = pipe.model.cfg.canvas_length
    rows = []
    print(f"\n{'setting':>24s} {'repeated lines':>15s} {'distinct tokens':>16s} {'wall s':>7s}")
    for name, penalty in (("frequency_penalty", 0.0), ("frequency_penalty", 0.5), ("frequency_penalty", 1.0),
                          ("repetition_penalty", 1.2), ("repetition_penalty", 1.5)):
        repeated, distinct, walls = [], [], []
        for seed in range(5):
            t0 = time.perf_counter()
            [done] = pipe.generate(["def parse_config(path):\n"], seed=seed, max_new_tokens=4 * T, ignore_eos=True,
                                   **{name: penalty})
            walls.append(time.perf_counter() - t0)
            lines = [x.strip() for x in done.text.splitlines() if x.strip()]
            repeated.append(1 - len(set(lines)) / max(len(lines), 1))
            distinct.append(len(set(done.tokens)) / len(done.tokens))
        row = {name: penalty, "repeated_lines": statistics.mean(repeated),
               "distinct_tokens": statistics.mean(distinct), "wall_s": statistics.mean(walls)}
        rows.append(row)
        print(f"{name + ' ' + str(penalty):>24s} {100 * row['repeated_lines']:14.1f}% "
              f"{100 * row['distinct_tokens']:15.1f}% "
              f"{row['wall_s']:7.2f}", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repetition", action="store_true", help="also the penalties' effect on the code model's text")
    p.add_argument("--out", help="write the results as JSON")
    a = p.parse_args()
    model = _setup(a.threads)
    _run(model, {})  # warm-up
    walls: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for r in range(a.rounds):
        for name, variant in VARIANTS.items():
            walls[name].append(_run(model, variant))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in walls.items()), flush=True)
    rows = []
    print(f"\n{'variant':56s} {'median s':>9s} {'peak RSS growth MiB':>20s}")
    for name in VARIANTS:
        row = {"variant": name, "wall_s": walls[name], "median_s": statistics.median(walls[name]),
               "peak_rss_growth_mib": _peak(name, a.threads)}
        rows.append(row)
        print(f"{name:56s} {row['median_s']:9.2f} {row['peak_rss_growth_mib']:20.0f}")
    out = {"threads": a.threads, "dtype": str(model.dtype), "rounds": rows}
    if a.repetition:
        out["repetition"] = repetition(a.threads)
    if a.out:
        import torch

        Path(a.out).write_text(json.dumps({"torch": torch.__version__, **out}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
