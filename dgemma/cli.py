"""`dgemma ...` subcommands: parse, validate, call the library. A user's mistake is one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPE_ALIASES = {"half": "float16", "float": "float32"}  # vLLM's --dtype names


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
    from .weights import load_config, read_generation_config, resolve

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
    import torch

    from .compressed import foreign_config
    from .quant import SCHEMES, QuantConfig, weight_bytes

    foreign = foreign_config(ckpt, cfg) if ckpt is not None else None  # llm-compressor's, ModelOpt's
    qcfg = QuantConfig.of(cfg)
    if foreign is not None:  # the layers the checkpoint holds quantized (its keys, no tensor read)
        from .weights import checkpoint_entries

        qcfg = QuantConfig.of(checkpoint_entries(ckpt)[0].cfg)
    if qcfg is not None:  # codes and scales at their stored size, the rest (embedding, norms) per dtype
        out["quantization"] = qcfg.to_dict()
        if foreign is not None:
            out["quantization"].update(quant_method=foreign["quant_method"],
                                       format=foreign.get("format") or foreign.get("quant_algo"))
        out["weights_bytes"] = {name: weight_bytes(cfg, qcfg, getattr(torch, name)) for name in DTYPE_BYTES}
    else:  # what `--quantization` / `dgemma quantize` would make of it (defaults; embedding etc. in bf16)
        out["quantized_weights_bytes"] = {s: weight_bytes(cfg, QuantConfig(s), torch.bfloat16) for s in SCHEMES}
    if ckpt is not None:
        from .vision import DEFAULT_SOFT_TOKENS, TOWER, tower_params
        from .weights import checkpoint_entries

        if any(k.startswith(TOWER) for k in checkpoint_entries(ckpt)[1]):  # safetensors headers only
            out["vision"] = {"tower_parameters": tower_params(cfg),
                             "soft_tokens_per_image": cfg.vision_soft_tokens_per_image or DEFAULT_SOFT_TOKENS}
        out["files_bytes"] = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        from .gguf_model import LINK

        if (ckpt / LINK).exists():  # a GGUF's sidecar directory: the file and its tensor types
            link = json.loads((ckpt / LINK).read_text())
            out["gguf"] = {"file": link["path"], "tensor_types": link["tensor_types"]}
            out["files_bytes"] = link["size"]
        gen = read_generation_config(ckpt)
        if gen:
            out["generation_config"] = gen
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
    q = d.get("quantization")
    quant = "" if q is None else f", {q['scheme']} quantized" + (
        f" ({q['quant_method']} {q['format']})" if q["quant_method"] != "dgemma" else "") + (
        ", embedding too" if q.get("embeddings") else "")
    print("  memory          " + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in d["weights_bytes"].items())
          + f"  (weights{quant}" + (f"; {_fmt_bytes(d['files_bytes'])} on disk)" if d.get("files_bytes") else ")"))
    if "quantized_weights_bytes" in d:
        print("  quantized       " + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in d["quantized_weights_bytes"].items())
              + "  (--quantization or dgemma quantize; the rest in bfloat16)")
    kv = d["kv_cache_bytes"]
    print("  kv cache        " + ", ".join(
        f"{k} {_fmt_bytes(v['per_token_full_layers'] * 1024)}/1k tokens + {_fmt_bytes(v['sliding_layers_fixed'])}"
        for k, v in kv.items()) + " (per row)")
    if "vision" in d:
        v = d["vision"]
        print(f"  vision          tower of {_fmt_count(v['tower_parameters'])} parameters, up to "
              f"{v['soft_tokens_per_image']} tokens per image")
    s = d["special_tokens"]
    print(f"  special tokens  pad {s['pad']}, bos {s['bos']}, eos {s['eos']}")
    if "gguf" in d:
        types = ", ".join(f"{n} {k}" for k, n in sorted(d["gguf"]["tensor_types"].items(), key=lambda kv: -kv[1]))
        print(f"  gguf            {d['gguf']['file']}: tensors {types}")
    if "tokenizer" in d:
        t = d["tokenizer"]
        print(f"  tokenizer       {t}" if "error" in t else
              f"  tokenizer       vocab {t['vocab_size']:,}, pad {t['pad']}, bos {t['bos']}, eos {t['eos']}")
    if "generation_config" in d:
        g = d["generation_config"]
        keys = ("max_denoising_steps", "t_min", "t_max", "stability_threshold", "confidence_threshold", "restarts")
        shown = ", ".join(f"{k} {g[k]}" for k in keys if k in g)
        if shown:
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
    s.add_argument("--dtype", choices=["auto", *sorted(DTYPE_BYTES), *sorted(DTYPE_ALIASES)],
                   help="weights and activations dtype (default auto: the device's fastest: bfloat16 on CUDA and on "
                   "CPUs with native bf16, AVX512-BF16 or AMX; float32 on other CPUs; DGEMMA_CPU_DTYPE pins the "
                   "CPU's; vLLM's half and float name float16 and float32)")
    s.add_argument("--device", type=device_arg, help="cpu or cuda (default: cuda when available)")
    s.add_argument("--adapter", metavar="DIR", help="a LoRA adapter (dgemma train --lora-rank) folded into MODEL's "
                   "weights as they load; a MODEL that is itself an adapter directory loads the base it records")
    s.add_argument("--revision", help="branch, tag or commit of a hub id MODEL (default: main; vLLM's)")
    s.add_argument("--download-dir", metavar="DIR", help="the Hugging Face cache directory hub ids are fetched into "
                   "and looked up in (default: huggingface_hub's own; vLLM's)")
    s.add_argument("--tokenizer", metavar="DIR_OR_ID", help="use this directory's (or hub id's) tokenizer instead of "
                   "MODEL's (vLLM's)")
    s.add_argument("--chat-template", metavar="FILE_OR_TEMPLATE", help="a Jinja chat template (a file, or the "
                   "template itself) instead of the checkpoint's (vLLM's)")
    s.add_argument("--generation-config", default="auto", metavar="auto|vllm|DIR", help="the sampling defaults: "
                   "auto, the checkpoint's generation_config.json (default); vllm, the built-in ones (transformers'); "
                   "DIR, the generation_config.json in DIR (vLLM's)")
    s.add_argument("--override-generation-config", metavar="JSON", help="defaults set over those, e.g. "
                   "'{\"max_denoising_steps\": 16, \"entropy_bound\": 0.2, \"max_new_tokens\": 512}' (the sampler's "
                   "knobs and max_new_tokens; vLLM's)")
    s.add_argument("--compile", action="store_true", help="torch.compile the denoiser's canvas pass (a one-off "
                   "compile of 5-20 s; the same tokens as without it; no faster on the CPUs measured, see "
                   "BENCHMARKS.md)")
    add_quantization_args(s, "(vLLM's --quantization; the same weights as `dgemma quantize` into a directory, "
                          "which loads faster next time; default: an adapter's base as it was trained)")


def add_quantization_args(s, what: str) -> None:
    s.add_argument("--quantization", metavar="SCHEME", help="int8, int4, fp8 or nvfp4: quantize a full-precision "
                   "MODEL (or a .gguf) as it loads, weight-only, one layer at a time: memory holds the quantized "
                   "model, never the float one " + what)
    s.add_argument("--quantization-group-size", type=int, metavar="N", help="with --quantization: inputs per "
                   "scale, 16 to 256 (int4 default 128; int8 / fp8 default: one scale per output channel; nvfp4: 16)")
    s.add_argument("--quantization-embeddings", action="store_true", help="with --quantization: the embedding / "
                   "tied LM head too (the 26B's 738M-entry matrix: 1.4 GiB in bf16, 0.4 GiB in int4 g128)")


def quantization_arg(args):
    """The QuantConfig of --quantization and its options, or None."""
    scheme, group = getattr(args, "quantization", None), getattr(args, "quantization_group_size", None)
    embeddings = getattr(args, "quantization_embeddings", False)
    if (group is not None or embeddings) and scheme is None:
        raise UsageError("--quantization-group-size and --quantization-embeddings go with --quantization")
    if scheme is None:
        return None
    from .quant import QuantConfig

    return QuantConfig(scheme, group, embeddings=embeddings)


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
    g.add_argument("--restarts", type=int, help="times a canvas that never stops early (never became sure) "
                   "starts again from fresh noise; the most confident attempt is kept (default 0)")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ar", action="store_true", help="decode autoregressively with the same weights (baseline)")
    g.add_argument("--ar-temperature", type=float, help="AR sampling temperature (default 0: greedy)")
    g.add_argument("--top-k", type=int, help="sample (AR, and each diffusion step) from the K most likely "
                   "tokens (default 0: all)")
    g.add_argument("--top-p", type=float, help="sample from the fewest most likely tokens reaching P of the "
                   "probability (default 1)")
    g.add_argument("--min-p", type=float, help="sample from tokens at least P times the likeliest one's "
                   "probability (default 0)")
    g.add_argument("--rng", choices=["row", "reference"], help="randomness: per-row generators (default) or "
                   "transformers' global draws (reproduces transformers' generate)")
    g.add_argument("--logit-bias", action="append", metavar="ID=BIAS", help="add BIAS (-100..100) to token ID's "
                   "logit everywhere (repeatable; -100 bans the token, +100 forces it)")
    g.add_argument("--ar-fallback", type=float, metavar="H", help="decode a canvas's span autoregressively "
                   "instead when the canvas ends with a mean entropy above H (the model was unsure of it)")
    g.add_argument("--presence-penalty", type=float, help="subtract this (-2..2) from the logit of every token "
                   "already in the output (diffusion: in the canvases before; AR: in the tokens before)")
    g.add_argument("--frequency-penalty", type=float, help="subtract this (-2..2) times a token's count in the "
                   "output so far from its logit")
    g.add_argument("--repetition-penalty", type=float, metavar="P", help="divide a positive logit by P (multiply a "
                   "negative one) for tokens in the prompt or the output so far (vLLM's; default 1: off)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS, to --max-new-tokens")
    g.add_argument("--min-tokens", type=int, metavar="N", help="no EOS, stop token or stop string before N tokens")
    g.add_argument("--stop-token-id", type=int, action="append", metavar="ID", help="end the output at this token "
                   "as at EOS (repeatable; kept in the text unless it is a special token)")
    g.add_argument("--bad-word", action="append", metavar="WORD", help="never write this word (repeatable; vLLM's "
                   "bad_words: also with a leading space; a word of several tokens makes diffusion commit its canvas left to "
                   "right)")
    g.add_argument("--logprobs", type=int, metavar="N", help="report each token's log-probability (raw logits, "
                   "at the step that emitted it) and the N most likely tokens there (0-20)")
    g = s.add_argument_group("structured output (the text is held to a grammar; one of these)").\
        add_mutually_exclusive_group()
    g.add_argument("--json-schema", metavar="SCHEMA", help="JSON valid against this JSON schema (its JSON text, or "
                   "a file holding it)")
    g.add_argument("--json-object", action="store_true", help="any JSON object")
    g.add_argument("--regex", metavar="PATTERN", help="text matching this regular expression, whole")
    g.add_argument("--choice", action="append", metavar="TEXT", help="exactly one of these strings (repeatable)")
    g.add_argument("--grammar", metavar="FILE", help="text in the language of this Lark grammar (start rule `start`)")


def sampling_options(args, pipe=None) -> dict:
    """The sampling flags as `Pipeline.params` options (`pipe` spells --bad-word's words in its tokens)."""
    bad = getattr(args, "bad_word", None)
    return {"max_new_tokens": args.max_new_tokens, "seed": args.seed, "steps": args.steps,
            "entropy_bound": args.entropy_bound, "t_min": args.t_min, "t_max": args.t_max,
            "stability": args.stability, "confidence": args.confidence, "restarts": args.restarts,
            "stop": args.stop,
            "ar_temperature": args.ar_temperature, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
            "rng": args.rng, "logprobs": getattr(args, "logprobs", None),
            "logit_bias": _logit_bias(getattr(args, "logit_bias", None)), "grammar": _grammar(args),
            "presence_penalty": getattr(args, "presence_penalty", None),
            "frequency_penalty": getattr(args, "frequency_penalty", None),
            "repetition_penalty": getattr(args, "repetition_penalty", None),
            "min_tokens": getattr(args, "min_tokens", None),
            "ignore_eos": True if getattr(args, "ignore_eos", False) else None,
            "stop_token_ids": tuple(args.stop_token_id) if getattr(args, "stop_token_id", None) else None,
            "ar_fallback": getattr(args, "ar_fallback", None),
            "skip_special_tokens": True if getattr(args, "skip_special_tokens", False) else None,
            "bad_words": pipe.bad_words_ids(bad) if bad and pipe is not None else None}


def _grammar(args):
    """The structured-output option given (--json-schema, --json-object, --regex, --choice, --grammar), or None."""
    from .structured import Grammar, GrammarError

    try:
        if getattr(args, "json_schema", None) is not None:
            text = args.json_schema
            if not text.lstrip().startswith(("{", "true", "false")):
                path = Path(text)
                if not path.is_file():
                    raise UsageError(f"--json-schema takes a JSON schema or a file holding one; no file {text!r}")
                text = path.read_text()
            return Grammar.json_schema(text)
        if getattr(args, "json_object", False):
            return Grammar.json_object()
        if getattr(args, "regex", None) is not None:
            return Grammar.regex(args.regex)
        if getattr(args, "choice", None):
            return Grammar.choice(args.choice)
        if getattr(args, "grammar", None) is not None:
            path = Path(args.grammar)
            if not path.is_file():
                raise UsageError(f"--grammar takes a Lark grammar file; no file {args.grammar!r}")
            return Grammar.lark(path.read_text())
    except GrammarError as e:
        raise UsageError(str(e)) from None
    return None


def _logit_bias(items: list[str] | None) -> dict[int, float] | None:
    if not items:
        return None
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            out[int(key)] = float(value)
        except ValueError:
            raise UsageError(f"--logit-bias takes ID=BIAS (a token id and a number), got {item!r}") from None
        if not sep:
            raise UsageError(f"--logit-bias takes ID=BIAS (a token id and a number), got {item!r}")
    return out


def model_path(args) -> str:
    """MODEL as given, or the shipped default code model when none is named."""
    if getattr(args, "model", None):
        return args.model
    from .assets import shipped_model

    try:
        return str(shipped_model())
    except FileNotFoundError as e:
        raise UsageError(f"{e}; name a checkpoint directory or a Hugging Face hub id") from None


def load_pipeline(args):
    import torch

    from .pipeline import Pipeline

    name = DTYPE_ALIASES.get(getattr(args, "dtype", None), getattr(args, "dtype", None))
    dtype = getattr(torch, name) if name and name != "auto" else None
    adapter, device = getattr(args, "adapter", None), getattr(args, "device", None)
    template = getattr(args, "chat_template", None)
    if template is not None:  # read and checked before the model loads
        template = chat_template_arg(template)
    source, override = generation_config_arg(args)
    kw = dict(adapter=adapter, dtype=dtype, device=device, compile=getattr(args, "compile", False),
              quantization=quantization_arg(args), revision=getattr(args, "revision", None),
              download_dir=getattr(args, "download_dir", None), tokenizer=getattr(args, "tokenizer", None))
    if adapter and not getattr(args, "model", None):  # `--adapter DIR` alone: the base the adapter records
        from .pipeline import adapter_base

        pipe = Pipeline.load(str(adapter_base(Path(adapter))), **kw)
    else:
        pipe = Pipeline.load(model_path(args), **kw)
    if template is not None:
        if pipe.tokenizer is None:
            raise UsageError("--chat-template: this checkpoint has no tokenizer.json to render it with")
        pipe.tokenizer.chat_template = template
    if source is not None or override:
        base = pipe.generation_config if source is None else source
        try:
            pipe.set_generation_config({**base, **override})
        except ValueError as e:
            raise UsageError(f"--override-generation-config: {e}") from None
    return pipe


GENERATION_KEYS = ("max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold",
                   "confidence_threshold", "restarts", "max_new_tokens")


def generation_config_arg(args) -> tuple[dict | None, dict]:
    """--generation-config (None: the checkpoint's) and --override-generation-config, read and checked before the
    model loads. The override's entropy_bound goes where generation_config.json keeps it (sampler_config)."""
    from .sampler import SamplerConfig
    from .weights import read_generation_config

    given = getattr(args, "generation_config", None) or "auto"
    source = None
    if given == "vllm":
        source = {}
    elif given != "auto":
        if not (Path(given).expanduser() / "generation_config.json").is_file():
            raise UsageError(f"--generation-config takes auto, vllm or a directory holding generation_config.json; "
                             f"got {given!r}")
        source = read_generation_config(Path(given).expanduser())
    text = getattr(args, "override_generation_config", None)
    if not text:
        return source, {}
    try:
        override = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--override-generation-config is not valid JSON ({e.msg})") from None
    if not isinstance(override, dict):
        raise UsageError("--override-generation-config takes a JSON object")
    unknown = sorted(set(override) - set(GENERATION_KEYS))
    if unknown:
        raise UsageError(f"--override-generation-config: unknown key(s) {', '.join(unknown)}; dgemma's are "
                         f"{', '.join(GENERATION_KEYS)}")
    if "entropy_bound" in override:
        override["sampler_config"] = {"entropy_bound": override.pop("entropy_bound"),
                                      "_cls_name": "EntropyBoundSamplerConfig"}
    max_new = override.get("max_new_tokens")
    if max_new is not None and (not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1):
        raise UsageError(f"--override-generation-config: max_new_tokens must be a positive integer, got {max_new!r}")
    try:
        SamplerConfig.from_generation_config(override)
    except ValueError as e:
        raise UsageError(f"--override-generation-config: {e}") from None
    return source, override


def split_model_prompt(args) -> None:
    """`generate [MODEL] PROMPT`: one positional is the prompt (default model) unless it names a model: an
    existing directory, or an org/name hub id while the prompt comes from --prompt-file or stdin."""
    import re

    if args.prompt is not None or args.model is None:
        return
    given = args.model
    if Path(given).expanduser().is_dir() or (given.endswith(".gguf") and Path(given).expanduser().is_file()):
        return
    if re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", given) and (args.prompt_file or not sys.stdin.isatty()):
        return
    args.model, args.prompt = None, given


def run_one(pipe, prompt_ids, params, *, show_canvas: bool, stream_text: bool, engine=None):
    """Run one request, drawing the canvas (stderr) and/or printing text (stdout) as canvases commit. `engine`:
    one kept between calls (a chat with --prefix-cache), else a new one sized to the request."""
    from .display import CanvasView
    from .generate import Commit, Done, Draft

    view = CanvasView(pipe.tokenizer) if show_canvas else None
    if engine is None:
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
                text = pipe.tokenizer.decode(so_far, skip_special=params.skip_special_tokens)
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


def _read_text(path: str, flag: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag}: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def _read_prompt(args) -> str:
    if args.prompt_file:
        return _read_text(args.prompt_file, "--prompt-file")
    if args.prompt is not None:
        return args.prompt
    if not sys.stdin.isatty():
        return sys.stdin.read()
    raise UsageError("no prompt: give PROMPT, --prompt-file, or pipe text on stdin")


FILL = "[FILL]"


def cmd_generate(args) -> int:
    from .display import describe_stats
    from .vision import IMAGE_MARKER

    split_model_prompt(args)
    text = _read_prompt(args)
    pipe = load_pipeline(args)
    opts = sampling_options(args, pipe)
    if text == "":
        raise UsageError("the prompt is empty")
    n_suffix = None
    if args.infill:
        if args.suffix is not None:
            raise UsageError("give either --infill (a [FILL] hole in the prompt) or --suffix, not both")
        if FILL not in text:
            raise UsageError(f"--infill needs the prompt to mark the hole with {FILL}")
        text, args.suffix = text.split(FILL, 1)
    if args.draft is not None:
        if args.ar:
            raise UsageError("--draft needs diffusion decoding: --ar has no canvas to start from")
        opts["init_canvas"] = pipe.encode(args.draft, add_bos=False)
    if args.prediction is not None or args.prediction_file is not None:
        if args.ar:
            raise UsageError("--prediction needs diffusion decoding: --ar has no canvas to start from")
        if args.prediction is not None and args.prediction_file is not None:
            raise UsageError("give either --prediction or --prediction-file, not both")
        predicted = args.prediction if args.prediction is not None else _read_text(args.prediction_file,
                                                                                   "--prediction-file")
        opts["prediction"] = pipe.encode(predicted, add_bos=False)
        if not opts["prediction"]:
            raise UsageError("the prediction is empty")
    images = None
    if args.image_tokens and not args.image:
        raise UsageError("--image-tokens goes with --image")
    if args.image:
        if args.suffix is not None:
            raise UsageError("--image cannot be combined with infilling (--suffix, --infill)")
        images = [pipe.image(path, args.image_tokens) for path in args.image]
        opts["images"] = tuple(images)
        if IMAGE_MARKER not in text:
            text = IMAGE_MARKER * len(images) + text
    if args.suffix is not None:
        prompt_ids, params, n_suffix = pipe.infill_request(text, args.suffix, ar=args.ar, **opts)
    else:
        prompt_ids = pipe.encode_chat([{"role": "user", "content": text}], images=images) if args.chat \
            else pipe.encode(text, images=images)
        params = pipe.params(ar=args.ar, **opts)
    stream = not args.json and n_suffix is None
    done = run_one(pipe, prompt_ids, params, show_canvas=args.show_canvas, stream_text=stream)
    if n_suffix is not None:
        done = pipe.trim_infill(done, n_suffix, params.skip_special_tokens)
    lps = None
    if done.logprobs is not None:
        piece = (lambda t: pipe.tokenizer.decode([t])) if pipe.tokenizer is not None else str  # noqa: E731
        lps = [{"token": t, "text": piece(t), "logprob": v, "entropy": h,
                "top_logprobs": [{"token": a, "text": piece(a), "logprob": w} for a, w in top]}
               for t, v, top, h in zip(done.tokens, done.logprobs, done.top_logprobs, done.entropies)]
    if args.json:
        out = {"text": done.text, "tokens": done.tokens, "finish_reason": done.finish_reason, "stats": done.stats}
        print(json.dumps(out if lps is None else {**out, "logprobs": lps}, indent=2, ensure_ascii=False))
        return 0
    if lps is not None:
        print("\nlogprob  entropy  token   (most likely there)", file=sys.stderr)
        for e in lps:
            alts = "  ".join(f"{a['text']!r} {a['logprob']:.2f}" for a in e["top_logprobs"])
            print(f"{e['logprob']:7.3f}  {e['entropy']:7.3f}  {e['text']!r}" + (f"   ({alts})" if alts else ""),
                  file=sys.stderr)
    if n_suffix is not None:
        body = done.text if done.text is not None else " ".join(map(str, done.tokens))
        print(f"{text}\x1b[4m{body}\x1b[0m{args.suffix}" if sys.stdout.isatty() else body)
    print(f"[{describe_stats(done.stats)}]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from .display import describe_stats
    from .generate import GenerationError
    from .tools import read_reply

    pipe = load_pipeline(args)
    opts = sampling_options(args, pipe)
    tools, names, forced = _chat_tools(args, pipe, structured=opts["grammar"] is not None)
    if opts["grammar"] is not None and args.think:
        opts["grammar"] = opts["grammar"].after_thought(pipe.tokenizer)
    # A forced call (--tool-choice required/NAME) is the reply to a user turn; after its results the model is free.
    first = dict(opts, grammar=forced) if forced is not None else opts
    pipe.params(ar=args.ar, **first)  # validate the options before the first turn
    engine = None
    if args.prefix_cache:
        if args.max_context < 1:
            raise UsageError(f"--max-context must be positive, got {args.max_context}")
        engine = pipe.engine(max_rows=1, drafts=args.show_canvas, prefix_cache=True,
                             max_len=min(args.max_context, pipe.model.cfg.max_position_embeddings))
    template_kw = {"tools": tools, "enable_thinking": args.think}
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    if interactive:
        print("dgemma chat: /image PATH adds an image to your next message, /reset clears the conversation, /exit "
              "quits.", file=sys.stderr)

    def ask(prompt: str) -> str | None:
        try:
            return input(prompt if interactive else "")
        except EOFError:
            return None

    pending = False  # tool results were just added: the model answers without a new user turn
    images = []  # /image PATH: images for the next user message
    while True:
        if not pending:
            line = ask("> ")
            if line is None:
                break
            line = line.strip()
            if not line:
                continue
            if line in ("/exit", "/quit"):
                break
            if line == "/reset":
                messages = messages[:1] if args.system else []
                images = []
                continue
            if line.startswith("/image"):
                path = line[len("/image"):].strip()
                try:
                    images.append(pipe.image(path if path else None))
                    print(f"[{images[-1]!r}: goes with your next message]", file=sys.stderr)
                except GenerationError as e:
                    print(f"[{e}]", file=sys.stderr)
                continue
            parts = [{"type": "image", "image": img} for img in images]
            messages.append({"role": "user", "content": parts + [{"type": "text", "text": line}] if parts else line})
            images = []
        turn, seen = pipe.chat_messages(messages)
        prompt_ids = pipe.encode_chat(turn, images=seen, **template_kw)
        run_opts = dict(opts if pending else first, images=tuple(seen) or None)
        done = run_one(pipe, prompt_ids, pipe.params(ar=args.ar, **run_opts),
                       show_canvas=args.show_canvas, stream_text=True, engine=engine)
        pending = False
        print(f"[{describe_stats(done.stats)}]", file=sys.stderr, flush=True)
        thought, content, calls, _ = read_reply(done.text or "", done.finish_reason, thinking=args.think, names=names)
        if thought is not None:
            print(f"[thought: {len(thought)} characters]", file=sys.stderr)
        if not calls:
            messages.append({"role": "assistant", "content": content})
            continue
        messages.append({"role": "assistant", "content": content, "tool_calls": [c.openai() for c in calls]})
        for call in calls:
            print(f"[tool call {call.name}({call.arguments})]", file=sys.stderr, flush=True)
            result = ask(f"{call.name} result> ")
            if result is None:
                return 0
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result.strip()})
        pending = True
    return 0


