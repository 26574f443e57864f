"""DiffusionGemma GGUF files (llama.cpp's `diffusion-gemma` architecture, as Unsloth publishes them): read, map, load.

A GGUF holds the whole model in one file: hyperparameters and the vocabulary as key/value metadata, then the
tensors under llama.cpp's names, each F32/F16/BF16 or in one of ggml's block formats (Q8_0, Q4_K, Q6_K, ...).
dgemma reads it without llama.cpp:

- `sidecar(path)` writes, once per file (cached by path, size and mtime), a small checkpoint directory holding the
  config.json, generation_config.json and tokenizer files the metadata implies, plus `gguf.json` pointing back at
  the file. Everything that takes a checkpoint directory (generate, chat, serve, info, quantize) then works; only
  the weights are read from the GGUF, lazily, one tensor at a time.
- `GGUFFile.tensor(hf_key)` returns one tensor under its Hugging Face name: float types as stored (memory-mapped),
  block formats dequantized to float32 by the `gguf` package's own decoders (`gguf.quants.dequantize`).

The names follow llama.cpp's converter for DiffusionGemma (the Gemma 4 tensor map for the shared stack, with
`enc_layer_output_scale` for the encoder's layer scalars and `self_cond_*` for the self-conditioning MLP); the
mapping is inverted here and fails closed on a name it does not know. Weights are dequantized, not run in their
ggml formats: load the file directly for small models, or convert it once (`dgemma quantize model.gguf DST
--scheme int4`, streamed tensor by tensor) into a memory-mapped dgemma checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import mmap
import os
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .weights import ENC_SCALAR

ARCH = "diffusion-gemma"
LINK = "gguf.json"  # in a sidecar directory: which GGUF file holds the weights
DECODER = "model.decoder."

# llama.cpp name (after `blk.N.`) -> HF name (after `model.decoder.layers.N.`)
_LAYER = {
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_norm.weight": "input_layernorm.weight", "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "pre_ffw_norm_2.weight": "pre_feedforward_layernorm_2.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "post_ffw_norm_1.weight": "post_feedforward_layernorm_1.weight",
    "post_ffw_norm_2.weight": "post_feedforward_layernorm_2.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "router.proj.weight", "ffn_gate_inp.scale": "router.scale",
    "ffn_down_exps.scale": "router.per_expert_scale",
    "ffn_gate_up_exps.weight": "experts.gate_up_proj", "ffn_down_exps.weight": "experts.down_proj",
    "layer_output_scale.weight": "layer_scalar", "layer_output_scale": "layer_scalar",
}
_GLOBAL = {
    "token_embd.weight": DECODER + "embed_tokens.weight", "output_norm.weight": DECODER + "norm.weight",
    "self_cond_pre_norm.weight": DECODER + "self_conditioning.pre_norm.weight",
    "self_cond_gate.weight": DECODER + "self_conditioning.gate_proj.weight",
    "self_cond_up.weight": DECODER + "self_conditioning.up_proj.weight",
    "self_cond_down.weight": DECODER + "self_conditioning.down_proj.weight",
}
_SKIP = ("rope_freqs.weight",)  # precomputed by the converter from the config; dgemma computes its own
_ENC_SCALAR = re.compile(r"^blk\.(\d+)\.enc_layer_output_scale(\.weight)?$")
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")
# Older converters write the experts' gate and up halves apart; dgemma stacks them as [E, 2I, H] (gate first).
_SPLIT_EXPERTS = {"ffn_gate_exps.weight": 0, "ffn_up_exps.weight": 1}

# The generation defaults of the released checkpoint (SPEC §3): llama.cpp's converter writes them as diffusion.eb_*
# keys when the source had a generation_config.json; files without them get these.
_GEN_KEYS = {"max_denoising_steps": "diffusion.eb_max_steps", "t_min": "diffusion.eb_t_min",
             "t_max": "diffusion.eb_t_max", "stability_threshold": "diffusion.eb_stability_threshold",
             "confidence_threshold": "diffusion.eb_confidence_threshold"}
# Gemma 4's end-of-turn markers: llama.cpp keeps one scalar eos id, DiffusionGemma stops on these too.
_TURN_ENDS = ("<turn|>", "<|tool_response>")


class GGUFError(ValueError):
    """A GGUF file dgemma cannot load, with the reason."""


# ---------------------------------------------------------------- the file format
@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy / torch order (GGUF stores the innermost dimension first)
    qtype: int
    offset: int  # absolute, in bytes
    nbytes: int


def read_header(path: str | Path, keep: Callable[[str], bool] = lambda key: True, *,
                tensors: bool = True) -> tuple[dict[str, Any], list[TensorInfo]]:
    """A GGUF file's metadata (the keys `keep` accepts) and its tensor directory, without reading tensor data.

    gguf's GGUFReader builds numpy views for every string of the vocabulary (~25 s on a 262k-token file); walking
    the header with struct takes about a second. The value-type, magic and block-size constants come from gguf."""
    gguf = import_gguf()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if path.stat().st_size < 24:
        raise GGUFError(f"{path} is too small to be a GGUF file")
    T = gguf.GGUFValueType
    formats = {T.UINT8: "B", T.INT8: "b", T.UINT16: "H", T.INT16: "h", T.UINT32: "I", T.INT32: "i",
               T.FLOAT32: "f", T.BOOL: "?", T.UINT64: "Q", T.INT64: "q", T.FLOAT64: "d"}

    # struct reads the mmap in place and slicing it copies to bytes, so no view outlives the `with` below.
    # Slicing past the end silently returns less, hence the explicit bounds checks.
    def take(mm, pos, n):
        if pos + n > len(mm):
            raise struct.error(f"{n} bytes wanted at offset {pos}, the file ends at {len(mm)}")
        return mm[pos: pos + n]

    def string(mm, pos):
        (n,) = struct.unpack_from("<Q", mm, pos)
        return take(mm, pos + 8, n).decode("utf-8"), pos + 8 + n

    def value(mm, pos, vtype, want):
        if vtype == T.STRING:
            return string(mm, pos)
        if vtype in formats:
            fmt = "<" + formats[vtype]
            return struct.unpack_from(fmt, mm, pos)[0], pos + struct.calcsize(fmt)
        if vtype != T.ARRAY:
            raise GGUFError(f"{path}: unknown GGUF value type {vtype}")
        etype, count = struct.unpack_from("<IQ", mm, pos)
        pos += 12
        if etype in formats:
            width = struct.calcsize("<" + formats[etype])
            arr = np.frombuffer(take(mm, pos, count * width), "<" + formats[etype]) if want else None
            return arr, pos + count * width
        items = []
        for _ in range(count):  # strings have no fixed width: walk them even when skipped
            item, pos = value(mm, pos, etype, want)
            if want:
                items.append(item)
        return items, pos

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        try:
            magic, version = struct.unpack_from("<II", mm, 0)
            if magic != gguf.GGUF_MAGIC:
                raise GGUFError(f"{path} is not a GGUF file (bad magic bytes)")
            if version & 0xFFFF == 0 or version < 2:
                raise GGUFError(f"{path}: GGUF version {version} (or a big-endian file) is not supported")
            n_tensors, kv_count = struct.unpack_from("<QQ", mm, 8)
            pos, meta, alignment = 24, {}, 32
            for _ in range(kv_count):
                key, pos = string(mm, pos)
                (vtype,) = struct.unpack_from("<I", mm, pos)
                want = keep(key) or key == "general.alignment"
                val, pos = value(mm, pos + 4, vtype, want)
                if key == "general.alignment":
                    alignment = int(val)
                if want:
                    meta[key] = val
            infos = []
            if tensors:
                raw = []
                for _ in range(n_tensors):
                    name, pos = string(mm, pos)
                    (n_dims,) = struct.unpack_from("<I", mm, pos)
                    dims = struct.unpack_from(f"<{n_dims}Q", mm, pos + 4)
                    qtype, offset = struct.unpack_from("<IQ", mm, pos + 4 + 8 * n_dims)
                    pos += 4 + 8 * n_dims + 12
                    raw.append((name, dims, qtype, offset))
                start = -(-pos // alignment) * alignment
                for name, dims, qtype, offset in raw:
                    try:
                        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
                    except (ValueError, KeyError):
                        raise GGUFError(f"{path}: tensor {name} has ggml type {qtype}, unknown to the gguf "
                                        "package (upgrade it: pip install -U gguf)") from None
                    n = math.prod(dims)
                    if dims and dims[0] % block:
                        raise GGUFError(f"{path}: tensor {name}'s rows ({dims[0]}) are not whole {block}-blocks")
                    info = TensorInfo(name, tuple(int(d) for d in reversed(dims)), qtype, start + offset,
                                      n // block * size)
                    if info.offset + info.nbytes > len(mm):
                        raise GGUFError(f"{path}: tensor {name} runs past the end of the file (truncated?)")
                    infos.append(info)
        except (struct.error, UnicodeDecodeError, IndexError) as e:
            raise GGUFError(f"{path}: truncated or corrupt GGUF header ({e})") from None
    return meta, infos


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading a GGUF file needs the `gguf` package: pip install gguf") from None
    return gguf


def is_gguf_file(path: str | Path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


# ---------------------------------------------------------------- names
def hf_key(name: str) -> str | None:
    """llama.cpp tensor name -> HF checkpoint key; None for tensors dgemma recomputes (rope_freqs). Unknown names
    raise: a tensor silently dropped would leave a layer at its initial value."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    if name in _SKIP:
        return None
    if name == "output.weight":
        raise GGUFError("the file has an untied output.weight; DiffusionGemma ties its LM head to the embedding")
    m = _ENC_SCALAR.match(name)
    if m:
        return f"model.encoder.language_model.layers.{m.group(1)}.layer_scalar"
    m = _BLK.match(name)
    if m and m.group(2) in _LAYER:
        return f"{DECODER}layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    raise GGUFError(f"tensor {name!r} is not part of llama.cpp's diffusion-gemma layout as dgemma knows it")


