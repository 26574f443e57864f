"""Does transformers' DiffusionGemma `generate` agree with itself across CPU thread counts?

The self-conditioning loop feeds each step's softmax back into the next decoder pass, and on a random model with
sharp logits it amplifies float rounding: a change of 1e-4 in the soft embedding can move the next logits by
several units. Reduction order changes with the thread count, so past some number of steps per canvas even
transformers gives different tokens for the same seed. This script shows where that starts, which is the
bar for token-for-token parity between two implementations (dgemma's `--rng reference` included).

    python bench/reference_drift.py --steps 4,6,8,12 [--vocab 8192] [--out drift.json]

Needs transformers (the test extra). Each run is a fresh process: torch's thread count is per process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def worker(ckpt: str, steps: int, threads: int, max_new: int) -> list[int]:
    import torch
    import transformers
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    from dgemma.sampler import SamplerConfig

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    s = SamplerConfig(max_denoising_steps=steps)
    model = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(ckpt, dtype=torch.float32).eval()
    vocab = model.config.text_config.vocab_size
    prompt = torch.randint(3, min(vocab, 30_000), (64,), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(prompt[None], max_new_tokens=max_new, max_denoising_steps=steps, t_min=s.t_min,
                             t_max=s.t_max, stability_threshold=s.stability_threshold,
                             confidence_threshold=s.confidence_threshold,
                             sampler_config=EntropyBoundSamplerConfig(entropy_bound=s.entropy_bound))
    return out.sequences[0, prompt.shape[0]:].tolist()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", default="4,6,8,12", help="denoising steps per canvas to try")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--embed-gain", type=float, default=8.0, help="as in `dgemma bench`")
    p.add_argument("--out", help="write the results as JSON")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], *map(int, a.worker[1:]))))
        return 0
    import torch

    from dgemma.config import preset
    from dgemma.weights import init_random, save_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = init_random(preset("small").replace(vocab_size=a.vocab), seed=0)  # the bench's model
        with torch.no_grad():
            model.embed_tokens.weight.mul_(a.embed_gain)
        save_model(model, Path(tmp))
        for steps in map(int, a.steps.split(",")):
            toks = {}
            for threads in (1, 2):
                cmd = [sys.executable, __file__, "--worker", tmp, str(steps), str(threads), str(a.max_new_tokens)]
                toks[threads] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True)
                                           .stdout.splitlines()[-1])
            differ = sum(x != y for x, y in zip(toks[1], toks[2]))
            rows.append({"steps": steps, "same_tokens_1_vs_2_threads": toks[1] == toks[2], "positions_differ": differ,
                         "tokens": len(toks[1])})
            print(f"steps {steps:3d}: 1 vs 2 threads {'same' if toks[1] == toks[2] else 'DIFFER'} "
                  f"({differ} of {len(toks[1])} positions differ)", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