def _chat_tools(args, pipe, structured: bool):
    """(tools, their names, the grammar that forces a call or None) from --tools and --tool-choice."""
    from .tools import ToolError, tool_setup

    if args.tools is None:
        if args.tool_choice is not None:
            raise UsageError("--tool-choice needs --tools")
        return None, None, None
    if structured and args.tool_choice not in (None, "auto", "none"):
        raise UsageError("--tool-choice required/NAME decodes under the call grammar; it cannot be combined with "
                         "a structured-output option")
    try:
        return tool_setup(_json_arg(args.tools, "--tools"), args.tool_choice or "auto", pipe.tokenizer,
                          thinking=args.think)
    except ToolError as e:
        raise UsageError(str(e)) from None


def _json_arg(text: str, flag: str):
    """A JSON value given inline or as a file's path."""
    if not text.lstrip().startswith(("[", "{")):
        path = Path(text)
        if not path.is_file():
            raise UsageError(f"{flag} takes JSON or a file holding it; no file {text!r}")
        text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{flag}: not valid JSON ({e})") from None


# ---------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


# ---------------------------------------------------------------- serve
def _lora_module(spec: str) -> tuple[str, str]:
    """`--lora NAME=PATH` (or vLLM's `{"name": NAME, "path": PATH}`) -> (NAME, PATH), the directory checked here so
    a typo fails before the model loads."""
    if spec.lstrip().startswith("{"):
        try:
            d = json.loads(spec)
        except json.JSONDecodeError as e:
            raise UsageError(f"--lora-modules {spec}: not valid JSON ({e.msg})") from None
        name, path = d.get("name"), d.get("path")
        if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
            raise UsageError(f"--lora-modules {spec}: needs string \"name\" and \"path\"")
        spec = f"{name}={path}"
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise UsageError(f"--lora takes NAME=PATH, got {spec!r}")
    if not (Path(path).expanduser() / "adapter_config.json").is_file():
        raise UsageError(f"--lora {spec}: {path} is not a LoRA adapter directory (no adapter_config.json)")
    return name, str(Path(path).expanduser())


