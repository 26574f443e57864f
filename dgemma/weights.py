"""Checkpoints in the Hugging Face DiffusionGemma format: resolve, load (memory-mapped), save (atomically).

The HF model ties the encoder's text weights to the decoder's, so the shared stack is stored once under
`model.decoder.*`; only the per-layer `layer_scalar` buffers exist twice (`model.encoder.language_model.layers.N.
layer_scalar`). dgemma's parameter names are the decoder's with the prefix removed, so the map is a rename.
Vision-tower tensors are not part of the text model: they are read when the first image arrives (`vision.py`) and
carried through to a save untouched.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from . import compressed, quant
from .config import ConfigError, ModelConfig
from .io import atomic_dir
from .model import DiffusionGemma

DECODER = "model.decoder."
ENC_SCALAR = re.compile(r"^model\.encoder\.language_model\.layers\.(\d+)\.layer_scalar$")
PASSTHROUGH = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
# Keys a checkpoint may carry that dgemma neither needs nor writes back (tied copies of decoder weights).
TIED = ("lm_head.weight", "model.encoder.language_model.")
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
CHECKPOINT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "chat_template.jinja", "chat_template.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, with the reason."""


# ---------------------------------------------------------------- names
def hf_name(name: str) -> str:
    """dgemma state_dict key -> HF checkpoint key."""
    m = re.match(r"^layers\.(\d+)\.encoder_layer_scalar$", name)
    if m:
        return f"model.encoder.language_model.layers.{m.group(1)}.layer_scalar"
    return DECODER + name


def dgemma_name(key: str) -> str | None:
    """HF checkpoint key -> dgemma state_dict key (None for keys dgemma does not use)."""
    if key.startswith(DECODER):
        return key[len(DECODER):]
    m = ENC_SCALAR.match(key)
    if m:
        return f"layers.{m.group(1)}.encoder_layer_scalar"
    return None


