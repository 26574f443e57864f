"""`dgemma bench`: honest side-by-side measurements on one model and one prompt.

Engines, each timed in its own fresh process (so peak RSS is that engine's alone), on the same random weights:
  dgemma-diffusion     the engine's default path: per-row RNG; the LM head fused into the vocabulary-blocked
                       sampler step (logits never materialised) when a step's logits would pass 64 MiB (the
                       262,144 vocabulary), one head matmul below that (8,192)
  dgemma-plain         the same algorithm over materialised logits (must give the same tokens)
  dgemma-compiled      the default path with the denoiser's canvas pass through torch.compile (`--compile`); the
                       compile is timed apart (compile_s) and tokens are compared with dgemma-diffusion's
  dgemma-reference     the engine replaying transformers' global-RNG draws (same tokens as transformers)
  dgemma-top-p         the engine with top_p 0.95 (a common client default): each step's distribution cut to its
                       nucleus, over materialised logits (what a cut costs)
  dgemma-ar            autoregressive greedy decoding of the same weights through the encoder and KV cache
  dgemma-int8          the default path on the same weights after `dgemma quantize --scheme int8` (per channel)
  dgemma-int4          the same after `--scheme int4` (groups of 128); both report their weights' bytes and
                       whether their tokens equal the full-precision run's
  dgemma-int8e, -int4e the same with `--embeddings` (the embedding / tied LM head quantized too)
  dgemma-fp8, -nvfp4   the same after `--scheme fp8` (e4m3, per channel) and `--scheme nvfp4` (e2m1, groups of 16)
  transformers         DiffusionGemmaForBlockDiffusion.generate, same weights and seed (the reference)
  forward              not a generator: the machine's matmul peak (in the bench's dtype), and the share of it
                       that one canvas forward reaches (a step after the first: self-conditioning MLP, stack
                       and LM head, logits into a reused buffer as in the plain path)
Each engine loads the checkpoint, runs one untimed warm-up, then `--repeats` timed generations; we report the
median. Wall tokens/s counts generated tokens over the whole generate call (prefill included).
Every engine runs in the dtype dgemma picks for the device (`pipeline.default_dtype`: bfloat16 on CUDA and on CPUs
with native bf16, float32 on other CPUs) unless --dtype names one; --ref-dtype runs the transformers engine in its
own (its fastest dtype need not be dgemma's: on this project's Zen 4 it was now one, now the other). --device cuda runs
every engine on the GPU (timings synchronise the device) and adds each engine's peak GPU memory.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENGINES = ("dgemma-diffusion", "dgemma-plain", "dgemma-compiled", "dgemma-reference", "dgemma-top-p", "dgemma-ar",
           "dgemma-int8", "dgemma-int4", "dgemma-int8e", "dgemma-int4e", "dgemma-fp8", "dgemma-nvfp4", "transformers",
           "forward")
# engine -> (scheme, group size, embedding quantized too)
QUANT_ENGINES = {"dgemma-int8": ("int8", None, False), "dgemma-int4": ("int4", 128, False),
                 "dgemma-int8e": ("int8", None, True), "dgemma-int4e": ("int4", 128, True),
                 "dgemma-fp8": ("fp8", None, False), "dgemma-nvfp4": ("nvfp4", None, False)}


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from .runtime import cpu_bf16_native

    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "cpu_bf16_native": cpu_bf16_native()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB: /proc's VmHWM where there is one, which starts afresh at exec.
    (`ru_maxrss` does not: a child started by fork + exec reports at least its parent's RSS at the fork, so a bench
    worker spawned by a parent holding a model would read the parent's memory as its own.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- worker (one engine, one process)
def _device_dtype(engine: str | None = None):
    """The bench's device and dtype (set by the driver for its worker processes); the transformers engine may run
    in a dtype of its own (`--ref-dtype`)."""
    import torch

    dev = torch.device(os.environ.get("DGEMMA_BENCH_DEVICE", "cpu"))
    name = os.environ.get("DGEMMA_BENCH_DTYPE", "float32")
    if engine == "transformers":
        name = os.environ.get("DGEMMA_BENCH_REF_DTYPE") or name
    return dev, getattr(torch, name)


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def worker(engine: str, ckpt: str, prompt: list[int], max_new: int, steps: int, seed: int, repeats: int) -> dict:
    import torch

    from .generate import AR, DIFFUSION, GenerationParams, generate
    from .sampler import SamplerConfig
    from .weights import load_model

    torch.set_num_threads(int(os.environ.get("DGEMMA_BENCH_THREADS", torch.get_num_threads())))
    sampler = SamplerConfig(max_denoising_steps=steps)
    dev, dtype = _device_dtype(engine)
    rss_before = peak_rss_mib()
    if engine == "forward":
        return forward_efficiency(ckpt, prompt, repeats)
    if engine == "transformers":
        import transformers
        from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

        transformers.logging.set_verbosity_error()
        model = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(ckpt, dtype=dtype).to(dev).eval()
        kw = dict(max_new_tokens=max_new, max_denoising_steps=steps, t_min=sampler.t_min, t_max=sampler.t_max,
                  stability_threshold=sampler.stability_threshold,
                  confidence_threshold=sampler.confidence_threshold,
                  sampler_config=EntropyBoundSamplerConfig(entropy_bound=sampler.entropy_bound))

        def run(n_new, n_steps):
            torch.manual_seed(seed)
            with torch.no_grad():
                out = model.generate(torch.tensor([prompt], device=dev), **{**kw, "max_new_tokens": n_new,
                                                                 "max_denoising_steps": n_steps})
            new = out.sequences[0, len(prompt):]
            toks = new.tolist()
            cut = next((i for i, t in enumerate(toks) if t in (1, 106, 50)), len(toks))
            toks = toks[:min(cut, n_new)]
            # transformers' tokens_per_forward counts every non-pad token of every canvas, also past
            # max_new_tokens; recover its decoder-pass count and report on dgemma's basis (returned tokens).
            passes = float((new != 0).sum()) / float(out.tokens_per_forward[0])
            canvases = -(-new.shape[0] // model.config.canvas_length)
            return toks, {"tokens_per_forward": len(toks) / passes, "mean_steps_per_canvas": passes / canvases}
    else:
        if engine in QUANT_ENGINES:  # the driver wrote the quantized copy beside the checkpoint
            ckpt = _quant_path(ckpt, engine)
        model = load_model(ckpt, dtype=dtype, device=dev)
        if engine == "dgemma-compiled":
            _sync(dev)
            t = time.perf_counter()
            model.compile_denoiser()
            _sync(dev)
            compile_s = time.perf_counter() - t
        mode = AR if engine == "dgemma-ar" else DIFFUSION
        rng = "reference" if engine == "dgemma-reference" else "row"

        def run(n_new, n_steps):
            params = GenerationParams(max_new_tokens=n_new, sampler=sampler.replace(max_denoising_steps=n_steps),
                                      seed=seed, mode=mode, rng=rng, ignore_eos=(mode == AR),
                                      top_p=0.95 if engine == "dgemma-top-p" else 1.0)
            done = generate(model, [prompt], params, fused_head=False if engine == "dgemma-plain" else None)[0]
            return done.tokens, done.stats

    load_rss = peak_rss_mib()
    run(min(max_new, 8), 1)  # warm-up: allocator, thread pool, lazy init
    times, toks, stats = [], None, {}
    for _ in range(repeats):
        _sync(dev)
        t = time.perf_counter()
        toks, stats = run(max_new, steps)
        _sync(dev)
        times.append(time.perf_counter() - t)
    wall = statistics.median(times)
    extra = {"compile_s": compile_s} if engine == "dgemma-compiled" else {}
    if engine != "transformers":  # the weights as held: quantized codes and scales, the rest in the dtype
        from .quant import QuantConfig, weight_bytes

        extra["weights_mib"] = weight_bytes(model.cfg, QuantConfig.of(model.cfg), dtype) / 2**20
    return {
        **extra,
        "engine": engine,
        "tokens": len(toks),
        "token_ids": toks,
        "wall_s": wall,
        "tokens_per_s": len(toks) / wall if wall > 0 else None,
        "mean_steps_per_canvas": stats.get("mean_steps_per_canvas"),
        "tokens_per_forward": stats.get("tokens_per_forward"),
        "peak_rss_mib": peak_rss_mib(),
        "rss_after_load_mib": load_rss,
        "rss_at_start_mib": rss_before,
        "repeats": repeats,
        "dtype": str(dtype).removeprefix("torch."),
        **_gpu_memory(dev),
    }


def _quant_path(ckpt, engine: str) -> Path:
    return Path(str(ckpt) + "-" + engine.removeprefix("dgemma-"))


def _gpu_memory(dev) -> dict:
    import torch

    return {"peak_gpu_mib": torch.cuda.max_memory_allocated(dev) / 2**20} if dev.type == "cuda" else {}


def matmul_peak_gflops(repeats: int = 5, device=None, dtype=None) -> dict:
    """The best GEMM rate this process reaches on large square random matrices: the machine's own peak."""
    import torch

    device, dtype = torch.device(device or "cpu"), dtype or torch.float32
    sizes = (1024, 2048, 3072) if device.type == "cpu" else (4096, 8192)
    best = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        t = min(_timed(lambda: a @ b, device) for _ in range(repeats))
        best[n] = 2 * n**3 / t / 1e9
    return {"gflops": max(best.values()), "by_size": best}


