"""Loading with `--quantization` against loading a `dgemma quantize`d copy: what quantizing at every load costs.

    python bench/quant_load.py [--preset bench-80m] [--layers N] [--schemes int8,int4,fp8,nvfp4] [--threads 2]
                               [--repeats 3]

A random model of the preset (with --layers, only its first N layers: `--preset 26b-a4b --layers 2` is the released
model's shape at a size this machine holds in float32) is saved in bfloat16 (as the released checkpoint is);
then, each in a fresh process (so its peak RSS is its own), the median over --repeats of: the plain load
(memory-mapped, float32 for the CPU), a load that quantizes as it loads (`load_model(..., quantize=)`, what
`--quantization SCHEME` does), and a load of the same scheme written once by `dgemma quantize` (memory-mapped; the
writing too is timed, with its peak RSS, in a process of its own). Prints a table; JSON:
bench/results-quant-load.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import write_results  # noqa: E402


def worker(a) -> dict:
    import torch

    from dgemma.bench import peak_rss_mib
    from dgemma.quant import QuantConfig, quantize_checkpoint
    from dgemma.weights import load_model

    torch.set_num_threads(a.threads)
    t = time.perf_counter()
    if a.write:  # `dgemma quantize SRC DST --scheme S`
        quantize_checkpoint(a.src, a.write, QuantConfig(a.quantize))
        return {"seconds": time.perf_counter() - t, "peak_rss_mib": peak_rss_mib()}
    model = load_model(a.src, dtype=torch.float32, quiet=True,
                       quantize=QuantConfig(a.quantize) if a.quantize else None)
    s = time.perf_counter() - t
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"seconds": s, "peak_rss_mib": peak_rss_mib(),
            "weights_mib": held / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench-80m")
    p.add_argument("--layers", type=int, help="keep only the preset's first N layers")
    p.add_argument("--schemes", default="int8,int4,fp8,nvfp4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results-quant-load.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--quantize", help=argparse.SUPPRESS)
    p.add_argument("--write", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    import torch

    from dgemma.config import preset
    from dgemma.weights import init_random, save_model

    def run(src: Path, quantize: str | None) -> dict:
        rows = []
        for _ in range(a.repeats):
            cmd = [sys.executable, __file__, "--worker", "--src", str(src), "--threads", str(a.threads)]
            r = subprocess.run(cmd + (["--quantize", quantize] if quantize else []), check=True,
                               stdout=subprocess.PIPE, text=True)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        return {"seconds": statistics.median(r["seconds"] for r in rows),
                "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rows),
                "weights_mib": rows[0]["weights_mib"]}

    results = []
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "bf16"
        cfg = preset(a.preset)
        if a.layers:
            cfg = cfg.replace(num_hidden_layers=a.layers, layer_types=None)
        save_model(init_random(cfg, seed=0), src, dtype=torch.bfloat16)
        results.append({"load": "bf16 checkpoint, as it is", **run(src, None)})
        for scheme in a.schemes.split(","):
            dst = Path(d) / scheme
            cmd = [sys.executable, __file__, "--worker", "--src", str(src), "--threads", str(a.threads), "--quantize",
                   scheme, "--write", str(dst)]
            written = json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.strip()
                                 .splitlines()[-1])
            results.append({"load": f"--quantization {scheme}", "scheme": scheme, **run(src, scheme)})
            results.append({"load": f"dgemma quantize --scheme {scheme} copy", "scheme": scheme,
                            "quantize_s": written["seconds"], "quantize_peak_rss_mib": written["peak_rss_mib"],
                            **run(dst, None)})
    shape = f"{a.preset}" + (f", {a.layers} layers" if a.layers else "")
    print(f"{shape}, {a.threads} threads, median of {a.repeats} fresh processes")
    print(f"{'load':<40}{'seconds':>9}{'peak RSS MiB':>14}{'weights MiB':>13}")
    for r in results:
        print(f"{r['load']:<40}{r['seconds']:>9.2f}{r['peak_rss_mib']:>14.0f}{r['weights_mib']:>13.0f}")
    for r in results:
        if "quantize_s" in r:
            print(f"writing the {r['scheme']} copy (dgemma quantize): {r['quantize_s']:.2f} s, peak RSS "
                  f"{r['quantize_peak_rss_mib']:.0f} MiB")
    write_results(a.out, "quant_load.py", None, a.threads, preset=a.preset, layers=a.layers, repeats=a.repeats,
                  results=results)


if __name__ == "__main__":
    main()
