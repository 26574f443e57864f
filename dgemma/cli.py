"""`dgemma ...` subcommands: parse, validate, call the library. A user's mistake is one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class UsageError(Exception):
    """A mistake in what the user asked for: reported as one line, exit status 2."""


# ---------------------------------------------------------------- info
def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _fmt_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def info_dict(target: str, is_preset: bool = False) -> dict:
    from .config import preset
    from .weights import load_config, resolve

    if is_preset:
        cfg, where = preset(target), f"preset {target}"
        ckpt = None
    else:
        ckpt = resolve(target)
        cfg, where = load_config(ckpt), str(ckpt)
    counts = cfg.param_counts()
    kv_per_token = {}
    for name, nbytes in DTYPE_BYTES.items():
        full = sum(2 * cfg.layer_kv_heads(i) * cfg.layer_head_dim(i) * nbytes
                   for i in range(cfg.num_hidden_layers) if not cfg.is_sliding(i))
        kv_per_token[name] = full
    sliding_fixed = {name: sum(2 * cfg.layer_kv_heads(i) * cfg.layer_head_dim(i) * b * (cfg.sliding_window - 1)
                               for i in range(cfg.num_hidden_layers) if cfg.is_sliding(i))
                     for name, b in DTYPE_BYTES.items()}
    out = {
        "source": where,
        "architecture": "DiffusionGemmaForBlockDiffusion",
        "layers": cfg.num_hidden_layers,
        "layer_types": {"sliding": cfg.layer_types.count("sliding_attention"),
                        "full": cfg.layer_types.count("full_attention")},
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "heads": {"query": cfg.num_attention_heads, "kv_sliding": cfg.num_key_value_heads,
                  "kv_full": cfg.num_global_key_value_heads, "head_dim": cfg.head_dim,
                  "global_head_dim": cfg.global_head_dim},
        "sliding_window": cfg.sliding_window,
        "experts": {"count": cfg.num_experts, "top_k": cfg.top_k_experts, "width": cfg.moe_intermediate_size},
        "dense_mlp_width": cfg.intermediate_size,
        "canvas_length": cfg.canvas_length,
        "parameters": counts,
        "weights_bytes": {name: counts["total"] * b for name, b in DTYPE_BYTES.items()},
        "kv_cache_bytes": {name: {"per_token_full_layers": kv_per_token[name],
                                  "sliding_layers_fixed": sliding_fixed[name]} for name in DTYPE_BYTES},
        "special_tokens": {"pad": cfg.pad_token_id, "bos": cfg.bos_token_id, "eos": cfg.eos_token_id},
    }
    if ckpt is not None:
        gen = ckpt / "generation_config.json"
        if gen.exists():
            out["generation_config"] = json.loads(gen.read_text())
        if (ckpt / "tokenizer.json").exists():
            try:
                from .tokenizer import Tokenizer

                tok = Tokenizer.from_dir(ckpt)
                out["tokenizer"] = {"vocab_size": tok.vocab_size, "pad": tok.pad_id, "bos": tok.bos_id,
                                    "eos": sorted(tok.eos_ids)}
            except Exception as e:  # a broken tokenizer should not hide the rest of the report
                out["tokenizer"] = {"error": str(e)}
    return out


def print_info(d: dict) -> None:
    p = d["parameters"]
    print(f"{d['architecture']}  ({d['source']})")
    print(f"  layers          {d['layers']} ({d['layer_types']['sliding']} sliding, {d['layer_types']['full']} full), "
          f"hidden {d['hidden_size']}, vocab {d['vocab_size']:,}")
    h = d["heads"]
    print(f"  attention       {h['query']} query heads; sliding: {h['kv_sliding']} kv heads x {h['head_dim']}, "
          f"window {d['sliding_window']}; full: {h['kv_full']} kv heads x {h['global_head_dim']} (V = K)")
    e = d["experts"]
    print(f"  mlp             dense {d['dense_mlp_width']} + MoE {e['count']} experts x {e['width']}, top-{e['top_k']}")
    print(f"  canvas          {d['canvas_length']} tokens")
    print(f"  parameters      {_fmt_count(p['total'])} total, {_fmt_count(p['active'])} active per token")
    print("  memory          " + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in d["weights_bytes"].items())
          + "  (weights)")
    kv = d["kv_cache_bytes"]
    print("  kv cache        " + ", ".join(
        f"{k} {_fmt_bytes(v['per_token_full_layers'] * 1024)}/1k tokens + {_fmt_bytes(v['sliding_layers_fixed'])}"
        for k, v in kv.items()) + " (per row)")
    s = d["special_tokens"]
    print(f"  special tokens  pad {s['pad']}, bos {s['bos']}, eos {s['eos']}")
    if "tokenizer" in d:
        t = d["tokenizer"]
        print(f"  tokenizer       {t}" if "error" in t else
              f"  tokenizer       vocab {t['vocab_size']:,}, pad {t['pad']}, bos {t['bos']}, eos {t['eos']}")
    if "generation_config" in d:
        g = d["generation_config"]
        keys = ("max_denoising_steps", "t_min", "t_max", "stability_threshold", "confidence_threshold")
        shown = ", ".join(f"{k} {g[k]}" for k in keys if k in g)
        print(f"  generation      {shown}")


def cmd_info(args) -> int:
    d = info_dict(args.model, is_preset=args.preset)
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        print_info(d)
    return 0


# ---------------------------------------------------------------- generate / chat
def add_model_args(s) -> None:
    s.add_argument("--dtype", choices=sorted(DTYPE_BYTES), help="weights dtype (default: float32 on CPU, "
                   "bfloat16 on CUDA)")
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def add_sampling_args(s) -> None:
    g = s.add_argument_group("sampling (defaults come from the checkpoint's generation_config.json)")
    g.add_argument("--max-new-tokens", type=int, help="tokens to generate at most")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--steps", type=int, help="denoising steps per canvas (max_denoising_steps)")
    g.add_argument("--entropy-bound", type=float, help="EntropyBound acceptance budget per step")
    g.add_argument("--t-min", type=float, help="temperature at the end of the schedule")
    g.add_argument("--t-max", type=float, help="temperature at the start of the schedule")
    g.add_argument("--stability", type=int, help="steps the draft must stay unchanged to stop early (0: off)")
    g.add_argument("--confidence", type=float, help="mean entropy under which a stable canvas stops early")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ar", action="store_true", help="decode autoregressively with the same weights (baseline)")
    g.add_argument("--ar-temperature", type=float, help="AR sampling temperature (default 0: greedy)")
    g.add_argument("--rng", choices=["row", "reference"], help="randomness: per-row generators (default) or "
                   "transformers' global draws (reproduces transformers' generate)")


def sampling_options(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "seed": args.seed, "steps": args.steps,
            "entropy_bound": args.entropy_bound, "t_min": args.t_min, "t_max": args.t_max,
            "stability": args.stability, "confidence": args.confidence, "stop": args.stop,
            "ar_temperature": args.ar_temperature, "rng": args.rng}


def load_pipeline(args):
    import torch

    from .pipeline import Pipeline

    dtype = getattr(torch, args.dtype) if getattr(args, "dtype", None) else None
    return Pipeline.load(args.model, dtype=dtype, device=getattr(args, "device", None))


def run_one(pipe, prompt_ids, params, *, show_canvas: bool, stream_text: bool):
    """Run one request, drawing the canvas (stderr) and/or printing text (stdout) as canvases commit."""
    from .display import CanvasView
    from .generate import Commit, Done, Draft

    view = CanvasView(pipe.tokenizer) if show_canvas else None
    engine = pipe.engine(max_rows=1, drafts=show_canvas,
                         max_len=len(prompt_ids) + params.max_new_tokens + pipe.model.cfg.canvas_length)
    done, so_far, shown = None, [], ""
    for ev in engine.run([prompt_ids], params):
        if isinstance(ev, Draft) and view:
            view.draft(ev, params.sampler.max_denoising_steps)
        elif isinstance(ev, Commit):
            if view:
                view.commit(ev)
            so_far.extend(ev.tokens)
            if stream_text and pipe.tokenizer is not None and not params.stop:
                text = pipe.decode(so_far)
                if text.startswith(shown):  # print only the new part (a multi-byte char may still be open)
                    sys.stdout.write(text[len(shown):])
                    sys.stdout.flush()
                    shown = text
        elif isinstance(ev, Done):
            done = ev
    if stream_text:
        rest = done.text[len(shown):] if done.text is not None and done.text.startswith(shown) else ""
        sys.stdout.write(rest + "\n" if done.text is not None else " ".join(map(str, done.tokens)) + "\n")
        sys.stdout.flush()
    return done


def _read_prompt(args) -> str:
    if args.prompt_file:
        try:
            return Path(args.prompt_file).read_text()
        except OSError as e:
            raise UsageError(f"cannot read {args.prompt_file}: {e.strerror}") from None
    if args.prompt is not None:
        return args.prompt
    if not sys.stdin.isatty():
        return sys.stdin.read()
    raise UsageError("no prompt: give PROMPT, --prompt-file, or pipe text on stdin")


FILL = "[FILL]"


def cmd_generate(args) -> int:
    from .display import describe_stats

    pipe = load_pipeline(args)
    opts = sampling_options(args)
    text = _read_prompt(args)
    if text == "":
        raise UsageError("the prompt is empty")
    n_suffix = None
    if args.infill:
        if args.suffix is not None:
            raise UsageError("give either --infill (a [FILL] hole in the prompt) or --suffix, not both")
        if FILL not in text:
            raise UsageError(f"--infill needs the prompt to mark the hole with {FILL}")
        text, args.suffix = text.split(FILL, 1)
    if args.suffix is not None:
        if args.ar:
            raise UsageError("--suffix (infill) needs the denoiser; it cannot run with --ar")
        prompt_ids, params, n_suffix = pipe.infill_request(text, args.suffix, **opts)
    else:
        prompt_ids = pipe.encode_chat([{"role": "user", "content": text}]) if args.chat else pipe.encode(text)
        params = pipe.params(ar=args.ar, **opts)
    stream = not args.json and n_suffix is None
    done = run_one(pipe, prompt_ids, params, show_canvas=args.show_canvas, stream_text=stream)
    if n_suffix is not None:
        done = pipe.trim_infill(done, n_suffix)
    if args.json:
        print(json.dumps({"text": done.text, "tokens": done.tokens, "finish_reason": done.finish_reason,
                          "stats": done.stats}, indent=2))
        return 0
    if n_suffix is not None:
        body = done.text if done.text is not None else " ".join(map(str, done.tokens))
        print(f"{text}\x1b[4m{body}\x1b[0m{args.suffix}" if sys.stdout.isatty() else body)
    print(f"[{describe_stats(done.stats)}]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from .display import describe_stats

    pipe = load_pipeline(args)
    opts = sampling_options(args)
    pipe.params(ar=args.ar, **opts)  # validate the options before the first turn
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    if interactive:
        print("dgemma chat: /reset clears the conversation, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        prompt_ids = pipe.encode_chat(messages)
        done = run_one(pipe, prompt_ids, pipe.params(ar=args.ar, **opts), show_canvas=args.show_canvas,
                       stream_text=True)
        print(f"[{describe_stats(done.stats)}]", file=sys.stderr, flush=True)
        messages.append({"role": "model", "content": done.text})
    return 0


# ---------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


# ---------------------------------------------------------------- serve
NO_DEFAULT_MODEL = ("no default model is shipped with dgemma yet (it is still being trained); pass a checkpoint "
                    "directory or a Hugging Face hub id: dgemma serve PATH_OR_ORG/NAME")


def cmd_serve(args) -> int:
    import os

    if args.model is None:
        raise UsageError(NO_DEFAULT_MODEL)
    try:
        from .serve.app import check_port, run
        from .serve.settings import ServerSettings
    except ImportError as e:
        raise UsageError(f"dgemma serve needs FastAPI and uvicorn ({e.name} is missing): "
                         "pip install 'dgemma[serve]'") from None
    settings = ServerSettings(
        model_name=args.model_name or Path(str(args.model).rstrip("/")).name or str(args.model),
        host=args.host, port=args.port, api_key=args.api_key or os.environ.get("DGEMMA_API_KEY") or None,
        max_concurrency=args.max_concurrency, max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit,
        max_context=args.max_context, max_body_bytes=args.max_body_bytes,
        cors_origins=tuple(args.cors_origin or ()))
    check_port(settings.host, settings.port)  # before the (slow) model load
    pipe = load_pipeline(args)
    if pipe.tokenizer is None:
        raise UsageError(f"{args.model} has no tokenizer.json; the server needs one to read and write text")
    run(pipe, settings, log_level=args.log_level)
    return 0


# ---------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dgemma", description="DiffusionGemma engine: generate, serve, train, bench.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("info", help="config, parameter counts, memory and special tokens of a checkpoint")
    s.add_argument("model", help="checkpoint directory, hub id (org/name), or a preset name with --preset")
    s.add_argument("--preset", action="store_true", help="MODEL names a preset (26b-a4b, tiny, small, bench-80m)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("generate", help="generate text from a prompt (diffusion, or --ar)")
    s.add_argument("model", help="checkpoint directory or hub id")
    s.add_argument("prompt", nargs="?", help="prompt text (or --prompt-file, or stdin)")
    s.add_argument("--prompt-file", help="read the prompt from a file")
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user turn")
    s.add_argument("--suffix", help="infill: the prompt is the text before the hole, this the text after it")
    s.add_argument("--infill", action="store_true", help="infill the [FILL] hole of the prompt through the canvas")
    s.add_argument("--show-canvas", action="store_true", help="draw the canvas live while it denoises")
    s.add_argument("--json", action="store_true", help="print text, tokens and stats as JSON")
    add_sampling_args(s)
    add_model_args(s)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", help="an interactive multi-turn chat (chat template)")
    s.add_argument("model", help="checkpoint directory or hub id")
    s.add_argument("--system", help="system prompt")
    s.add_argument("--show-canvas", action="store_true", help="draw the canvas live while it denoises")
    add_sampling_args(s)
    add_model_args(s)
    s.set_defaults(func=cmd_chat)

    # `bench` has its own parser (dgemma/bench.py); main() hands it the rest of the command line.
    sub.add_parser("bench", help="benchmarks: dgemma diffusion vs AR vs transformers (dgemma bench --help)",
                   add_help=False)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with live draft streaming and a web page")
    s.add_argument("model", nargs="?", help="checkpoint directory or hub id (org/name)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* and /metrics "
                   "(default: $DGEMMA_API_KEY; none: open)")
    s.add_argument("--model-name", help="the model id clients send (default: the checkpoint's directory name)")
    s.add_argument("--max-concurrency", type=int, default=8, help="engine rows denoised together (default 8)")
    s.add_argument("--max-queue", type=int, default=64, help="rows waiting for an engine row (default 64); "
                   "beyond that, 429")
    s.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    s.add_argument("--max-context", type=int, default=8192,
                   help="KV-cache positions per row: prompt plus committed canvases (default 8192)")
    s.add_argument("--max-body-bytes", type=int, default=4 << 20, help="larger request bodies get 413")
    s.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="allow browser requests from ORIGIN (repeatable; CORS is off by default)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_model_args(s)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("demo", help="the end-to-end demo (what `make demo` runs)")
    s.add_argument("--fast", action="store_true", help="a shorter run")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .weights import CheckpointError

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (UsageError, CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        # GenerationError, CacheFullError and the sampler's option errors are ValueErrors too.
        print(f"dgemma {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "build_parser", "info_dict"]
