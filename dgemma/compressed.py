"""Checkpoints in llm-compressor's compressed-tensors format, converted into dgemma's quantized modules at load.

This is the format of the published quantized DiffusionGemma checkpoints that vLLM serves: RedHatAI's
`diffusiongemma-26B-A4B-it-FP8-dynamic` (FP8 e4m3 weights, one scale per output channel) and `...-NVFP4`, INT8
W8A8 (int8 per channel), and W4A16 / W8A16 (int4 / int8 packed into int32, per group or channel). `config.json` holds
`"quantization_config": {"quant_method": "compressed-tensors", "format": ..., "config_groups": {NAME: {"targets":
["Linear"], "weights": {"num_bits", "type", "strategy", "group_size", "symmetric"}, "input_activations": ...}},
"ignore": [...]}`. Each quantized Linear `P` stores (compressed_tensors.compressors):
  float-quantized / int-quantized / naive-quantized   P.weight (float8_e4m3fn or int8, [out, in]), P.weight_scale
  pack-quantized     P.weight_packed (int32 [out, ceil(in * bits / 32)]: element i at bit i * bits, stored q + 2^(bits-1)),
                     P.weight_shape, P.weight_scale, and P.weight_zero_point (int, packed along dim 0) if asymmetric
with weight_scale `[out, 1]` (channel), `[1]` (tensor), `[out, in / group]` (group) or `[out / rows, in / inputs]`
(block), and w = (q - zero_point) * scale.
The MoE experts, which HF stores fused (`experts.gate_up_proj [E, 2I, H]`), are split into per-expert Linears
(`experts.{e}.gate_proj / up_proj / down_proj`) so that `targets: ["Linear"]` reaches them; layers in `ignore`
(the LM head, embeddings, routers, self-conditioning in RedHatAI's release) are stored as plain floats.

The conversion (`adapt`) rewrites the checkpoint's entries into dgemma's layout lazily, one layer at a time when
read: fp8 / int8 codes as they are (the per-channel scale flattened, a per-tensor one repeated per channel); int4
unpacked and repacked two per byte with the scale as stored and zero = -zero_point * scale; experts stacked back
into `[E, ...]`. Layers the checkpoint keeps in floats become `QuantConfig.ignore`; a quantized layer dgemma keeps
in floats (a router) is dequantized. Only weights are read: activation quantization (`input_activations`, the
`input_scale`s of static schemes) and the KV-cache scales are not applied, so dgemma runs these checkpoints
weight-only, with activations in the model dtype. NVFP4 (`nvfp4-pack-quantized`: e2m1 pairs per byte, e4m3 scales
per 16 inputs, a global scale) loads as dgemma's nvfp4, tensors as stored. Group and block scales (W8A16's int8 groups, FP8_BLOCK's 128x128
blocks) load as dgemma's grouped int8 / fp8: a block's scale repeated over its rows. Not supported, each with a
clear error: MXFP4 / MXFP8, 2:4 sparse formats, several weight schemes in one checkpoint, asymmetric int8 / fp8.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .quant import QUANT_KEY, Int4, QuantConfig, QuantError, targets

METHOD = "compressed-tensors"
MODELOPT = "modelopt"
FORMATS = ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized", "nvfp4-pack-quantized")
# Per-module tensors of what compressed-tensors quantizes and dgemma does not: activations, the KV cache.
SKIPPED = (".input_scale", ".input_zero_point", ".input_global_scale", ".output_scale", ".output_zero_point",
           ".k_scale", ".v_scale", ".q_scale", ".k_zero_point", ".v_zero_point")
PARTS = ("weight", "weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_global_scale",
         "weight_scale_2")
DECODER = "model.decoder."

Entry = tuple[object, Callable[[], torch.Tensor]]  # (where it comes from, for messages; a reader)


def is_compressed(qc) -> bool:
    """Whether a `quantization_config` is one this module converts: llm-compressor's or ModelOpt's."""
    return isinstance(qc, dict) and qc.get("quant_method") in (METHOD, MODELOPT)


def foreign_config(ckpt, cfg) -> dict | None:
    """The llm-compressor / ModelOpt quantization config of a checkpoint directory: config.json's
    `quantization_config`, or ModelOpt's older `hf_quant_config.json` beside it; None for anything else."""
    import json
    from pathlib import Path

    qc = cfg.extra.get(QUANT_KEY)
    if qc is None and (Path(ckpt) / "hf_quant_config.json").exists():
        try:
            hq = json.loads((Path(ckpt) / "hf_quant_config.json").read_text())
        except json.JSONDecodeError as e:
            raise QuantError(f"malformed hf_quant_config.json: {e}") from None
        qc = {"quant_method": MODELOPT, **(hq.get("quantization") or {})} if isinstance(hq, dict) else None
    return qc if is_compressed(qc) else None