def _timed(f, device=None) -> float:
    if device is not None:
        _sync(device)
    t = time.perf_counter()
    f()
    if device is not None:
        _sync(device)
    return time.perf_counter() - t


def canvas_forward_flops(cfg, context: int, self_conditioning: bool = True) -> int:
    """Matmul FLOPs (2 per multiply-add) of one denoiser pass over a canvas after `context` cached tokens: the
    self-conditioning MLP (every step but a canvas's first runs it), the stack, and the LM head. A test checks
    it against torch's FLOP counter."""
    T, H = cfg.canvas_length, cfg.hidden_size
    flops = 2 * T * H * cfg.vocab_size  # LM head
    if self_conditioning:
        flops += 2 * T * 3 * H * cfg.intermediate_size
    for i in range(cfg.num_hidden_layers):
        hd, kv = cfg.layer_head_dim(i), cfg.layer_kv_heads(i)
        q = cfg.num_attention_heads * hd
        proj = H * q + H * kv * hd * (2 if cfg.is_sliding(i) else 1) + q * H
        keys = T + (min(context, cfg.sliding_window - 1) if cfg.is_sliding(i) else context)
        attn = 4 * cfg.num_attention_heads * hd * keys  # per query: QK^T and AV, hd multiply-adds per key each
        mlp = 3 * H * cfg.intermediate_size + 3 * H * cfg.moe_intermediate_size * cfg.top_k_experts
        flops += 2 * T * (proj + mlp + H * cfg.num_experts) + T * attn
    return flops


