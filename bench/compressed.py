"""llm-compressor (compressed-tensors) checkpoints in dgemma: load time, conversion, accuracy and memory.

    python bench/compressed.py [--checkpoint dgemma/models/code] [--schemes FP8_DYNAMIC,W8A8,...] [--threads 2]

For each compressed-tensors preset, the checkpoint's weights are compressed by the compressed-tensors library
(as llm-compressor's data-free `model_free_ptq` would: min-max scales, RedHatAI's ignore list, experts split per
expert) into a compressed-tensors checkpoint. Then, timed: loading it with dgemma (converted in memory), converting
it with `dgemma quantize SRC DST` (streamed), and loading the converted checkpoint (memory-mapped). Accuracy: logits
over a 32-token prompt, a first denoise step and a second with self-conditioning (quant_accuracy.py's), against the
fp32 model, and
whether the codes equal those of dgemma's own `--scheme` of the same kind. Writes a table and JSON
(bench/results-compressed.json). Needs `compressed-tensors` (a test dependency).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import quant_accuracy  # noqa: E402  (bench/, the script's own directory)
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES  # noqa: E402
from test_compressed import write_ct  # noqa: E402

from dgemma.model import DiffusionGemma  # noqa: E402
from dgemma.quant import QuantConfig, QuantExperts, QuantLinear, convert_checkpoint, quantize_model  # noqa: E402
from dgemma.weights import load_model  # noqa: E402

FORMATS = {"FP8_DYNAMIC": ("float-quantized", None), "FP8": ("float-quantized", None),
           "FP8_BLOCK": ("float-quantized", None), "W8A8": ("int-quantized", None),
           "W8A16": ("pack-quantized", 128), "W4A16": ("pack-quantized", 128), "W4A16_ASYM": ("pack-quantized", 128),
           "NVFP4A16": ("nvfp4-pack-quantized", None)}


def logits(model) -> torch.Tensor:
    return torch.cat([t.flatten() for t in quant_accuracy.logits(model)])


def same_codes(a, b) -> bool:
    """Whether two quantized models hold the same codes and scales in every layer both quantize."""
    mods = dict(b.named_modules())
    for name, m in a.named_modules():
        if isinstance(m, (QuantLinear, QuantExperts)) and isinstance(mods.get(name), type(m)):
            for n, t in m.named_buffers(recurse=False):
                if not torch.equal(t.float(), getattr(mods[name], n).float()):
                    return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(ROOT / "dgemma/models/code"))
    p.add_argument("--preset", help="random weights of a preset (e.g. bench-80m) instead of --checkpoint: load and "
                   "conversion times at a larger size (transformers' init; errors then are of a random model)")
    p.add_argument("--schemes", default="FP8_DYNAMIC,FP8_BLOCK,W8A8,W8A16,W4A16,W4A16_ASYM,NVFP4A16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=str(ROOT / "bench/results-compressed.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.preset:
        from dgemma.config import preset

        model = DiffusionGemma(preset(args.preset)).init_weights(0).eval()
        fresh = lambda: copy.deepcopy(model)  # noqa: E731
        args.checkpoint = args.preset
    else:
        model = load_model(args.checkpoint, dtype=torch.float32, quiet=True).eval()
        fresh = lambda: load_model(args.checkpoint, dtype=torch.float32, quiet=True).eval()  # noqa: E731
    ref = logits(model)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="dgemma-ct-"))
    try:
        for name in args.schemes.split(","):
            fmt, g = FORMATS[name]
            src = tmp / name
            write_ct(model, src, PRESET_SCHEMES[name], fmt, g)
            t0 = time.perf_counter()
            direct = load_model(src, dtype=torch.float32, quiet=True).eval()
            t_load = time.perf_counter() - t0
            t0 = time.perf_counter()
            convert_checkpoint(src, tmp / (name + "-dgemma"))
            t_conv = time.perf_counter() - t0
            t0 = time.perf_counter()
            conv = load_model(tmp / (name + "-dgemma"), dtype=torch.float32, quiet=True).eval()
            t_mmap = time.perf_counter() - t0
            q = QuantConfig.of(direct.cfg)
            own = quantize_model(fresh(), QuantConfig(q.scheme, q.group_size))
            err = (logits(direct) - ref).abs()
            own_err = (logits(own) - ref).abs()
            rows.append(dict(
                preset=name, format=fmt, loads_as=q.scheme + (f"-g{q.group_size}" if q.group_size else ""),
                kept_in_floats=len(q.ignore), bytes_on_disk=sum(f.stat().st_size for f in src.glob("*.safetensors")),
                load_s=round(t_load, 3), convert_s=round(t_conv, 3), load_converted_s=round(t_mmap, 3),
                converted_equals_direct=all(torch.equal(a.float(), b.float()) for a, b in
                                            zip(direct.state_dict().values(), conv.state_dict().values())),
                max_abs_err=round(err.max().item(), 4), mean_abs_err=round(err.mean().item(), 5),
                own_scheme_max_abs_err=round(own_err.max().item(), 4),
                own_scheme_mean_abs_err=round(own_err.mean().item(), 5),
                same_codes_as_own_scheme=same_codes(direct, own)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{Path(args.checkpoint).name} ({sum(t.numel() for t in model.state_dict().values()) / 1e6:.1f}M "
          f"parameters): logit std {ref.std():.3f}; {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    head = (f"{'preset':<12}{'loads as':<11}{'disk MiB':>9}{'load s':>8}{'convert s':>10}{'load conv s':>12}"
            f"{'max err':>9}{'mean err':>10}{'own --scheme max/mean':>24}{'same codes':>11}")
    print(head)
    for r in rows:
        print(f"{r['preset']:<12}{r['loads_as']:<11}{r['bytes_on_disk'] / 2**20:>9.1f}{r['load_s']:>8.2f}"
              f"{r['convert_s']:>10.2f}{r['load_converted_s']:>12.2f}{r['max_abs_err']:>9.3f}"
              f"{r['mean_abs_err']:>10.4f}{r['own_scheme_max_abs_err']:>14.3f} / {r['own_scheme_mean_abs_err']:.4f}"
              f"{str(r['same_codes_as_own_scheme']):>11}")
    ck = Path(args.checkpoint).resolve()
    out = dict(checkpoint=str(ck.relative_to(ROOT)) if ck.is_relative_to(ROOT) else args.checkpoint,
               parameters=sum(t.numel() for t in model.state_dict().values()), logit_std=round(ref.std().item(), 4),
               threads=torch.get_num_threads(), machine=platform.machine(), torch=torch.__version__,
               date=time.strftime("%Y-%m-%d"), rows=rows)
    tmpj = Path(args.json + ".tmp")
    tmpj.write_text(json.dumps(out, indent=2) + "\n")
    tmpj.replace(args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
