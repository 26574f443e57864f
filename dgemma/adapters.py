"""Several LoRA adapters over one base model, chosen per row: multi-LoRA serving (`dgemma serve --lora NAME=PATH`).

`attach_adapters(model, [path, ...])` swaps every module that any of the adapters targets for a `MultiLoRALinear`
or `MultiLoRAExperts` holding all of their A/B matrices, and gives the model a `RowAdapters` selector. Adapter i
(1-based, in the order given) is then chosen per row: `model.encode/denoise(..., adapters=[a_0, ..., a_{B-1}])`
(the engine passes each row's `GenerationParams.adapter`) adds each row's own low-rank update to the base output,
y = W x + s_a B_a (A_a x): the unmerged form, so rows of different adapters share one forward. Adapter 0 is the
base: its rows, and every forward without `adapters`, compute the base alone, bit for bit. An adapter's rows give
its unmerged LoRA's output (`train.lora.LoRALinear`), within float rounding of the adapter folded into the weights.

Costs: two thin matmuls per targeted module per adapter present in the batch, over that adapter's rows only;
`torch.compile` of the denoiser does not apply (a clear error).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .model import ExpertGroups, Experts, moe_dispatch
from .quant import QuantExperts, QuantLinear
from .weights import hf_name


class AdapterError(ValueError):
    """An adapter that cannot be served over this model, or a request for one that is not there."""


class RowAdapters:
    """Which adapter each token of the current forward uses: set by `DiffusionGemma.forward`, read by the modules."""

    def __init__(self, names: list[str]):
        self.names = names  # adapter i + 1 is names[i] (None once removed)
        self.active: list[int] = []  # the adapters (> 0) present in this forward, ascending
        self.token: torch.Tensor | None = None  # [B * T] adapter per token (only when `active`)
        self.rows: dict[int, torch.Tensor] = {}  # adapter -> the flat token indices that use it

    def set(self, adapters: list[int] | None, T: int, device) -> None:
        self.active, self.token, self.rows = [], None, {}
        if not adapters or not any(adapters):
            return
        bad = [a for a in adapters if a and not (0 < a <= len(self.names) and self.names[a - 1] is not None)]
        if bad:
            raise AdapterError(f"no adapter {bad[0]} on this model")
        self.active = sorted({a for a in adapters if a})
        self.token = torch.tensor(adapters, device=device).repeat_interleave(T)
        for a in self.active:  # from the host list: no device read
            self.rows[a] = torch.cat([torch.arange(i * T, (i + 1) * T, device=device)
                                      for i, b in enumerate(adapters) if b == a])

    def clear(self) -> None:
        self.active, self.token, self.rows = [], None, {}


class MultiLoRALinear(nn.Module):
    """A linear module (plain or quantized) plus any number of adapters' (A, B, scale), applied per token."""

    def __init__(self, base: nn.Module, sel: RowAdapters):
        super().__init__()
        self.base, self.sel = base, sel
        self.lora: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        hit = [a for a in self.sel.active if a in self.lora]
        if not hit:
            return out
        out = out.contiguous()  # the updates are added in place, through a flat view
        flat, oflat = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
        for a in hit:
            A, B, s = self.lora[a]
            rows = self.sel.rows[a]
            d = F.linear(F.linear(flat.index_select(0, rows), A), B) * s
            oflat.index_add_(0, rows, d.to(out.dtype))
        return out