def _parse_modelopt(qc: dict) -> tuple[QuantConfig, dict]:
    """NVIDIA ModelOpt's export (`quant_method: modelopt`, `quant_algo`): NVFP4 stores `weight` (uint8 e2m1 pairs),
    `weight_scale` (e4m3 per 16 inputs) and `weight_scale_2` (float32, 1 / the global scale); FP8 stores `weight`
    (e4m3) and `weight_scale` (per tensor, or per channel for FP8_PER_CHANNEL_PER_TOKEN)."""
    algo = qc.get("quant_algo") or (qc.get("quantization") or {}).get("quant_algo")
    if algo == "NVFP4":
        if qc.get("group_size", 16) != 16:
            raise QuantError(f"ModelOpt NVFP4 with group size {qc.get('group_size')} is not supported (16 is)")
        return QuantConfig("nvfp4"), {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16}
    if algo in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN"):
        return QuantConfig("fp8"), {"num_bits": 8, "type": "float", "strategy": "channel", "group_size": None}
    raise QuantError(f"ModelOpt quant_algo {algo!r} is not supported; dgemma reads ModelOpt's NVFP4 and FP8")


def parse(qc: dict) -> tuple[QuantConfig, dict]:
    """The dgemma scheme a compressed-tensors or ModelOpt config maps to, and its weight arguments; QuantError
    otherwise."""
    if qc.get("quant_method") == MODELOPT:
        return _parse_modelopt(qc)
    fmt = qc.get("format")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise QuantError("compressed-tensors quantization_config has no config_groups")
    args, formats = [], set()
    for name, g in groups.items():
        w = g.get("weights") if isinstance(g, dict) else None
        if not isinstance(w, dict):
            raise QuantError(f"compressed-tensors group {name!r} quantizes no weights (activation-only schemes "
                             "are not supported)")
        args.append({k: w.get(k) for k in ("num_bits", "type", "strategy", "group_size", "symmetric",
                                           "block_structure")})
        formats.add(g.get("format") or fmt)
    if any(a != args[0] for a in args):
        raise QuantError("this compressed-tensors checkpoint mixes weight schemes across layers; dgemma supports "
                         "one weight scheme per checkpoint")
    if len(formats) != 1:
        raise QuantError(f"this compressed-tensors checkpoint mixes formats ({', '.join(sorted(map(str, formats)))})")
    fmt = formats.pop()
    a = args[0]
    bits, kind, strategy = a["num_bits"], a["type"], a["strategy"]
    what = f"{kind} {bits}-bit weights, {strategy} strategy, format {fmt!r}"
    if fmt not in FORMATS:
        hint = (" (use the bf16 checkpoint and `dgemma quantize --scheme nvfp4` or `--scheme int4`)"
                if "fp4" in str(fmt) else "")
        raise QuantError(f"compressed-tensors format {fmt!r} is not supported{hint}; dgemma reads "
                         f"{', '.join(FORMATS)}")
    per_channel = strategy in ("channel", "tensor")
    group = a["group_size"] if strategy == "group" else None
    if strategy == "block":  # [rows, inputs] blocks: each row takes its block's scales, groups of `inputs`
        bs = a["block_structure"]
        if not (isinstance(bs, (list, tuple)) and len(bs) == 2 and all(isinstance(v, int) and v > 0 for v in bs)):
            raise QuantError(f"compressed-tensors block strategy needs block_structure [rows, inputs], got {bs!r}")
        group = bs[1]
    if fmt == "nvfp4-pack-quantized" or (kind == "float" and bits == 4):
        if not (fmt == "nvfp4-pack-quantized" and kind == "float" and bits == 4 and strategy == "tensor_group"
                and a["group_size"] == 16 and a["symmetric"] is not False):
            raise QuantError(f"compressed-tensors {what}, group size {a['group_size']} is not supported; dgemma "
                             "reads FP4 as NVFP4 (e2m1, e4m3 scales per 16 inputs, a global scale per tensor)")
        qcfg = QuantConfig("nvfp4")
    elif kind == "float" and bits == 8 and (per_channel or group):
        qcfg = QuantConfig("fp8", group)
    elif kind == "int" and bits == 8 and (per_channel or group) and a["symmetric"] is not False:
        qcfg = QuantConfig("int8", group)
    elif kind == "int" and bits == 4 and strategy == "group" and fmt == "pack-quantized":
        qcfg = QuantConfig("int4", group)
    else:
        raise QuantError(f"compressed-tensors {what} is not supported; dgemma reads FP8 and int8 per channel, "
                         "tensor, group or block, and int4 per group (packed)")
    return qcfg, a


