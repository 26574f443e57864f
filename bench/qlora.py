"""QLoRA: what a LoRA training step costs in memory and time over a full-precision base and over quantized ones.

    python bench/qlora.py [--preset 26b-a4b] [--layers 2] [--variants float,int8,int4,int4+e] [--steps 3]

The model is the preset's shape cut to `--layers` layers (the 26B-A4B's: 2,816 hidden, 128 experts of 704, the
262,144-token vocabulary; two layers are 1.5B of its parameters plus the 0.74B embedding), random weights written
once per variant: `float` in bfloat16 (as the released checkpoint), the others with `dgemma quantize
--random-preset`'s writer (`int4+e`: the embedding / LM head quantized too). Each variant then trains in a fresh
process as `dgemma train --model CKPT --lora-rank 8` does (the checkpoint loaded with float32 for what is not
quantized, LoRA r8 on every linear layer and the experts, AdamW): one untimed step, then `--steps` timed ones over
random examples of a 64-token prompt and a 128-token response (one canvas), batch 2. Reported: the weights' bytes
as held, the process's peak RSS, seconds per step and the adapter's parameters. JSON: bench/results-qlora.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import write_results  # noqa: E402

VARIANTS = {"float": None, "int8": ("int8", None, False), "int4": ("int4", 128, False), "int4+e": ("int4", 128, True)}


def config(preset_name: str, layers: int):
    from dgemma.config import FULL, SLIDING, preset

    cfg = preset(preset_name)
    return cfg.replace(num_hidden_layers=layers, layer_types=[SLIDING] * (layers - 1) + [FULL])


def write(variant: str, cfg, path: Path) -> None:
    import torch

    from dgemma.quant import QuantConfig, write_random_quantized

    q = VARIANTS[variant]
    if q is None:  # bf16 random weights (made in fp32 in memory first: ~9 GiB for 2 layers of the 26B)
        from dgemma.weights import init_random, save_model

        save_model(init_random(cfg, seed=0).to(torch.bfloat16), path)
    else:
        write_random_quantized(cfg, path, QuantConfig(q[0], q[1], embeddings=q[2]), seed=0)


def worker(ckpt: str, steps: int, threads: int) -> dict:
    import torch

    from dgemma.quant import QuantConfig, weight_bytes
    from dgemma.train.data import Example
    from dgemma.train.trainer import ListDataset, TrainConfig, Trainer
    from dgemma.weights import load_model

    torch.set_num_threads(threads)
    model = load_model(ckpt, dtype=torch.float32, quiet=True)  # what `dgemma train --model` does
    g = torch.Generator().manual_seed(0)
    V = model.cfg.vocab_size
    exs = [Example(tuple(torch.randint(5, V, (64,), generator=g).tolist()),
                   tuple(torch.randint(5, V, (127,), generator=g).tolist()) + (1,)) for _ in range(8)]
    with tempfile.TemporaryDirectory() as out:
        tr = Trainer(model, ListDataset(exs), TrainConfig(out=out, steps=steps + 1, batch_size=2, lora_rank=8,
                                                          lr=1e-4, warmup=1, log_every=1000, save_every=10**6,
                                                          threads=threads), quiet=True)
        trainable = sum(p.numel() for p in tr.params)
        tr.train_step()  # warm-up
        times, losses = [], []
        for _ in range(steps):
            t = time.perf_counter()
            losses.append(tr.train_step()["loss"])
            times.append(time.perf_counter() - t)
    return {"weights_mib": weight_bytes(model.cfg, QuantConfig.of(model.cfg), torch.float32) / 2**20,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "s_per_step": statistics.median(times), "step_times": times, "losses": losses,
            "adapter_params": trainable}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="26b-a4b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results-qlora.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.steps, a.threads)))
        return
    variants = a.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    cfg = config(a.preset, a.layers)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="dgemma-qlora-"))
    try:
        for v in variants:
            ckpt = tmp / v.replace("+", "-")
            print(f"{v}: writing ...", file=sys.stderr, flush=True)
            write(v, cfg, ckpt)
            print(f"{v}: training ...", file=sys.stderr, flush=True)
            r = subprocess.run([sys.executable, __file__, "--worker", str(ckpt), "--steps", str(a.steps),
                                "--threads", str(a.threads)], check=True, stdout=subprocess.PIPE, text=True)
            rows.append({"variant": v, "disk_mib": sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**20,
                         **json.loads(r.stdout.strip().splitlines()[-1])})
            shutil.rmtree(ckpt)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{a.preset} cut to {a.layers} layers, LoRA r8 (all linear layers and the experts), batch 2 x (64 + 128) "
          f"tokens, {a.threads} threads, median of {a.steps} steps")
    print(f"{'base':<8}{'weights MiB':>12}{'peak RSS MiB':>14}{'s/step':>9}{'adapter params':>16}  losses")
    for r in rows:
        print(f"{r['variant']:<8}{r['weights_mib']:>12.0f}{r['peak_rss_mib']:>14.0f}{r['s_per_step']:>9.2f}"
              f"{r['adapter_params']:>16,}  " + " ".join(f"{x:.3f}" for x in r["losses"]))
    write_results(a.out, "qlora.py", None, a.threads, preset=a.preset, layers=a.layers, rows=rows)


if __name__ == "__main__":
    main()
