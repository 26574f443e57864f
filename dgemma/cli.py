"""`dgemma ...` subcommands: parse, validate, call the library. A user's mistake is one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import json
import sys

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
    return p


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .weights import CheckpointError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (UsageError, CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"dgemma {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "build_parser", "info_dict"]