# ---------------------------------------------------------------- unpacking
def unpack_int32(packed: torch.Tensor, bits: int, cols: int, dim: int = 1) -> torch.Tensor:
    """compressed-tensors' dense int32 packing (element i at bit i * bits, little-endian) -> signed codes int16
    [rows, cols] (packed along dim 0: [cols, rows] transposed back). 4 and 8 bits: a value never straddles a byte."""
    if packed.dtype != torch.int32:
        raise QuantError(f"packed weights must be int32, got {packed.dtype}")
    if bits not in (4, 8):
        raise QuantError(f"unpacking {bits}-bit weights is not supported (4 and 8 are)")
    v = packed.t() if dim == 0 else packed
    by = v.contiguous().view(torch.uint8).view(v.shape[0], -1)  # little-endian bytes; CPUs and GPUs alike
    if bits == 8:
        u = by
    else:
        u = torch.stack((by & 15, by >> 4), dim=-1).view(v.shape[0], -1)
    if u.shape[1] < cols:
        raise QuantError(f"packed weights hold {u.shape[1]} values per row, expected {cols}")
    q = u[:, :cols].to(torch.int16) - (1 << (bits - 1))
    return q.t() if dim == 0 else q


# ---------------------------------------------------------------- one layer
class _Reader:
    """The per-module tensors of one compressed-tensors Linear `P` (names `P.weight_scale` and the like)."""

    def __init__(self, entries: dict[str, Entry], a: dict, qcfg: QuantConfig):
        self.entries, self.a, self.qcfg, self.scheme = entries, a, qcfg, qcfg.make()

    def has(self, p: str) -> bool:
        return p + ".weight_scale" in self.entries

    def get(self, key: str) -> torch.Tensor:
        if key not in self.entries:
            raise QuantError(f"the checkpoint has no tensor {key}")
        return self.entries[key][1]()

    def codes(self, p: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(signed codes [out, in] as stored or int16, scale, zero point or None) of one Linear."""
        if p + ".weight_packed" in self.entries:
            shape = [int(v) for v in self.get(p + ".weight_shape").tolist()]
            q = unpack_int32(self.get(p + ".weight_packed"), self.a["num_bits"], shape[1])
            if tuple(q.shape) != tuple(shape):
                raise QuantError(f"{p}.weight_packed unpacks to {tuple(q.shape)}, weight_shape says {tuple(shape)}")
        else:
            q = self.get(p + ".weight")
            want = torch.float8_e4m3fn if self.qcfg.scheme == "fp8" else torch.int8
            if q.dtype != want:
                raise QuantError(f"{p}.weight has dtype {q.dtype}, expected {want} for {self.qcfg.scheme}")
        zp = None
        if p + ".weight_zero_point" in self.entries:
            zp = self.get(p + ".weight_zero_point")
            if zp.dtype == torch.int32 and self.qcfg.scheme == "int4":  # packed along the output dim
                zp = unpack_int32(zp, self.a["num_bits"], q.shape[0], dim=0)
        return q, self.get(p + ".weight_scale"), zp

    def dgemma(self, p: str) -> dict[str, torch.Tensor]:
        """One Linear in dgemma's layout for the scheme: {"": codes, "_scale": ..., ["_zero": ...]}."""
        if self.qcfg.scheme == "nvfp4":  # as stored: packed e2m1 pairs, e4m3 group scales; the global per row
            packed = self.get(p + (".weight_packed" if p + ".weight_packed" in self.entries else ".weight"))
            scale = self.get(p + ".weight_scale")
            if p + ".weight_scale_2" in self.entries:  # ModelOpt: w = e2m1 * scale * scale_2, scale_2 = 1 / global
                glob = 1.0 / self.get(p + ".weight_scale_2").float().reshape(-1)
            else:
                glob = self.get(p + ".weight_global_scale").float().reshape(-1)
            if packed.dtype != torch.uint8 or scale.dtype != torch.float8_e4m3fn or glob.numel() != 1:
                raise QuantError(f"{p}: NVFP4 needs uint8 codes, float8_e4m3fn weight_scale and one global "
                                 f"scale; got {packed.dtype}, {scale.dtype}, {glob.numel()} values")
            return {"": packed, "_scale": scale, "_global": glob.expand(packed.shape[0]).contiguous()}
        q, scale, zp = self.codes(p)
        out, inp = q.shape
        if self.qcfg.scheme in ("fp8", "int8"):
            if zp is not None and bool(zp.ne(0).any()):
                raise QuantError(f"{p} has a nonzero zero point: asymmetric {self.qcfg.scheme} is not supported")
            codes = q if q.dtype == self.scheme.code_dtype else q.to(torch.int8)
            if self.qcfg.group_size is None:
                scale = scale.reshape(-1)
                if scale.numel() == 1:
                    scale = scale.expand(out).contiguous()
                elif scale.numel() != out:
                    raise QuantError(f"{p}.weight_scale has {scale.numel()} values; per channel needs {out}")
                return {"": codes, "_scale": scale}
            groups = -(-inp // self.qcfg.group_size)
            if self.a["strategy"] == "block":
                rows = self.a["block_structure"][0]
                if tuple(scale.shape) != (-(-out // rows), groups):
                    raise QuantError(f"{p}.weight_scale has shape {tuple(scale.shape)}; blocks of "
                                     f"{self.a['block_structure']} need {(-(-out // rows), groups)}")
                scale = scale.repeat_interleave(rows, dim=0)[:out].contiguous()
            if tuple(scale.shape) != (out, groups):
                raise QuantError(f"{p}.weight_scale has shape {tuple(scale.shape)}; groups of "
                                 f"{self.qcfg.group_size} need {(out, groups)}")
            return {"": codes, "_scale": scale}
        g = self.qcfg.group_size
        groups = -(-inp // g)
        if tuple(scale.shape) != (out, groups):
            raise QuantError(f"{p}.weight_scale has shape {tuple(scale.shape)}; groups of {g} need {(out, groups)}")
        if inp % 2:
            raise QuantError(f"{p} has {inp} (odd) inputs; int4 packs two per byte")
        zero = (torch.zeros_like(scale) if zp is None else -zp.reshape(out, groups).float() * scale.float())
        return {"": Int4.pack((q + 8).to(torch.uint8)), "_scale": scale, "_zero": zero}  # dgemma's code: q + 8

    def dequantized(self, p: str) -> torch.Tensor:
        """A quantized Linear of a layer dgemma keeps in floats (a router), as a float32 weight."""
        return self.scheme.dequantize(self.dgemma(p), torch.float32)


def _stack(parts: list[Callable[[], dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Per-expert tensors (one dict per expert) -> `[E, ...]`, filled one expert at a time."""
    out: dict[str, torch.Tensor] = {}
    for e, part in enumerate(parts):
        for s, t in part().items():
            if s not in out:
                out[s] = torch.empty((len(parts), *t.shape), dtype=t.dtype)
            out[s][e] = t
    return out


def _experts(r: _Reader, p: str, E: int, quantized: bool) -> dict[str, Callable[[], dict[str, torch.Tensor]]]:
    """Readers of the stacked `gate_up_proj` (gate rows first) and `down_proj` from per-expert Linears."""
    def one(e: int, w: str) -> dict[str, torch.Tensor]:
        return r.dgemma(f"{p}.{e}.{w}") if quantized else {"": r.get(f"{p}.{e}.{w}.weight")}

    def gate_up(e: int) -> dict[str, torch.Tensor]:
        g, u = one(e, "gate_proj"), one(e, "up_proj")
        return {s: torch.cat([g[s], u[s]], dim=0) for s in g}

    return {"gate_up_proj": lambda: _stack([lambda e=e: gate_up(e) for e in range(E)]),
            "down_proj": lambda: _stack([lambda e=e: one(e, "down_proj") for e in range(E)])}


# ---------------------------------------------------------------- the checkpoint
def adapt(model: nn.Module, entries: dict[str, Entry], qc: dict) -> tuple[dict[str, Entry], QuantConfig | None]:
    """Rewrite a compressed-tensors checkpoint's entries (HF key -> (source, reader)) into dgemma's quantized
    layout for `model` (float modules, meta device). Returns the new entries and the QuantConfig to load them
    with (None when no layer dgemma quantizes is quantized in the checkpoint)."""
    qcfg, a = parse(qc)
    entries = {k: v for k, v in entries.items() if not k.endswith(SKIPPED)}
    r = _Reader(entries, a, qcfg)
    new: dict[str, Entry] = {}
    used: set[str] = set()
    ignore: list[str] = []

    def take(p: str) -> None:
        used.update(f"{p}.{n}" for n in PARTS)

    def lazy(key: str, src, make: Callable[[], dict[str, torch.Tensor]], suffixes) -> None:
        cache: dict[str, torch.Tensor] = {}

        def read(s):
            def f():
                if s not in cache:  # one conversion for the codes and their scales; each handed over once
                    cache.update(make())
                return cache.pop(s)
            return f
        for s in suffixes:
            new[key + s] = (src, read(s))

    suffixes, total = r.scheme.suffixes, 0
    for qname, _, _, child in targets(model):
        total += 1
        p = DECODER + qname
        if isinstance(child, nn.Linear):
            if r.has(p):
                take(p)
                lazy(p + ".weight", entries[p + ".weight_scale"][0], lambda p=p: r.dgemma(p), suffixes)
            else:
                ignore.append(qname)
            continue
        E = child.gate_up_proj.shape[0]
        split = [f"{p}.{e}.{w}" for e in range(E) for w in ("gate_proj", "up_proj", "down_proj")]
        if p + ".gate_up_proj" in entries:  # fused, as HF stores them: left in floats by the quantizer
            ignore.append(qname)
            continue
        if not any(s + ".weight" in entries or r.has(s) for s in split):
            continue  # missing: load_model reports it
        quantized = [r.has(s) for s in split]
        if any(quantized) and not all(quantized):
            raise QuantError(f"{p}: some experts are quantized and some are not; dgemma needs all or none")
        for s in split:
            take(s)
        src = entries.get(split[0] + ".weight_scale", entries.get(split[0] + ".weight", ("?",)))[0]
        if not quantized[0]:
            ignore.append(qname)
        for w, make in _experts(r, p, E, quantized[0]).items():
            lazy(f"{p}.{w}", src, make, suffixes if quantized[0] else ("",))
    # Quantized layers dgemma keeps in floats (a router, the LM head): dequantized into plain weights.
    for key in [k for k in entries if k.endswith(".weight_scale")]:
        p = key[: -len(".weight_scale")]
        if p + ".weight" in used or key in used:
            continue
        take(p)
        new[p + ".weight"] = (entries[key][0], lambda p=p: r.dequantized(p))
    for key, v in entries.items():
        if key not in used and key not in new:
            new[key] = v
    if len(ignore) == total:
        return new, None
    return new, QuantConfig(qcfg.scheme, qcfg.group_size, tuple(ignore))


__all__ = ["is_compressed", "parse", "adapt", "unpack_int32"]