def forward_efficiency(ckpt: str, prompt: list[int], repeats: int) -> dict:
    import torch

    from .runtime import tune_cpu_allocator
    from .weights import load_model

    dev, dtype = _device_dtype()
    if dev.type == "cpu":
        tune_cpu_allocator()  # as the engine runs (runtime.py)
    model = load_model(ckpt, dtype=dtype, device=dev).eval()
    peak = matmul_peak_gflops(device=dev, dtype=dtype)
    cfg = model.cfg
    cache = model.new_cache(1, len(prompt) + cfg.canvas_length)
    g = torch.Generator().manual_seed(0)
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=g).to(dev)
    with torch.no_grad():
        known = [len(prompt)]  # as the engine runs it: attention over the filled cache slots only
        model.encode(torch.tensor([prompt], device=dev), cache, known_lengths=[0])
        # a step after a canvas's first, as most steps are: with the previous step's soft embedding as input, the
        # logits written into one reused buffer as the engine's plain path does
        sc = model.soft_embed(model.denoise(canvas, cache, known_lengths=known))
        buf = torch.empty(cfg.canvas_length * cfg.vocab_size, device=dev)

        def step():
            return model.logits(model.denoise(canvas, cache, sc=sc, head=False, known_lengths=known), out=buf)

        step()
        tries = max(repeats, 10 if dev.type == "cuda" else 3)
        t = min(_timed(step, dev) for _ in range(tries))
    flops = canvas_forward_flops(cfg, len(prompt))
    return {"engine": "forward", "tokens": model.cfg.canvas_length, "wall_s": t, "tokens_per_s": None,
            "mean_steps_per_canvas": None, "tokens_per_forward": None, "peak_rss_mib": peak_rss_mib(),
            "token_ids": [], "canvas_forward_gflop": flops / 1e9, "canvas_forward_gflops": flops / t / 1e9,
            "matmul_peak_gflops": peak["gflops"], "share_of_peak": flops / t / 1e9 / peak["gflops"],
            "dtype": str(dtype).removeprefix("torch.")}


