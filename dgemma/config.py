"""Model configuration: one dataclass for DiffusionGemma's text stack, its presets, and the HF config.json format.

A Hugging Face DiffusionGemma checkpoint carries a two-level `config.json`: the top-level `diffusion_gemma`
config (canvas length, special-token ids, a vision config) with the text stack under `text_config`. dgemma keeps
the text fields it computes with in `ModelConfig`, and carries what it does not use (the vision config, unknown
keys) through untouched so that a save writes back what a load read.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"

# rope_parameters as the released checkpoint writes them (SPEC §1).
DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}

# A vision config small enough that transformers can build the (unused) vision tower of a tiny test model
# in milliseconds; the released one (~550M parameters) is kept verbatim when a real checkpoint is loaded.
TINY_VISION_CONFIG = {
    "model_type": "gemma4_vision",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 8,
}


class ConfigError(ValueError):
    """A config.json or a preset that dgemma cannot build a model from."""


def default_layer_types(num_layers: int, pattern: int = 6) -> list[str]:
    """Five sliding layers then one full, repeated; the last layer is always full (as transformers forces)."""
    types = [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]
    types[-1] = FULL
    return types


@dataclass
class ModelConfig:
    """Every field of DiffusionGemma's text config plus the top-level fields dgemma needs.

    Sliding layers use `head_dim` / `num_key_value_heads` and a real v_proj; full layers use `global_head_dim` /
    `num_global_key_value_heads` and take V from the k projection (attention_k_eq_v).
    """

    vocab_size: int = 262_144
    hidden_size: int = 2816
    intermediate_size: int = 2112  # the dense MLP, and the width of the self-conditioning MLP
    num_hidden_layers: int = 30
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    num_global_key_value_heads: int = 2
    head_dim: int = 256
    global_head_dim: int = 512
    sliding_window: int = 1024
    layer_types: list[str] | None = None
    rope_parameters: dict[str, dict[str, Any]] = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_ROPE)))
    max_position_embeddings: int = 262_144
    num_experts: int = 128
    top_k_experts: int = 8
    moe_intermediate_size: int = 704
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 30.0
    attention_bias: bool = False
    attention_dropout: float = 0.0
    attention_k_eq_v: bool = True
    enable_moe_block: bool = True
    use_bidirectional_attention: str | None = "vision"
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: list[int] = field(default_factory=lambda: [1, 106, 50])
    # Top-level (multimodal wrapper) fields.
    canvas_length: int = 256
    boi_token_id: int = 255_999
    eoi_token_id: int = 258_882
    image_token_id: int = 258_880
    vision_soft_tokens_per_image: int | None = None
    vision_config: dict[str, Any] | None = None
    # Keys of config.json that dgemma does not interpret, written back on save.
    extra: dict[str, Any] = field(default_factory=dict)
    extra_text: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = default_layer_types(self.num_hidden_layers)
        self.layer_types = list(self.layer_types)
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.eos_token_id = [int(t) for t in self.eos_token_id]
        self.validate()

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "num_global_key_value_heads", "head_dim", "global_head_dim",
                     "sliding_window", "canvas_length", "max_position_embeddings"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"config field {name} must be a positive integer, got {getattr(self, name)!r}")
        need(len(self.layer_types) == self.num_hidden_layers,
             f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}")
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        need(not bad, f"unknown layer types {bad}; expected {SLIDING!r} or {FULL!r}")
        need(self.layer_types[-1] == FULL, "the last layer must be a full_attention layer")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             "num_attention_heads must be a multiple of num_key_value_heads")
        need(self.num_attention_heads % self.num_global_key_value_heads == 0,
             "num_attention_heads must be a multiple of num_global_key_value_heads")
        need(self.head_dim % 2 == 0 and self.global_head_dim % 2 == 0, "head dims must be even (RoPE)")
        need(self.num_experts is not None and self.num_experts > 0, "num_experts must be set (the MoE block)")
        need(self.top_k_experts is not None and 0 < self.top_k_experts <= self.num_experts,
             f"top_k_experts must be in [1, num_experts], got {self.top_k_experts}")
        need(self.moe_intermediate_size is not None and self.moe_intermediate_size > 0,
             "moe_intermediate_size must be set")
        need(self.hidden_activation in ("gelu_pytorch_tanh", "gelu_tanh"),
             f"hidden_activation {self.hidden_activation!r} is not supported (DiffusionGemma uses gelu_pytorch_tanh)")
        need(self.attention_k_eq_v, "attention_k_eq_v=False is not supported: DiffusionGemma's full layers use V = K")
        need(self.enable_moe_block, "enable_moe_block=False is not supported: DiffusionGemma always runs the MoE")
        need(self.use_bidirectional_attention in (None, "vision"),
             f"use_bidirectional_attention={self.use_bidirectional_attention!r} is not supported "
             "(the released model uses 'vision': causal text, bidirectional image spans)")
        for kind in set(self.layer_types):
            rp = self.rope_parameters.get(kind)
            need(isinstance(rp, dict) and "rope_theta" in rp, f"rope_parameters[{kind!r}] needs a rope_theta")
            need(rp.get("rope_type", "default") in ("default", "proportional"),
                 f"rope_type {rp.get('rope_type')!r} is not supported (default and proportional are)")
        need(all(0 <= t < self.vocab_size for t in self.eos_token_id), "eos_token_id outside the vocabulary")

    # ---------------------------------------------------------------- derived
    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def layer_head_dim(self, layer: int) -> int:
        return self.head_dim if self.is_sliding(layer) else self.global_head_dim

    def layer_kv_heads(self, layer: int) -> int:
        return self.num_key_value_heads if self.is_sliding(layer) else self.num_global_key_value_heads

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    def param_counts(self) -> dict[str, int]:
        """Parameters of the text stack (embedding counted once: it is tied to the LM head), total and active."""
        h, v = self.hidden_size, self.vocab_size
        norm = h
        dense = 3 * h * self.intermediate_size
        expert = 3 * h * self.moe_intermediate_size
        router = h * self.num_experts + h + self.num_experts
        total = active = v * h + norm  # embedding + final norm
        sc = 3 * h * self.intermediate_size + h  # self-conditioning MLP + pre_norm
        total += sc
        active += sc
        for i in range(self.num_hidden_layers):
            hd, kv = self.layer_head_dim(i), self.layer_kv_heads(i)
            q = self.num_attention_heads * hd
            attn = h * q + h * kv * hd + (h * kv * hd if self.is_sliding(i) else 0) + q * h + 2 * hd
            layer = attn + dense + router + 7 * norm  # layer_scalar is a buffer, not a parameter
            total += layer + self.num_experts * expert
            active += layer + self.top_k_experts * expert
        return {"total": total, "active": active}

    # ---------------------------------------------------------------- HF format
    def to_hf_dict(self) -> dict[str, Any]:
        """The HF `config.json` dict (model_type diffusion_gemma) that transformers' DiffusionGemmaConfig reads."""
        text = {
            "model_type": "diffusion_gemma_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "num_global_key_value_heads": self.num_global_key_value_heads,
            "head_dim": self.head_dim,
            "global_head_dim": self.global_head_dim,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rope_parameters": json.loads(json.dumps(self.rope_parameters)),
            "max_position_embeddings": self.max_position_embeddings,
            "num_experts": self.num_experts,
            "top_k_experts": self.top_k_experts,
            "moe_intermediate_size": self.moe_intermediate_size,
            "hidden_activation": self.hidden_activation,
            "rms_norm_eps": self.rms_norm_eps,
            "final_logit_softcapping": self.final_logit_softcapping,
            "attention_bias": self.attention_bias,
            "attention_dropout": self.attention_dropout,
            "attention_k_eq_v": self.attention_k_eq_v,
            "enable_moe_block": self.enable_moe_block,
            "use_bidirectional_attention": self.use_bidirectional_attention,
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": self.tie_word_embeddings,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id),
            **self.extra_text,
        }
        out = {
            "architectures": ["DiffusionGemmaForBlockDiffusion"],
            "model_type": "diffusion_gemma",
            "canvas_length": self.canvas_length,
            "boi_token_id": self.boi_token_id,
            "eoi_token_id": self.eoi_token_id,
            "image_token_id": self.image_token_id,
            "eos_token_id": list(self.eos_token_id),
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": self.tie_word_embeddings,
            "text_config": text,
            "vision_config": json.loads(json.dumps(self.vision_config or TINY_VISION_CONFIG)),
            **self.extra,
        }
        if self.vision_soft_tokens_per_image is not None:
            out["vision_soft_tokens_per_image"] = self.vision_soft_tokens_per_image
        return out

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Read an HF config.json dict: the top-level diffusion_gemma config, or a bare diffusion_gemma_text one."""
        if not isinstance(d, dict):
            raise ConfigError("config.json must hold a JSON object")
        model_type = d.get("model_type")
        if model_type == "diffusion_gemma":
            top, text = dict(d), dict(d.get("text_config") or {})
            if not text:
                raise ConfigError("config.json has model_type 'diffusion_gemma' but no text_config")
        elif model_type == "diffusion_gemma_text":
            top, text = {}, dict(d)
        else:
            raise ConfigError(
                f"config.json has model_type {model_type!r}; dgemma loads DiffusionGemma checkpoints "
                "(model_type 'diffusion_gemma')"
            )
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "extra_text", "vision_config"}
        kw: dict[str, Any] = {}
        extra_text: dict[str, Any] = {}
        per_layer = text.pop("per_layer_config", None)
        for k, v in text.items():
            if k == "model_type":
                continue
            if k in known and k not in ("canvas_length",):
                kw[k] = v
            else:
                extra_text[k] = v
        # transformers writes the full-layer overrides as per_layer_config; the released file writes
        # global_head_dim / num_global_key_value_heads. Accept both.
        if per_layer:
            overrides = [dict(v) for v in per_layer.values()]
            if any(o != overrides[0] for o in overrides):
                raise ConfigError("per_layer_config with different overrides per layer is not supported")
            o = overrides[0]
            kw.setdefault("global_head_dim", o.get("head_dim", 512))
            if "num_key_value_heads" in o:
                kw.setdefault("num_global_key_value_heads", o["num_key_value_heads"])
        if "num_global_key_value_heads" not in kw or kw["num_global_key_value_heads"] is None:
            kw["num_global_key_value_heads"] = kw.get("num_key_value_heads", 4)
        kw.setdefault("global_head_dim", 512)
        # transformers class defaults for fields the file may omit
        hf_text_defaults = {
            "hidden_size": 2304, "intermediate_size": 9216, "num_attention_heads": 8, "num_key_value_heads": 4,
            "max_position_embeddings": 131_072, "sliding_window": 512, "use_bidirectional_attention": None,
        }
        for k, v in hf_text_defaults.items():
            kw.setdefault(k, v)
        if kw.get("rope_parameters") is None:
            kw.pop("rope_parameters", None)
        if "layer_types" in kw and kw["layer_types"] is not None and kw["layer_types"][-1] != FULL:
            kw["layer_types"] = list(kw["layer_types"][:-1]) + [FULL]  # as transformers forces
        top_known = {"canvas_length", "boi_token_id", "eoi_token_id", "image_token_id",
                     "vision_soft_tokens_per_image", "initializer_range", "tie_word_embeddings"}
        extra: dict[str, Any] = {}
        for k, v in top.items():
            if k in ("model_type", "text_config", "vision_config", "architectures", "transformers_version"):
                continue
            if k in top_known:
                kw[k] = v
            elif k in ("eos_token_id", "pad_token_id", "bos_token_id"):
                if v is not None:
                    kw[k] = v
            else:
                extra[k] = v
        kw["vision_config"] = top.get("vision_config")
        try:
            return cls(**kw, extra=extra, extra_text=extra_text)
        except TypeError as e:  # a field of the wrong kind
            raise ConfigError(f"bad config.json: {e}") from None

    def save(self, path: str | Path) -> None:
        from .io import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(d)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


# ---------------------------------------------------------------- presets
def _preset_26b() -> ModelConfig:
    return ModelConfig(vision_soft_tokens_per_image=280)


def _preset_tiny() -> ModelConfig:
    # For tests: every feature of the architecture at toy size (sliding + full layers, GQA, V=K, MoE top-k).
    return ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_global_key_value_heads=1, head_dim=16, global_head_dim=32, sliding_window=16,
        layer_types=[SLIDING, SLIDING, FULL, FULL], num_experts=4, top_k_experts=2, moe_intermediate_size=32,
        max_position_embeddings=4096, canvas_length=32
    )


def _preset_small() -> ModelConfig:
    # A model this CPU can train from scratch in minutes to hours (Sudoku, small code models).
    return ModelConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, num_global_key_value_heads=1, head_dim=64, global_head_dim=128, sliding_window=256,
        num_experts=8, top_k_experts=2, moe_intermediate_size=256, max_position_embeddings=8192,
        canvas_length=256
    )


def _preset_bench_80m() -> ModelConfig:
    # ~80M parameters with the real 262,144-token vocabulary: the vocabulary-bound benchmark model.
    return _preset_small().replace(vocab_size=262_144, max_position_embeddings=8192)


PRESETS = {
    "26b-a4b": _preset_26b,
    "tiny": _preset_tiny,
    "small": _preset_small,
    "bench-80m": _preset_bench_80m,
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
