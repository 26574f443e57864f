"""Setting up a training run from plain options: the model (preset, config or checkpoint), tokenizer, data, resume.

`prepare(cfg, source, resume=...)` returns a ready `Trainer`. `source` says where model and data come from and is
stored in <out>/train_config.json with the options, so `--resume` rebuilds exactly the same run:
    {"preset": "small" | None, "config": path | None, "overrides": {...},   # a new model (from scratch)
     "model": path | None,                                                    # or a checkpoint to fine-tune
     "tokenizer": path | None, "data": path, "eval_data": path | None, "max_len": int | None}
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig, preset
from ..vision import has_vision
from . import state as S
from .data import load_jsonl
from .dist import DistEnv
from .lora import load_adapter, merge_lora
from .trainer import ListDataset, TrainConfig, Trainer, TrainError, build_model


def parse_overrides(items: list[str] | None) -> dict:
    """["hidden_size=128", "layer_types=[...]"] -> dict; values are JSON when they parse, else strings."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise TrainError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def model_config(source: dict) -> ModelConfig:
    """The config of a model trained from scratch: a preset or a config.json, then the overrides."""
    if source.get("config"):
        cfg = ModelConfig.load(source["config"])
    elif source.get("preset"):
        cfg = preset(source["preset"])
    else:
        raise TrainError("say what to train: --preset NAME (from scratch), --config CONFIG.json, or --model PATH")
    over = dict(source.get("overrides") or {})
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    bad = sorted(set(over) - known)
    if bad:
        raise TrainError(f"unknown model config field(s) in --set: {', '.join(bad)}")
    try:
        return cfg.replace(**over)
    except (TypeError, ConfigError) as e:
        raise TrainError(f"bad --set value: {e}") from None


def _tokenizer(source: dict):
    from ..tokenizer import Tokenizer

    where = source.get("tokenizer")
    if where is None and source.get("model"):  # the model's own: a hub id or a .gguf file resolves to its directory
        from ..weights import resolve

        where = resolve(source["model"])
    if where and (Path(where) / "tokenizer.json").is_file():
        return Tokenizer.from_dir(where)
    if source.get("tokenizer"):
        raise TrainError(f"no tokenizer.json in {source['tokenizer']}")
    return None


def _base_factory(source: dict, seed: int):
    if source.get("model"):
        from ..quant import QuantConfig
        from ..weights import load_model

        q = source.get("quantization")
        quantize = None if q is None else QuantConfig.from_dict(q)
        return lambda: load_model(source["model"], dtype=torch.float32, quiet=True, quantize=quantize)
    cfg = model_config(source)
    from ..weights import init_random

    return lambda: init_random(cfg, seed=seed)


def prepare(cfg: TrainConfig | None, source: dict | None, *, resume: bool = False, out: str | None = None,
            quiet: bool = False) -> Trainer:
    """A Trainer for a JSONL run, new or resumed (resume: options and source come from <out>/train_config.json)."""
    dist = DistEnv.from_env()
    if resume:
        saved = S.load_run_config(Path(out or cfg.out))
        if saved["source"].get("task"):
            raise TrainError(f"{out or cfg.out} is a '{saved['source']['task']}' run: resume it with "
                             f"`dgemma {saved['source']['task']} train --resume --out ...`")
        cfg, source = TrainConfig.from_dict(saved["train"]), saved["source"]
    out_dir = Path(cfg.out)
    ckpt = _resume_point(out_dir, resume)
    if not resume and dist.main:
        S.check_writable(out_dir)
        S.save_run_config(out_dir, {"train": cfg.to_dict(), "source": source})
    tok = _tokenizer(source)
    model = build_model(cfg, base_model=_base_factory(source, cfg.seed), resume_from=ckpt)
    mc = model.cfg
    max_len = min(source.get("max_len") or mc.max_position_embeddings, mc.max_position_embeddings)
    eos = tok.eos_id if tok is not None and tok.eos_id is not None else mc.eos_token_id[0]
    eos_set = set(mc.eos_token_id) | (set(tok.eos_ids) if tok is not None else set())
    kw = dict(vocab=mc.vocab_size, eos=eos, eos_set=eos_set, canvas=mc.canvas_length, max_len=max_len,
              quiet=quiet or not dist.main)
    if has_vision(model) and tok is not None:  # records may carry images (data.py)
        from ..pipeline import Pipeline

        kw["pipe"] = Pipeline(model, tok)
    if not source.get("data"):
        raise TrainError("--data TRAIN.jsonl is required")
    train = ListDataset(load_jsonl(source["data"], tok, **kw))
    evald = ListDataset(load_jsonl(source["eval_data"], tok, **kw)) if source.get("eval_data") else None
    gen = None if source.get("model") else _default_generation_config(mc)
    base = source.get("model") if cfg.lora_rank else None
    return Trainer(model, train, cfg, eval_data=evald, tokenizer=tok, generation_config=gen, resume_from=ckpt,
                   dist=dist, base=base, quiet=quiet)


def _resume_point(out: Path, resume: bool) -> Path | None:
    found = S.latest(out)
    if resume:
        if found is None:
            raise S.CheckpointStateError(f"no checkpoint in {out / 'checkpoints'} to resume from")
        return found[1]
    if found is not None:
        raise TrainError(f"{out} already holds checkpoints: pass --resume to continue that run, or choose a new --out")
    return None


def task_run(task: str, cfg, source: dict | None, *, resume: bool, out: str | None):
    """A recipe's run (`dgemma sudoku|code train`): (cfg, source, out dir, checkpoint to resume or None). With
    resume, cfg and source come from <out>/train_config.json, which must belong to the same task."""
    if resume:
        saved = S.load_run_config(Path(out or cfg.out))
        if saved["source"].get("task") != task:
            raise TrainError(f"{out or cfg.out} is not a {task} run: resume it with the command that started it")
        cfg, source = TrainConfig.from_dict(saved["train"]), saved["source"]
    out_dir = Path(cfg.out)
    return cfg, source, out_dir, _resume_point(out_dir, resume)


def _default_generation_config(mc: ModelConfig) -> dict:
    from ..sampler import SamplerConfig

    return {**SamplerConfig().to_generation_config(), "max_new_tokens": mc.canvas_length,
            "eos_token_id": list(mc.eos_token_id), "pad_token_id": mc.pad_token_id, "bos_token_id": mc.bos_token_id}


def merge(base: str, adapter: str, out: str) -> Path:
    """base checkpoint + LoRA adapter -> a plain checkpoint with the adapter folded in (tokenizer etc. copied)."""
    from ..weights import load_model, save_model

    model = load_model(base, quiet=True)
    load_adapter(model, adapter)
    merge_lora(model)
    return save_model(model, out)
