"""QLoRA: what a LoRA training step costs in memory and time over a full-precision base and over quantized ones.

    python bench/qlora.py [--preset 26b-a4b] [--layers 2] [--variants float,int8,int4,int4+e] [--steps 3]
                          [--checkpointing off,on] [--prompt-len 64] [--response-len 127] [--batch 2]

The model is the preset's shape cut to `--layers` layers (the 26B-A4B's: 2,816 hidden, 128 experts of 704, the
262,144-token vocabulary; two layers are 1.5B of its parameters plus the 0.74B embedding), random weights written
once per variant: `float` in bfloat16 (as the released checkpoint), the others with `dgemma quantize
--random-preset`'s writer (`int4+e`: the embedding / LM head quantized too). Each variant then trains in a fresh
process as `dgemma train --model CKPT --lora-rank 8` does (the checkpoint loaded with float32 for what is not
quantized, LoRA r8 on every linear layer and the experts, AdamW): one untimed step, then `--steps` timed ones over
random examples of a `--prompt-len`-token prompt and a `--response-len` + EOS response (default 64 + 128: one
canvas), `--batch` examples a step, with activation checkpointing off and/or on (`--gradient-checkpointing`: each
in its own process). Reported: the weights' bytes as held, the RSS once the model is loaded and the process's
peak, what autograd keeps from the forward for the backward (`kept_for_backward`), seconds per step and the
adapter's parameters. JSON: bench/results-qlora.json.
"""

from __future__ import annotations

import argparse
import json
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


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def kept_for_backward(model, step) -> int:
    """Bytes of the tensors autograd keeps from the forward for the backward (each storage once; the model's own
    weights and buffers left out: they are there anyway), over one call of `step`. Under activation checkpointing
    that is each layer's input and what lies outside the layers; the layers' own activations are made again in the
    backward, under checkpointing's own hooks, which this count does not see."""
    import torch

    own = {t.untyped_storage().data_ptr() for t in model.state_dict(keep_vars=True).values()}
    kept: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            kept[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(kept.values())


def worker(ckpt: str, a) -> dict:
    import torch

    from dgemma.bench import peak_rss_mib
    from dgemma.quant import QuantConfig, weight_bytes
    from dgemma.train.data import Example
    from dgemma.train.trainer import ListDataset, TrainConfig, Trainer
    from dgemma.weights import load_model

    torch.set_num_threads(a.threads)
    model = load_model(ckpt, dtype=torch.float32, quiet=True)  # what `dgemma train --model` does
    loaded = rss_mib()
    g = torch.Generator().manual_seed(0)
    V = model.cfg.vocab_size
    exs = [Example(tuple(torch.randint(5, V, (a.prompt_len,), generator=g).tolist()),
                   tuple(torch.randint(5, V, (a.response_len,), generator=g).tolist()) + (1,))
           for _ in range(4 * a.batch)]
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(out=out, steps=a.steps + 1, batch_size=a.batch, lora_rank=8, lr=1e-4, warmup=1,
                          log_every=1000, save_every=10**6, threads=a.threads,
                          gradient_checkpointing=a.worker_checkpointing)
        tr = Trainer(model, ListDataset(exs), cfg, quiet=True)
        trainable = sum(p.numel() for p in tr.params)
        kept = kept_for_backward(model, tr.train_step)  # the warm-up step
        times, losses = [], []
        for _ in range(a.steps):
            t = time.perf_counter()
            losses.append(tr.train_step()["loss"])
            times.append(time.perf_counter() - t)
    return {"weights_mib": weight_bytes(model.cfg, QuantConfig.of(model.cfg), torch.float32) / 2**20,
            "loaded_rss_mib": loaded, "peak_rss_mib": peak_rss_mib(),
            "kept_for_backward_mib": kept / 2**20,
            "s_per_step": statistics.median(times), "step_times": times, "losses": losses,
            "adapter_params": trainable}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="26b-a4b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpointing", default="off", help="off, on or off,on: activation checkpointing")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response-len", type=int, default=127, help="response tokens before the EOS")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--out", default="bench/results-qlora.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-checkpointing", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a)))
        return
    variants = a.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    modes = a.checkpointing.split(",")
    if not modes or any(m not in ("off", "on") for m in modes):
        raise SystemExit("--checkpointing takes off, on or off,on")
    cfg = config(a.preset, a.layers)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="dgemma-qlora-"))
    try:
        for v in variants:
            ckpt = tmp / v.replace("+", "-")
            print(f"{v}: writing ...", file=sys.stderr, flush=True)
            write(v, cfg, ckpt)
            disk = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**20
            for mode in modes:
                print(f"{v}: training, checkpointing {mode} ...", file=sys.stderr, flush=True)
                r = subprocess.run([sys.executable, __file__, "--worker", str(ckpt), "--steps", str(a.steps),
                                    "--threads", str(a.threads), "--prompt-len", str(a.prompt_len),
                                    "--response-len", str(a.response_len), "--batch", str(a.batch)]
                                   + ["--worker-checkpointing"] * (mode == "on"),
                                   check=True, stdout=subprocess.PIPE, text=True)
                rows.append({"variant": v, "checkpointing": mode == "on", "disk_mib": disk,
                             **json.loads(r.stdout.strip().splitlines()[-1])})
            shutil.rmtree(ckpt)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{a.preset} cut to {a.layers} layers, LoRA r8 (all linear layers and the experts), batch {a.batch} x "
          f"({a.prompt_len} + {a.response_len + 1}) tokens, {a.threads} threads, median of {a.steps} steps")
    print(f"{'base':<8}{'ckpt':>5}{'weights MiB':>12}{'loaded RSS':>11}{'peak RSS MiB':>14}{'kept MiB':>10}"
          f"{'s/step':>9}{'adapter params':>16}  losses")
    for r in rows:
        print(f"{r['variant']:<8}{'on' if r['checkpointing'] else 'off':>5}{r['weights_mib']:>12.0f}"
              f"{r['loaded_rss_mib']:>11.0f}{r['peak_rss_mib']:>14.0f}{r['kept_for_backward_mib']:>10.0f}"
              f"{r['s_per_step']:>9.2f}"
              f"{r['adapter_params']:>16,}  " + " ".join(f"{x:.3f}" for x in r["losses"]))
    write_results(a.out, "qlora.py", None, a.threads, preset=a.preset, layers=a.layers, batch=a.batch,
                  prompt_len=a.prompt_len, response_len=a.response_len, rows=rows)


if __name__ == "__main__":
    main()
