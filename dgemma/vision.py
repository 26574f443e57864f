"""Image input: the Gemma 4 vision tower, its projection into the text stack, and the image preprocessing.

The released checkpoint carries a ~550M-parameter vision tower (`model.encoder.vision_tower.*`, config
`vision_config`, SPEC §1) and a projection (`model.encoder.embed_vision.embedding_projection`). Images only ever
enter the encoder (SPEC §2): an image becomes a run of `image_token_id` placeholders in the prompt, between
`boi_token_id` and `eoi_token_id`, whose input embeddings are replaced by the tower's features; the encoder attends
bidirectionally inside each run (`use_bidirectional_attention: "vision"`) and causally everywhere else.

The pipeline, as transformers' Gemma 4 image processor (PIL backend) and vision model compute it:
- resize (bicubic) to the largest size that keeps the aspect ratio, has both sides a multiple of
  patch * pooling_kernel (48 px) and at most `max_soft_tokens * kernel^2` patches of 16x16 (280 -> 2,520);
- pixels / 255 in [0, 1]; cut into patches, each flattened (row, column, channel);
- the tower: a linear patch embedding (after 2x - 1) plus learned x and y position embeddings; bidirectional
  layers with 2-D RoPE (the head's first half rotates by x, the second by y), q/k RMS-normed, v normed without
  scale, attention scale 1; then each kernel x kernel block of patches averaged into one soft token, scaled by
  sqrt(hidden), standardized (`std_bias`, `std_scale`) where the config says so;
- the projection: RMS norm without scale, then a linear map to the text hidden size.

The tower is built from the checkpoint's tensors the first time an image arrives (`vision_tower(model)`), at the
model's dtype and device, and held beside the text stack, not inside it: it is not trained, quantized or given
LoRA adapters (those touch the text stack only), and a save writes its tensors back as they were read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .model import RMSNorm, gelu_tanh, rms_norm

# Gemma4VisionConfig's defaults (transformers), for fields a checkpoint's vision_config leaves out.
VISION_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 16, "num_attention_heads": 12,
    "num_key_value_heads": 12, "head_dim": 64, "rms_norm_eps": 1e-6, "pooling_kernel_size": 3, "patch_size": 16,
    "position_embedding_size": 10 * 1024, "use_clipped_linears": False, "standardize": False,
    "hidden_activation": "gelu_pytorch_tanh",
}
# The released checkpoint's vision_config (SPEC §1): ~550M parameters.
RELEASED_VISION_CONFIG = {
    "model_type": "gemma4_vision", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 72, "patch_size": 16, "pooling_kernel_size": 3,
    "standardize": True, "use_clipped_linears": False, "rope_parameters": {"rope_type": "axial", "rope_theta": 100.0},
}
SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)  # the image processor's max_soft_tokens choices
DEFAULT_SOFT_TOKENS = 280
# How a chat message marks where an image goes (the Gemma 4 chat template's image part): the prompt's ids then
# hold boi, one image_token_id per soft token, eoi there.
IMAGE_MARKER = "<|image|>"
TOWER = "model.encoder.vision_tower."
FEATURE_CACHE_BYTES = 128 << 20
EMBED = "model.encoder.embed_vision."


class ImageError(ValueError):
    """An image that cannot be read or used, with the reason (a client's mistake: a 400)."""


# ---------------------------------------------------------------- preprocessing
@dataclass(frozen=True, eq=False)
class Image:
    """One preprocessed image: its patches `[N, 3 * patch^2]` (fp32 in [0, 1]), their (x, y) grid positions `[N, 2]`,
    how many soft tokens (prompt positions) it takes, and a digest of its pixels (two images with the same digest
    give the same features: rows that share a prompt share its encoding)."""

    patches: torch.Tensor
    positions: torch.Tensor
    tokens: int
    size: tuple[int, int]  # (width, height) after the resize
    digest: str

    def __eq__(self, other) -> bool:
        return isinstance(other, Image) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def __repr__(self) -> str:
        return f"Image({self.size[0]}x{self.size[1]}, {self.tokens} tokens, {self.digest[:12]})"


def target_size(height: int, width: int, patch: int, max_patches: int, kernel: int) -> tuple[int, int]:
    """(height, width) the image is resized to: the largest with the same aspect ratio, both sides a multiple of
    patch * kernel and at most max_patches patches (transformers' get_aspect_ratio_preserving_size)."""
    factor = math.sqrt(max_patches * patch * patch / (height * width))
    side = kernel * patch
    th = int(math.floor(factor * height / side)) * side
    tw = int(math.floor(factor * width / side)) * side
    longest = (max_patches // kernel ** 2) * side
    if th == 0 and tw == 0:
        raise ImageError(f"a {width}x{height} image cannot be resized to at least {side} px a side")
    if th == 0:
        th, tw = side, min(int(math.floor(width / height)) * side, longest)
    elif tw == 0:
        tw, th = side, min(int(math.floor(height / width)) * side, longest)
    return th, tw


def _pil():
    try:
        from PIL import Image as PILImage
    except ImportError:  # pillow is a dependency; a broken environment still gets one clear line
        raise ImageError("image input needs pillow: pip install pillow") from None
    return PILImage


MAX_PIXELS = 64 * 1024 * 1024  # a decompression bomb guard: larger images are refused before decoding


def open_image(data: bytes | str | Path):
    """An RGB PIL image from encoded bytes (PNG, JPEG, WebP, GIF's first frame, ...) or a file path."""
    PILImage = _pil()
    try:
        src = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else open(data, "rb")
    except OSError as e:
        raise ImageError(f"cannot read image {data}: {e.strerror or e}") from None
    with src:
        try:
            img = PILImage.open(src)
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(f"the image is {img.width}x{img.height} pixels; at most {MAX_PIXELS:,} are read")
            img.load()
        except ImageError:
            raise
        except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
            raise ImageError(f"not an image PIL can read: {e}") from None
    if img.mode != "RGB":
        # transformers' convert_rgb: transparent pixels over white, not over black
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            white = PILImage.new("RGBA", img.size, (255, 255, 255, 255))
            img = PILImage.alpha_composite(white, img)
        img = img.convert("RGB")
    return img


def decode_data_url(url: str) -> bytes:
    """The bytes of a `data:[<type>][;base64],<data>` URL (images are sent base64)."""
    m = re.match(r"data:([^,;]*)((?:;[^,;]*)*),(.*)\Z", url, re.S)
    if not m:
        raise ImageError("an image URL must be a data: URL, data:image/png;base64,<data>")
    if ";base64" not in m.group(2):
        raise ImageError("a data: URL image must be base64-encoded (data:image/png;base64,...)")
    try:
        return base64.b64decode(m.group(3), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the data: URL's base64 payload is not valid base64") from None


def preprocess(img, *, patch: int = 16, kernel: int = 3, max_soft_tokens: int = DEFAULT_SOFT_TOKENS) -> Image:
    """Resize, rescale and patchify one PIL image (see the module's docstring)."""
    import numpy as np

    if max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
        raise ImageError(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got {max_soft_tokens}")
    PILImage = _pil()
    th, tw = target_size(img.height, img.width, patch, max_soft_tokens * kernel ** 2, kernel)
    if (tw, th) != (img.width, img.height):
        img = img.resize((tw, th), resample=PILImage.Resampling.BICUBIC)
    px = np.asarray(img, dtype=np.uint8)  # [H, W, 3]
    digest = hashlib.sha256(px.tobytes() + f"{tw}x{th}".encode()).hexdigest()
    x = torch.from_numpy(px.astype(np.float32) / np.float32(255.0))  # as the processor rescales (fp32)
    ph, pw = th // patch, tw // patch
    patches = x.view(ph, patch, pw, patch, 3).permute(0, 2, 1, 3, 4).reshape(ph * pw, patch * patch * 3)
    gy, gx = torch.meshgrid(torch.arange(ph), torch.arange(pw), indexing="ij")
    positions = torch.stack([gx, gy], dim=-1).reshape(ph * pw, 2)
    return Image(patches.contiguous(), positions, ph * pw // kernel ** 2, (tw, th), digest)


def load_image(src: bytes | str | Path, *, patch: int = 16, kernel: int = 3,
               max_soft_tokens: int = DEFAULT_SOFT_TOKENS) -> Image:
    """Read and preprocess an image from a file path, encoded bytes or a data: URL."""
    if isinstance(src, str) and src.startswith("data:"):
        src = decode_data_url(src)
    return preprocess(open_image(src), patch=patch, kernel=kernel, max_soft_tokens=max_soft_tokens)


# ---------------------------------------------------------------- the tower
class _Linear(nn.Module):
    """Gemma 4's clippable linear (`<name>.linear.weight`, optional input/output clamps)."""

    def __init__(self, cin: int, cout: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.clipped = clipped
        if clipped:
            for name in ("input_min", "input_max", "output_min", "output_max"):
                self.register_buffer(name, torch.tensor(float("inf") if "max" in name else -float("inf")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clipped:
            x = torch.clamp(x, self.input_min, self.input_max)
        x = self.linear(x)
        if self.clipped:
            x = torch.clamp(x, self.output_min, self.output_max)
        return x


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin


class _Attention(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.heads, self.kv, self.hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        h, clip = c["hidden_size"], c["use_clipped_linears"]
        self.q_proj = _Linear(h, self.heads * self.hd, clip)
        self.k_proj = _Linear(h, self.kv * self.hd, clip)
        self.v_proj = _Linear(h, self.kv * self.hd, clip)
        self.o_proj = _Linear(self.heads * self.hd, h, clip)
        self.q_norm = RMSNorm(self.hd, c["rms_norm_eps"])
        self.k_norm = RMSNorm(self.hd, c["rms_norm_eps"])
        self.v_norm = RMSNorm(self.hd, c["rms_norm_eps"], with_scale=False)

    def forward(self, x: torch.Tensor, rope: tuple) -> torch.Tensor:
        N = x.shape[0]
        q = self._rope(self.q_norm(self.q_proj(x).view(N, self.heads, self.hd)), rope)
        k = self._rope(self.k_norm(self.k_proj(x).view(N, self.kv, self.hd)), rope)
        v = self.v_norm(self.v_proj(x).view(N, self.kv, self.hd))
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], scale=1.0, enable_gqa=self.kv != self.heads)
        return self.o_proj(out[0].transpose(0, 1).reshape(N, self.heads * self.hd))

    @staticmethod
    def _rope(x: torch.Tensor, rope: tuple) -> torch.Tensor:
        """The head's first half rotated by the x position, the second by y (each half a rotate-half RoPE)."""
        (cx, sx), (cy, sy) = rope
        a, b = x.chunk(2, dim=-1)
        return torch.cat([_rotate(a, cx, sx), _rotate(b, cy, sy)], dim=-1)


class _Layer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        h, eps, clip = c["hidden_size"], c["rms_norm_eps"], c["use_clipped_linears"]
        self.self_attn = _Attention(c)
        self.mlp = nn.Module()
        self.mlp.gate_proj = _Linear(h, c["intermediate_size"], clip)
        self.mlp.up_proj = _Linear(h, c["intermediate_size"], clip)
        self.mlp.down_proj = _Linear(c["intermediate_size"], h, clip)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, RMSNorm(h, eps))

    def forward(self, x: torch.Tensor, rope: tuple) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope))
        m = self.mlp
        y = self.pre_feedforward_layernorm(x)
        y = m.down_proj(gelu_tanh(m.gate_proj(y)) * m.up_proj(y))
        return x + self.post_feedforward_layernorm(y)


class VisionTower(nn.Module):
    """The vision tower plus the projection into the text stack: `features(image)` -> `[tokens, text hidden]`.

    Parameter names follow the checkpoint's (`vision_tower.<...>`, `embed_vision.<...>`), so loading is a rename."""

    def __init__(self, vision_config: dict, text_hidden: int, rope_theta: float | None = None):
        super().__init__()
        c = {**VISION_DEFAULTS, **{k: v for k, v in vision_config.items() if v is not None}}
        if c.get("hidden_activation") not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ImageError(f"vision hidden_activation {c.get('hidden_activation')!r} is not supported")
        self.c = c
        h = c["hidden_size"]
        self.vision_tower = nn.Module()
        t = self.vision_tower
        t.patch_embedder = nn.Module()
        t.patch_embedder.input_proj = nn.Linear(3 * c["patch_size"] ** 2, h, bias=False)
        t.patch_embedder.position_embedding_table = nn.Parameter(torch.ones(2, c["position_embedding_size"], h))
        t.encoder = nn.Module()
        t.encoder.layers = nn.ModuleList(_Layer(c) for _ in range(c["num_hidden_layers"]))
        if c["standardize"]:
            t.register_buffer("std_bias", torch.zeros(h))
            t.register_buffer("std_scale", torch.ones(h))
        self.embed_vision = nn.Module()
        self.embed_vision.embedding_projection = nn.Linear(h, text_hidden, bias=False)
        self.cache_bytes = FEATURE_CACHE_BYTES
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        rp = c.get("rope_parameters") or {}
        theta = rope_theta if rope_theta is not None else rp.get("rope_theta", 100.0)
        quarter = c["head_dim"] // 2
        self.register_buffer("inv_freq", 1.0 / (theta ** (torch.arange(0, quarter, 2, dtype=torch.float32)
                                                           / quarter)), persistent=False)

    def __getstate__(self):  # copy.deepcopy / pickle: the features cache and its lock stay behind
        state = dict(super().__getstate__())
        state.update(_cache=OrderedDict(), _held=0, _lock=None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._lock = threading.Lock()

    @property
    def patch(self) -> int:
        return self.c["patch_size"]

    @property
    def kernel(self) -> int:
        return self.c["pooling_kernel_size"]

    def _rope(self, positions: torch.Tensor, dtype) -> tuple:
        out = []
        for axis in (0, 1):
            f = positions[:, axis, None].float() * self.inv_freq  # [N, hd/4]
            f = torch.cat([f, f], dim=-1)[:, None, :]  # rotate-half layout, broadcast over heads
            out.append((f.cos().to(dtype), f.sin().to(dtype)))
        return tuple(out)

    def features(self, image: Image, cached: bool = True) -> torch.Tensor:
        """The image's soft tokens in the text stack's input space: `[image.tokens, text hidden]`.

        Kept in a small LRU cache by the image's digest (`cache_bytes` of features, 128 MiB by default: ~80 images
        of 280 tokens at the released size in bf16), so an image sent again (each turn of a chat resends the
        conversation) costs no second tower forward, and a server can run the tower while it plans a request,
        beside the engine's steps, leaving the engine a cache hit. Thread-safe; callers must not modify the
        tensor. cached=False runs the tower whatever the cache holds, and keeps nothing (benchmarks)."""
        if not cached:
            return self._features(image)
        with self._lock:
            hit = self._cache.get(image.digest)
            if hit is not None:
                self._cache.move_to_end(image.digest)
                self.hits += 1
                return hit
        out = self._features(image)
        size = out.numel() * out.element_size()
        with self._lock:
            self.misses += 1
            if size <= self.cache_bytes and image.digest not in self._cache:
                self._cache[image.digest] = out
                self._held += size
                while self._held > self.cache_bytes:
                    _, old = self._cache.popitem(last=False)
                    self._held -= old.numel() * old.element_size()
        return out

    @torch.no_grad()
    def _features(self, image: Image) -> torch.Tensor:
        t, k = self.vision_tower, self.kernel
        w = t.patch_embedder.input_proj.weight
        dev, dtype = w.device, w.dtype
        pos = image.positions.to(dev)
        x = t.patch_embedder.input_proj((2 * (image.patches.to(dev) - 0.5)).to(dtype))
        table = t.patch_embedder.position_embedding_table
        x = x + (table[0][pos[:, 0]] + table[1][pos[:, 1]]).to(dtype)
        rope = self._rope(pos, dtype)
        for layer in t.encoder.layers:
            x = layer(x, rope)
        # each kernel x kernel block of patches -> its mean, in fp32, in row-major block order
        pw = int(pos[:, 0].max()) + 1
        block = (pos[:, 0] // k) + (pw // k) * (pos[:, 1] // k)
        pooled = torch.zeros(image.tokens, x.shape[-1], dtype=torch.float32, device=dev)
        pooled.index_add_(0, block, x.float())
        pooled = pooled / (k * k) * (x.shape[-1] ** 0.5)
        if self.c["standardize"]:
            pooled = (pooled - t.std_bias.float()) * t.std_scale.float()
        pooled = pooled.to(dtype)
        normed = rms_norm(pooled.float(), None, self.c["rms_norm_eps"]).to(dtype)
        return self.embed_vision.embedding_projection(normed)


def tower_params(cfg) -> int:
    """Parameters of a config's vision tower with its projection (built on the meta device: nothing allocated)."""
    with torch.device("meta"):
        tower = VisionTower(cfg.vision_config or {}, cfg.hidden_size)
    return sum(p.numel() for p in tower.parameters())


def has_vision(model) -> bool:
    """Whether the model's checkpoint carries a vision tower (loaded or not)."""
    return getattr(model, "vision", None) is not None or \
        any(k.startswith(TOWER) for k in getattr(model, "passthrough", {}))


def vision_tower(model) -> VisionTower:
    """The model's vision tower, built from its checkpoint's tensors on first use (memory-mapped reads, converted
    to the model's dtype and device) and kept on the model (`model.vision`); moved along if the model was."""
    tower = getattr(model, "vision", None)
    if tower is not None:
        w = tower.embed_vision.embedding_projection.weight
        if w.device != model.device or w.dtype != model.dtype:  # the model moved (`.to()`) after the tower was read
            with tower._lock:
                tower.to(device=model.device, dtype=model.dtype)
                tower._cache.clear()
                tower._held = 0
        return tower
    files = getattr(model, "passthrough", {})
    if not any(k.startswith(TOWER) for k in files):
        raise ImageError("this model has no vision tower, so it takes text only (its checkpoint carries no "
                         "model.encoder.vision_tower.* tensors)")
    from .weights import _open

    cfg = model.cfg
    tower = VisionTower(cfg.vision_config or {}, cfg.hidden_size)
    want = tower.state_dict()
    state = {}
    for key, f in files.items():
        name = key[len("model.encoder."):]
        if name not in want:
            if name.startswith("embed_vision.embedding."):  # a vestigial Gemma3n-style table some carry (SPEC)
                continue
            raise ImageError(f"the checkpoint's vision tensor {key} does not fit this vision config")
        t = _open(f).get_tensor(key)
        if tuple(t.shape) != tuple(want[name].shape):
            raise ImageError(f"vision tensor {key} has shape {tuple(t.shape)}, expected {tuple(want[name].shape)}")
        state[name] = t.to(model.dtype if t.is_floating_point() else t.dtype)
    missing = sorted(set(want) - set(state))
    if missing:
        raise ImageError(f"the checkpoint's vision tower is missing {', '.join(missing[:3])}")
    tower.load_state_dict(state, strict=True)
    tower = tower.to(model.device).eval()
    _keep(model, tower)
    return tower


def _keep(model, tower: VisionTower) -> None:
    """Hold the tower on the model without making it a submodule: the text stack's state_dict, quantization,
    LoRA and `.to()` never see it (it is saved by `weights.state_for_save` under its checkpoint names)."""
    model.__dict__["vision"] = tower


DETAIL_TOKENS = {"low": 70, "high": 1120}  # OpenAI's image detail as a token budget ("auto": the default)


def detail_tokens(detail) -> int | None:
    """The soft-token budget OpenAI's `detail` asks for: "low" the fewest (70), "high" the most (1120), "auto" or
    none the checkpoint's default (None)."""
    if detail in (None, "auto"):
        return None
    if detail not in DETAIL_TOKENS:
        raise ImageError(f"detail must be 'low', 'high' or 'auto', got {detail!r}")
    return DETAIL_TOKENS[detail]


def add_text(content: str, text: str) -> str:
    """A message's content so far plus a text part: parts are joined by newlines, none after an image's marker
    (Gemma 4's template writes the image, then the text)."""
    return content + ("\n" if content and not content.endswith(IMAGE_MARKER) else "") + text


def image_ids(cfg, image: Image) -> list[int]:
    """The prompt ids one image takes: boi, one image token per soft token, eoi."""
    return [cfg.boi_token_id] + [cfg.image_token_id] * image.tokens + [cfg.eoi_token_id]


def image_spans(prompt, image_token_id: int) -> list[tuple[int, int]]:
    """(start, end) of each run of image tokens in a prompt, in order."""
    spans, start = [], None
    for i, t in enumerate(prompt):
        if t == image_token_id:
            if start is None:
                start = i
        elif start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(prompt)))
    return spans


def attach_vision(model, vision_config: dict | None = None, seed: int | None = 0) -> VisionTower:
    """Give a model a new, randomly initialised vision tower (tests, training a tower from scratch); `save_model`
    writes it with the model. vision_config: the config's `vision_config` is replaced by this one if given."""
    if vision_config is not None:
        model.cfg = model.cfg.replace(vision_config=dict(vision_config))
    tower = VisionTower(model.cfg.vision_config or {}, model.cfg.hidden_size)
    g = torch.Generator().manual_seed(0 if seed is None else seed)
    with torch.no_grad():
        for name, t in tower.state_dict().items():
            if name.endswith("norm.weight") or name.endswith("std_scale"):
                t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=g))
            elif t.is_floating_point() and "_min" not in name and "_max" not in name:
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
    _keep(model, tower.to(device=model.device, dtype=model.dtype).eval())
    return tower
