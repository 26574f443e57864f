"""The real-size check: a random int4 (or int8) 26B-A4B checkpoint, loaded memory-mapped on a small machine,
running one prefill and denoising steps over a full 256-token canvas.

    python bench/quant_26b.py [--dir DIR] [--scheme int4] [--group-size 128] [--embeddings] [--keep] [--gguf]

1. write   `dgemma quantize --random-preset 26b-a4b DIR --scheme int4` in a child process: random weights made
           and quantized layer by layer (one expert at a time), never the ~100 GB fp32 model. Full-precision
           tensors (embedding, norms, router) are stored in bfloat16, like the released checkpoint; with
           --embeddings the embedding / tied LM head is quantized too (`dgemma quantize --embeddings`).
2. measure in a fresh child process (so its peak RSS is its own): `load_model(DIR, dtype=float32)` (the CPU
           default: the bf16 embedding is converted, everything quantized stays memory-mapped), one prefill of
           `--prompt-tokens` tokens, a first denoise step (no self-conditioning) and a second one with it.
           Peak RSS is /proc's VmHWM, which counts the mapped checkpoint pages a step touches (page cache the
           kernel can drop) as well as anonymous memory; both are reported at the end from /proc/self/status.
   With --gguf, step 1 writes a Q4_K_M-like GGUF of the preset's shape instead (random blocks, as
           bench/gguf_files.py writes them: Q4_K, Q5_0 where rows do not fill 256-blocks, the embedding Q6_K), and
           step 2 loads that file quantizing as it loads (`load_model(FILE, quantize=...)`, `--quantization`): one
           tensor, one expert at a time decoded and requantized into --scheme, never the float model.
3. delete  DIR, unless --keep.
Prints one JSON object (also written to --out). On a machine where other jobs hold a core, pass --threads 1: there
two OpenMP threads made the MoE (thousands of small per-expert ops) about 6x slower than one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[k] = round(int(v.split()[0]) / 1024 / 1024, 2)  # GiB
    return out


def measure(ckpt: str, prompt_tokens: int, threads: int, steps: int, quantize=None) -> dict:
    import torch

    from dgemma.bench import machine, peak_rss_mib
    from dgemma.weights import load_model

    torch.set_num_threads(threads)
    t = time.perf_counter()
    model = load_model(ckpt, dtype=torch.float32, quiet=True, quantize=quantize)
    load_s = time.perf_counter() - t
    after_load = _status()
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, cfg.vocab_size, (1, prompt_tokens), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=g)
    res = {"load_s": load_s, "rss_after_load_gib": after_load}
    with torch.no_grad():
        cache = model.new_cache(1, prompt_tokens + cfg.canvas_length)
        t = time.perf_counter()
        model.encode(prompt, cache)
        res["prefill_s"] = time.perf_counter() - t
        sc, step_s = None, []
        for _ in range(steps):
            t = time.perf_counter()
            logits = model.denoise(canvas, cache, sc=sc)
            step_s.append(time.perf_counter() - t)
            assert torch.isfinite(logits).all()
            sc = model.soft_embed(logits / 0.8)  # the next step's self-conditioning input
        res["denoise_step_s"] = step_s
    res.update(peak_rss_gib=peak_rss_mib() / 1024, rss_at_end_gib=_status(),
               machine=machine(), quantization=cfg.extra.get("quantization_config"),
               prompt_tokens=prompt_tokens, canvas_tokens=cfg.canvas_length)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", help="checkpoint directory (default: a new one under the system temp dir)")
    p.add_argument("--preset", default="26b-a4b")
    p.add_argument("--scheme", default="int4")
    p.add_argument("--group-size", type=int)
    p.add_argument("--embeddings", action="store_true", help="quantize the embedding / tied LM head too")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--steps", type=int, default=2, help="denoise steps to time (the first has no self-conditioning)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--keep", action="store_true", help="keep the checkpoint (and reuse it if it exists)")
    p.add_argument("--gguf", action="store_true", help="a Q4_K_M-like GGUF instead, quantized into --scheme as it "
                   "loads")
    p.add_argument("--out", default="quant_26b.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        quantize = None
        if args.gguf:
            from dgemma.quant import QuantConfig

            quantize = QuantConfig(args.scheme, args.group_size, embeddings=args.embeddings)
        print(json.dumps(measure(args.dir, args.prompt_tokens, args.threads, args.steps, quantize)))
        return 0

    ckpt = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="dgemma-26b-")) / "ckpt"
    if args.gguf and ckpt.suffix != ".gguf":
        ckpt = ckpt.with_suffix(".gguf")
    created = not (ckpt.exists() if args.gguf else (ckpt / "config.json").exists())  # only what this run writes
    result = {"checkpoint": str(ckpt), "gguf": args.gguf}  # is ever deleted
    try:
        if created and args.gguf:
            from dgemma.config import preset
            from gguf_files import write_26b

            t = time.perf_counter()
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            write_26b(ckpt, preset(args.preset).num_hidden_layers, args.preset)
            result["write_s"] = time.perf_counter() - t
        elif created:
            cmd = [sys.executable, "-m", "dgemma.cli", "quantize", "--random-preset", args.preset, str(ckpt),
                   "--scheme", args.scheme, "--dtype", "bfloat16"]
            if args.group_size:
                cmd += ["--group-size", str(args.group_size)]
            if args.embeddings:
                cmd.append("--embeddings")
            t = time.perf_counter()
            subprocess.run(cmd, check=True)
            result["write_s"] = time.perf_counter() - t
            result["write_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2
        files = [ckpt] if args.gguf else ckpt.glob("*.safetensors")
        result["checkpoint_gib"] = sum(f.stat().st_size for f in files) / 1024 ** 3
        cmd = [sys.executable, __file__, "--worker", "--dir", str(ckpt), "--prompt-tokens", str(args.prompt_tokens),
               "--threads", str(args.threads), "--steps", str(args.steps), "--scheme", args.scheme]
        cmd += (["--group-size", str(args.group_size)] if args.group_size else []) + (
            ["--embeddings"] if args.embeddings else []) + (["--gguf"] if args.gguf else [])
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        result.update(json.loads(out.strip().splitlines()[-1]))
    finally:
        if created and not args.keep:
            if args.gguf and args.dir:
                ckpt.unlink(missing_ok=True)
            else:
                shutil.rmtree(ckpt if args.dir else ckpt.parent, ignore_errors=True)
            result["deleted"] = True
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