def _image_limit(text: str | None) -> int | None:
    """--limit-mm-per-prompt '{"image": N}' (vLLM's) -> N; video and audio only as 0 (dgemma takes neither)."""
    if text is None:
        return None
    try:
        limits = json.loads(text)
    except json.JSONDecodeError:
        limits = None
    if not isinstance(limits, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                               for v in limits.values()):
        raise UsageError(f"--limit-mm-per-prompt takes a JSON object of counts, e.g. '{{\"image\": 2}}'; got {text!r}")
    unknown = sorted(set(limits) - {"image", "video", "audio"})
    if unknown:
        raise UsageError(f"--limit-mm-per-prompt: unknown modality {', '.join(unknown)} (image, video, audio)")
    for kind in ("video", "audio"):
        if limits.get(kind):
            raise UsageError(f"--limit-mm-per-prompt: dgemma takes no {kind} input ({kind} may only be 0)")
    return limits.get("image")


LOG_LEVELS = ["critical", "error", "warning", "info", "debug", "trace"]


def _origins(text: str) -> list[str] | str:
    """--cors-origin ORIGIN, or vLLM's --allowed-origins '["*"]' (a JSON list)."""
    if not text.lstrip().startswith("["):
        return text
    try:
        origins = json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"not a JSON list of origins: {text!r}") from None
    if not isinstance(origins, list) or not all(isinstance(o, str) and o for o in origins):
        raise argparse.ArgumentTypeError(f"not a JSON list of origins: {text!r}")
    return origins


def _adaptive_steps(text: str | None) -> tuple[int, int] | None:
    """`--adaptive-steps ROWS[:MIN_STEPS]` (MIN_STEPS default 4)."""
    if text is None:
        return None
    rows, _, floor = text.partition(":")
    try:
        value = (int(rows), int(floor) if floor else 4)
    except ValueError:
        value = None
    if value is None or min(value) < 1:
        raise UsageError(f"--adaptive-steps takes ROWS[:MIN_STEPS], both positive integers, got {text!r}")
    return value


def _need_serve(command: str, *names: str) -> None:
    """One readable line when a module of the `serve` extra that `command` needs is not installed."""
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            raise UsageError(f"dgemma {command} needs the serve extra ({name} is missing): "
                             "pip install 'dgemma[serve]'") from None


def cmd_serve(args) -> int:
    import os

    check_vllm_args(args, "serve")
    _need_serve("serve", "fastapi", "uvicorn", *(("httpx", "python_multipart") if args.batch_dir else ()),
                *(("httpx",) if args.allowed_media_domains else ()))
    from .serve.app import check_dirs, check_port, run

    settings = _server_settings(args, host=args.host, port=args.port,
                                api_key=args.api_key or os.environ.get("DGEMMA_API_KEY") or None,
                                max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                                cors_origins=tuple(o for x in args.cors_origin or ()
                                                   for o in (x if isinstance(x, list) else [x])),
                                allow_runtime_lora=args.allow_runtime_lora, scheduling_policy=args.scheduling_policy,
                                batch_dir=args.batch_dir, responses_store=args.responses_store,
                                responses_dir=args.responses_dir, root_path=args.root_path,
                                ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
                                access_log=not args.disable_uvicorn_access_log)
    if (settings.lora_modules or settings.allow_runtime_lora) and args.compile:
        raise UsageError("--lora and --allow-runtime-lora cannot be combined with --compile (torch.compile does not "
                         "apply to a model serving LoRA adapters)")
    check_port(settings.host, settings.port)  # before the (slow) model load
    check_dirs(settings)
    run(_server_pipeline(args, settings), settings, log_level=args.uvicorn_log_level or args.log_level)
    return 0


def _server_settings(args, **kw):
    """The ServerSettings of the options `serve` and `run-batch` share, plus `kw`."""
    from .serve.settings import ServerSettings

    names = args.served_model_name or [args.model_name or (Path(str(args.adapter or args.model).rstrip("/")).name
                                                           if args.adapter or args.model else "dgemma-code")]
    return ServerSettings(
        model_name=names[0], model_aliases=tuple(names[1:]),
        max_concurrency=args.max_concurrency, max_tokens_limit=args.max_tokens_limit, max_context=args.max_context,
        prefix_cache=args.prefix_cache, prefix_margin=args.prefix_cache_margin,
        lora_modules=tuple(_lora_module(m) for m in args.lora or ()),
        adaptive_steps=_adaptive_steps(args.adaptive_steps), prefill_chunk=args.prefill_chunk, seed=args.seed,
        trust_request_chat_template=args.trust_request_chat_template, max_lora_rank=args.max_lora_rank,
        limit_images=_image_limit(args.limit_mm_per_prompt),
        allowed_media_domains=tuple(",".join(args.allowed_media_domains or ()).split(",")),
        allowed_local_media_path=args.allowed_local_media_path, **kw)


