"""Training throughput of the Sudoku recipe's model: seconds per optimizer step for batch sizes, MoE layouts,
`torch.compile` and activation checkpointing, on the real `Trainer.train_step` (encoder + AR loss, two-pass
self-conditioning, backward, clipping, AdamW).

    python bench/train_step.py [--data runs/sudoku-data/train.jsonl] [--init CKPT] [--configs 512:sorted,512:dense]
                               [--steps 8] [--bf16] [--out train_step.json]

A config is BATCH:MOE[:compile][:ckpt] (MOE: sorted | dense; ckpt: `--gradient-checkpointing`). Each one builds a
fresh Trainer, runs 3 warm-up steps (the first call's compile time is reported apart), then times `--steps` steps,
synchronising the device at both ends. After each config, a `BEST` line names the fastest so far by examples per
second (the last one holds).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time


def parse_configs(text: str) -> list[tuple[int, str, bool, bool]]:
    out = []
    for item in text.split(","):
        parts = item.strip().split(":")
        flags = parts[2:]
        if (len(parts) < 2 or not parts[0].isdigit() or parts[1] not in ("sorted", "dense")
                or flags not in ([], ["compile"], ["ckpt"], ["compile", "ckpt"])):
            raise SystemExit(f"bad config {item!r}: expected BATCH:sorted|dense[:compile][:ckpt]")
        out.append((int(parts[0]), parts[1], "compile" in flags, "ckpt" in flags))
    return out


def run_one(batch: int, moe: str, compile_: bool, ckpt: bool, a, pairs) -> dict:
    import torch

    from dgemma.tasks.sudoku import SudokuDataset, model_config
    from dgemma.train.trainer import TrainConfig, Trainer
    from dgemma.weights import init_random, load_model

    model = load_model(a.init, dtype=torch.float32, quiet=True) if a.init else init_random(model_config(), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(out=tmp, steps=10_000, batch_size=batch, lr=1e-4, warmup=1, bf16=a.bf16, moe=moe,
                          compile=compile_, gradient_checkpointing=ckpt, device=a.device)
        tr = Trainer(model, SudokuDataset(pairs), cfg, quiet=True)
        dev = tr.device
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        hosts = [tr.step_data[s] for s in range(a.steps + 3)]
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        tr.train_step(hosts[0])
        sync()
        first = time.perf_counter() - t0
        for h in hosts[1:3]:
            tr.train_step(h)
        sync()
        t0 = time.perf_counter()
        for h in hosts[3:]:
            m = tr.train_step(h)
        sync()
        dt = (time.perf_counter() - t0) / a.steps
        return {"batch": batch, "moe": moe, "compile": compile_, "ckpt": ckpt, "step_s": dt, "examples_per_s": batch / dt,
                "tokens_per_s": m["tokens"] / dt, "first_step_s": first, "loss": m["loss"],
                "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None,
                "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="runs/sudoku-data/train.jsonl")
    p.add_argument("--init", help="a Sudoku checkpoint (default: a new model from the recipe's config)")
    p.add_argument("--configs", default="512:sorted,512:dense")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--puzzles", type=int, default=20_000, help="puzzles read from --data")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", help="write the rows as JSON")
    a = p.parse_args()
    import torch

    from dgemma.io import atomic_write_text
    from dgemma.tasks.sudoku import read_puzzles

    if a.threads:
        torch.set_num_threads(a.threads)
    pairs = read_puzzles(a.data, limit=a.puzzles)
    rows = []
    print(f"{'batch':>6} {'moe':>7} {'compile':>7} {'ckpt':>5} {'s/step':>8} {'examples/s':>11} {'tokens/s':>10} "
          f"{'first step':>10} {'GPU MiB':>8}", flush=True)
    for batch, moe, comp, ckpt in parse_configs(a.configs):
        try:
            r = run_one(batch, moe, comp, ckpt, a, pairs)
        except Exception as e:  # one failing config (out of memory, a compile error) must not lose the others
            r = {"batch": batch, "moe": moe, "compile": comp, "ckpt": ckpt, "error": f"{type(e).__name__}: {e}"[:500]}
            print(f"{batch:>6} {moe:>7} {str(comp):>7} {str(ckpt):>5}  failed: {r['error'][:200]}", flush=True)
        else:
            gpu = f"{r['peak_gpu_mib']:.0f}" if r["peak_gpu_mib"] is not None else "-"
            print(f"{batch:>6} {moe:>7} {str(comp):>7} {str(ckpt):>5} {r['step_s']:>8.3f} {r['examples_per_s']:>11,.0f} "
                  f"{r['tokens_per_s']:>10,.0f} {r['first_step_s']:>9.1f}s {gpu:>8}", flush=True)
        rows.append(r)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        ok = [r for r in rows if "error" not in r]
        if ok:  # the best so far after every config, so a run cut short still names one
            b = max(ok, key=lambda r: r["examples_per_s"])
            print(f"BEST batch={b['batch']} moe={b['moe']} compile={int(b['compile'])} ckpt={int(b['ckpt'])} "
                  f"step_s={b['step_s']:.4f}",
                  flush=True)
        if a.out:
            atomic_write_text(a.out, json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=1))
    return 0 if any("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