# ---------------------------------------------------------------- resolve
def resolve(path_or_id: str | os.PathLike, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """A local checkpoint directory, or a hub id fetched through huggingface_hub (its cache first when offline;
    `cache_dir`: that cache's directory instead of huggingface_hub's own, vLLM's --download-dir)."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        if not p.is_dir():
            from . import gguf_model

            if gguf_model.is_gguf_file(p):  # llama.cpp's format: a cached directory stands for it (gguf_model.py)
                try:
                    return gguf_model.sidecar(p)
                except gguf_model.GGUFError as e:
                    raise CheckpointError(str(e)) from None
            raise CheckpointError(f"{p} is a file; a checkpoint is a directory holding config.json and weights "
                                  "(or a DiffusionGemma .gguf file)")
        return p
    s = str(path_or_id)
    if s.count("/") != 1 or s.startswith((".", "/", "~")):
        raise CheckpointError(f"no checkpoint directory at {s!r} (and it is not a Hugging Face hub id 'org/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    if ":" in s:  # org/name:QUANT, llama.cpp's -hf syntax: the GGUF file of that quantization in the repo
        from . import gguf_model

        repo, tag = s.split(":", 1)
        try:
            return gguf_model.sidecar(gguf_model.hub_file(repo, tag, revision, cache_dir))
        except gguf_model.GGUFError as e:
            raise CheckpointError(str(e)) from None
        except RepositoryNotFoundError:
            raise CheckpointError(f"{repo!r} was not found on the Hugging Face Hub (or needs a token: set "
                                  "HF_TOKEN)") from None
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
            raise CheckpointError(f"cannot fetch {s!r}: the Hugging Face Hub is not reachable and the file is not "
                                  f"in the local cache ({type(e).__name__})") from None

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.model"]
    try:
        return Path(snapshot_download(s, revision=revision, allow_patterns=patterns, local_files_only=True,
                                      cache_dir=cache_dir))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    try:
        return Path(snapshot_download(s, revision=revision, allow_patterns=patterns, cache_dir=cache_dir))
    except RepositoryNotFoundError:
        raise CheckpointError(f"{s!r} was not found on the Hugging Face Hub (or needs a token: set HF_TOKEN)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise CheckpointError(
            f"cannot fetch {s!r}: the Hugging Face Hub is not reachable and the model is not in the local cache "
            f"({type(e).__name__})"
        ) from None


def read_generation_config(ckpt: str | Path) -> dict:
    """A checkpoint's generation_config.json as a dict ({} when it has none); a malformed one is a clear error."""
    path = Path(ckpt) / "generation_config.json"
    if not path.exists():
        return {}
    try:
        gen = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"malformed JSON in {path}: {e}") from None
    if not isinstance(gen, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return gen


def weight_files(ckpt: Path) -> list[Path]:
    if (ckpt / INDEX).exists():
        try:
            index = json.loads((ckpt / INDEX).read_text())
            names = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{ckpt / INDEX} is not a valid safetensors index: {e}") from None
        files = [ckpt / n for n in names]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{ckpt} is missing shard(s) named in {INDEX}: {', '.join(missing)}")
        return files
    if (ckpt / SINGLE).exists():
        return [ckpt / SINGLE]
    raise CheckpointError(f"{ckpt} has no weights: expected {SINGLE} or {INDEX}")


# ---------------------------------------------------------------- load
def _open(f: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(f), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f} is not a readable safetensors file (truncated or corrupt?): {e}") from None


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class _Read:
    """`checkpoint_entries`' reader of one safetensors tensor. Called: safetensors' own, memory-mapped with the whole
    file for as long as the load lasts. `exact()`: the same tensor on a private map of its own bytes, unmapped when
    the tensor is dropped, for one that is consumed as it loads (quantized: `quant.quantizing_entries`,
    `quant.quantize_checkpoint`): the file-wide map's pages stay in the process's resident memory until the load
    ends, so a 47 GiB bf16 checkpoint quantized as it loads would otherwise fill RAM with file pages (the kernel can
    drop them, but RSS and cgroup limits count them)."""

    def __init__(self, handle, f: Path, key: str, entry: tuple | None):
        self.handle, self.f, self.key, self.entry = handle, f, key, entry
        self.dtype = entry[0] if entry else None

    def __call__(self) -> torch.Tensor:
        return self.handle.get_tensor(self.key)

    def exact(self) -> torch.Tensor:
        import mmap

        if self.entry is None:  # a dtype this reader does not know: safetensors' own
            return self()
        dtype, shape, lo, hi = self.entry
        if hi == lo:
            return torch.empty(shape, dtype=dtype)
        start = lo - lo % mmap.ALLOCATIONGRANULARITY
        try:
            with open(self.f, "rb") as fh:  # copy-on-write: torch wants a writable buffer; nothing is written
                mm = mmap.mmap(fh.fileno(), hi - start, offset=start, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.f}: cannot read tensor {self.key} (truncated?): {e}") from None
        # the tensor holds the map: it is unmapped when the last view of it goes
        return torch.frombuffer(mm, dtype=torch.uint8, offset=lo - start, count=hi - lo).view(dtype).reshape(shape)


def _directory(f: Path) -> dict[str, tuple | None]:
    """A safetensors file's tensors {key: (dtype, shape, start, end)}, offsets from the file's start (its header:
    an 8-byte little-endian length, then that much JSON; data offsets count from the header's end)."""
    import struct

    try:
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        out = {}
        for key, e in header.items():
            if key == "__metadata__":
                continue
            dtype = _ST_DTYPES.get(e["dtype"])
            lo, hi = e["data_offsets"]
            out[key] = None if dtype is None else (dtype, tuple(e["shape"]), 8 + n + lo, 8 + n + hi)
        return out
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise CheckpointError(f"{f} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def load_config(ckpt: Path) -> ModelConfig:
    if not (ckpt / "config.json").exists():
        raise CheckpointError(f"{ckpt} has no config.json")
    try:
        return ModelConfig.load(ckpt)
    except ConfigError as e:
        raise CheckpointError(f"{ckpt / 'config.json'}: {e}") from None


def checkpoint_entries(ckpt: Path, dtype: torch.dtype | None = None) -> tuple[DiffusionGemma, dict]:
    """The model for a checkpoint directory, on the meta device, and its tensors as {HF key: (file, reader)}, read
    one at a time when asked. A GGUF file's sidecar directory reads them from the GGUF (gguf_model.py), its block
    types decoded straight into `dtype` (None: float32; a reader's `exact()` and `expert(e)` read float32). An
    llm-compressor (compressed-tensors) or ModelOpt checkpoint is rewritten here into dgemma's quantized layout
    (compressed.py): its entries convert lazily and model.cfg records the dgemma scheme."""
    from . import gguf_model

    cfg = load_config(ckpt)
    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    try:
        gpath = gguf_model.linked_file(ckpt)
        if gpath is not None:  # a GGUF's sidecar directory: its tensors, dequantized when read
            g = gguf_model.GGUFFile(gpath)
            return model, {key: (gpath, gguf_model.Reader(g, key, dtype)) for key in g.keys}
    except gguf_model.GGUFError as e:
        raise CheckpointError(str(e)) from None
    entries = {}
    for f in weight_files(ckpt):
        handle, where = _open(f), _directory(f)
        entries.update({key: (f, _Read(handle, f, key, where.get(key))) for key in handle.keys()})
    try:
        qc = compressed.foreign_config(ckpt, cfg)
    except quant.QuantError as e:
        raise CheckpointError(f"{ckpt}: {e}") from None
    if qc is not None:
        try:
            entries, qcfg = compressed.adapt(model, entries, qc)
        except quant.QuantError as e:
            raise CheckpointError(f"{ckpt / 'config.json'}: {e}") from None
        extra = {k: v for k, v in cfg.extra.items() if k != quant.QUANT_KEY}
        cfg = cfg.replace(extra=extra)
        model.cfg = cfg if qcfg is None else qcfg.apply_to(cfg)
    return model, entries


def load_model(path_or_id, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               revision: str | None = None, quiet: bool = False, quantize: quant.QuantConfig | None = None
               ) -> DiffusionGemma:
    """Build the model on the meta device, then assign the checkpoint's tensors (memory-mapped) into it.

    dtype: None keeps the checkpoint's dtype; otherwise tensors are converted (which copies them).
    quantize: quantize a full-precision checkpoint (or GGUF) as it loads, one weight (one expert) at a time, so
    memory holds the quantized model and one layer's weight in float, never the float model; the same bits as
    `dgemma quantize` into a directory and loading that.
    """
    from safetensors import SafetensorError

    ckpt = resolve(path_or_id, revision)
    model, entries = checkpoint_entries(ckpt, dtype)
    if quantize is not None:
        have = quant.QuantConfig.of(model.cfg)
        if have is not None:
            raise CheckpointError(f"{ckpt} is already quantized ({have.scheme}); load it without quantization, or "
                                  "quantize its full-precision checkpoint")
        try:
            entries = quant.quantizing_entries(model, entries, quantize)
        except quant.QuantError as e:
            raise CheckpointError(f"{ckpt}: {e}") from None
        model.cfg = quantize.apply_to(model.cfg)
    # --- quantized checkpoints (quant.py): config.json's quantization_config swaps in quantized modules here,
    # before assigning, so their int8/uint8 codes and scales are memory-mapped like every other tensor.
    try:
        qnames = quant.prepare_for_load(model)
    except quant.QuantError as e:
        raise CheckpointError(f"{ckpt / 'config.json'}: {e}") from None
    # ---
    expected = {k: v for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    passthrough: dict[str, Path] = {}
    unused: list[str] = []
    for key, (f, read) in entries.items():
        name = dgemma_name(key)
        if name is None:
            if key.startswith(PASSTHROUGH):
                passthrough[key] = f
            elif not key.startswith(TIED):
                unused.append(key)
            continue
        if name not in expected:
            unused.append(key)
            continue
        try:
            t = read()
        except quant.QuantError as e:
            raise CheckpointError(f"{ckpt}: {e}") from None
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"cannot read tensor {key} from {f} (truncated or corrupt?): {e}") from None
        fname = getattr(f, "name", f)
        want = tuple(expected[name].shape)
        if tuple(t.shape) != want:
            raise CheckpointError(f"tensor {key} in {fname} has shape {tuple(t.shape)}, expected {want}")
        if name in qnames:  # quantized codes and scales keep their stored dtype
            problem = quant.dtype_problem(t, expected[name])
            if problem:
                raise CheckpointError(f"tensor {key} in {fname} {problem}")
        elif dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        state[name] = t.to(device) if str(device) != "cpu" else t
    missing = [hf_name(k) for k in expected if k not in state]
    # A checkpoint without the encoder's own layer scalars (some converters write one copy) uses the decoder's.
    for k in list(missing):
        m = ENC_SCALAR.match(k)
        if m:
            dec = f"layers.{m.group(1)}.layer_scalar"
            if dec in state:
                state[f"layers.{m.group(1)}.encoder_layer_scalar"] = state[dec].clone()
                missing.remove(k)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        where = ckpt
        from .gguf_model import LINK, linked_file

        if (ckpt / LINK).exists():  # name the file, and the known gap of early llama.cpp conversions
            where = linked_file(ckpt)
            if any(".self_conditioning." in k for k in missing):
                more += ("; some llama.cpp conversions of DiffusionGemma leave out the self-conditioning MLP "
                         "(self_cond_*: optional to the draft loader), without which the model does not denoise "
                         "as trained: use a conversion that keeps it")
        raise CheckpointError(f"{where} is missing tensor(s): {', '.join(missing[:5])}{more}")
    if unused:
        more = f" (and {len(unused) - 3} more)" if len(unused) > 3 else ""
        raise CheckpointError(f"{ckpt} has tensor(s) dgemma does not know: {', '.join(unused[:3])}{more}")
    model.load_state_dict(state, assign=True, strict=True)
    model.rebuild_buffers(device)
    model.passthrough = passthrough
    model.source = ckpt
    model.quantized_at_load = quantize  # a LoRA adapter trained over it records it (train.lora.save_adapter)
    return model


# ---------------------------------------------------------------- save
def state_for_save(model: DiffusionGemma) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in model.state_dict().items():
        out[hf_name(name)] = t.detach().to("cpu").contiguous()
    for key, f in getattr(model, "passthrough", {}).items():
        out[key] = _open(f).get_tensor(key)
    vision = getattr(model, "vision", None)  # a tower made here (vision.attach_vision), not read from a checkpoint
    if vision is not None:
        for name, t in vision.state_dict().items():
            out.setdefault("model.encoder." + name, t.detach().to("cpu").contiguous())
    return out


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_bytes:
        return [tensors]
    shards, cur, size = [], {}, 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = t
        size += n
    if cur:
        shards.append(cur)
    return shards


def save_model(model: DiffusionGemma, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
               max_shard_bytes: int | None = None, generation_config: dict | None = None,
               tokenizer=None, copy_from: Path | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Write config.json, weights (one file or shards + index), generation_config.json and tokenizer files.

    The whole directory is written beside the target and renamed into place, so a kill leaves the old one intact.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    tensors = state_for_save(model)
    keep = {hf_name(n) for n in quant.quantized_names(model)}  # quantized codes and scales keep their dtype
    if dtype is not None:
        tensors = {k: (v.to(dtype) if v.is_floating_point() and k not in keep else v) for k, v in tensors.items()}
    meta = {"format": "pt", **quant.safetensors_metadata(model.cfg), **(metadata or {})}
    src = copy_from if copy_from is not None else getattr(model, "source", None)
    with atomic_dir(out) as tmp:
        model.cfg.save(tmp / "config.json")
        shards = _shards(tensors, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE), metadata=meta)
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata=meta)
                for k, t in shard.items():
                    weight_map[k] = name
                    total += t.numel() * t.element_size()
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2) + "\n")
        if src is not None:  # also when overwriting in place: the old files are still there until the rename
            for name in CHECKPOINT_FILES[1:]:
                if (Path(src) / name).exists():
                    (tmp / name).write_bytes((Path(src) / name).read_bytes())
        if generation_config is not None:
            (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return out


def init_random(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> DiffusionGemma:
    """A randomly initialised model (for tests, benchmarks and training from scratch)."""
    model = DiffusionGemma(cfg).init_weights(seed)
    return model.to(dtype)