def _server_pipeline(args, settings):
    """The pipeline a server runs: the model, its LoRA modules attached, a tokenizer required."""
    if settings.lora_modules and args.compile:
        raise UsageError("--lora cannot be combined with --compile (torch.compile does not apply to a model "
                         "serving LoRA adapters)")
    if settings.lora_modules and settings.max_lora_rank is not None:  # before the (slow) model load
        from .adapters import AdapterError
        from .serve.app import check_lora_rank

        try:
            for _, path in settings.lora_modules:
                check_lora_rank(path, settings.max_lora_rank)
        except AdapterError as e:
            raise UsageError(str(e)) from None
    gpu_memory_limit(args.gpu_memory_utilization, args.device)
    pipe = load_pipeline(args)
    if settings.lora_modules:
        from .adapters import AdapterError, attach_adapters
        from .quant import QuantConfig
        from .train.lora import BASE_QUANTIZATION, LoRAError, read_adapter_config

        have = QuantConfig.of(pipe.model.cfg)
        for name, path in settings.lora_modules:  # trained over a base quantized as it loaded (train --quantization)
            try:
                want = read_adapter_config(path).get(BASE_QUANTIZATION)
            except LoRAError:
                continue  # attach_adapters says what is wrong with it
            if want is not None and (have is None or have.to_dict() != want):
                print(f"dgemma serve: warning: LoRA module {name!r} was trained over a base quantized as "
                      f"{QuantConfig.from_dict(want).scheme} as it loaded (--quantization); this base is "
                      f"{'not quantized' if have is None else 'quantized otherwise'}, so its outputs differ from "
                      "those it was trained for", file=sys.stderr)

        try:
            attach_adapters(pipe.model, [path for _, path in settings.lora_modules])
        except AdapterError as e:
            raise UsageError(str(e)) from None
    if pipe.tokenizer is None:
        raise UsageError(f"{model_path(args)} has no tokenizer.json; the server needs one to read and write text")
    return pipe


def _is_url(name: str) -> bool:
    return name.startswith(("http://", "https://"))


def _download(url: str, dest: Path) -> None:
    """GET `url` into `dest` (vLLM's run-batch reads its input from a URL too, e.g. a presigned one)."""
    import httpx

    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=60) as r, open(dest, "wb") as f:
            if r.status_code >= 400:
                raise UsageError(f"reading {url}: HTTP {r.status_code}")
            for chunk in r.iter_bytes(1 << 20):
                f.write(chunk)
    except httpx.HTTPError as e:
        raise UsageError(f"reading {url}: {e}") from None


def _upload(path: Path, url: str, tries: int = 3) -> None:
    """PUT the file at `path` to `url`, a few tries; on failure the file stays (the message names it)."""
    import httpx

    error = ""
    for k in range(tries):
        try:
            with open(path, "rb") as f:
                r = httpx.put(url, content=f, timeout=600)
            if r.status_code < 300:
                return
            error = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            error = str(e)
        time.sleep(min(2 ** k, 10) if k + 1 < tries else 0)
    raise UsageError(f"uploading to {url} failed ({error}); the answers are in {path}")


def cmd_run_batch(args) -> int:
    import hashlib
    import tempfile

    _need_serve("run-batch", "fastapi", "httpx")
    check_vllm_args(args, "run-batch")
    settings = _server_settings(args)
    tmp_dir = Path(args.output_tmp_dir or tempfile.gettempdir())
    if not tmp_dir.is_dir():
        raise UsageError(f"--output-tmp-dir {tmp_dir}: no such directory")
    # an output URL: answers kept under --output-tmp-dir first, by a name the URL fixes (so a rerun resumes), and
    # PUT there at the end
    out = tmp_dir / f"dgemma-batch-{hashlib.sha256(args.output_file.encode()).hexdigest()[:16]}.jsonl" \
        if _is_url(args.output_file) else Path(args.output_file)
    if out.is_dir() or not out.parent.is_dir():
        raise UsageError(f"{out}: not a file in an existing directory")
    downloaded = None
    if _is_url(args.input_file):
        downloaded = inp = Path(tempfile.mkstemp(prefix="dgemma-batch-input-", suffix=".jsonl", dir=tmp_dir)[1])
    else:
        inp = Path(args.input_file)
        if not inp.is_file():
            raise UsageError(f"{inp}: no such file")
        if out.resolve() == inp.resolve():
            raise UsageError("the output file is the input file")
    try:
        if downloaded is not None:
            _download(args.input_file, downloaded)
        summary = _answer_batch(args, settings, inp, out)
    finally:
        if downloaded is not None:
            downloaded.unlink(missing_ok=True)
    if _is_url(args.output_file):
        _upload(out, args.output_file)
        out.unlink()
    if args.summary_json:
        from .io import atomic_write_text

        atomic_write_text(args.summary_json, json.dumps(summary.as_dict(), indent=2) + "\n")
    if not args.quiet:
        tps = summary.completion_tokens / summary.wall_s if summary.wall_s else 0.0
        print(f"run-batch: wrote {args.output_file}: {summary.lines} lines ({summary.resumed} from an earlier run), "
              f"{summary.ok} ok, {summary.failed} failed, {summary.invalid} invalid; {summary.completion_tokens} "
              f"tokens written in {summary.wall_s:.1f} s ({tps:.1f} tok/s)", file=sys.stderr)
    return 0


def _answer_batch(args, settings, inp: Path, out: Path):
    """run-batch's run: the model loaded, the file answered with progress lines."""
    import logging

    from .serve.batch import BatchError, run_batch

    partial = out.with_name(out.name + ".partial")
    if partial.exists() and not args.quiet:
        print(f"run-batch: resuming after the answers in {partial}", file=sys.stderr)
    pipe = _server_pipeline(args, settings)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise, at --log-level info
    t0 = time.perf_counter()

    def progress(s) -> None:
        if not args.quiet:
            rate = (s.lines - s.resumed) / max(time.perf_counter() - t0, 1e-9)
            print(f"run-batch: {s.lines} lines answered ({s.ok} ok, {s.failed} failed, {s.invalid} invalid), "
                  f"{rate:.2f} lines/s", file=sys.stderr)

    try:
        return run_batch(pipe, settings, inp, out, progress=progress)
    except BatchError as e:
        raise UsageError(str(e)) from None


# ---------------------------------------------------------------- train
def _add_train_options(s, *, steps=1000, batch=32, lr=3e-4, warmup=100, wd=0.0, beta2=0.95, save_every=500,
                       eval_every=0, log_every=10) -> None:
    """Optimizer, objective and run options shared by `train` and `sudoku train`."""
    s.add_argument("--out", help="run directory: train_config.json, log.jsonl, checkpoints/, final/")
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
                   "(options come from the run's train_config.json)")
    s.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    s.add_argument("--batch-size", type=int, default=batch,
                   help=f"examples per optimizer step, over all processes (default {batch})")
    s.add_argument("--micro-batch", type=int, help="examples per forward per process (gradient accumulation)")
    s.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    s.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr (default 0.1)")
    s.add_argument("--warmup", type=int, default=warmup, help=f"linear warmup steps (default {warmup})")
    s.add_argument("--weight-decay", type=float, default=wd, help=f"AdamW weight decay on matrices (default {wd})")
    s.add_argument("--beta1", type=float, default=0.9)
    s.add_argument("--beta2", type=float, default=beta2)
    s.add_argument("--clip", type=float, default=1.0, help="max gradient norm, 0 = off (default 1.0)")
    s.add_argument("--eps", type=float, default=1e-3, help="noise level t ~ U(eps, 1) (default 1e-3)")
    s.add_argument("--sc-prob", type=float, default=0.5, help="self-conditioning probability (default 0.5)")
    s.add_argument("--diffusion-weight", type=float, default=1.0, help="weight of the canvas loss (default 1)")
    s.add_argument("--ar-weight", type=float, default=1.0, help="weight of the encoder's AR loss (default 1)")
    s.add_argument("--ar-on-prompt", action="store_true", help="also train next-token prediction on the prompt")
    s.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0 = full training)")
    s.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha; the update is scaled alpha/rank")
    s.add_argument("--lora-targets", default="all", help="comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,"
                   "up_proj,down_proj,experts,router, or all (default: all but the router)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--log-every", type=int, default=log_every, help=f"log interval in steps (default {log_every})")
    s.add_argument("--save-every", type=int, default=save_every, help=f"checkpoint interval (default {save_every})")
    s.add_argument("--keep", type=int, default=3, help="checkpoints kept, 0 = all (default 3)")
    s.add_argument("--eval-every", type=int, default=eval_every, help="evaluation interval, 0 = at the end only")
    s.add_argument("--eval-examples", type=int, default=256, help="held-out examples per evaluation (default 256)")
    s.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
    s.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast, fp32 master weights (for CUDA; on the CPU it works but is slower)")
    s.add_argument("--threads", type=nonneg_int, default=0, help="torch CPU threads per process (default: torch's)")
    s.add_argument("--workers", type=int, default=0, help="processes that build batches ahead of the GPU "
                   "(default 0: inline; the batches are the same either way)")
    s.add_argument("--moe", choices=("auto", "sorted", "dense"), default="auto",
                   help="experts: sorted (each over its routed tokens) or dense (every expert over every token, "
                   "weighted 0 where not routed; fewer kernels, no host sync); auto: dense on CUDA with few experts")
    s.add_argument("--compile", action="store_true", help="torch.compile each decoder layer for the training "
                   "passes (a one-off compile time; evaluation stays eager)")
    s.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing: keep only each "
                   "layer's input and run the layer again in the backward (far less activation memory for about "
                   "one more forward's time; the same losses)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", dest="overrides",
                   help="model config override for a new model, e.g. --set hidden_size=128 (repeatable)")


def _train_config(args):
    from .train.trainer import TrainConfig

    if not args.out:
        raise UsageError("--out DIR is required")
    return TrainConfig(
        out=args.out, steps=args.steps, batch_size=args.batch_size, micro_batch=args.micro_batch, lr=args.lr,
        min_lr_ratio=args.min_lr_ratio, warmup=args.warmup, weight_decay=args.weight_decay, beta1=args.beta1,
        beta2=args.beta2, clip=args.clip, eps=args.eps, sc_prob=args.sc_prob, diffusion_weight=args.diffusion_weight,
        ar_weight=args.ar_weight, ar_on_prompt=args.ar_on_prompt, seed=args.seed, log_every=args.log_every,
        save_every=args.save_every, eval_every=args.eval_every, eval_examples=args.eval_examples, keep=args.keep,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
        device=args.device, bf16=args.bf16, threads=args.threads, workers=args.workers, moe=args.moe,
        compile=args.compile, gradient_checkpointing=args.gradient_checkpointing)


def _finish_training(trainer) -> int:
    last = trainer.fit()
    if trainer.dist.main:
        shown = {k: round(v, 4) for k, v in last.items() if isinstance(v, float)}
        print(json.dumps({"out": str(trainer.out), "step": trainer.step, **shown}))
    trainer.close()
    return 0


def cmd_train(args) -> int:
    from .train.run import merge, parse_overrides, prepare

    if args.train_cmd == "merge":
        out = merge(args.base, args.adapter, args.merged)
        print(f"merged {args.adapter} into {args.base} -> {out}")
        return 0
    if args.resume:
        if not args.out:
            raise UsageError("--resume needs --out RUN_DIR")
        return _finish_training(prepare(None, None, resume=True, out=args.out))
    if args.model and (args.preset or args.config):
        raise UsageError("give either --model PATH (fine-tune) or --preset/--config (from scratch), not both")
    quantization = quantization_arg(args)
    if quantization is not None and not args.model:
        raise UsageError("--quantization quantizes the --model being fine-tuned (QLoRA); a model trained from "
                         "scratch starts in full precision")
    if quantization is not None and not args.lora_rank:
        raise UsageError(f"--quantization {quantization.scheme} freezes the weights in {quantization.scheme}: train "
                         "LoRA adapters over them (--lora-rank R, QLoRA), or fine-tune the full-precision model "
                         "without --quantization")
    source = {"model": args.model, "preset": args.preset, "config": args.config,
              "overrides": _overrides(args, parse_overrides), "tokenizer": args.tokenizer, "data": args.data,
              "eval_data": args.eval_data, "max_len": args.max_len}
    if quantization is not None:
        source["quantization"] = quantization.to_dict()
    return _finish_training(prepare(_train_config(args), source))


