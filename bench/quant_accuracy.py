"""Accuracy and memory of dgemma's weight-only quantization (int8 and fp8 per channel, int4 and nvfp4 group-wise).

    python bench/quant_accuracy.py [--presets tiny-a,tiny-b,tiny-c,small] [--threads 1]
    python bench/quant_accuracy.py --checkpoints dgemma/models/code,dgemma/models/sudoku   # trained models
    python bench/quant_accuracy.py ... --embeddings   # also each scheme with the embedding / LM head quantized

Accuracy: logits of a quantized model vs the same fp32 model, over a prefill (32 tokens), a first denoise step and
a second one with self-conditioning (batch 1). Max and mean absolute error, the fp32 logits' standard deviation
(the scale the errors should be read against) and top-1 agreement. Three initialisations:
  hf         transformers' init: normal(0, 0.02), norms at one (what `init_weights` does)
  tempered   hf, with q/k-norm weights at hd^-1/4 so q.k has unit variance (at one, q.k has variance head_dim and
             attention is nearly argmax, which no trained model is)
  smooth     tempered, with every expert active (top_k = num_experts): no discrete routing decision can flip
Also: int4 RMS weight error, asymmetric (dgemma) vs symmetric, on Gaussian weights; and bytes of weights per scheme
for the small and 26b-a4b presets.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from dgemma.config import preset  # noqa: E402
from dgemma.model import DiffusionGemma  # noqa: E402
from dgemma.quant import Int4, QuantConfig, quantize_model, weight_bytes  # noqa: E402

SCHEMES = [QuantConfig("int8"), QuantConfig("fp8"), QuantConfig("int4", 32), QuantConfig("int4", 64),
           QuantConfig("int4", 128), QuantConfig("nvfp4")]


def config(name: str):
    if name.startswith("tiny-"):
        from conftest import tiny_config

        return tiny_config(name[5:]).replace(max_position_embeddings=4096)
    return preset(name)


def model_for(cfg, init: str) -> DiffusionGemma:
    if init == "smooth":
        cfg = cfg.replace(top_k_experts=cfg.num_experts)
    model = DiffusionGemma(cfg).init_weights(1)
    if init in ("tempered", "smooth"):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(("q_norm.weight", "k_norm.weight")):
                    p.fill_(p.shape[0] ** -0.25)
    return model.eval()


def logits(model, seed=0):
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.vocab_size, (1, 32), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=g)
    with torch.no_grad():
        cache = model.new_cache(1, 32 + cfg.canvas_length)
        enc = model.encode(prompt, cache)
        den = model.denoise(canvas, cache)
        den2 = model.denoise(canvas, cache, sc=model.soft_embed(den / 0.8))
    return [enc[0], den[0], den2[0]]


HEADER = f"{'model':<8}{'init':<10}{'scheme':<13}{'max abs':>10}{'mean abs':>10}{'logit std':>11}{'top-1':>8}"


def compare(name: str, init: str, base) -> None:
    """Each scheme against the fp32 model; last, as the yardstick, the unquantized model run in bf16 (weights and
    activations: dgemma's default dtype on CUDA and on CPUs with native bf16)."""
    ref = logits(base)
    r = torch.cat([t.flatten() for t in ref])
    for q in [*schemes(), None]:
        model = copy.deepcopy(base)
        out = logits(quantize_model(model, q) if q is not None else model.to(torch.bfloat16))
        out = [t.float() for t in out]
        d = (torch.cat([t.flatten() for t in out]) - r).abs()
        top1 = torch.cat([(a.argmax(-1) == b.argmax(-1)).float() for a, b in zip(out, ref)]).mean()
        print(f"{name:<8}{init:<10}{'bf16' if q is None else tag(q):<13}{d.max():>10.2e}{d.mean():>10.2e}{r.std():>11.3f}{top1:>8.3f}", flush=True)


EMBEDDINGS = False  # --embeddings


def schemes() -> list[QuantConfig]:
    """SCHEMES, and with --embeddings each also with the embedding / tied LM head quantized."""
    extra = [QuantConfig(q.scheme, q.group_size, embeddings=True) for q in SCHEMES] if EMBEDDINGS else []
    return [*SCHEMES, *extra]


def tag(q: QuantConfig) -> str:
    return q.scheme + (f"-g{q.group_size}" if q.group_size else "") + ("+e" if q.embeddings else "")


def accuracy(names, inits) -> None:
    print(HEADER)
    for name in names:
        cfg = config(name)
        for init in inits:
            compare(name, init, model_for(cfg, init))


def accuracy_trained(paths) -> None:
    """Trained checkpoints (the shipped models): weights as trained, random token inputs as above."""
    from dgemma.weights import load_model

    print(HEADER)
    for path in paths:
        compare(Path(path).name, "trained", load_model(path, dtype=torch.float32, quiet=True).eval())


def int4_symmetric_vs_asymmetric() -> None:
    torch.manual_seed(0)
    w = torch.randn(256, 2048)
    print("\nint4 RMS weight error / weight std on Gaussian weights:")
    for g in (32, 64, 128):
        s = Int4(g)
        asym = (s.dequantize(s.quantize(w), torch.float32) - w).pow(2).mean().sqrt()
        wg = w.view(256, -1, g)
        scale = wg.abs().amax(-1, keepdim=True) / 7.5  # symmetric: levels -8..7 around 0, scale from |w|max
        sym = ((torch.round(wg / scale - 0.5).clamp(-8, 7) + 0.5) * scale - wg).pow(2).mean().sqrt()
        scale7 = wg.abs().amax(-1, keepdim=True) / 7  # symmetric, levels -7..7
        sym7 = (torch.round(wg / scale7).clamp(-7, 7) * scale7 - wg).pow(2).mean().sqrt()
        print(f"  group {g:>3}: asymmetric (dgemma) {asym:.4f}   symmetric -7..7 {sym7:.4f}   "
              f"symmetric half-step -8..7 {sym:.4f}")


def memory() -> None:
    print("\nbytes of weights (quantized codes, scales and zeros as stored; the rest in the dtype named):")
    gib = 1 << 30
    for name in ("small", "26b-a4b"):
        cfg = preset(name)
        for rest in (torch.float32, torch.bfloat16):
            row = [f"fp32 {weight_bytes(cfg, None, torch.float32) / gib:8.3f}" if rest == torch.float32 else
                   f"bf16 {weight_bytes(cfg, None, torch.bfloat16) / gib:8.3f}"]
            for q in schemes():
                row.append(f"{tag(q)} {weight_bytes(cfg, q, rest) / gib:8.3f}")
            print(f"  {name:<8} rest {str(rest)[6:]:<9} GiB: " + "  ".join(row))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny-a,tiny-b,tiny-c,small")
    p.add_argument("--inits", default="hf,tempered,smooth")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--checkpoints", help="comma list of trained checkpoints to measure instead of random models, "
                   "e.g. dgemma/models/code,dgemma/models/sudoku")
    p.add_argument("--embeddings", action="store_true", help="also each scheme with the embedding / tied LM head "
                   "quantized (+e; dgemma quantize --embeddings)")
    args = p.parse_args()
    global EMBEDDINGS
    EMBEDDINGS = args.embeddings
    torch.set_num_threads(args.threads)
    if args.checkpoints:
        accuracy_trained(args.checkpoints.split(","))
        return
    if not args.skip_accuracy:
        accuracy(args.presets.split(","), args.inits.split(","))
    int4_symmetric_vs_asymmetric()
    memory()


if __name__ == "__main__":
    main()
