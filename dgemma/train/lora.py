"""LoRA: low-rank adapters added to the model as a module swap, saved on their own, and mergeable.

`apply_lora` replaces each targeted `nn.Linear` by a `LoRALinear` (y = W x + s * B A x, s = alpha / r) and each
targeted `Experts` stack by `LoRAExperts` (the same per expert), freezes every base weight, and leaves only A and B
trainable. On a quantized checkpoint (`dgemma quantize`) the same wraps the `QuantLinear` / `QuantExperts` layers:
QLoRA, the base staying in its int8 / int4 / fp8 / nvfp4 codes. B starts at zero, so a fresh adapter changes nothing. `merge_lora` folds s * B A into the base weights
and swaps the plain modules back, giving an ordinary model that `save_model` writes in the usual HF format.

Adapter files (PEFT-like names; the experts' 3-D A/B are dgemma's own):
    adapter_model.safetensors   base_model.model.<HF module name>.lora_{A,B}.weight
    adapter_config.json         {"peft_type": "LORA", "r", "lora_alpha", "target_modules", "base_model_name_or_path"}

Targets are module names: q_proj k_proj v_proj o_proj (attention), gate_proj up_proj down_proj (dense MLP and the
self-conditioning MLP), experts (the MoE stacks), router (its projection; frozen by default, as NeMo does), or
"all" = everything but the router and the embedding (which is tied to the LM head and stays frozen).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..io import atomic_dir
from ..model import Experts, moe_dispatch
from ..weights import hf_name

LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_TARGETS = LINEAR_TARGETS + ("experts",)
KNOWN_TARGETS = ALL_TARGETS + ("router",)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
# adapter_config.json: the quantization a base was given as it loaded for training (QLoRA from a full-precision
# checkpoint), so that loading the adapter quantizes its base the same way
BASE_QUANTIZATION = "dgemma_base_quantization"


class LoRAError(ValueError):
    """A bad LoRA option or an adapter that does not fit the model."""


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("all",)

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise LoRAError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if self.alpha <= 0:
            raise LoRAError(f"LoRA alpha must be positive, got {self.alpha}")
        bad = [t for t in self.targets if t != "all" and t not in KNOWN_TARGETS]
        if bad or not self.targets:
            raise LoRAError(f"unknown LoRA target(s) {bad}; choose from all, {', '.join(KNOWN_TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def resolved(self) -> tuple[str, ...]:
        names = set()
        for t in self.targets:
            names |= set(ALL_TARGETS) if t == "all" else {t}
        return tuple(n for n in KNOWN_TARGETS if n in names)


def _init_a(shape, gen) -> torch.Tensor:
    # kaiming_uniform(a=sqrt(5)) as nn.Linear and PEFT initialise A: bound = 1/sqrt(fan_in)
    bound = 1.0 / math.sqrt(shape[-1])
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def _quantized(base: nn.Module) -> bool:
    from ..quant import QuantExperts, QuantLinear

    return isinstance(base, (QuantLinear, QuantExperts))


def _no_merge(base: nn.Module) -> LoRAError:
    return LoRAError(f"a LoRA adapter cannot be folded into {base.scheme.name}-quantized weights: merge it into the "
                     "full-precision base (dgemma train merge BASE ADAPTER OUT; an adapter trained on a quantized copy "
                     "has the same tensor names), or serve it unmerged over the quantized base")


class LoRALinear(nn.Module):
    """y = base(x) + s * B A x over an `nn.Linear`, or over a frozen `QuantLinear` (QLoRA: the base's weight stays
    quantized; its matmul keeps nothing for backward, `quant.quant_linear`). dtype: the adapter's (the model's
    float dtype; a quantized base's weight holds codes)."""

    def __init__(self, base: nn.Module, rank: int, scale: float, gen: torch.Generator, dtype: torch.dtype):
        super().__init__()
        self.base, self.scale = base, scale
        dev = base.weight.device  # a QuantLinear's codes are its `weight` too
        self.lora_A = nn.Parameter(_init_a((rank, base.in_features), gen).to(dev, dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        if _quantized(self.base):
            raise _no_merge(self.base)
        self.base.weight += (self.lora_B.float() @ self.lora_A.float() * self.scale).to(self.base.weight.dtype)
        return self.base


class LoRAExperts(nn.Module):
    """`Experts` with a rank-r adapter per expert on gate_up_proj and down_proj (`linear` is the override point)."""

    dense = False  # see Experts

    def __init__(self, base: nn.Module, rank: int, scale: float, gen: torch.Generator, dtype: torch.dtype):
        super().__init__()
        self.base, self.scale, self.num_experts = base, scale, base.num_experts
        if _quantized(base):  # QuantExperts: the shapes it was built with (its codes may be packed)
            E, I2, H, I = base.num_experts, 2 * base.inner, base.hidden, base.inner
        else:
            (E, I2, H), I = base.gate_up_proj.shape, base.down_proj.shape[2]
        dev, dt = base.gate_up_proj.device, dtype
        self.gate_up_A = nn.Parameter(_init_a((E, rank, H), gen).to(dev, dt))
        self.gate_up_B = nn.Parameter(torch.zeros(E, I2, rank, device=dev, dtype=dt))
        self.down_A = nn.Parameter(_init_a((E, rank, I), gen).to(dev, dt))
        self.down_B = nn.Parameter(torch.zeros(E, H, rank, device=dev, dtype=dt))

    def linear(self, name: str, xs: torch.Tensor, groups) -> torch.Tensor:
        A, B = getattr(self, name[:-len("_proj")] + "_A"), getattr(self, name[:-len("_proj")] + "_B")
        delta = groups.per_expert(xs, lambda e, rows: F.linear(F.linear(rows, A[e]), B[e]))
        return self.base.linear(name, xs, groups) + delta * self.scale

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # the model's own routing; only the per-expert products differ
        return moe_dispatch(x, weights, idx, self.num_experts, self.linear, dense=self.dense)

    @torch.no_grad()
    def merged(self) -> Experts:
        if _quantized(self.base):
            raise _no_merge(self.base)
        b, s = self.base, self.scale
        b.gate_up_proj += (torch.bmm(self.gate_up_B.float(), self.gate_up_A.float()) * s).to(b.gate_up_proj.dtype)
        b.down_proj += (torch.bmm(self.down_B.float(), self.down_A.float()) * s).to(b.down_proj.dtype)
        return b


def _targets(model: nn.Module, names: tuple[str, ...]):
    """(parent module, attribute, full name) of every module to wrap, in a fixed order."""
    for full, mod in model.named_modules():
        if isinstance(mod, (LoRALinear, LoRAExperts)):
            raise LoRAError("the model already has LoRA adapters")
    from ..quant import QuantExperts, QuantLinear

    out = []
    for full, mod in list(model.named_modules()):
        for attr, child in mod.named_children():
            path = f"{full}.{attr}" if full else attr
            if isinstance(child, (Experts, QuantExperts)) and "experts" in names:
                out.append((mod, attr, path))
            elif isinstance(child, (nn.Linear, QuantLinear)):
                kind = "router" if attr == "proj" and full.endswith("router") else attr
                if kind in names:
                    out.append((mod, attr, path))
    return out


def apply_lora(model: nn.Module, cfg: LoRAConfig, seed: int = 0) -> list[str]:
    """Wrap the targeted modules, freeze everything else. Returns the wrapped module names."""
    gen = torch.Generator().manual_seed(seed)
    found = _targets(model, cfg.resolved())
    if not found:
        raise LoRAError(f"no module of the model matches the LoRA targets {list(cfg.targets)}")
    for p in model.parameters():
        p.requires_grad_(False)
    from ..quant import QuantLinear

    dtype = getattr(model, "dtype", torch.float32)  # the model's float dtype (DiffusionGemma: its norms')
    for parent, attr, _ in found:
        child = getattr(parent, attr)
        wrap = LoRALinear if isinstance(child, (nn.Linear, QuantLinear)) else LoRAExperts
        setattr(parent, attr, wrap(child, cfg.rank, cfg.scale, gen, dtype))
    model.lora_config = cfg
    return [path for _, _, path in found]


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, (LoRALinear, LoRAExperts)) for m in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and unwrap it (in place). Base weights stay frozen."""
    for full, mod in list(model.named_modules()):
        for attr, child in list(mod.named_children()):
            if isinstance(child, (LoRALinear, LoRAExperts)):
                setattr(mod, attr, child.merged())
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


# ---------------------------------------------------------------- files
_PARAM_NAMES = {"lora_A": "lora_A", "lora_B": "lora_B", "gate_up_A": "gate_up_proj.lora_A",
                "gate_up_B": "gate_up_proj.lora_B", "down_A": "down_proj.lora_A", "down_B": "down_proj.lora_B"}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under their file names."""
    out = {}
    for full, mod in model.named_modules():
        if isinstance(mod, (LoRALinear, LoRAExperts)):
            for pname, p in mod.named_parameters(recurse=False):
                key = f"{PREFIX}{hf_name(full)}.{_PARAM_NAMES[pname]}.weight"
                out[key] = p.detach().to("cpu").contiguous()
    return out


def save_adapter(model: nn.Module, out_dir: str | Path, base: str | None = None, into: Path | None = None) -> Path:
    """Write the adapter files atomically (or straight into an already-atomic directory `into`)."""
    from safetensors.torch import save_file

    cfg: LoRAConfig = getattr(model, "lora_config", None)
    if cfg is None:
        raise LoRAError("the model has no LoRA adapters to save")

    def write(d: Path):
        save_file(adapter_state(model), str(d / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        conf = {"peft_type": "LORA", "r": cfg.rank, "lora_alpha": cfg.alpha, "target_modules": list(cfg.resolved()),
                "base_model_name_or_path": base, "bias": "none", "dgemma_lora": 1}
        quantized = getattr(model, "quantized_at_load", None)
        if quantized is not None:  # trained over a base quantized as it loaded (`train --quantization`): served so
            conf[BASE_QUANTIZATION] = quantized.to_dict()
        (d / ADAPTER_CONFIG).write_text(json.dumps(conf, indent=2) + "\n")

    if into is not None:
        write(into)
        return into
    with atomic_dir(out_dir) as tmp:
        write(tmp)
    return Path(out_dir)


def read_adapter_config(path: str | Path) -> dict:
    p = Path(path) / ADAPTER_CONFIG
    if not p.is_file():
        raise LoRAError(f"{path} is not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    try:
        conf = json.loads(p.read_text())
        LoRAConfig(int(conf["r"]), float(conf["lora_alpha"]), tuple(conf["target_modules"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise LoRAError(f"{p} is not a valid adapter config: {e}") from None
    return conf


def load_adapter(model: nn.Module, path: str | Path, seed: int = 0) -> nn.Module:
    """Apply the adapter stored at `path` to a base model (wrapping it if needed) and load its weights."""
    from safetensors.torch import load_file

    conf = read_adapter_config(path)
    cfg = LoRAConfig(int(conf["r"]), float(conf["lora_alpha"]), tuple(conf["target_modules"]))
    if not has_lora(model):
        apply_lora(model, cfg, seed)
    elif model.lora_config.resolved() != cfg.resolved() or model.lora_config.rank != cfg.rank:
        raise LoRAError(f"adapter {path} (r={cfg.rank}, {cfg.resolved()}) does not match the model's adapters")
    tensors = load_file(str(Path(path) / ADAPTER_WEIGHTS))
    mine = {}
    for full, mod in model.named_modules():
        if isinstance(mod, (LoRALinear, LoRAExperts)):
            for pname, p in mod.named_parameters(recurse=False):
                mine[f"{PREFIX}{hf_name(full)}.{_PARAM_NAMES[pname]}.weight"] = p
    missing, extra = sorted(set(mine) - set(tensors)), sorted(set(tensors) - set(mine))
    if missing or extra:
        raise LoRAError(f"adapter {path} does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for k, p in mine.items():
            if tuple(tensors[k].shape) != tuple(p.shape):
                raise LoRAError(f"adapter tensor {k} has shape {tuple(tensors[k].shape)}, expected {tuple(p.shape)}")
            p.copy_(tensors[k])
    return model