def _overrides(args, parse) -> dict:
    over = parse(args.overrides)
    if over and getattr(args, "model", None):
        raise UsageError("--set changes the config of a new model; it cannot be used with --model")
    return over


def _add_train_parser(sub) -> None:
    s = sub.add_parser("train", help="train or fine-tune (full or LoRA) on JSONL data; torchrun for data parallel",
                       description="Train with the DiffusionGemma objective (canvas CE + encoder AR CE). "
                       "`dgemma train merge BASE ADAPTER OUT` folds a LoRA adapter into its base.")
    s.add_argument("--data", help="training JSONL: {prompt, response}, {messages} or {prompt_ids, response_ids}")
    s.add_argument("--eval-data", help="held-out JSONL, evaluated every --eval-every steps")
    src = s.add_argument_group("model (one of)")
    src.add_argument("--model", help="checkpoint to fine-tune (directory or hub id)")
    add_quantization_args(s, "(with --lora-rank: QLoRA from a full-precision checkpoint, no quantized copy on "
                          "disk; the adapter records it, and loading the adapter quantizes its base the same way)")
    src.add_argument("--preset", help="train a new model from scratch: tiny, small, bench-80m, 26b-a4b")
    src.add_argument("--config", help="train a new model from scratch from this config.json")
    s.add_argument("--tokenizer", help="directory with tokenizer.json (default: the model's)")
    s.add_argument("--max-len", type=int, help="skip examples longer than this (prompt + padded response)")
    _add_train_options(s)
    ts = s.add_subparsers(dest="train_cmd", metavar="[merge]")
    m = ts.add_parser("merge", help="fold a LoRA adapter into its base model: merge BASE ADAPTER OUT")
    m.add_argument("base", help="base checkpoint")
    m.add_argument("adapter", help="adapter directory (adapter_model.safetensors + adapter_config.json)")
    m.add_argument("merged", metavar="out", help="output checkpoint directory")
    s.set_defaults(func=cmd_train, train_cmd=None)


# ---------------------------------------------------------------- sudoku
def _clue_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise UsageError(f"--clues expects N or LO-HI, e.g. 30-36; got {text!r}") from None
    if not 17 <= lo_i <= hi_i <= 80:
        raise UsageError(f"--clues must lie within 17-80 with LO <= HI; got {text!r}")
    return lo_i, hi_i


def cmd_sudoku(args) -> int:
    from .tasks import sudoku as SU

    if args.sudoku_cmd == "gen":
        from .io import atomic_path

        clues = _clue_range(args.clues)
        with atomic_path(args.out) as tmp, open(tmp, "w") as f:
            for rec in SU.generate(args.n, clues, args.seed, workers=args.workers, progress=True):
                f.write(json.dumps(rec) + "\n")
        print(f"wrote {args.n} puzzles ({args.clues} clues) to {args.out}")
        return 0
    if args.sudoku_cmd == "train":
        from .train.run import parse_overrides

        if args.resume:
            if not args.out:
                raise UsageError("--resume needs --out RUN_DIR")
            return _finish_training(SU.prepare_training(None, None, resume=True, out=args.out))
        if not args.data:
            raise UsageError("--data TRAIN.jsonl is required (make one with `dgemma sudoku gen`)")
        source = {"task": "sudoku", "data": args.data, "eval_data": args.eval_data, "eval_puzzles": args.eval_puzzles,
                  "eval_steps": args.eval_steps, "augment": not args.no_augment,
                  "overrides": parse_overrides(args.overrides), "init_from": args.init_from}
        return _finish_training(SU.prepare_training(_train_config(args), source))
    from .tasks import sudoku_eval as EV
    from .weights import load_model

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    if args.sudoku_cmd == "eval":
        budgets = _int_list(args.steps)
        pairs = SU.read_puzzles(args.data, limit=args.n)
        model = load_model(args.model, dtype=torch_float32(), quiet=True).eval()
        base = _sudoku_sampler(args)
        print(f"sampler: temperature {base.t_min:g}-{base.t_max:g}, entropy bound {base.entropy_bound:g}, early stop "
              f"after {base.stability_threshold} stable step(s) under mean entropy {base.confidence_threshold:g}, "
              f"{base.restarts} restart(s) for a board that never stops early")
        rows = []
        for st in EV.settings(budgets, early=not args.no_early, fixed=not args.no_fixed, ar=not args.no_ar,
                              seed=args.seed, sampler=base, constrain=args.constrain):
            r = EV.evaluate(model, pairs, st, batch=args.batch)
            rows.append(r)
            print(f"{r['setting']:<28} solve {100 * r['solve_rate']:6.2f}%  cells {100 * r['cell_accuracy']:6.2f}%  "
                  f"mean steps {r['mean_steps']:6.2f}" + (f"  restarted {100 * r['restarted']:.1f}%"
                                                          if r['restarted'] else "") + f"  ({r['wall_s']:.1f}s)",
                  flush=True)
        if args.json:
            from .io import atomic_write_text

            atomic_write_text(args.json, json.dumps({"model": args.model, "data": args.data, "results": rows},
                                                    indent=2) + "\n")
        return 0
    # solve
    from .generate import GenerationParams
    from .tasks.sudoku_board import is_solution, parse, pretty, solve, to_string

    if args.puzzle is None:  # `sudoku solve PUZZLE`: the shipped model
        if args.model is None:
            raise UsageError("give the puzzle: 81 characters, digits and . or 0 for blanks")
        args.model, args.puzzle = None, args.model
    cells = parse(args.puzzle)  # a bad string is a one-line error before the model loads
    if args.model is None:
        from .assets import shipped_model

        try:
            args.model = str(shipped_model("sudoku"))
        except FileNotFoundError as e:
            raise UsageError(f"{e}; name a Sudoku checkpoint: dgemma sudoku solve MODEL PUZZLE") from None
    model = load_model(args.model, dtype=torch_float32(), quiet=True).eval()
    sampler = _sudoku_sampler(args)
    if args.steps is not None:
        sampler = sampler.replace(max_denoising_steps=args.steps)
    if args.no_early:
        sampler = sampler.replace(confidence_threshold=0.0)
    params = GenerationParams(max_new_tokens=81, seed=args.seed, sampler=sampler,
                              allowed=SU.allowed_tokens(to_string(cells), model.cfg.canvas_length)
                              if args.constrain else None)
    print(pretty(cells) + "\n")
    done = EV.print_solve(model, to_string(cells), params)
    board, steps = SU.board_from_ids(done.tokens), done.stats["steps_per_canvas"][0]
    if board is None:
        print(f"no board: the model did not write 81 digits ({steps} steps)")
        return 1
    ok = is_solution(cells, [int(c) for c in board])
    print(pretty(board))
    n_sol = len(solve(cells, 2))
    restarts = done.stats["restarts_per_canvas"][0]
    verdict = ("solved" if ok else "wrong") + f" in {steps} denoising steps" + (
        f" over {restarts + 1} attempts" if restarts else "")
    verdict += " (the unique solution)" if ok and n_sol == 1 else (
        f" (the puzzle has {'no' if not n_sol else 'more than one'} solution)" if n_sol != 1 else "")
    print(verdict)
    return 0 if ok else 1


def _sudoku_sampler(args):
    """The checkpoint's own decoding settings (generation_config.json), with the sampler flags given on top."""
    from .sampler import SamplerConfig
    from .weights import read_generation_config, resolve

    ckpt = resolve(args.model)
    gen = read_generation_config(ckpt)
    try:
        base = SamplerConfig.from_generation_config(gen) if gen else SamplerConfig()
    except (ValueError, TypeError, KeyError) as e:
        raise UsageError(f"{ckpt / 'generation_config.json'}: bad sampler settings: {e}") from None
    overrides = {k: getattr(args, k) for k in ("t_min", "t_max", "entropy_bound", "confidence_threshold",
                                               "stability_threshold", "restarts") if getattr(args, k) is not None}
    try:
        return base.replace(**overrides)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _add_sudoku_sampler_args(p) -> None:
    g = p.add_argument_group("sampler (defaults come from the checkpoint's generation_config.json)")
    g.add_argument("--t-min", type=float, help="temperature at the end of the schedule")
    g.add_argument("--t-max", type=float, help="temperature at the start of the schedule")
    g.add_argument("--entropy-bound", type=float, help="EntropyBound acceptance budget per step")
    g.add_argument("--stability", dest="stability_threshold", type=int,
                   help="steps the draft must stay unchanged to stop early (0: off)")
    g.add_argument("--confidence", dest="confidence_threshold", type=float,
                   help="mean entropy under which a stable canvas stops early")
    g.add_argument("--restarts", type=int, help="times a board that never stops early starts again from fresh "
                   "noise (the most confident attempt is kept; every attempt's steps count)")
    g.add_argument("--constrain", action="store_true", help="decode under the puzzle's constraint: a blank cell "
                   "may only take a digit no given in its row, column or box holds (constrained decoding)")


def torch_float32():
    import torch

    return torch.float32


