"""One MoE layer of a memory-mapped checkpoint: torch's grouped expert matmul against the per-expert loop.

    python bench/moe_layer.py [--preset small] [--dtype float32] [--tokens 256] [--rounds 400] [--threads 2]

A random model of the preset is saved and loaded back memory-mapped, as `dgemma generate` loads a checkpoint (its
weights sit where the file put them: most tensors of an fp32 safetensors file are 4, 8 or 12 bytes off 16). For
each layer: how far its expert weights are off 16 bytes. Then layer 0's experts over `--tokens` routed tokens (the
canvas), the grouped matmul (`torch._grouped_mm`, what `Experts.linear` picks) and the per-expert loop, alternating
call by call in one process; medians and minima in ms, and whether the two give the same bits. JSON:
bench/results-moe-layer.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import write_results  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=400)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results-moe-layer.json"))
    a = p.parse_args(argv)
    import torch

    import dgemma.model as M
    from dgemma.config import preset
    from dgemma.runtime import tune_cpu_allocator
    from dgemma.weights import init_random, load_model, save_model

    torch.set_num_threads(a.threads)
    tune_cpu_allocator()  # as the engine runs
    dtype = getattr(torch, a.dtype)
    with tempfile.TemporaryDirectory(prefix="dgemma-moe-") as tmp:
        save_model(init_random(preset(a.preset), seed=0).to(dtype), Path(tmp) / "m")
        model = load_model(Path(tmp) / "m", dtype=dtype).eval()
        offsets = [layer.experts.gate_up_proj.data_ptr() % 16 for layer in model.layers]
        layer = model.layers[0]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(a.tokens, model.cfg.hidden_size, generator=g).to(dtype)
        times = {"grouped": [], "loop": []}
        with torch.no_grad():
            w, idx = layer.router(x)
            out = {}
            for name in times:
                M._GROUPED_MM = name == "grouped"
                out[name] = layer.experts(x, w, idx)
            for r in range(a.rounds):
                for name in (("grouped", "loop") if r % 2 else ("loop", "grouped")):
                    M._GROUPED_MM = name == "grouped"
                    t = time.perf_counter()
                    layer.experts(x, w, idx)
                    times[name].append((time.perf_counter() - t) * 1e3)
        M._GROUPED_MM = hasattr(torch, "_grouped_mm")
    rows = {name: {"median_ms": statistics.median(ts), "min_ms": min(ts)} for name, ts in times.items()}
    same = torch.equal(out["grouped"], out["loop"])
    print(f"{a.preset}, {a.dtype}, {a.tokens} tokens, top-{model.cfg.top_k_experts} of {model.cfg.num_experts} "
          f"experts; expert weights' bytes off 16, layer by layer: {offsets}")
    print(f"{'path':<10}{'median ms':>11}{'min ms':>9}")
    for name, r in rows.items():
        print(f"{name:<10}{r['median_ms']:>11.3f}{r['min_ms']:>9.3f}")
    ratio = rows["loop"]["median_ms"] / rows["grouped"]["median_ms"]
    print(f"loop / grouped (medians): {ratio:.2f}x; same bits: {same}")
    write_results(a.out, "moe_layer.py", argv, a.threads, preset=a.preset, dtype=a.dtype, tokens=a.tokens,
                  rounds=a.rounds, bytes_off_16=offsets, results=rows, same_bits=same)
    return 0


if __name__ == "__main__":
    sys.exit(main())