class MultiLoRAExperts(nn.Module):
    """An `Experts` stack (plain or quantized) plus adapters' per-expert (A, B) on gate_up_proj and down_proj."""

    dense = False

    def __init__(self, base: nn.Module, sel: RowAdapters):
        super().__init__()
        self.base, self.sel, self.num_experts = base, sel, base.num_experts
        self.lora: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.scale: dict[int, float] = {}

    def linear(self, name: str, xs: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
        out = self.base.linear(name, xs, groups)
        hit = [a for a in self.sel.active if a in self.lora]
        if not hit:
            return out
        row_adapter = self.sel.token[groups.token]  # the adapter of each (token, expert) row
        expert = torch.repeat_interleave(torch.arange(self.num_experts, device=xs.device), groups.counts)
        for a in hit:
            rows = (row_adapter == a).nonzero().squeeze(1)  # sorted by expert, as xs is
            if rows.numel() == 0:
                continue
            A, B = self.lora[a][name]
            sub = ExpertGroups(torch.bincount(expert[rows], minlength=self.num_experts))
            out.index_add_(0, rows, (_per_expert_lora(sub, xs.index_select(0, rows), A, B) * self.scale[a]
                                     ).to(out.dtype))
        return out

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return moe_dispatch(x, weights, idx, self.num_experts, self.linear, dense=self.dense)


def _per_expert_lora(groups: ExpertGroups, xs: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Each row's B[e] (A[e] x) for its expert e (rows sorted by expert): two grouped matmuls where the kernel
    takes the operands (no host read of the row counts), else one expert at a time."""
    if groups.grouped_ok(xs, A):
        t = groups.grouped(xs, A)
        if groups.grouped_ok(t, B):
            return groups.grouped(t, B)
        return groups.per_expert(t, lambda e, r: F.linear(r, B[e]))
    return groups.per_expert(xs, lambda e, r: F.linear(F.linear(r, A[e]), B[e]))


def attach_adapters(model, paths: list[str | Path]) -> list[str]:
    """Serve the LoRA adapters at `paths` (adapter directories, `dgemma train --lora-rank`) over `model`, as
    adapters 1..N. Returns the wrapped module names. Every adapter is checked against the model before any is
    attached: a name, shape or rank that does not fit is an AdapterError naming the adapter."""
    if getattr(model, "served_adapters", None) is not None:
        raise AdapterError("the model serves adapters already")
    if not paths:
        raise AdapterError("no adapters given")
    loaded = [read_adapter(model, p) for p in paths]
    for p, a in zip(paths, loaded):
        install_adapter(model, str(p), a)
    return sorted(name for name, m in model.named_modules() if isinstance(m, (MultiLoRALinear, MultiLoRAExperts)))


def read_adapter(model, path: str | Path) -> tuple[float, dict[str, dict[str, torch.Tensor]]]:
    """An adapter's scale and tensors per module of `model` (cast to its device and dtype), checked against it:
    what `install_adapter` takes. Reads files only; the model is not touched (safe beside a running engine)."""
    from safetensors.torch import load_file

    from .train.lora import ADAPTER_WEIGHTS, PREFIX, LoRAConfig, LoRAError, read_adapter_config

    dev, dt, cfg_m = model.device, model.dtype, model.cfg
    try:
        conf = read_adapter_config(path)
        cfg = LoRAConfig(int(conf["r"]), float(conf["lora_alpha"]), tuple(conf["target_modules"]))
    except LoRAError as e:
        raise AdapterError(str(e)) from None
    try:
        tensors = load_file(str(Path(path) / ADAPTER_WEIGHTS))
    except (OSError, ValueError) as e:  # missing, or not safetensors
        raise AdapterError(f"cannot read {Path(path) / ADAPTER_WEIGHTS}: {e}") from None
    per_module, want = {}, set()
    for full, base in _targets(model, cfg.resolved()):
        stem = f"{PREFIX}{hf_name(full)}"
        if not _is_experts(base):
            names = {"A": f"{stem}.lora_A.weight", "B": f"{stem}.lora_B.weight"}
            shapes = {"A": (cfg.rank, base.in_features), "B": (base.out_features, cfg.rank)}
        else:
            names = {f"{p}_{m}": f"{stem}.{p}.lora_{m}.weight" for p in ("gate_up_proj", "down_proj") for m in "AB"}
            E, H, inner = cfg_m.num_experts, cfg_m.hidden_size, cfg_m.moe_intermediate_size
            shapes = {"gate_up_proj_A": (E, cfg.rank, H), "gate_up_proj_B": (E, 2 * inner, cfg.rank),
                      "down_proj_A": (E, cfg.rank, inner), "down_proj_B": (E, H, cfg.rank)}
        got = {}
        for k, key in names.items():
            want.add(key)
            if key not in tensors:
                raise AdapterError(f"adapter {path} does not fit the model: {key} is missing")
            if tuple(tensors[key].shape) != shapes[k]:
                raise AdapterError(f"adapter {path}: {key} has shape {tuple(tensors[key].shape)}, expected "
                                   f"{shapes[k]}")
            got[k] = tensors[key].to(dev, dt)
        per_module[full] = got
    extra = sorted(set(tensors) - want)
    if extra:
        raise AdapterError(f"adapter {path} does not fit the model: unexpected {extra[:3]}")
    return cfg.scale, per_module


def install_adapter(model, name: str, adapter: tuple[float, dict]) -> int:
    """Add an adapter (`read_adapter`'s result) to the model's served ones, wrapping the modules it targets that
    are not wrapped yet; returns its index. Indices are never reused, so nothing cached under a removed adapter's
    index can be mistaken for a new one's. Run it between forwards (the server's worker does)."""
    scale, per_module = adapter
    if any(getattr(layer, "compiled", False) for layer in model.layers):
        raise AdapterError("a model whose denoiser is compiled (--compile) cannot take LoRA adapters")
    sel = getattr(model, "served_adapters", None)
    if sel is None:
        sel = model.served_adapters = RowAdapters([])
    sel.names.append(name)
    i = len(sel.names)
    for full, mod in list(model.named_modules()):
        if isinstance(mod, (MultiLoRALinear, MultiLoRAExperts)):
            continue
        for attr, child in list(mod.named_children()):
            path = f"{full}.{attr}" if full else attr
            got = per_module.get(path)
            if got is None:
                continue
            w = child
            if not isinstance(w, (MultiLoRALinear, MultiLoRAExperts)):
                w = (MultiLoRAExperts if _is_experts(child) else MultiLoRALinear)(child, sel)
                setattr(mod, attr, w)
            if isinstance(w, MultiLoRAExperts):
                w.lora[i] = {p: (got[f"{p}_A"], got[f"{p}_B"]) for p in ("gate_up_proj", "down_proj")}
                w.scale[i] = scale
            else:
                w.lora[i] = (got["A"], got["B"], scale)
    return i


def remove_adapter(model, index: int) -> None:
    """Drop adapter `index`'s tensors (its rows must be gone). Its index stays taken; the wrappers stay, costing
    nothing while no row uses an adapter they hold."""
    sel = getattr(model, "served_adapters", None)
    if sel is None or not 1 <= index <= len(sel.names) or sel.names[index - 1] is None:
        raise AdapterError(f"no adapter {index} to remove")
    sel.names[index - 1] = None
    for m in model.modules():
        if isinstance(m, (MultiLoRALinear, MultiLoRAExperts)):
            m.lora.pop(index, None)
            if isinstance(m, MultiLoRAExperts):
                m.scale.pop(index, None)


def _is_experts(m: nn.Module) -> bool:
    return isinstance(m, (Experts, QuantExperts))


def _targets(model: nn.Module, names: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module an adapter with these target names wraps: `train.lora`'s rule, over plain
    and quantized modules alike (an adapter is served unmerged, so a quantized base is fine)."""
    out = []
    for full, mod in model.named_modules():
        if isinstance(mod, (MultiLoRALinear, MultiLoRAExperts)):
            continue  # a wrapper's base is the wrapper's place: the wrapper itself is listed below
        for attr, child in mod.named_children():
            path = f"{full}.{attr}" if full else attr
            if isinstance(child, (MultiLoRALinear, MultiLoRAExperts)):
                child = child.base
            if _is_experts(child):
                if "experts" in names:
                    out.append((path, child))
            elif isinstance(child, (nn.Linear, QuantLinear)):
                kind = "router" if attr == "proj" and full.endswith("router") else attr
                if kind in names:
                    out.append((path, child))
    return out