def device_arg(text: str) -> str:
    """argparse type: a device dgemma runs on that this machine has (cpu, cuda, cuda:N)."""
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device (or torch was built without "
                                         "CUDA); use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a bad value is argparse's one-line error)."""
    return _int_at_least(text, 1, "a positive integer")


def nonneg_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"expected a comma list of integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise UsageError(f"step budgets must be positive integers, got {text!r}")
    return vals


def _add_sudoku_parser(sub) -> None:
    s = sub.add_parser("sudoku", help="the Sudoku recipe: gen | train | eval | solve")
    ss = s.add_subparsers(dest="sudoku_cmd", metavar="gen|train|eval|solve")
    ss.required = True
    g = ss.add_parser("gen", help="generate puzzles with unique solutions (JSONL)")
    g.add_argument("--out", required=True, help="output JSONL file")
    g.add_argument("--n", type=positive_int, default=1000, help="number of puzzles (default 1000)")
    g.add_argument("--clues", default="30-36", help="clue count N or range LO-HI (default 30-36)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workers", type=positive_int, default=1, help="processes (default 1)")
    t = ss.add_parser("train", help="train the recipe's model from scratch (see recipes/sudoku.md)")
    t.add_argument("--data", help="training puzzles (JSONL from `sudoku gen`)")
    t.add_argument("--eval-data", help="held-out puzzles: eval loss and solve rate during training")
    t.add_argument("--eval-puzzles", type=int, default=200, help="puzzles in each solve-rate check (default 200)")
    t.add_argument("--eval-steps", type=int, default=12, help="step budget of that check (default 12)")
    t.add_argument("--no-augment", action="store_true", help="no random symmetries of the training puzzles")
    t.add_argument("--init-from", help="start from this Sudoku checkpoint (e.g. a finished run's final/) with a "
                   "new schedule, instead of a new model")
    _add_train_options(t, steps=20000, batch=64, lr=1e-3, warmup=500, wd=0.01, beta2=0.98, save_every=500,
                       eval_every=1000, log_every=20)
    e = ss.add_parser("eval", help="solve rate and denoising steps at step budgets, vs AR decoding")
    e.add_argument("model", help="checkpoint directory")
    e.add_argument("--data", required=True, help="puzzles JSONL")
    e.add_argument("--n", type=positive_int, default=1000, help="puzzles to evaluate (default 1000)")
    e.add_argument("--steps", default="12,24,48", help="step budgets (default 12,24,48)")
    e.add_argument("--no-early", action="store_true", help="skip the early-stopping runs")
    e.add_argument("--no-fixed", action="store_true", help="skip the runs without early stopping")
    e.add_argument("--no-ar", action="store_true", help="skip autoregressive decoding")
    e.add_argument("--batch", type=positive_int, default=250, help="puzzles decoded together (default 250)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", help="also write the results to this JSON file")
    e.add_argument("--threads", type=nonneg_int, default=0, help="torch CPU threads (default: torch's)")
    _add_sudoku_sampler_args(e)
    v = ss.add_parser("solve", help="solve one puzzle, showing the board fill in step by step")
    v.add_argument("model", nargs="?", help="checkpoint directory (default: the shipped Sudoku model)")
    v.add_argument("puzzle", nargs="?", help="81 characters: digits, and 0 or . for blanks")
    v.add_argument("--steps", type=int, help="step budget (default: the checkpoint's, 12 for the shipped model)")
    v.add_argument("--no-early", action="store_true", help="run all steps (no early stop)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--threads", type=nonneg_int, default=0, help="torch CPU threads (default: torch's)")
    _add_sudoku_sampler_args(v)
    s.set_defaults(func=cmd_sudoku)


# ---------------------------------------------------------------- code
def cmd_code(args) -> int:
    from .tasks import code as CO

    if args.code_cmd == "data":
        m = CO.build_data(args.out, root=args.source, vocab_size=args.vocab_size)
        print(f"{m['train_files']} training files ({m['train_tokens']:,} tokens), {m['heldout_files']} held-out files, "
              f"vocabulary {m['vocab_size']:,} -> {args.out} ({m['seconds']:.0f}s)")
        return 0
    if args.code_cmd == "train":
        from .train.run import parse_overrides

        if args.resume:
            if not args.out:
                raise UsageError("--resume needs --out RUN_DIR")
            return _finish_training(CO.prepare_training(None, None, resume=True, out=args.out))
        if not args.data:
            raise UsageError("--data DIR is required (make it with `dgemma code data --out DIR`)")
        source = {"task": "code", "data": args.data, "overrides": parse_overrides(args.overrides)}
        return _finish_training(CO.prepare_training(_train_config(args), source))
    from .tasks import code_eval as CE

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    settings = list(args.settings.split(",")) if args.settings else list(CE.SETTINGS)
    bad = [s for s in settings if s not in CE.SETTINGS + CE.EXTRA_SETTINGS]
    if bad:
        raise UsageError(f"unknown --settings {', '.join(bad)}; choose from "
                         f"{', '.join(CE.SETTINGS + CE.EXTRA_SETTINGS)}")
    for h in args.ar_fallback or []:
        if h < 0:
            raise UsageError("--ar-fallback takes a mean entropy >= 0")
        settings.append(f"completion:fallback@{h:g}")
    for tp in args.top_p or []:
        if not 0 <= tp <= 1:
            raise UsageError("--top-p takes a probability in [0, 1]")
        settings.append(f"completion:top_p@{tp:g}")
    report = CE.run_eval(args.model, args.data, n=args.n, steps=args.steps, seed=args.seed,
                         loss_examples=args.loss_examples, settings=tuple(settings), progress=True)
    print(CE.format_report(report))
    if args.json:
        from .io import atomic_write_text

        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0


def _add_code_parser(sub) -> None:
    s = sub.add_parser("code", help="the default code model's recipe: data | train | eval (see recipes/code.md)")
    ss = s.add_subparsers(dest="code_cmd", metavar="data|train|eval")
    ss.required = True
    d = ss.add_parser("data", help="tokenizer + tokenized training split + held-out files from Python sources")
    d.add_argument("--out", required=True, help="data directory")
    d.add_argument("--source", help="directory of .py files (default: this Python's standard library)")
    d.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default 8192)")
    t = ss.add_parser("train", help="train the code model from scratch")
    t.add_argument("--data", help="data directory from `dgemma code data`")
    _add_train_options(t, steps=1000, batch=16, lr=2e-3, warmup=100, wd=0.01, beta2=0.98, save_every=50,
                       eval_every=250, log_every=10)
    e = ss.add_parser("eval", help="held-out loss, and completion/infill of held-out functions, diffusion vs AR")
    e.add_argument("model", help="checkpoint directory")
    e.add_argument("--data", required=True, help="data directory from `dgemma code data` (its held-out files)")
    e.add_argument("--n", type=positive_int, default=200, help="held-out functions (default 200)")
    e.add_argument("--steps", type=positive_int, default=16, help="denoising steps per canvas (default 16)")
    e.add_argument("--loss-examples", type=positive_int, default=256,
                   help="held-out examples for the loss (default 256)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--settings", help="comma-separated rows to run (default: all of " + ", ".join(
        ("completion:diffusion", "completion:ar", "infill-canvas:diffusion", "infill-fim:diffusion",
         "infill-fim:ar")) + "; also completion:ar-draft, AR's answer refined by diffusion from it as the draft)")
    e.add_argument("--ar-fallback", type=float, action="append", metavar="H",
                   help="also completion by diffusion with canvases that end above mean entropy H decoded AR instead "
                        "(repeatable)")
    e.add_argument("--top-p", type=float, action="append", metavar="P",
                   help="also completion by diffusion with each step cut to its top-P nucleus (repeatable)")
    e.add_argument("--json", help="also write the report to this JSON file")
    e.add_argument("--threads", type=nonneg_int, default=0, help="torch CPU threads (default: torch's)")
    s.set_defaults(func=cmd_code)


# ---------------------------------------------------------------- quantize
def _check_destination(dst: Path, overwrite: bool) -> Path:
    """Fail before any work if DST cannot be written; returns the existing directory it will be created in."""
    import os

    if dst.exists():
        if not overwrite:
            raise UsageError(f"{dst} already exists; choose a new directory (or --overwrite to replace the "
                             "checkpoint there)")
        if not (dst / "config.json").is_file():
            raise UsageError(f"refusing to replace {dst}: it is not a checkpoint directory (no config.json)")
    parent = dst.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"cannot write {dst}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {dst}: {parent} is not writable")
    return parent


def cmd_quantize(args) -> int:
    import shutil
    import time

    import torch

    from .compressed import foreign_config
    from .config import preset
    from .gguf_model import linked_file
    from .quant import QuantConfig, quantize_checkpoint, weight_bytes, write_random_quantized
    from .weights import load_config, resolve

    paths = [p for p in (args.src, args.dst) if p is not None]
    if not args.random_preset and len(paths) == 2:
        src = resolve(paths[0])
        cfg = load_config(src)
        fq = foreign_config(src, cfg)  # llm-compressor's, ModelOpt's: without --scheme, into dgemma's layout
        if fq is not None and args.scheme is None:
            return _convert(args, src, Path(paths[1]), fq["quant_method"])
        if args.scheme is None and linked_file(src) is not None:  # a GGUF: into a float dgemma checkpoint
            return _convert_gguf(args, src, Path(paths[1]))
    if args.scheme is None:
        raise UsageError("give --scheme int8, int4, fp8 or nvfp4")
    qcfg = QuantConfig(args.scheme, args.group_size, embeddings=args.embeddings)
    if args.random_preset:
        if len(paths) != 1:
            raise UsageError("with --random-preset NAME give only DST")
        src, dst, cfg = None, Path(paths[0]), preset(args.random_preset)
    else:
        if len(paths) != 2:
            raise UsageError("give SRC and DST (or --random-preset NAME DST)")
        dst = Path(paths[1])
        if dst.absolute() == src.absolute():
            raise UsageError("DST must be a new directory, not SRC")
        if fq is not None:
            raise UsageError(f"{src} is already quantized ({fq['quant_method']} "
                             f"{QuantConfig.from_dict(fq).scheme}); "
                             "leave out --scheme to convert it into dgemma's layout, or quantize the "
                             "full-precision checkpoint")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    parent = _check_destination(dst, args.overwrite)
    need = weight_bytes(cfg, qcfg, dtype or torch.bfloat16)
    if shutil.disk_usage(parent).free < need * 1.05:
        raise UsageError(f"{parent} has {_fmt_bytes(shutil.disk_usage(parent).free)} free; the quantized "
                         f"checkpoint needs about {_fmt_bytes(need)}")
    log = None if args.quiet else (lambda m: print(f"dgemma quantize: {m}", file=sys.stderr, flush=True))
    shard = int(args.max_shard_gib * (1 << 30))
    t0 = time.perf_counter()
    try:
        if src is None:
            write_random_quantized(cfg, dst, qcfg, seed=args.seed, dtype=dtype or torch.bfloat16,
                                   max_shard_bytes=shard, log=log)
        else:
            quantize_checkpoint(src, dst, qcfg, dtype=dtype, max_shard_bytes=shard, log=log)
    except OSError as e:  # disk full, permissions changed mid-way: the partial output was already removed
        raise UsageError(f"writing {dst} failed: {e.strerror or e}") from None
    size = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    g = (f" group {qcfg.group_size}" if qcfg.group_size else "") + (", embedding too" if qcfg.embeddings else "")
    print(f"{dst}: {qcfg.scheme}{g}, {_fmt_bytes(size)} of weights "
          f"(float32: {_fmt_bytes(weight_bytes(cfg, None, torch.float32))}), {time.perf_counter() - t0:.1f}s")
    return 0