def _pool(threads: int) -> ThreadPoolExecutor:
    """The threads that decode block data: one pool per size, kept for the process (a forked child, e.g. a data
    loader worker, makes its own: the parent's threads do not exist there)."""
    return _pools(threads, os.getpid())


@functools.lru_cache(maxsize=None)
def _pools(threads: int, pid: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="dgemma-gguf")


class GGUFFile:
    """One GGUF file's tensors under HF names, read on demand (float types memory-mapped, block types dequantized
    to float32)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta, infos = read_header(self.path, lambda key: not key.startswith("tokenizer."))
        if int(self.meta.get("split.count", 1)) > 1:
            raise GGUFError(f"{self.path} is part of a split GGUF ({int(self.meta['split.count'])} files), which "
                            "dgemma does not read: merge the parts with llama-gguf-split --merge")
        arch = self.meta.get("general.architecture")
        if arch != ARCH:
            raise GGUFError(f"{self.path} holds a {arch!r} model; dgemma runs DiffusionGemma ({ARCH!r} in "
                            "llama.cpp's naming)")
        self.infos = {i.name: i for i in infos}
        self.keys: dict[str, list[TensorInfo]] = {}  # HF key -> its source tensor(s)
        for info in infos:
            m = _BLK.match(info.name)
            if m and m.group(2) in _SPLIT_EXPERTS:
                key = f"{DECODER}layers.{m.group(1)}.experts.gate_up_proj"
                parts = self.keys.setdefault(key, [None, None])
                parts[_SPLIT_EXPERTS[m.group(2)]] = info
                continue
            key = hf_key(info.name)
            if key is not None:
                self.keys[key] = [info]
        for key, parts in self.keys.items():
            if None in parts:
                raise GGUFError(f"{self.path}: {key} has only one of ffn_gate_exps / ffn_up_exps")
        self._mm = None

    def _raw(self, info: TensorInfo, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Bytes lo:hi of a tensor's data, memory-mapped (float types are used in place)."""
        if self._mm is None:  # copy-on-write: torch wants writable arrays, and nothing is ever written back
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="c")
        return self._mm[info.offset + lo: info.offset + (info.nbytes if hi is None else hi)]

    def _read(self, pos: int, n: int) -> np.ndarray:
        """n bytes at file offset pos, read (not mapped): block data is decoded once and dropped, so it goes through
        the page cache rather than into this process's resident pages (a 15 GB file read through a map would add
        15 GB to its RSS)."""
        buf = np.empty(n, dtype=np.uint8)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(pos)
            if f.readinto(memoryview(buf)) != n:
                raise GGUFError(f"{self.path} is truncated: tensor data ends past the end of the file")
        return buf

    def _decode(self, info: TensorInfo, shape: tuple[int, ...], dtype: torch.dtype | None = None, lo: int = 0,
                hi: int | None = None) -> torch.Tensor:
        """Bytes lo:hi of a tensor (whole rows; default all) as a tensor of `shape`: float types memory-mapped, block
        types read and decoded 64 MiB of float32 rows at a time straight into `dtype` (default float32)."""
        gguf = import_gguf()
        Q = gguf.GGMLQuantizationType
        qtype = Q(info.qtype)
        hi = info.nbytes if hi is None else hi
        if qtype in (Q.F32, Q.F16, Q.BF16, Q.F64):
            raw = self._raw(info, lo, hi)
            if qtype == Q.F32:
                return torch.from_numpy(raw.view(np.float32).reshape(shape))
            if qtype == Q.F16:
                return torch.from_numpy(raw.view(np.float16).reshape(shape))
            if qtype == Q.BF16:
                return torch.from_numpy(raw.view(np.int16).reshape(shape)).view(torch.bfloat16)
            return torch.from_numpy(raw.view(np.float64).reshape(shape)).float()
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        row_bytes = shape[-1] // block * size
        n_rows = (hi - lo) // row_bytes
        out = torch.empty(n_rows, shape[-1], dtype=dtype or torch.float32)
        # float32 rows a chunk at a time into the result's dtype (the 26B's embedding is 2.9 GiB in float32, half that
        # in bf16): chunks of at most 64 MiB, and one per torch thread where they are smaller, decoded in parallel
        # (numpy's decoders mostly release the GIL: 1.1-1.6x on 2 cores)
        threads = max(1, torch.get_num_threads())
        step = max(1, min((64 << 20) // (4 * shape[-1]), -(-n_rows // threads)))

        def chunk(i: int) -> None:
            k = min(step, n_rows - i)
            rows = self._read(info.offset + lo + i * row_bytes, k * row_bytes).reshape(k, row_bytes)
            try:
                part = gguf.quants.dequantize(rows, qtype)
            except NotImplementedError:
                raise GGUFError(f"{self.path}: tensor {info.name} is {qtype.name}, which the gguf package cannot "
                                "dequantize") from None
            out[i: i + k] = torch.from_numpy(np.asarray(part, dtype=np.float32))

        starts = range(0, n_rows, step)
        if threads == 1 or len(starts) == 1:
            for i in starts:
                chunk(i)
        else:
            for _ in _pool(threads).map(chunk, starts):  # in order; the first error is raised here
                pass
        return out.view(shape)

    def tensor(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor stored for HF key `key` (gate and up halves concatenated where the file splits them), in
        `dtype` (None: float types as stored, block types as float32). A file without the encoder's layer scalars
        gives the decoder's, as a checkpoint directory without them does."""
        parts = self.keys.get(key)
        if parts is None:
            m = ENC_SCALAR.match(key)
            parts = self.keys.get(f"{DECODER}layers.{m.group(1)}.layer_scalar") if m else None
            if parts is None:
                raise GGUFError(f"{self.path} has no tensor for {key}")
        ts = [self._decode(i, i.shape, dtype) for i in parts]
        t = ts[0] if len(ts) == 1 else torch.cat([t.to(dtype or torch.float32) for t in ts], dim=1)
        t = t if dtype is None else t.to(dtype)
        return t.reshape(1) if t.dim() == 0 else t

    def expert(self, key: str, e: int) -> torch.Tensor:
        """Expert e's matrix of a stacked expert tensor, decoding only its own blocks (experts are outermost)."""
        out = []
        if key not in self.keys:
            raise GGUFError(f"{self.path} has no tensor for {key}")
        for info in self.keys[key]:
            per = info.nbytes // info.shape[0]
            out.append(self._decode(info, info.shape[1:], lo=e * per, hi=(e + 1) * per).float())
        return out[0] if len(out) == 1 else torch.cat(out, dim=0)

    def qtypes(self) -> dict[str, int]:
        """Tensor count per ggml type name, e.g. {'Q4_K': 120, 'Q6_K': 31, 'F32': 361}."""
        gguf = import_gguf()
        counts: dict[str, int] = {}
        for i in self.infos.values():
            name = gguf.GGMLQuantizationType(i.qtype).name
            counts[name] = counts.get(name, 0) + 1
        return counts


class Reader:
    """`weights.checkpoint_entries`' reader of one HF key from a GGUF: called, the tensor in `into` (block types
    decoded straight into it, a row chunk at a time); `exact()`: at its stored precision (block types as float32,
    what quantization starts from); `expert(e)`: one expert's matrix of a stacked weight, decoding only its
    blocks."""

    def __init__(self, g: GGUFFile, key: str, into: torch.dtype | None = None):
        self.g, self.key, self.into = g, key, into

    def __call__(self) -> torch.Tensor:
        return self.g.tensor(self.key, self.into)

    def exact(self) -> torch.Tensor:
        return self.g.tensor(self.key)

    def expert(self, e: int) -> torch.Tensor:
        return self.g.expert(self.key, e)


# ---------------------------------------------------------------- config, generation config, tokenizer
def _scalar(meta: dict, key: str, default=None):
    v = meta.get(key, default)
    if isinstance(v, np.ndarray):
        vals = {x.item() for x in v}
        if len(vals) != 1:
            raise GGUFError(f"{key} differs between layers ({sorted(vals)}); dgemma supports one value")
        return vals.pop()
    return v


def config_dict(f: GGUFFile, tok: dict[str, Any]) -> dict[str, Any]:
    """The HF config.json (two-level, `diffusion_gemma`) that a diffusion-gemma GGUF's metadata and shapes imply;
    `tok` is its tokenizer.* metadata."""
    meta, a = f.meta, ARCH
    vocab = [str(t) for t in tok.get("tokenizer.ggml.tokens", [])]

    def need(key):
        if f"{a}.{key}" not in meta:
            raise GGUFError(f"{f.path}: metadata {a}.{key} is missing")
        return meta[f"{a}.{key}"]

    layers = int(need("block_count"))
    pattern = meta.get(f"{a}.attention.sliding_window_pattern")
    if pattern is None:
        raise GGUFError(f"{f.path}: metadata {a}.attention.sliding_window_pattern is missing")
    if isinstance(pattern, (int, np.integer)):  # a period, as Gemma 3 conversions write it: every n-th layer full
        sliding = [(i + 1) % int(pattern) != 0 for i in range(layers)]
    else:
        sliding = [bool(x) for x in pattern]
    if len(sliding) != layers:
        raise GGUFError(f"{f.path}: sliding_window_pattern has {len(sliding)} entries for {layers} layers")
    kv = need("attention.head_count_kv")
    kv = [int(x) for x in kv] if isinstance(kv, np.ndarray) else [int(kv)] * layers
    kv_sliding = {h for h, s in zip(kv, sliding) if s} or {kv[0]}
    kv_full = {h for h, s in zip(kv, sliding) if not s} or {kv[0]}
    if len(kv_sliding) != 1 or len(kv_full) != 1:
        raise GGUFError(f"{f.path}: KV head counts {kv} vary within sliding or full layers")
    head_dim_full = int(need("attention.key_length"))
    head_dim = int(meta.get(f"{a}.attention.key_length_swa", head_dim_full))
    from .config import DEFAULT_ROPE

    partial = DEFAULT_ROPE["full_attention"]["partial_rotary_factor"]  # the released model's, without rope_freqs
    if "rope_freqs.weight" in f.infos:  # 1.0 for rotated frequency pairs, 1e30 for the unrotated rest
        info = f.infos["rope_freqs.weight"]
        freqs = f._decode(info, info.shape).float()
        partial = 2 * int((freqs < 1e3).sum()) / head_dim_full
    rot_swa = int(meta.get(f"{a}.rope.dimension_count_swa", head_dim))
    if rot_swa != head_dim:
        raise GGUFError(f"{f.path}: partial rotary embeddings on sliding layers ({rot_swa} of {head_dim} dims) "
                        "are not supported")
    full = [i for i, s in enumerate(sliding) if not s]
    k_eq_v = not any(f"blk.{i}.attn_v.weight" in f.infos for i in full)
    embd = f.infos.get("token_embd.weight")
    if embd is None:
        raise GGUFError(f"{f.path} has no token_embd.weight")
    vocab_size = embd.shape[0]
    if vocab and len(vocab) != vocab_size:
        raise GGUFError(f"{f.path}: {len(vocab)} tokens in the vocabulary, {vocab_size} rows in token_embd")
    if "diffusion.canvas_length" not in meta:
        raise GGUFError(f"{f.path} has no diffusion.canvas_length: not a DiffusionGemma conversion")
    eos = eos_ids(tok, vocab)
    text = {
        "model_type": "diffusion_gemma_text", "vocab_size": vocab_size,
        "hidden_size": int(need("embedding_length")),
        "intermediate_size": int(_scalar(meta, f"{a}.feed_forward_length")),
        "num_hidden_layers": layers, "num_attention_heads": int(_scalar(meta, f"{a}.attention.head_count")),
        "num_key_value_heads": kv_sliding.pop(), "num_global_key_value_heads": kv_full.pop(),
        "head_dim": head_dim, "global_head_dim": head_dim_full,
        "sliding_window": int(meta.get(f"{a}.attention.sliding_window", 1024)),
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default",
                                  "rope_theta": float(meta.get(f"{a}.rope.freq_base_swa", 10_000.0))},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": partial,
                               "rope_theta": float(meta.get(f"{a}.rope.freq_base", 1_000_000.0))},
        },
        "max_position_embeddings": int(meta.get(f"{a}.context_length", 262_144)),
        "num_experts": int(need("expert_count")), "top_k_experts": int(need("expert_used_count")),
        "moe_intermediate_size": int(need("expert_feed_forward_length")),
        "rms_norm_eps": float(meta.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        "final_logit_softcapping": meta.get(f"{a}.final_logit_softcapping"),
        "attention_k_eq_v": k_eq_v, "enable_moe_block": True, "tie_word_embeddings": True,
    }
    if text["final_logit_softcapping"] is not None:
        text["final_logit_softcapping"] = float(text["final_logit_softcapping"])
    top = {"model_type": "diffusion_gemma", "architectures": ["DiffusionGemmaForBlockDiffusion"],
           "text_config": text, "canvas_length": int(meta["diffusion.canvas_length"]), "eos_token_id": eos,
           "tie_word_embeddings": True}
    for gg, hf in (("bos", "bos_token_id"), ("padding", "pad_token_id")):
        if f"tokenizer.ggml.{gg}_token_id" in tok:
            top[hf] = int(tok[f"tokenizer.ggml.{gg}_token_id"])
    return top


def eos_ids(tok: dict, vocab: list[str]) -> list[int]:
    """The scalar eos id llama.cpp keeps, then Gemma 4's turn-end markers found in the vocabulary ([1, 106, 50] for
    the released model)."""
    out = []
    if "tokenizer.ggml.eos_token_id" in tok:
        out.append(int(tok["tokenizer.ggml.eos_token_id"]))
    index = {t: i for i, t in enumerate(vocab)} if vocab else {}
    out += [index[t] for t in _TURN_ENDS if t in index and index[t] not in out]
    return out or [1]


def generation_dict(meta: dict, cfg: dict) -> dict[str, Any]:
    gen: dict[str, Any] = {"eos_token_id": cfg["eos_token_id"]}
    for k in ("bos_token_id", "pad_token_id"):
        if k in cfg:
            gen[k] = cfg[k]
    gen["max_new_tokens"] = cfg["canvas_length"]
    for hf, gg in _GEN_KEYS.items():
        if gg in meta:
            gen[hf] = meta[gg].item() if isinstance(meta[gg], np.generic) else meta[gg]
    if "diffusion.eb_entropy_bound" in meta:
        gen["sampler_config"] = {"_cls_name": "EntropyBoundSamplerConfig",
                                 "entropy_bound": float(meta["diffusion.eb_entropy_bound"])}
    return gen


# ---------------------------------------------------------------- the sidecar checkpoint directory
def sidecar(path: str | Path) -> Path:
    """The checkpoint directory standing for GGUF file `path` (built on first use, then cached under
    $DGEMMA_CACHE_DIR/gguf): config.json, generation_config.json, the tokenizer, and gguf.json naming the file."""
    from . import tokenizer as dtok
    from .assets import cache_root
    from .io import atomic_dir

    path = Path(path).expanduser().resolve()
    st = path.stat()
    tag = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "gguf" / f"{path.stem}-{tag}"
    if (target / LINK).exists():
        return target
    f = GGUFFile(path)
    fields, _ = read_header(path, lambda key: key.startswith("tokenizer."), tensors=False)
    cfg = config_dict(f, fields)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_dict(f.meta, cfg), indent=2) + "\n")
        if "tokenizer.ggml.tokens" in fields:
            try:
                dtok.convert_gguf_tokenizer(path, tmp, control=dtok.GEMMA4_CONTROL_TOKENS.values())
            except ValueError as e:
                raise GGUFError(str(e)) from None
        (tmp / LINK).write_text(json.dumps({"path": str(path), "size": st.st_size,
                                            "tensor_types": f.qtypes()}, indent=2) + "\n")
    return target


