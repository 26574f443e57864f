"""`dgemma demo` (what `make demo` runs): the engine end to end, diffusion beside autoregressive.

Until the embedded default models are trained and shipped (Sudoku, and a small code model), the demo runs on a
randomly initialised DiffusionGemma with the real 262,144-token Gemma vocabulary: its words are noise, but the
canvas, the steps, acceptance, commits and the timings are the engine's real ones. It says so when it runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

SHIPPED = Path(__file__).parent / "models"


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", file=sys.stderr, flush=True)


def run_demo(args) -> int:
    from .assets import gemma_tokenizer_dir
    from .cli import run_one
    from .config import preset
    from .display import describe_stats
    from .pipeline import Pipeline
    from .tokenizer import Tokenizer
    from .weights import init_random

    shipped = sorted(p for p in SHIPPED.glob("*") if (p / "config.json").exists()) if SHIPPED.exists() else []
    if shipped:
        pipe = Pipeline.load(str(shipped[0]), quiet=True)
        _banner(f"model: {shipped[0].name}")
    else:
        _banner("no trained default model is shipped yet: a RANDOMLY INITIALISED DiffusionGemma (output is noise)")
        cfg = preset("bench-80m")
        torch.manual_seed(0)
        pipe = Pipeline(init_random(cfg, seed=0), Tokenizer.from_dir(gemma_tokenizer_dir()))
        n = pipe.model.num_params()
        print(f"~{n / 1e6:.0f}M parameters, vocabulary {cfg.vocab_size:,}, canvas {cfg.canvas_length}, "
              f"{cfg.num_hidden_layers} layers, {cfg.num_experts} experts (top-{cfg.top_k_experts})", file=sys.stderr)

    steps = 8 if args.fast else 16
    max_new = pipe.model.cfg.canvas_length
    prompt = pipe.encode_chat([{"role": "user", "content": "Write a haiku about parallel decoding."}])
    results = {}
    for label, ar in (("diffusion (the canvas, drawn live)", False), ("autoregressive, same weights", True)):
        _banner(label)
        params = pipe.params(ar=ar, max_new_tokens=max_new if not ar else min(max_new, 64), steps=steps,
                             ignore_eos=True)
        done = run_one(pipe, prompt, params, show_canvas=not ar, stream_text=True)
        results[label] = done
        print(f"[{describe_stats(done.stats)}]", file=sys.stderr)
    d, a = results.values()
    _banner("comparison")
    print(f"diffusion: {d.stats['tokens_per_s']:.1f} tok/s, {d.stats['tokens_per_forward']:.1f} tokens per decoder "
          f"pass; autoregressive: {a.stats['tokens_per_s']:.1f} tok/s, 1 token per pass", file=sys.stderr)
    return 0