# ---------------------------------------------------------------- driver
def _run_worker(engine, ckpt, prompt, args) -> dict:
    cmd = [sys.executable, "-m", "dgemma.bench", "--worker", engine, "--ckpt", str(ckpt), "--prompt-ids",
           ",".join(map(str, prompt)), "--max-new-tokens", str(args.max_new_tokens), "--steps", str(args.steps),
           "--seed", str(args.seed), "--repeats", str(args.repeats)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{engine} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def bench_config(name: str, vocab: int, args) -> list[dict]:
    import torch

    from .config import preset
    from .weights import init_random, save_model

    cfg = preset("small").replace(vocab_size=vocab)
    with tempfile.TemporaryDirectory(prefix="dgemma-bench-") as tmp:
        ckpt = Path(tmp) / name
        model = init_random(cfg, seed=args.seed)
        with torch.no_grad():  # sharper logits than a 0.02-std init, so the sampler accepts more than one token
            model.embed_tokens.weight.mul_(args.embed_gain)
        save_model(model, ckpt)
        n_params = model.num_params()
        del model
        for engine in args.engines:
            if engine in QUANT_ENGINES:
                from .quant import QuantConfig, quantize_checkpoint

                scheme, group, emb = QUANT_ENGINES[engine]
                quantize_checkpoint(ckpt, _quant_path(ckpt, engine), QuantConfig(scheme, group, embeddings=emb))
        g = torch.Generator().manual_seed(args.seed)
        prompt = torch.randint(3, min(vocab, 30_000), (args.prompt_tokens,), generator=g).tolist()
        rows = []
        for engine in args.engines:
            print(f"  {name}: {engine} ...", file=sys.stderr, flush=True)
            r = _run_worker(engine, ckpt, prompt, args)
            r.update(config=name, vocab=vocab, params=n_params)
            rows.append(r)
    ref = next((r for r in rows if r["engine"] == "transformers"), None)
    base = ref
    plain = next((r for r in rows if r["engine"] == "dgemma-plain"), None)
    full = next((r for r in rows if r["engine"] == "dgemma-diffusion"), None)
    for r in rows:
        if r["engine"] == "forward":
            continue
        if full is not None and r["engine"] in QUANT_ENGINES:
            r["same_tokens_as_full_precision"] = r["token_ids"] == full["token_ids"]
        if ref is not None and r["engine"] != "transformers":
            r["same_tokens_as_transformers"] = r["token_ids"] == ref["token_ids"]
        if plain is not None and r["engine"] == "dgemma-diffusion":
            r["same_tokens_as_plain"] = r["token_ids"] == plain["token_ids"]
        if full is not None and r["engine"] == "dgemma-compiled":
            r["same_tokens_as_eager"] = r["token_ids"] == full["token_ids"]
        if base is not None and r["tokens_per_s"] and base["tokens_per_s"]:
            r["speedup_vs_transformers"] = r["tokens_per_s"] / base["tokens_per_s"]
    return rows


def print_table(rows: list[dict]) -> None:
    head = f"{'config':<14}{'engine':<19}{'tokens':>7}{'wall s':>9}{'tok/s':>9}{'steps/cv':>9}{'tok/fwd':>9}" \
           f"{'peak RSS':>10}{'vs HF':>7}  same tokens as HF; notes"
    print(head)
    print("-" * len(head))
    for r in rows:
        f = lambda v, fmt: (fmt.format(v) if v is not None else "-")  # noqa: E731
        if r["engine"] == "forward":
            print(f"{r['config']:<14}{'canvas forward':<19}{r['tokens']:>7}{r['wall_s']:>9.3f}  "
                  f"{r['canvas_forward_gflops']:.1f} GFLOP/s = {100 * r['share_of_peak']:.0f}% of the "
                  f"{r['matmul_peak_gflops']:.1f} GFLOP/s {r.get('dtype', 'float32')} matmul peak measured")
            continue
        notes = []
        if r.get("same_tokens_as_transformers") is not None:
            notes.append(str(r["same_tokens_as_transformers"]))
        if r.get("same_tokens_as_plain") is not None:
            notes.append(f"(same as plain: {r['same_tokens_as_plain']})")
        if r.get("same_tokens_as_eager") is not None:
            notes.append(f"(same as eager: {r['same_tokens_as_eager']}; compile {r['compile_s']:.0f} s)")
        if r.get("same_tokens_as_full_precision") is not None:
            notes.append(f"(same as full precision: {r['same_tokens_as_full_precision']})")
        if r.get("weights_mib") is not None:
            notes.append(f"weights {r['weights_mib']:.0f} MiB")
        if r.get("dtype"):
            notes.append(r["dtype"])
        same = " ".join(notes) or None
        print(f"{r['config']:<14}{r['engine']:<19}{r['tokens']:>7}{r['wall_s']:>9.2f}"
              f"{f(r['tokens_per_s'], '{:.1f}'):>9}{f(r['mean_steps_per_canvas'], '{:.1f}'):>9}"
              f"{f(r['tokens_per_forward'], '{:.2f}'):>9}{r['peak_rss_mib']:>8.0f}Mi"
              f"{f(r.get('speedup_vs_transformers'), '{:.2f}x'):>7}  {'' if same is None else same}"
              + (f"  (GPU peak {r['peak_gpu_mib']:.0f} MiB)" if "peak_gpu_mib" in r else ""))


def main(argv=None) -> int:
    import argparse

    from .cli import device_arg, positive_int

    p = argparse.ArgumentParser(prog="dgemma bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ", ".join(ENGINES))
    p.add_argument("--threads", type=positive_int, help="torch threads in each engine process (default: torch's)")
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="weights and activations of every engine (default: the device's fastest, as dgemma picks it: "
                        "bfloat16 on CUDA and on CPUs with native bf16, float32 on other CPUs)")
    p.add_argument("--ref-dtype", choices=("float32", "bfloat16", "float16"),
                   help="the transformers engine's dtype, when it runs fastest in another one (default: --dtype)")
    p.add_argument("--vocabs", default="8192,262144", help="vocabulary sizes to run (8192 small, 262144 real)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--steps", type=positive_int, default=16, help="denoising steps per canvas")
    p.add_argument("--prompt-tokens", type=positive_int, default=64)
    p.add_argument("--repeats", type=positive_int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--embed-gain", type=float, default=8.0, help="scale of the random embedding (sharper logits)")
    p.add_argument("--out", default="bench.json", help="where to write the JSON results")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        prompt = [int(t) for t in args.prompt_ids.split(",")]
        print(json.dumps(worker(args.worker, args.ckpt, prompt, args.max_new_tokens, args.steps, args.seed,
                                args.repeats)))
        return 0
    if args.threads:
        os.environ["DGEMMA_BENCH_THREADS"] = str(args.threads)
    import torch

    dev = torch.device(args.device)
    if args.dtype is None:
        from .pipeline import default_dtype

        args.dtype = str(default_dtype(dev)).removeprefix("torch.")
    os.environ["DGEMMA_BENCH_DEVICE"], os.environ["DGEMMA_BENCH_DTYPE"] = str(dev), args.dtype
    os.environ["DGEMMA_BENCH_REF_DTYPE"] = args.ref_dtype or ""
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in args.engines if e not in ENGINES]
    if bad:
        print(f"dgemma bench: error: unknown engine(s) {bad}; choose from {', '.join(ENGINES)}", file=sys.stderr)
        return 2
    try:
        vocabs = [int(v) for v in args.vocabs.split(",")]
    except ValueError:
        print("dgemma bench: error: --vocabs takes comma-separated integers", file=sys.stderr)
        return 2
    from .config import ConfigError, preset

    for v in vocabs:
        try:
            preset("small").replace(vocab_size=v)
        except ConfigError as e:
            print(f"dgemma bench: error: --vocabs {v}: {e}", file=sys.stderr)
            return 2
    rows = []
    try:
        for v in vocabs:
            rows += bench_config(f"vocab-{v}", v, args)
    except RuntimeError as e:  # an engine's process failed: its own error output is in the message
        print(f"dgemma bench: error: {e}", file=sys.stderr)
        return 1
    print_table(rows)
    result = {"machine": machine(), "settings": {k: v for k, v in vars(args).items()
                                                  if k not in ("worker", "ckpt", "prompt_ids")},
              "results": [{k: v for k, v in r.items() if k != "token_ids"} for r in rows]}
    from .io import atomic_write_text

    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