def hub_file(repo: str, tag: str, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """The one .gguf file of hub repo `repo` whose name holds `tag` (case-insensitive, as llama.cpp's `-hf
    org/name:Q4_K_M` picks it; mmproj files aside), from the local huggingface_hub cache when it is there."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    def pick(names: list[str]) -> str | None:
        hits = sorted(n for n in names if n.lower().endswith(".gguf") and tag.lower() in Path(n).name.lower()
                      and "mmproj" not in Path(n).name.lower())
        if len(hits) > 1:
            raise GGUFError(f"{repo}:{tag} matches several files ({', '.join(hits)}); name a more precise tag"
                            + (" (split GGUF files are not supported: merge them with llama-gguf-split --merge)"
                               if any(re.search(r"-\d{5}-of-\d{5}\.gguf$", h) for h in hits) else ""))
        return hits[0] if hits else None

    try:
        snap = Path(snapshot_download(repo, revision=revision, allow_patterns=["*.gguf"], local_files_only=True,
                                      cache_dir=cache_dir))
        name = pick([str(f.relative_to(snap)) for f in snap.rglob("*.gguf")])
        if name is not None:
            return snap / name
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    files = HfApi().list_repo_files(repo, revision=revision)
    name = pick(files)
    if name is None:
        have = ", ".join(sorted(f for f in files if f.endswith(".gguf"))[:8]) or "none"
        raise GGUFError(f"no .gguf file in {repo} has {tag!r} in its name (its GGUF files: {have})")
    return Path(hf_hub_download(repo, name, revision=revision, cache_dir=cache_dir))


def linked_file(ckpt: Path) -> Path | None:
    """For a sidecar directory, the GGUF file it stands for (None for an ordinary checkpoint)."""
    link = Path(ckpt) / LINK
    if not link.exists():
        return None
    try:
        path = Path(json.loads(link.read_text())["path"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise GGUFError(f"{link} is malformed: {e}") from None
    if not path.is_file():
        raise GGUFError(f"{link} names {path}, which no longer exists")
    return path


# ---------------------------------------------------------------- writing
def gguf_name(key: str) -> str:
    """HF checkpoint key -> the name llama.cpp's converter gives it (the inverse of `hf_key`)."""
    m = ENC_SCALAR.match(key)
    if m:
        return f"blk.{m.group(1)}.enc_layer_output_scale.weight"
    for name, hf in _GLOBAL.items():
        if hf == key:
            return name
    m = re.match(r"^model\.decoder\.layers\.(\d+)\.(.+)$", key)
    for name, hf in _LAYER.items():
        if m and hf == m.group(2) and name != "layer_output_scale":
            return f"blk.{m.group(1)}.{name}"
    raise GGUFError(f"{key} has no place in llama.cpp's diffusion-gemma layout")


def metadata(cfg, *, arch: str = ARCH, generation: dict | None = None) -> dict[str, Any]:
    """The key/value metadata llama.cpp's converter writes for a DiffusionGemma config (the inverse of
    `config_dict`), with the entropy-bound sampler's settings from `generation` (a generation_config.json)."""
    a, L = arch, cfg.num_hidden_layers
    meta: dict[str, Any] = {
        f"{a}.block_count": L, f"{a}.context_length": cfg.max_position_embeddings,
        f"{a}.embedding_length": cfg.hidden_size, f"{a}.feed_forward_length": cfg.intermediate_size,
        f"{a}.attention.head_count": cfg.num_attention_heads,
        f"{a}.attention.head_count_kv": [cfg.layer_kv_heads(i) for i in range(L)],
        f"{a}.attention.key_length": cfg.global_head_dim, f"{a}.attention.value_length": cfg.global_head_dim,
        f"{a}.attention.key_length_swa": cfg.head_dim, f"{a}.attention.value_length_swa": cfg.head_dim,
        f"{a}.attention.sliding_window": cfg.sliding_window,
        f"{a}.attention.sliding_window_pattern": [cfg.is_sliding(i) for i in range(L)],
        f"{a}.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        f"{a}.rope.freq_base": float(cfg.rope_parameters["full_attention"]["rope_theta"]),
        f"{a}.rope.freq_base_swa": float(cfg.rope_parameters["sliding_attention"]["rope_theta"]),
        f"{a}.rope.dimension_count": cfg.global_head_dim, f"{a}.rope.dimension_count_swa": cfg.head_dim,
        f"{a}.expert_count": cfg.num_experts, f"{a}.expert_used_count": cfg.top_k_experts,
        f"{a}.expert_feed_forward_length": cfg.moe_intermediate_size, f"{a}.attention.causal": False,
        "diffusion.canvas_length": cfg.canvas_length,
    }
    if cfg.final_logit_softcapping is not None:
        meta[f"{a}.final_logit_softcapping"] = float(cfg.final_logit_softcapping)
    gen = generation or {}
    for hf, gg in _GEN_KEYS.items():
        if hf in gen:
            meta[gg] = gen[hf]
    if isinstance(gen.get("sampler_config"), dict) and "entropy_bound" in gen["sampler_config"]:
        meta["diffusion.eb_entropy_bound"] = float(gen["sampler_config"]["entropy_bound"])
    return meta


def rope_freqs(cfg) -> np.ndarray:
    """The full-attention layers' frequency factors as llama.cpp's converter writes them: 1.0 for the rotated
    pairs, 1e30 (no rotation) for the rest of a proportional rope."""
    partial = cfg.rope_parameters["full_attention"].get("partial_rotary_factor", 1.0)
    n_rot = int(cfg.global_head_dim * partial / 2)
    return np.array([1.0] * n_rot + [1e30] * (cfg.global_head_dim // 2 - n_rot), dtype=np.float32)


def write_gguf(path: str | Path, meta: dict[str, Any], tensors, *, qtype=None, arch: str = ARCH) -> Path:
    """Write a GGUF file, streamed: `tensors` is a list of (name, shape, read) whose `read()` gives a float array;
    arrays of 2+ dimensions whose rows fill whole blocks of `qtype` (a gguf.GGMLQuantizationType gguf's Python
    side can encode: Q8_0, Q4_0, Q5_0, F16, BF16, ...) are stored in it, the rest (norms, scalars) as F32. An entry
    (name, shape, read, raw_type) gives blocks already encoded in raw_type (the K-quants, which gguf's Python side
    decodes but cannot encode) as bytes. Values
    in `meta` are typed by their Python type (bool, int as uint32, float as float32, str, lists). Written beside
    `path` and renamed into place."""
    gguf = import_gguf()
    from .io import atomic_path

    block, size = gguf.GGML_QUANT_SIZES[qtype] if qtype is not None else (1, 4)
    path = Path(path)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch=arch)
        for k, v in meta.items():
            if k == "general.architecture":
                continue
            if isinstance(v, bool):
                w.add_bool(k, v)
            elif isinstance(v, int):
                w.add_uint32(k, v)
            elif isinstance(v, float):
                w.add_float32(k, v)
            elif isinstance(v, str):
                w.add_string(k, v)
            else:
                w.add_array(k, list(v))
        plan = []
        for name, shape, read, *raw in tensors:
            n = math.prod(shape)
            if raw:  # already encoded: read() gives the blocks of type raw[0] as bytes
                rb, rs = gguf.GGML_QUANT_SIZES[raw[0]]
                nbytes, kind, rtype = n // rb * rs, "raw", raw[0]
            elif qtype is not None and len(shape) >= 2 and shape[-1] % block == 0:
                nbytes, kind, rtype = n // block * size, "quant", qtype
            else:
                nbytes, kind, rtype = 4 * n, "f32", None
            w.add_tensor_info(name, list(shape), np.dtype(np.float32), nbytes, raw_dtype=rtype)
            plan.append((read, kind, nbytes))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for read, kind, nbytes in plan:
            if kind == "raw":
                data = np.ascontiguousarray(read(), dtype=np.uint8)
            else:
                x = np.ascontiguousarray(read(), dtype=np.float32)
                data = gguf.quants.quantize(x, qtype) if kind == "quant" else x
            if data.nbytes != nbytes:
                raise GGUFError(f"a tensor of {data.nbytes} bytes where {nbytes} were announced")
            w.write_tensor_data(data)
        w.close()
    return path


def convert(src: str | Path, dst: str | Path, *, dtype: torch.dtype | None = torch.bfloat16,
            max_shard_bytes: int | None = None, log=None) -> Path:
    """Write a GGUF (its sidecar directory, or the file) as a full-precision dgemma checkpoint: every tensor decoded
    to float and stored in `dtype` (None: as decoded, float32 for block formats), streamed one tensor at a time and
    renamed into place only when whole. To requantize instead, `quant.quantize_checkpoint` takes a GGUF too."""
    from .quant import DEFAULT_SHARD_BYTES, _write
    from .weights import checkpoint_entries, hf_name, load_model, resolve

    ckpt = resolve(src)
    gpath = linked_file(ckpt)
    if gpath is None:
        raise GGUFError(f"{src} is not a GGUF file")
    model, _ = checkpoint_entries(ckpt)
    g = GGUFFile(gpath)
    tensors = ((name, g.tensor(hf_name(name), dtype=dtype), False) for name in model.state_dict())
    out = _write(Path(dst), model.cfg, tensors, dtype=dtype, max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES,
                 copy_from=ckpt, log=log)
    load_model(out, quiet=True)
    return out


__all__ = ["GGUFError", "GGUFFile", "TensorInfo", "read_header", "hf_key", "config_dict", "generation_dict",
           "sidecar", "linked_file", "hub_file", "is_gguf_file", "eos_ids",
           "convert", "gguf_name", "metadata", "rope_freqs", "write_gguf"]