def _convert_gguf(args, src: Path, dst: Path) -> int:
    import shutil
    import time

    import torch

    from .gguf_model import GGUFError, convert, linked_file
    from .quant import weight_bytes
    from .weights import load_config

    if dst.absolute() == src.absolute():
        raise UsageError("DST must be a new directory, not SRC")
    if args.group_size is not None or args.embeddings:
        raise UsageError("--group-size and --embeddings go with --scheme")
    dtype = getattr(torch, args.dtype or "bfloat16")
    parent = _check_destination(dst, args.overwrite)
    need = weight_bytes(load_config(src), None, dtype)
    if shutil.disk_usage(parent).free < need * 1.05:
        raise UsageError(f"{parent} has {_fmt_bytes(shutil.disk_usage(parent).free)} free; the converted "
                         f"checkpoint needs about {_fmt_bytes(need)} (or give --scheme int4 to requantize)")
    log = None if args.quiet else (lambda m: print(f"dgemma quantize: {m}", file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    try:
        convert(src, dst, dtype=dtype, max_shard_bytes=int(args.max_shard_gib * (1 << 30)), log=log)
    except OSError as e:
        raise UsageError(f"writing {dst} failed: {e.strerror or e}") from None
    except GGUFError as e:
        raise UsageError(str(e)) from None
    size = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    print(f"{dst}: converted from {linked_file(src).name} into {str(dtype).removeprefix('torch.')}, "
          f"{_fmt_bytes(size)} of weights, {time.perf_counter() - t0:.1f}s")
    return 0


def _convert(args, src: Path, dst: Path, method: str) -> int:
    import shutil
    import time

    from .quant import convert_checkpoint

    if dst.absolute() == src.absolute():
        raise UsageError("DST must be a new directory, not SRC")
    if args.group_size is not None or args.dtype or args.embeddings:
        raise UsageError(f"converting a {method} checkpoint keeps its scheme and dtypes: leave out "
                         "--group-size, --dtype and --embeddings")
    parent = _check_destination(dst, args.overwrite)
    srcsize = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    free = shutil.disk_usage(parent).free
    if free < srcsize * 1.05:
        raise UsageError(f"{parent} has {_fmt_bytes(free)} free; the converted checkpoint needs "
                         f"about {_fmt_bytes(srcsize)}")
    log = None if args.quiet else (lambda m: print(f"dgemma quantize: {m}", file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    try:
        qcfg = convert_checkpoint(src, dst, max_shard_bytes=int(args.max_shard_gib * (1 << 30)), log=log)
    except OSError as e:
        raise UsageError(f"writing {dst} failed: {e.strerror or e}") from None
    size = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    what = "no layer quantized" if qcfg is None else (
        qcfg.scheme + (f" group {qcfg.group_size}" if qcfg.group_size else "")
        + (f", {len(qcfg.ignore)} layers kept in floats" if qcfg.ignore else ""))
    print(f"{dst}: converted from {method}, {what}, {_fmt_bytes(size)} of weights, "
          f"{time.perf_counter() - t0:.1f}s")
    return 0


def _add_quantize_parser(sub) -> None:
    s = sub.add_parser("quantize", help="weight-only int8 / int4 / fp8 / nvfp4 quantization of a checkpoint",
                       usage="dgemma quantize SRC DST --scheme {int8,int4,fp8,nvfp4} [options]\n"
                             "       dgemma quantize --random-preset NAME DST --scheme {int8,int4,fp8,nvfp4} "
                             "[options]\n"
                             "       dgemma quantize LLM_COMPRESSOR_OR_MODELOPT_SRC DST   (into dgemma's layout)",
                       description="Quantize the attention, dense-MLP, self-conditioning and expert weights "
                       "(router and norms stay as they are; the embedding / tied LM head too, unless --embeddings). "
                       "The result loads with every dgemma "
                       "command; transformers cannot load it. Without --scheme, an llm-compressor "
                       "(compressed-tensors) or ModelOpt checkpoint such as RedHatAI's FP8-dynamic or NVIDIA's "
                       "NVFP4 is converted into dgemma's layout, which loads memory-mapped (dgemma also loads the "
                       "original as it is). To quantize without writing a copy, give generate / chat / serve / "
                       "run-batch --quantization SCHEME: the same weights, computed at each load.")
    s.add_argument("src", nargs="?", metavar="SRC", help="full-precision checkpoint directory, hub id or .gguf file")
    s.add_argument("dst", nargs="?", metavar="DST", help="new directory to write (atomically)")
    s.add_argument("--scheme", help="int8 or fp8 (e4m3; both per output channel), int4 (group-wise), or nvfp4 "
                   "(e2m1 codes, e4m3 scales per 16 inputs)")
    s.add_argument("--group-size", type=int, help="inputs per scale: 16, 32, 64, 128 or 256 (int4: default 128; "
                   "int8 / fp8: one scale per output channel unless given)")
    s.add_argument("--embeddings", action="store_true", help="quantize the embedding / tied LM head too, with "
                   "the same scheme (one scale per vocabulary entry, or per group): the 26B's 738M-entry matrix "
                   "drops from 1.4 GiB in bf16 to 0.7 (int8) or 0.4 (int4 g128)")
    s.add_argument("--dtype", choices=sorted(DTYPE_BYTES), help="dtype of the tensors kept at full precision "
                   "(default: as in SRC; bfloat16 with --random-preset)")
    s.add_argument("--random-preset", metavar="NAME", help="write random weights of a preset (e.g. 26b-a4b) "
                   "layer by layer instead of reading SRC (for memory and speed tests)")
    s.add_argument("--seed", type=int, default=0, help="seed for --random-preset (default 0)")
    s.add_argument("--max-shard-gib", type=float, default=2.0, help="largest safetensors file (default 2)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at DST")
    s.add_argument("--quiet", action="store_true", help="no progress lines")
    s.set_defaults(func=cmd_quantize)


# ---------------------------------------------------------------- main
def _add_server_engine_args(s):
    """The model and engine options `serve` and `run-batch` share; returns the group of vLLM's options."""
    s.add_argument("--model-name", help="the model id clients send (default: the checkpoint's directory name; "
                   "vLLM's --served-model-name, below, also takes aliases)")
    s.add_argument("--max-concurrency", "--max-num-seqs", type=int, default=8, help="engine rows denoised together "
                   "(default 8; vLLM's --max-num-seqs)")
    s.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    s.add_argument("--max-context", "--max-model-len", type=int, default=8192,
                   help="KV-cache positions per row: prompt plus committed canvases (default 8192; vLLM's "
                   "--max-model-len)")
    s.add_argument("--lora", action="append", metavar="NAME=PATH",
                   help="serve the LoRA adapter at PATH (dgemma train --lora-rank) over the base, as model NAME "
                   "(repeatable): requests choose it by `model`, and rows of different adapters share a forward")
    s.add_argument("--adaptive-steps", metavar="ROWS[:MIN_STEPS]",
                   help="load-adaptive step budget: a canvas that starts while more than ROWS requests are "
                   "denoising gets N * ROWS / rows of its N steps, at least MIN_STEPS (default 4); requests that "
                   "name their `steps` keep them. Off by default: a seed's tokens then depend on the load")
    s.add_argument("--prefix-cache", "--enable-prefix-caching", action="store_true",
                   help="(vLLM's --enable-prefix-caching) reuse the KV cache a finished request leaves for the next "
                   "prompt that starts the same way (a chat's earlier turns, a shared system prompt); off by default: "
                   "a seed's tokens then depend on what ran before, by float rounding (README, Prefix caching)")
    s.add_argument("--prefill-chunk", type=int, metavar="TOKENS",
                   help="chunked prefill: encode at most TOKENS of a new prompt per engine step, so a long prompt "
                   "does not hold up the requests already denoising (their steps go on between its chunks); off "
                   "by default: a seed's tokens then depend on the chunk size, by float rounding (README)")
    s.add_argument("--prefix-cache-margin", type=int, metavar="TOKENS",
                   help="with --prefix-cache: how far a cached context longer than the sliding window may be cut back "
                   "and reused (default: one canvas); each token widens every row's sliding-layer cache by one "
                   "position")
    s.add_argument("--allowed-media-domains", metavar="HOST[,HOST...]", action="append",
                   help="fetch http(s) image URLs from these hosts ('*': any; the default: none, images come inline "
                   "as data: URLs); redirects must stay on them")
    s.add_argument("--allowed-local-media-path", metavar="DIR", help="let file:// image URLs read images under DIR "
                   "(nothing outside it)")
    return _add_vllm_engine_args(s)


VLLM_PARSERS = ("gemma4",)  # the tool-call and reasoning formats dgemma reads (Gemma 4's), by vLLM's parser names


def _add_vllm_engine_args(s):
    """vLLM's `serve` / `run-batch` options that `dgemma serve` / `run-batch` take as they are, so a vLLM command line
    runs unchanged: each does what vLLM's does, is a no-op where dgemma already behaves as the option asks (said in
    its help), or is an error naming what dgemma cannot do (several GPUs, another tool-call format)."""
    g = s.add_argument_group("vLLM's options", "taken as `vllm serve` takes them (README, \"vLLM's command line\")")
    g.add_argument("--model", dest="model_option", metavar="MODEL", help="MODEL as an option (vLLM's older form)")
    g.add_argument("--served-model-name", nargs="+", metavar="NAME", help="the model id clients send; more names "
                   "are aliases of the first, which responses and /v1/models' first card carry")
    g.add_argument("--seed", type=int, metavar="N", help="draw the seeds of requests that name none from a "
                   "generator seeded with N, in the order they are planned (default: each at random)")
    g.add_argument("--limit-mm-per-prompt", metavar="JSON", help="'{\"image\": N}': at most N images in one request "
                   "(0: text only); video and audio, which dgemma does not take, may only be 0")
    g.add_argument("--trust-request-chat-template", action="store_true", help="let chat and /tokenize requests "
                   "bring their own chat_template (a Jinja template, rendered in a sandbox); off: a 400")
    g.add_argument("--lora-modules", nargs="+", action="extend", dest="lora", metavar="NAME=PATH",
                   help="vLLM's --lora: NAME=PATH or {\"name\": NAME, \"path\": PATH} (several)")
    g.add_argument("--enable-lora", action="store_true", help="(no effect: dgemma serves LoRA modules without it)")
    g.add_argument("--max-lora-rank", type=int, metavar="R", help="refuse adapters of a rank above R (at start-up and "
                   "through /v1/load_lora_adapter; default: any)")
    g.add_argument("--max-loras", type=int, metavar="N", help="(no effect: rows of every served adapter share each "
                   "forward, so there is no per-batch limit)")
    g.add_argument("--trust-remote-code", action="store_true", help="(no effect: dgemma runs no code from a "
                   "checkpoint)")
    g.add_argument("--enable-auto-tool-choice", action="store_true", help="(no effect: a request with tools always "
                   "has its reply read for tool calls, tool_choice auto included)")
    g.add_argument("--tool-call-parser", metavar="NAME", help=f"{' or '.join(VLLM_PARSERS)}: the format dgemma reads "
                   "tool calls in (Gemma 4's); no other")
    g.add_argument("--reasoning-parser", metavar="NAME", help=f"{' or '.join(VLLM_PARSERS)}: the thought comes back "
                   "as reasoning_content either way; no other")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N", help="1 only: dgemma runs "
                   "a model on one device")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, metavar="N", help="1 only")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=1, metavar="N", help="1 only: one engine per "
                   "process (start more servers behind a balancer)")
    g.add_argument("--kv-cache-dtype", default="auto", metavar="DTYPE", help="auto only: the KV cache is kept in "
                   "the model's dtype")
    g.add_argument("--gpu-memory-utilization", type=float, metavar="FRACTION", help="on CUDA, the share of the "
                   "GPU's memory this process may allocate (torch's per-process limit: past it, an allocation fails "
                   "instead of taking the rest); dgemma reserves nothing up front, so it is a ceiling, not a "
                   "reservation; no effect on the CPU")
    g.add_argument("--enforce-eager", action="store_true", help="(no effect: eager is the default; not with "
                   "--compile)")
    g.add_argument("--disable-log-requests", action="store_true", help="(no effect: dgemma logs no request's "
                   "contents; uvicorn's line per request: --disable-uvicorn-access-log)")
    g.add_argument("--disable-log-stats", action="store_true", help="(no effect: dgemma logs no periodic stats; "
                   "/metrics has them)")
    return g


def check_vllm_args(args, command: str) -> None:
    """vLLM's options that ask for what dgemma cannot do, as one line each; MODEL given as --model moved into
    place. Before the model loads."""
    if args.model_option is not None:
        if args.model is not None and args.model != args.model_option:
            raise UsageError(f"MODEL given twice: {args.model!r} and --model {args.model_option!r}")
        args.model = args.model_option
    if args.served_model_name and args.model_name:
        raise UsageError("--model-name and --served-model-name name the same thing; give one")
    for flag, n in (("--tensor-parallel-size", args.tensor_parallel_size),
                    ("--pipeline-parallel-size", args.pipeline_parallel_size),
                    ("--data-parallel-size", args.data_parallel_size)):
        if n != 1:
            raise UsageError(f"{flag} {n}: dgemma {command} runs the model on one device (1 only)")
    if args.kv_cache_dtype != "auto":
        raise UsageError(f"--kv-cache-dtype {args.kv_cache_dtype}: not supported; dgemma keeps the KV cache in the "
                         "model's dtype (auto)")
    for flag, name in (("--tool-call-parser", args.tool_call_parser), ("--reasoning-parser", args.reasoning_parser)):
        if name is not None and name not in VLLM_PARSERS:
            raise UsageError(f"{flag} {name}: dgemma reads Gemma 4's format only ({', '.join(VLLM_PARSERS)})")
    fraction = args.gpu_memory_utilization
    if fraction is not None and not 0 < fraction <= 1:
        raise UsageError(f"--gpu-memory-utilization takes a fraction in (0, 1], got {fraction}")
    if args.enforce_eager and getattr(args, "compile", False):
        raise UsageError("--enforce-eager and --compile ask opposite things; give one")


def chat_template_arg(text: str) -> str:
    """--chat-template: a file's text, or the template itself (vLLM's rule: what names no file and holds a Jinja
    delimiter or a newline is a template), checked to parse."""
    from .tokenizer import check_chat_template

    path = Path(text).expanduser()
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--chat-template {path}: cannot read it ({e})") from None
    elif not any(c in text for c in "{}\n"):
        raise UsageError(f"--chat-template {text}: no such file (and not a Jinja template)")
    try:
        check_chat_template(text)
    except ValueError as e:
        raise UsageError(f"--chat-template: {e}") from None
    return text


def gpu_memory_limit(fraction: float | None, device) -> None:
    """--gpu-memory-utilization: cap this process's share of a CUDA device's memory before the model loads."""
    if fraction is None:
        return
    import torch

    from .pipeline import default_device

    dev = torch.device(device or default_device())
    if dev.type != "cuda":
        print(f"dgemma: note: --gpu-memory-utilization applies to CUDA devices; no effect on {dev.type}",
              file=sys.stderr)
        return
    torch.cuda.set_per_process_memory_fraction(fraction, dev)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dgemma", description="DiffusionGemma engine: generate, serve, train, bench.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("info", help="config, parameter counts, memory and special tokens of a checkpoint")
    s.add_argument("model", help="checkpoint directory, hub id (org/name), .gguf file, or a preset name with --preset")
    s.add_argument("--preset", action="store_true", help="MODEL names a preset (26b-a4b, tiny, small, bench-80m)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("generate", help="generate text from a prompt (diffusion, or --ar)",
                       usage="dgemma generate [MODEL] [PROMPT] [options]")
    s.add_argument("model", nargs="?", help="checkpoint directory, hub id or .gguf file (default: the shipped code "
                   "model)")
    s.add_argument("prompt", nargs="?", help="prompt text (or --prompt-file, or stdin)")
    s.add_argument("--prompt-file", help="read the prompt from a file")
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user turn")
    s.add_argument("--suffix", help="infill: the prompt is the text before the hole, this the text after it")
    s.add_argument("--infill", action="store_true", help="infill the [FILL] hole of the prompt through the canvas")
    s.add_argument("--draft", metavar="TEXT", help="warm start: the first canvas starts from this text instead of "
                   "noise (a draft to correct; diffusion only)")
    s.add_argument("--prediction", metavar="TEXT", help="OpenAI's Predicted Outputs: the output expected (a file "
                   "being edited); every canvas starts from the predicted text after the output so far, and the "
                   "model keeps it where it agrees (diffusion only)")
    s.add_argument("--prediction-file", metavar="PATH", help="--prediction, read from a file")
    s.add_argument("--image", metavar="PATH", action="append", help="an image (PNG, JPEG, WebP, ...) the model sees "
                   "(repeat for several; a model with a vision tower): it goes where the prompt says <|image|>, "
                   "else before the prompt")
    s.add_argument("--image-tokens", type=int, choices=(70, 140, 280, 560, 1120), metavar="N",
                   help="read each image in at most N tokens (70, 140, 280, 560 or 1120; default the checkpoint's, "
                   "280 for the released model): more tokens, more detail, a longer prompt")
    s.add_argument("--show-canvas", action="store_true", help="draw the canvas live while it denoises")
    s.add_argument("--json", action="store_true", help="print text, tokens and stats as JSON")
    s.add_argument("--skip-special-tokens", action="store_true", help="leave the special tokens the model writes "
                   "out of the text (stop strings match the text without them; the tokens keep them)")
    add_sampling_args(s)
    add_model_args(s)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", help="an interactive multi-turn chat (chat template)")
    s.add_argument("model", nargs="?", help="checkpoint directory, hub id or .gguf file (default: the shipped code "
                   "model)")
    s.add_argument("--system", help="system prompt")
    s.add_argument("--show-canvas", action="store_true", help="draw the canvas live while it denoises")
    s.add_argument("--think", action="store_true", help="thinking on (the template's enable_thinking): the reply "
                   "opens with a thought channel")
    s.add_argument("--tools", help="OpenAI tools (a JSON list, or a file holding one): the model may call them; each "
                   "call's result is read as the next input line")
    s.add_argument("--tool-choice", help="auto (default), required, none, or a tool's name (forced by a grammar)")
    s.add_argument("--prefix-cache", action="store_true", help="keep the KV cache between turns: each turn encodes "
                   "only what is new (a seed's tokens then depend on the turns before, by float rounding)")
    s.add_argument("--max-context", type=int, default=8192,
                   help="with --prefix-cache: KV-cache positions for the whole conversation (default 8192)")
    add_sampling_args(s)
    add_model_args(s)
    s.set_defaults(func=cmd_chat)

    # `bench` has its own parser (dgemma/bench.py); main() hands it the rest of the command line.
    sub.add_parser("bench", help="benchmarks: dgemma diffusion vs AR vs transformers (dgemma bench --help)",
                   add_help=False)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with live draft streaming and a web page")
    s.add_argument("model", nargs="?", help="checkpoint directory, hub id (org/name) or .gguf file; default: the "
                   "shipped code model")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* and /metrics "
                   "(default: $DGEMMA_API_KEY; none: open)")
    s.add_argument("--max-queue", type=int, default=64, help="rows waiting for an engine row (default 64); "
                   "beyond that, 429")
    s.add_argument("--max-body-bytes", type=int, default=32 << 20,
                   help="larger request bodies get 413 (default 32 MiB: images come inline, base64)")
    s.add_argument("--allow-runtime-lora", action="store_true",
                   help="POST /v1/load_lora_adapter {lora_name, lora_path} and /v1/unload_lora_adapter {lora_name} "
                   "add and remove adapters while serving (vLLM's endpoints; they read directories on this host, "
                   "so keep --api-key on where others can reach the server)")
    s.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default="fcfs",
                   help="the order waiting requests get engine rows: fcfs (arrival, default) or priority (a "
                   "request's `priority`, lower first, then arrival; vLLM's; running rows are not preempted)")
    vllm = _add_server_engine_args(s)
    s.add_argument("--responses-store", type=int, default=1000, metavar="N",
                   help="the Responses API keeps the last N responses in memory, so a request can continue one by "
                   "previous_response_id (OpenAI's `store`, on unless a request says false), and up to N "
                   "conversations (/v1/conversations; the least recently used go first); default 1000, 0: none")
    s.add_argument("--responses-dir", metavar="DIR", help="keep stored responses and conversations under DIR as "
                   "well as in memory, so they outlive a restart (a background response a restart interrupted "
                   "comes back failed); default: in memory only")
    s.add_argument("--batch-dir", metavar="DIR", help="turn on OpenAI's Files and Batches APIs (/v1/files, "
                   "/v1/batches), keeping uploads, batch state and outputs under DIR; a batch's requests run as "
                   "background rows beside live traffic, and resume after a restart")
    s.add_argument("--cors-origin", "--allowed-origins", action="append", metavar="ORIGIN", type=_origins,
                   help="allow browser requests from ORIGIN (repeatable; CORS is off by default; vLLM's "
                   "--allowed-origins, a JSON list, also works)")
    s.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    vllm.add_argument("--uvicorn-log-level", choices=LOG_LEVELS, help="the same as --log-level")
    vllm.add_argument("--disable-uvicorn-access-log", action="store_true", help="no line per HTTP request")
    vllm.add_argument("--enable-request-id-headers", action="store_true", help="(no effect: every response carries "
                      "X-Request-Id)")
    vllm.add_argument("--root-path", default="", metavar="PATH", help="the path prefix a proxy serves this server "
                      "under")
    vllm.add_argument("--ssl-keyfile", metavar="FILE", help="serve HTTPS with this private key (and --ssl-certfile)")
    vllm.add_argument("--ssl-certfile", metavar="FILE", help="the certificate (chain) for --ssl-keyfile")
    add_model_args(s)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("run-batch", help="answer a file of requests in the OpenAI Batch format, offline (vLLM's "
                       "run-batch)", usage="dgemma run-batch [MODEL] -i INPUT.jsonl -o OUTPUT.jsonl [options]")
    s.add_argument("model", nargs="?", help="checkpoint directory, hub id (org/name) or .gguf file; default: the "
                   "shipped code model")
    s.add_argument("-i", "--input-file", required=True, help="JSONL, one request a line: {custom_id, method: POST, "
                   "url: /v1/chat/completions (or /v1/completions, /v1/responses, /v1/messages), body}; a local "
                   "file or an http(s) URL to GET")
    s.add_argument("-o", "--output-file", required=True, help="JSONL, one answer a line in input order: {id, "
                   "custom_id, response: {status_code, request_id, body}, error}; written to OUTPUT.partial as "
                   "lines finish and renamed at the end (run again to resume after a kill); or an http(s) URL to PUT "
                   "them to at the end")
    s.add_argument("--output-tmp-dir", metavar="DIR", help="with an http(s) output URL: where the answers are kept "
                   "until they are PUT there (default: the system's temp directory; a rerun resumes from it)")
    s.add_argument("--summary-json", metavar="PATH", help="also write the counts, tokens and wall time as JSON")
    s.add_argument("--quiet", action="store_true", help="no progress lines")
    s.add_argument("--log-level", default="warning", choices=LOG_LEVELS[:-1])  # trace: uvicorn's, serve only
    _add_server_engine_args(s)
    add_model_args(s)
    s.set_defaults(func=cmd_run_batch)

    s = sub.add_parser("demo", help="the end-to-end demo (what `make demo` runs)")
    s.add_argument("--fast", action="store_true", help="a shorter run")
    s.set_defaults(func=cmd_demo)

    _add_train_parser(sub)
    _add_sudoku_parser(sub)
    _add_code_parser(sub)
    _add_quantize_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .model import CompileError
    from .weights import CheckpointError

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (UsageError, CheckpointError, ConfigError, FileNotFoundError, ValueError, CompileError) as e:
        # GenerationError, CacheFullError and the sampler's option errors are ValueErrors too.
        print(f"dgemma {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `dgemma generate ... | head`: the reader left; no traceback, and none at exit
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "build_parser", "info_dict"]
