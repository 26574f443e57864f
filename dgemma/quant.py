"""Weight-only quantization as a module swap: int8 and fp8 per output channel (or per group), int4 group-wise.

The model never sees it (gpt-fast's `WeightOnlyInt8QuantHandler` is the pattern): `quantize_model` replaces each
`nn.Linear` of the attention, the dense MLP and the self-conditioning MLP with a `QuantLinear`, and each `Experts`
with a `QuantExperts`; both keep the forward signature of what they replace. The router and the norms stay at
full precision; so does the embedding / tied LM head unless asked (`QuantConfig(embeddings=True)`, `dgemma quantize
--embeddings`): then `embed_tokens` becomes a `QuantEmbedding`, which the model reads through `model.embedding()` as
`QuantRows` (rows gathered, vocabulary blocks dequantized as the LM head and the self-conditioning matmul reach them).

Schemes (`w` is one output row, `K` input features):
  int8   symmetric, one scale per output channel:   w ~ q * scale,              q in [-127, 127]
         (or per group of `group_size` inputs, as llm-compressor's W8A16 stores it)
  fp8    the same with e4m3 codes:                  w ~ q * scale,              |q| <= 448
         (llm-compressor's FP8 checkpoints; its 128x128 block scales load as groups of 128, each row its block's)
  int4   asymmetric, one scale and zero per group of `group_size` consecutive inputs (the last group of a row
         is shorter when K is not a multiple; the 26B model's 704 and 2112 are not multiples of 128):
                                                    w ~ (q - 8) * scale + zero,  q in [0, 15]
         Asymmetric because a group's weights are not centred on 0: min-max spends all 16 levels on the range
         actually present (symmetric int4 is set by the larger side of the group; on Gaussian weights its RMS
         error is 10-25% higher at every group size, bench/quant_accuracy.py). `(q - 8) * scale + zero` is
         tinygemm's convention (`_weight_int4pack_mm`), so those kernels could take these scales and zeros as is.

Tensors (HF names; `P` is `model.decoder.layers.N.self_attn.q_proj` and the like, or `...experts.gate_up_proj`):
  int8   P.weight int8 [out, in]                 P.weight_scale float32 [out]  (grouped: [out, G])
  fp8    P.weight float8_e4m3fn [out, in]        P.weight_scale float32 [out]  (grouped: [out, G])
  int4   P.weight uint8 [out, in/2]              P.weight_scale bfloat16 [out, G]   P.weight_zero bfloat16 [out, G]
         byte j of a row holds input j in its low nibble and input j + in/2 in its high nibble, so unpacking
         writes two contiguous halves.
  experts: the same with a leading [E] and no `.weight` (`...experts.gate_up_proj`, `..._scale`, `..._zero`).
  embedding (with --embeddings): `model.decoder.embed_tokens.weight` [V, H] and its scales, as a Linear's [out, in].
config.json records `"quantization_config": {"quant_method": "dgemma", "scheme": ..., "group_size": ...}` (also
in each safetensors file's metadata) and `weights.load_model` swaps the modules before assigning the memory-mapped
tensors. transformers cannot load these checkpoints (it knows no `dgemma` quant_method).

Matmul (bench/quant_kernels.py): dequantize to the activation dtype, then `F.linear` (int8 scales the output, not
the weight), in every dtype and on every device. With fp32 activations torch's weight-only CPU kernels are scalar
loops (10-80x slower than dequantize + linear); in bf16 `_weight_int8pack_mm` was ~3x faster on an AVX2 CPU
without native bf16, but on one with native bf16 (where bf16 is dgemma's default) it is 2-5x slower than a bf16
matmul and it crashes on some shapes, so it is not used. The int4 kernel's packed layout depends on the CPU's ISA
(AVX2 and AVX-512 pack differently), so it cannot be memory-mapped from a portable checkpoint: not used either.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, ModelConfig
from .model import DiffusionGemma, Experts, Router, exact_under_compile, moe_dispatch

QUANT_KEY = "quantization_config"
METHOD = "dgemma"
GROUP_SIZES = (16, 32, 64, 128, 256)
SCHEMES = ("int8", "int4", "fp8", "nvfp4")
DEFAULT_GROUP_SIZE = 128
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
# Bytes of one expert weight expanded for all experts at once (QuantExperts.linear): a CPU keeps its memory for the
# 26B model (one layer's gate_up in fp32 is 2 GiB); a GPU takes the 26B's 0.95 GiB in bf16 to avoid a host read.
STACK_BUDGET = {"cpu": 256 << 20, "accelerator": 2 << 30}


class QuantError(ConfigError):
    """A quantization request or a quantized checkpoint that dgemma cannot handle, with the reason."""


# ---------------------------------------------------------------- schemes
class Int8:
    """Symmetric int8, one float32 scale per output channel, or per group of `group_size` inputs of a channel
    (the last group of a row may be short): w ~ q * scale, |q| <= 127."""

    name = "int8"
    suffixes = ("", "_scale")
    code_dtype, qmax = torch.int8, 127

    def __init__(self, group_size: int | None = None):
        self.group_size = group_size

    def specs(self, lead: tuple[int, ...], out: int, inp: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        scale = (*lead, out) if self.group_size is None else (*lead, out, -(-inp // self.group_size))
        return {"": ((*lead, out, inp), self.code_dtype), "_scale": (scale, torch.float32)}

    def _codes(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.round(w / scale).clamp_(-127, 127).to(torch.int8)

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        w = w.float()
        if self.group_size is None:
            scale = (w.abs().amax(-1) / self.qmax).clamp_min(1e-30)
            return {"": self._codes(w, scale[..., None]), "_scale": scale}
        *lead, out, inp = w.shape
        g, G = self.group_size, -(-inp // self.group_size)
        pad = torch.cat([w, w[..., -1:].expand(*lead, out, G * g - inp)], dim=-1) if G * g != inp else w
        scale = (pad.view(*lead, out, G, g).abs().amax(-1) / self.qmax).clamp_min(1e-30)
        return {"": self._codes(w, self._per_input(scale, inp)), "_scale": scale}

    def _per_input(self, scale: torch.Tensor, inp: int) -> torch.Tensor:
        """A group-wise scale `[..., out, G]` repeated over its group's inputs: `[..., out, inp]`."""
        return scale.repeat_interleave(self.group_size, dim=-1)[..., :inp]

    def dequantize(self, t: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        q, scale = t[""], t["_scale"].to(dtype)
        w = codes_to(q, dtype)
        return w * (scale[..., None] if self.group_size is None else self._per_input(scale, q.shape[-1]))

    # The experts' grouped matmul (QuantExperts.linear): the weights it multiplies, then what follows per row, so
    # that each row gets exactly `linear`'s bits: `(x @ q^T) * scale`, the scale of the row's own expert. With
    # groups, the scale is in the weight (dequantize, then multiply), as int4 does.
    def stacked(self, t: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return codes_to(t[""], dtype) if self.group_size is None else self.dequantize(t, dtype)

    def finish(self, y: torch.Tensor, t: dict[str, torch.Tensor], expert_of_row: torch.Tensor) -> torch.Tensor:
        return y * t["_scale"].to(y.dtype)[expert_of_row] if self.group_size is None else y

    def linear(self, x: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.group_size is not None:
            return F.linear(x, self.dequantize(t, x.dtype))
        # Under torch.compile (`--compile`) the same line runs as an opaque op: Inductor would otherwise rewrite
        # it into `_weight_int8pack_mm` in bf16 (other bits, and see int8_linear).
        return (_int8_linear_op if exact_under_compile() else int8_linear)(x, t[""], t["_scale"])


class Fp8(Int8):
    """FP8 (e4m3) codes, one float32 scale per output channel (or per group of inputs): w ~ q * scale, |q| <= 448.
    The layout of llm-compressor's FP8 checkpoints (compressed.py); multiplied exactly as int8 is (e4m3 -> bf16
    is exact)."""

    name = "fp8"
    code_dtype, qmax = torch.float8_e4m3fn, 448.0

    def _codes(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (w / scale).clamp_(-self.qmax, self.qmax).to(self.code_dtype)  # round to nearest even


def codes_to(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 or e4m3 codes as `dtype`, exactly. On the CPU torch converts e4m3 one element at a time; moving its
    bits into a bf16 instead (exponent bias 127 there, 7 in e4m3), multiplying by 2^120, then converting gives the
    same values, subnormals included, 2-4x faster here (16-bit integer ops: half the memory traffic of 32-bit
    ones). The NaN codes, which no weight has, map to 480."""
    if q.dtype != torch.float8_e4m3fn or q.device.type != "cpu" or dtype not in (torch.bfloat16, torch.float32):
        return q.to(dtype)
    x = q.view(torch.uint8).to(torch.int16)
    w = (((x & 0x80) << 8) | ((x & 0x7F) << 4)).view(torch.bfloat16).mul_(2.0 ** 120)
    return w.to(dtype)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x @ (q * scale)^T` as `(x @ q^T) * scale`: the scale is per output channel, so it multiplies the (smaller)
    output, not the weight. torch's `_weight_int8pack_mm` is not used: on a CPU with native bf16 it is 2-5x slower
    than this line and it crashes the process (SIGSEGV) on some shapes (K = 40, N = 24 on a Zen 4, torch 2.13)."""
    return F.linear(x, codes_to(q, x.dtype)) * scale.to(x.dtype)


@torch.library.custom_op("dgemma::int8_linear", mutates_args=())
def _int8_linear_op(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return int8_linear(x, q, scale)


@_int8_linear_op.register_fake
def _(x, q, scale):
    return x.new_empty((*x.shape[:-1], q.shape[0]))


class _DequantizeFirst:
    """Schemes whose scales vary along the inputs: the weight is dequantized, then multiplied (also for the
    experts' grouped matmul, where nothing is left to do per row after it)."""

    def linear(self, x: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.linear(x, self.dequantize(t, x.dtype))

    def stacked(self, t: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return self.dequantize(t, dtype)

    def finish(self, y: torch.Tensor, t: dict[str, torch.Tensor], expert_of_row: torch.Tensor) -> torch.Tensor:
        return y


class Int4(_DequantizeFirst):
    """Asymmetric int4, one bfloat16 scale and zero per group of `group_size` inputs (last group may be short)."""

    name = "int4"
    suffixes = ("", "_scale", "_zero")

    def __init__(self, group_size: int = DEFAULT_GROUP_SIZE):
        self.group_size = group_size

    def groups(self, inp: int) -> int:
        return -(-inp // self.group_size)

    def specs(self, lead, out, inp):
        if inp % 2:
            raise QuantError(f"int4 packs two inputs per byte; a layer with {inp} (odd) inputs cannot be packed")
        g = (*lead, out, self.groups(inp))
        return {"": ((*lead, out, inp // 2), torch.uint8), "_scale": (g, torch.bfloat16), "_zero": (g, torch.bfloat16)}

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        *lead, out, inp = w.shape
        self.specs(tuple(lead), out, inp)  # checks inp is even
        g, G = self.group_size, self.groups(inp)
        w = w.float()
        if G * g != inp:  # repeat the last input into the padding: the short group's min and max are unchanged
            w = torch.cat([w, w[..., -1:].expand(*lead, out, G * g - inp)], dim=-1)
        wg = w.view(*lead, out, G, g)
        lo, hi = wg.amin(-1), wg.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-12).to(torch.bfloat16)
        zero = (lo + 8 * scale.float()).to(torch.bfloat16)
        # Codes from the *stored* (bf16-rounded) scale and zero, so dequantization rounds to the nearest level:
        # q = round((w - zero) / scale + 8), as one multiply-add (this runs over all 25B weights of the 26B model).
        inv = 1 / scale.float()
        q = torch.addcmul((8 - zero.float() * inv)[..., None], wg, inv[..., None]).round_().clamp_(0, 15)
        q = q.view(*lead, out, G * g)[..., :inp]
        return {"": self.pack(q), "_scale": scale, "_zero": zero}

    @staticmethod
    def pack(q: torch.Tensor) -> torch.Tensor:
        """Codes in [0, 15] `[..., in]` -> bytes `[..., in/2]`: input j in the low nibble, j + in/2 in the high."""
        half = q.shape[-1] // 2
        return torch.add(q[..., :half], q[..., half:], alpha=16).to(torch.uint8)

    def dequantize(self, t: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        packed = t[""]
        *lead, out, half = packed.shape
        inp, g = 2 * half, self.group_size
        w = torch.empty(*lead, out, inp, dtype=dtype, device=packed.device)
        w[..., :half] = packed & 15
        w[..., half:] = packed >> 4
        scale = t["_scale"].to(dtype)
        offset = t["_zero"].to(dtype) - 8 * scale  # w = q * scale + (zero - 8 * scale): one multiply-add
        full = inp // g
        if full:
            main = w[..., :full * g].view(*lead, out, full, g)  # a view: the in-place ops below write into w
            main.mul_(scale[..., :full, None]).add_(offset[..., :full, None])
        if full * g != inp:
            tail = w[..., full * g:]
            tail.mul_(scale[..., -1:]).add_(offset[..., -1:])
        return w



# e2m1 values of the 16 codes: bit 3 the sign, bits 0-2 the magnitude index.
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
_E2M1_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
FP8_MAX, FP4_MAX = 448.0, 6.0


class Nvfp4(_DequantizeFirst):
    """NVFP4: e2m1 codes two per byte (element 2j in the low nibble, 2j + 1 in the high one), an e4m3 scale per
    16 inputs and a float32 global scale: w = e2m1(q) * scale / global. The layout of compressed-tensors'
    `nvfp4-pack-quantized` (RedHatAI's NVFP4 releases), so their tensors load as stored. The global scale is kept
    per output channel (checkpoints have one per tensor; fused gate and up rows keep each their own)."""

    name = "nvfp4"
    suffixes = ("", "_scale", "_global")
    group_size = 16

    def __init__(self, group_size: int | None = 16):
        if group_size not in (None, 16):
            raise QuantError("nvfp4 has groups of 16 inputs")

    def specs(self, lead, out, inp):
        if inp % 2:
            raise QuantError(f"nvfp4 packs two inputs per byte; a layer with {inp} (odd) inputs cannot be packed")
        return {"": ((*lead, out, inp // 2), torch.uint8),
                "_scale": ((*lead, out, -(-inp // 16)), torch.float8_e4m3fn), "_global": ((*lead, out), torch.float32)}

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        *lead, out, inp = w.shape
        self.specs(tuple(lead), out, inp)
        G = -(-inp // 16)
        w = w.float()
        if G * 16 != inp:  # a short last group (checkpoints from elsewhere have none): padded with its last input
            w = torch.cat([w, w[..., -1:].expand(*lead, out, G * 16 - inp)], dim=-1)
        amax = w.abs().amax((-2, -1), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        glob = FP8_MAX * FP4_MAX / amax  # the tensor's largest group scale lands on e4m3's largest value
        wg = w.view(*lead, out, G, 16)
        scale = (wg.abs().amax(-1) / FP4_MAX * glob).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
        eff = scale.float() / glob
        x = wg / torch.where(eff == 0, 1.0, eff)[..., None]
        mids = _E2M1_MIDPOINTS.to(x.device)
        mag = torch.bucketize(x.abs(), mids)  # nearest e2m1 magnitude; a tie lands on the lower one, so:
        mag += (mag % 2 == 1) & (x.abs() == mids[mag.clamp(max=len(mids) - 1)])  # ties to even, as the hardware
        q = mag + 8 * (x < 0)
        q = q.view(*lead, out, G * 16)[..., :inp].to(torch.uint8)
        return {"": q[..., 0::2] | (q[..., 1::2] << 4), "_scale": scale,
                "_global": glob.reshape(*lead, 1).expand(*lead, out).contiguous()}

    def dequantize(self, t: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        # Each nibble's bits moved into a bf16: the sign to bit 15, the 2-bit exponent and 1-bit mantissa to
        # bf16's exponent bits 7-8 and mantissa bit 6, so the number is e2m1's value times 2^-126 (e2m1's bias is
        # 1, bf16's 127; a zero exponent is a subnormal in both); the 2^126 goes into the scale. 16-bit integer
        # ops, then float32 for the scale: 2-3x faster than a table lookup on the CPU, and the same bits.
        b = t[""].to(torch.int16)
        *lead, out, half = b.shape
        v = torch.empty(*lead, out, half, 2, dtype=torch.int16, device=b.device)
        m = torch.empty_like(v)
        v[..., 0], v[..., 1] = b << 12, b << 8  # element 2j: the low nibble; 2j + 1: the high one
        m[..., 0], m[..., 1] = b << 6, b << 2
        v.bitwise_and_(-(1 << 15)).bitwise_or_(m.bitwise_and_(7 << 6))
        eff = t["_scale"].float() / t["_global"].float()[..., None]  # compressed-tensors' order: scale / global
        eff = eff * 2.0 ** 126
        x = v.view(torch.bfloat16).view(*lead, out, 2 * half).float()
        inp, G = 2 * half, eff.shape[-1]
        if G * 16 == inp:
            x.view(*lead, out, G, 16).mul_(eff[..., None])
        else:
            x.mul_(eff.repeat_interleave(16, dim=-1)[..., :inp])
        return x.to(dtype)



# ---------------------------------------------------------------- config
@dataclass(frozen=True)
class QuantConfig:
    """What `config.json`'s `quantization_config` records. group_size: inputs per scale (int4: default 128; int8
    and fp8: None, one scale per output channel, unless given).
    ignore: the layers (dgemma module names, e.g. `self_conditioning.gate_proj`, `layers.3.experts`) that stay at
    full precision although they are of a quantized kind (a checkpoint converted from one that kept them so).
    embeddings: the embedding / tied LM head is quantized too, with the same scheme (its rows are the LM head's
    output channels); off by default, as in llama.cpp's and llm-compressor's usual recipes."""

    scheme: str
    group_size: int | None = None
    ignore: tuple[str, ...] = ()
    embeddings: bool = False

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise QuantError(f"unknown quantization scheme {self.scheme!r}; choose {', '.join(SCHEMES)}")
        if self.scheme == "int4" and self.group_size is None:
            object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE)
        if self.scheme == "nvfp4":
            if self.group_size not in (None, 16):
                raise QuantError("nvfp4 has groups of 16 inputs (--group-size does not apply)")
            object.__setattr__(self, "group_size", 16)
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise QuantError(f"{self.scheme} group size must be one of {', '.join(map(str, GROUP_SIZES))}, "
                             f"got {self.group_size}")
        if isinstance(self.ignore, str) or not all(isinstance(n, str) for n in self.ignore):
            raise QuantError("quantization_config's ignore must be a list of module names")
        object.__setattr__(self, "ignore", tuple(sorted(set(self.ignore))))
        if not isinstance(self.embeddings, bool):
            raise QuantError("quantization_config's embeddings must be true or false")

    def make(self) -> Int8 | Int4:
        return {"int8": Int8, "fp8": Fp8, "int4": Int4, "nvfp4": Nvfp4}[self.scheme](self.group_size)

    def to_dict(self) -> dict:
        d = {"quant_method": METHOD, "scheme": self.scheme, "group_size": self.group_size}
        if self.embeddings:
            d["embeddings"] = True
        return {**d, "ignore": list(self.ignore)} if self.ignore else d

    @classmethod
    def from_dict(cls, d) -> "QuantConfig":
        if not isinstance(d, dict):
            raise QuantError(f"{QUANT_KEY} must be a JSON object")
        method = d.get("quant_method")
        if method in ("compressed-tensors", "modelopt"):  # llm-compressor's, ModelOpt's: the scheme only
            from .compressed import parse

            return parse(d)[0]
        if method != METHOD:
            raise QuantError(f"{QUANT_KEY} has quant_method {method!r}; dgemma loads its own int8/int4/fp8/nvfp4 "
                             f"checkpoints (quant_method {METHOD!r}), llm-compressor's (compressed-tensors) and "
                             "ModelOpt's (modelopt), not GPTQ/AWQ/bitsandbytes/GGUF/MLX exports")
        return cls(scheme=d.get("scheme"), group_size=d.get("group_size"), ignore=tuple(d.get("ignore") or ()),
                   embeddings=d.get("embeddings", False))

    @classmethod
    def of(cls, cfg: ModelConfig) -> "QuantConfig | None":
        """The quantization a model config records (None: full precision)."""
        d = cfg.extra.get(QUANT_KEY)
        return None if d is None else cls.from_dict(d)

    def apply_to(self, cfg: ModelConfig) -> ModelConfig:
        """A copy of cfg that records this quantization (the original object is left alone)."""
        return cfg.replace(extra={**cfg.extra, QUANT_KEY: self.to_dict()})


# ---------------------------------------------------------------- training through frozen quantized weights
class _FrozenQuantLinear(torch.autograd.Function):
    """`scheme.linear(x, t)` for an input that needs a gradient (LoRA over a quantized base: QLoRA). The weight is
    frozen, so only the input's gradient is wanted, `g @ W`; autograd would keep the dequantized weight of every
    layer until the backward pass (a full-precision copy of the model), so here nothing is kept but references to
    the stored codes and scales, and the backward dequantizes the weight again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scheme, t: dict[str, torch.Tensor], dequantize_first: bool) -> torch.Tensor:
        ctx.scheme, ctx.t = scheme, t
        return _matmul(scheme, x, t, dequantize_first)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g @ ctx.scheme.dequantize(ctx.t, g.dtype), None, None, None


def quant_linear(scheme, x: torch.Tensor, t: dict[str, torch.Tensor], dequantize_first: bool = False
                 ) -> torch.Tensor:
    """`x` times a quantized weight `t`: the scheme's matmul (or `F.linear` with the dequantized weight), through
    `_FrozenQuantLinear` when `x` needs a gradient (the same values; only what the backward keeps differs)."""
    if x.requires_grad and torch.is_grad_enabled():
        return _FrozenQuantLinear.apply(x, scheme, t, dequantize_first)
    return _matmul(scheme, x, t, dequantize_first)


def _matmul(scheme, x: torch.Tensor, t: dict[str, torch.Tensor], dequantize_first: bool) -> torch.Tensor:
    return F.linear(x, scheme.dequantize(t, x.dtype)) if dequantize_first else scheme.linear(x, t)


# ---------------------------------------------------------------- modules
class QuantLinear(nn.Module):
    """Stand-in for a bias-optional `nn.Linear` holding quantized codes (`weight`) and `weight_scale` [/ `_zero`]."""

    def __init__(self, in_features: int, out_features: int, scheme, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        for suffix, (shape, dtype) in scheme.specs((), out_features, in_features).items():
            self.register_buffer("weight" + suffix, torch.zeros(shape, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, scheme) -> "QuantLinear":
        q = cls(lin.in_features, lin.out_features, scheme, bias=lin.bias is not None, device=lin.weight.device)
        with torch.no_grad():
            for suffix, t in scheme.quantize(lin.weight.detach()).items():
                setattr(q, "weight" + suffix, t)
            if lin.bias is not None:
                q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        return q

    def tensors(self) -> dict[str, torch.Tensor]:
        return {s: getattr(self, "weight" + s) for s in self.scheme.suffixes}

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return self.scheme.dequantize(self.tensors(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = quant_linear(self.scheme, x, self.tensors())
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        g = f", group_size={self.scheme.group_size}" if self.scheme.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme.name}{g}"


class QuantExperts(nn.Module):
    """Stand-in for `model.Experts`: the same stacked layout ([E, 2I, H] and [E, H, I]) and forward, quantized."""

    dense = False  # see Experts

    def __init__(self, num_experts: int, hidden: int, inner: int, scheme, device=None):
        super().__init__()
        self.num_experts, self.hidden, self.inner, self.scheme = num_experts, hidden, inner, scheme
        shapes = {"gate_up_proj": (2 * inner, hidden), "down_proj": (hidden, inner)}
        for name, (out, inp) in shapes.items():
            for suffix, (shape, dtype) in scheme.specs((num_experts,), out, inp).items():
                self.register_buffer(name + suffix, torch.zeros(shape, dtype=dtype, device=device))

    @classmethod
    def from_experts(cls, ex: Experts, scheme) -> "QuantExperts":
        E, two_i, H = ex.gate_up_proj.shape
        q = cls(E, H, two_i // 2, scheme, device=ex.gate_up_proj.device)
        with torch.no_grad():
            for name in EXPERT_WEIGHTS:
                w = getattr(ex, name).detach()
                parts = 2 if name == "gate_up_proj" else 1
                for suffix, t in quantize_stacked(scheme, lambda e: w[e], E, parts).items():
                    setattr(q, name + suffix, t)
        return q

    def expert(self, name: str, e: int) -> dict[str, torch.Tensor]:
        return {s: getattr(self, name + s)[e] for s in self.scheme.suffixes}

    def linear(self, name: str, xs: torch.Tensor, groups) -> torch.Tensor:
        """`Experts.linear` with the quantized weights: each expert's rows times its dequantized `name`.

        With at least as many rows as experts (a canvas pass: nearly every expert is hit, so nearly every one
        would be dequantized anyway) every expert's weight is expanded at once and multiplied in one grouped
        matmul, when it takes the operands and the expanded weights fit `STACK_BUDGET`: the same bits as one
        expert at a time, and on a GPU no host read of the experts' row counts. Otherwise one expert at a time."""
        E = self.num_experts
        if xs.requires_grad and torch.is_grad_enabled():  # QLoRA: one expert at a time, nothing kept for backward
            return groups.per_expert(xs, lambda e, rows: quant_linear(self.scheme, rows, self.expert(name, e)))
        if xs.shape[0] >= E:
            t = {s: getattr(self, name + s) for s in self.scheme.suffixes}
            out, inp = getattr(self, name + "_scale").shape[1], xs.shape[1]
            if E * out * inp * xs.element_size() <= STACK_BUDGET.get(xs.device.type, STACK_BUDGET["accelerator"]):
                w = self.scheme.stacked(t, xs.dtype)
                if groups.grouped_ok(xs, w):
                    y = groups.grouped(xs, w)
                    expert_of_row = torch.repeat_interleave(torch.arange(E, device=xs.device), groups.counts,
                                                            output_size=xs.shape[0])
                    return self.scheme.finish(y, t, expert_of_row)
        return groups.per_expert(xs, lambda e, rows: self.scheme.linear(rows, self.expert(name, e)))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x `[N, H]`, weights/idx `[N, k]` -> `[N, H]`, through the model's own routing (`moe_dispatch`)."""
        return moe_dispatch(x, weights, idx, self.num_experts, self.linear, dense=self.dense)

    def extra_repr(self) -> str:
        g = f", group_size={self.scheme.group_size}" if self.scheme.group_size else ""
        return f"num_experts={self.num_experts}, {self.scheme.name}{g}"


class QuantEmbedding(nn.Module):
    """Stand-in for the `nn.Embedding` that is also the tied LM head: its `[V, H]` weight quantized as a Linear's
    `[out, in]` (one scale per vocabulary entry, or per group of its inputs). The model reads it through `rows`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.scheme = num_embeddings, embedding_dim, scheme
        for suffix, (shape, dtype) in scheme.specs((), num_embeddings, embedding_dim).items():
            self.register_buffer("weight" + suffix, torch.zeros(shape, dtype=dtype, device=device))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, scheme) -> "QuantEmbedding":
        q = cls(emb.num_embeddings, emb.embedding_dim, scheme, device=emb.weight.device)
        with torch.no_grad():
            for suffix, t in quantize_rows(scheme, emb.weight.detach()).items():
                setattr(q, "weight" + suffix, t)
        return q

    def tensors(self) -> dict[str, torch.Tensor]:
        return {s: getattr(self, "weight" + s) for s in self.scheme.suffixes}

    def rows(self, dtype: torch.dtype) -> "QuantRows":
        return QuantRows(self.scheme, self.tensors(), dtype, self.embedding_dim)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return self.scheme.dequantize(self.tensors(), dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        raise TypeError("a quantized embedding is read through DiffusionGemma.embedding() (it needs the model's dtype)")

    def extra_repr(self) -> str:
        g = f", group_size={self.scheme.group_size}" if self.scheme.group_size else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.scheme.name}{g}"


class QuantRows:
    """A quantized `[V, H]` embedding as the model reads its embedding matrix: `shape`, `dtype` (what its rows
    dequantize to), `rows[ids]` (gathered, then dequantized: an input embedding or a pinned token's), `rows[lo:hi]`
    (a vocabulary block, dequantized: the LM head's and the self-conditioning matmul's operand) and `matmul(p)`
    (`p @ E`, block by block). The last block is kept, so the fused sampler step's logits and soft embedding of one
    block dequantize it once. Only the block being used is ever expanded: at the real vocabulary the whole matrix in
    fp32 would be 2.9 GiB."""

    def __init__(self, scheme, tensors: dict[str, torch.Tensor], dtype: torch.dtype, width: int):
        self.scheme, self.tensors, self.dtype = scheme, tensors, dtype
        self.shape = torch.Size((tensors[""].shape[0], width))
        self.device = tensors[""].device
        self._last: tuple[tuple[int, int], torch.Tensor] | None = None

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, slice):
            lo, hi, step = key.indices(self.shape[0])
            if step != 1:
                raise ValueError("QuantRows slices take contiguous rows")
            if self._last is not None and self._last[0] == (lo, hi):
                return self._last[1]
            block = self.scheme.dequantize({s: t[lo:hi] for s, t in self.tensors.items()}, self.dtype)
            self._last = ((lo, hi), block)
            return block
        ids = torch.as_tensor(key, device=self.device)
        flat = ids.reshape(-1)
        rows = self.scheme.dequantize({s: t[flat] for s, t in self.tensors.items()}, self.dtype)
        return rows.view(*ids.shape, self.shape[1])

    def linear(self, h: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """`h @ E[lo:hi]^T`, the LM head's block: with the dequantized block (its bits at inference), and when `h`
        needs a gradient (training over a frozen quantized embedding) without keeping the block for backward."""
        if h.requires_grad and torch.is_grad_enabled():
            return quant_linear(self.scheme, h, {s: t[lo:hi] for s, t in self.tensors.items()}, dequantize_first=True)
        return F.linear(h, self[lo:hi])

    def matmul(self, p: torch.Tensor, block: int) -> torch.Tensor:
        """`p @ E` for `p` `[..., V]` in `self.dtype`: a sum over vocabulary blocks of `p[..., lo:hi] @ E[lo:hi]`."""
        V = self.shape[0]
        out = None
        for lo in range(0, V, block):
            hi = min(lo + block, V)
            part = p[..., lo:hi] @ self[lo:hi]
            out = part if out is None else out.add_(part)
        return out


def quantize_rows(scheme, w: torch.Tensor, rows: int = 8192) -> dict[str, torch.Tensor]:
    """Quantize a large `[out, in]` matrix (the embedding) `rows` rows at a time, so that only one block is ever
    in fp32 (the 26B model's embedding is 2.9 GiB in fp32)."""
    out, inp = w.shape
    specs = scheme.specs((), out, inp)
    res = {s: torch.empty(shape, dtype=dtype, device=w.device) for s, (shape, dtype) in specs.items()}
    for lo in range(0, out, rows):
        for s, t in scheme.quantize(w[lo:lo + rows]).items():
            res[s][lo:lo + t.shape[0]] = t
    return res


def quantize_stacked(scheme, get: Callable[[int], torch.Tensor], n: int, parts: int = 1) -> dict[str, torch.Tensor]:
    """Quantize n stacked matrices one at a time (`get(i)` -> `[out, in]`), so only one is ever in fp32. parts:
    each matrix is that many matrices stacked along its rows (gate_up_proj: gate, then up), quantized one by one:
    the same for per-row schemes, and for nvfp4 each keeps its own global scale, as checkpoints store them."""
    first = get(0)
    specs = scheme.specs((n,), *first.shape)
    out = {s: torch.empty(shape, dtype=dtype, device=first.device) for s, (shape, dtype) in specs.items()}
    for i in range(n):
        w = first if i == 0 else get(i)
        chunks = [scheme.quantize(c) for c in w.chunk(parts, dim=0)]
        for s in chunks[0]:
            out[s][i] = torch.cat([c[s] for c in chunks], dim=0)
    return out


# ---------------------------------------------------------------- the swap
def targets(model: nn.Module, ignore: tuple[str, ...] = (), embeddings: bool = False
            ) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """(qualified name, parent, attribute, module) for every layer that is quantized: every Linear but the
    routers' (routing decisions are discrete: keep them exact, the router is tiny) and every Experts, less the
    names in `ignore`; with `embeddings`, the embedding / tied LM head too."""
    for prefix, parent in list(model.named_modules()):
        if isinstance(parent, (Router, QuantLinear, QuantExperts)):
            continue
        for name, child in list(parent.named_children()):
            qname = f"{prefix}.{name}" if prefix else name
            if isinstance(child, (nn.Linear, Experts)) and qname not in ignore:
                yield qname, parent, name, child
            elif embeddings and isinstance(child, nn.Embedding) and qname == "embed_tokens":
                yield qname, parent, name, child


def _quantized(child: nn.Module, scheme) -> nn.Module:
    """The quantized stand-in of one target layer, from its weights."""
    if isinstance(child, nn.Linear):
        return QuantLinear.from_linear(child, scheme)
    if isinstance(child, nn.Embedding):
        return QuantEmbedding.from_embedding(child, scheme)
    return QuantExperts.from_experts(child, scheme)


def _empty(child: nn.Module, scheme) -> nn.Module:
    """An empty quantized stand-in of one target layer, on its device (meta, for loading)."""
    if isinstance(child, nn.Linear):
        return QuantLinear(child.in_features, child.out_features, scheme, bias=child.bias is not None,
                           device=child.weight.device)
    if isinstance(child, nn.Embedding):
        return QuantEmbedding(child.num_embeddings, child.embedding_dim, scheme, device=child.weight.device)
    E, two_i, H = child.gate_up_proj.shape
    return QuantExperts(E, H, two_i // 2, scheme, device=child.gate_up_proj.device)


def quantize_model(model: DiffusionGemma, qcfg: QuantConfig) -> DiffusionGemma:
    """Quantize the model's weights in place (one layer at a time) and record the scheme in `model.cfg`."""
    if QuantConfig.of(model.cfg) is not None:
        raise QuantError(f"the model is already quantized ({QuantConfig.of(model.cfg).scheme})")
    scheme = qcfg.make()
    for _, parent, name, child in list(targets(model, qcfg.ignore, qcfg.embeddings)):
        setattr(parent, name, _quantized(child, scheme))
    model.cfg = qcfg.apply_to(model.cfg)
    return model


def swap_modules(model: DiffusionGemma, qcfg: QuantConfig) -> DiffusionGemma:
    """Replace the quantized layers with empty quantized modules on the same device (meta, for loading)."""
    scheme = qcfg.make()
    for _, parent, name, child in list(targets(model, qcfg.ignore, qcfg.embeddings)):
        setattr(parent, name, _empty(child, scheme))
    return model


def prepare_for_load(model: DiffusionGemma) -> set[str]:
    """`weights.load_model`'s hook: swap in quantized modules if model.cfg records a quantization; returns the
    state-dict names of the quantized tensors (they keep their stored dtype)."""
    qcfg = QuantConfig.of(model.cfg)
    if qcfg is not None:
        swap_modules(model, qcfg)
    return quantized_names(model)


def quantized_names(model: nn.Module) -> set[str]:
    """State-dict names of the codes, scales and zeros of every quantized module (empty for a float model)."""
    out = set()
    for prefix, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantExperts, QuantEmbedding)):
            out.update(f"{prefix}.{n}" for n, _ in m.named_buffers(recurse=False))
    return out


def dtype_problem(t: torch.Tensor, expected: torch.Tensor) -> str | None:
    """Why a stored quantized tensor cannot go where `expected` (a meta tensor) is, or None."""
    fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
    if expected.is_floating_point() and t.is_floating_point() and expected.dtype not in fp8 and t.dtype not in fp8:
        return None  # scales and zeros: any float dtype (kept as stored)
    if t.dtype != expected.dtype:
        return f"has dtype {t.dtype}, expected {expected.dtype} (does config.json's {QUANT_KEY} match the weights?)"
    return None


def safetensors_metadata(cfg: ModelConfig) -> dict[str, str]:
    """Extra safetensors metadata for a quantized model (informational; config.json is what loading reads)."""
    qcfg = QuantConfig.of(cfg)
    return {} if qcfg is None else {"dgemma_quantization": json.dumps(qcfg.to_dict(), sort_keys=True)}


def weight_bytes(cfg: ModelConfig, qcfg: QuantConfig | None = None, dtype=torch.float32) -> int:
    """Bytes of the model's tensors (quantized codes and scales as stored; everything else in `dtype`)."""
    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    if qcfg is not None:
        swap_modules(model, qcfg)
    q = quantized_names(model)
    return sum(t.numel() * (t.element_size() if n in q else torch.empty((), dtype=dtype).element_size())
               for n, t in model.state_dict().items())


# ---------------------------------------------------------------- checkpoints, streamed
DEFAULT_SHARD_BYTES = 2 << 30


class _ShardWriter:
    """Writes tensors into safetensors shards of at most `max_bytes` as they arrive, then the index."""

    def __init__(self, out: Path, max_bytes: int, metadata: dict[str, str]):
        self.out, self.max_bytes, self.metadata = out, max_bytes, {"format": "pt", **metadata}
        self.cur: dict[str, torch.Tensor] = {}
        self.size, self.files, self.weight_map, self.total = 0, [], {}, 0

    def add(self, key: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.cur and self.size + n > self.max_bytes:
            self.flush()
        self.cur[key] = t.contiguous()
        self.size += n
        self.total += n

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.cur:
            return
        path = self.out / f".part-{len(self.files):05d}.safetensors"
        save_file(self.cur, str(path), metadata=self.metadata)
        self.files.append((path, list(self.cur)))
        self.cur, self.size = {}, 0

    def finish(self) -> int:
        """Name the shards as `save_model` does; returns the number of shards."""
        from .weights import INDEX, SINGLE

        self.flush()
        if len(self.files) == 1:
            self.files[0][0].rename(self.out / SINGLE)
            return 1
        n = len(self.files)
        for i, (path, keys) in enumerate(self.files, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.out / name)
            self.weight_map.update({k: name for k in keys})
        (self.out / INDEX).write_text(json.dumps({"metadata": {"total_size": self.total},
                                                  "weight_map": self.weight_map}, indent=2) + "\n")
        return n


def target_weights(model: DiffusionGemma, qcfg: QuantConfig) -> dict[str, str]:
    """State-dict name of every weight `qcfg` quantizes -> its kind: "linear", "embedding" or "experts"."""
    out = {}
    for qname, _, _, child in targets(model, qcfg.ignore, qcfg.embeddings):
        if isinstance(child, nn.Linear):
            out[qname + ".weight"] = "linear"
        elif isinstance(child, nn.Embedding):
            out[qname + ".weight"] = "embedding"
        else:
            out.update({f"{qname}.{w}": "experts" for w in EXPERT_WEIGHTS})
    return out


def quantize_weight(scheme, name: str, kind: str, get: Callable[[], torch.Tensor],
                    get_expert: Callable[[int], torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """One target weight's quantized tensors {suffix: tensor}: `get()` gives the whole full-precision weight,
    `get_expert(e)` one expert's matrix of a stacked one (experts are quantized one at a time)."""
    if kind == "linear":
        return scheme.quantize(get())
    if kind == "embedding":
        return quantize_rows(scheme, get())
    return quantize_stacked(scheme, get_expert, num_experts, 2 if name.endswith("gate_up_proj") else 1)


def _stream(model: DiffusionGemma, qcfg: QuantConfig, get: Callable[[str, torch.Tensor], torch.Tensor],
            get_expert: Callable[[str, torch.Tensor, int], torch.Tensor],
            get_kept: Callable[[str, torch.Tensor], torch.Tensor] | None = None
            ) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(state name, tensor, is_quantized) in state-dict order, quantizing the target layers' weights as they come.

    `model` gives names and shapes only (it may live on the meta device); `get(name, like)` returns the full-
    precision tensor of one state entry and `get_expert(name, like, e)` one expert's matrix of a stacked weight;
    `get_kept` (default `get`) the entries that stay unquantized, which a source may read at their final dtype.
    """
    scheme = qcfg.make()
    kinds = target_weights(model, qcfg)
    for name, like in model.state_dict().items():
        kind = kinds.get(name)
        if kind is None:
            yield name, (get_kept or get)(name, like), False
            continue
        tensors = quantize_weight(scheme, name, kind, lambda: get(name, like),
                                  lambda e: get_expert(name, like, e), like.shape[0])
        for s, t in tensors.items():
            yield name + s, t, True


def quantizing_entries(model: DiffusionGemma, entries: dict, qcfg: QuantConfig) -> dict:
    """`weights.checkpoint_entries`' {HF key: (file, reader)} of a full-precision checkpoint, with each weight that
    `qcfg` quantizes replaced by its quantized tensors (codes, scales, zeros), computed when the first of them is
    read: load-time quantization (`load_model(..., quantize=)`, `--quantization`). The same functions as
    `quantize_checkpoint`, so the same bits as quantizing into a directory and loading that. Call before the
    model's modules are swapped (its float shapes name the weights). A reader with an `expert(e)` method (a GGUF's)
    gives one expert at a time; one with `exact()` gives the weight at its stored precision (a GGUF block type
    decoded to float32 rather than to the dtype kept)."""
    from .weights import dgemma_name, hf_name

    scheme = qcfg.make()
    kinds = target_weights(model, qcfg)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    out = {}
    for key, (f, read) in entries.items():
        name = dgemma_name(key)
        kind = kinds.get(name)
        if kind is None:
            out[key] = (f, read)
            continue
        shape = shapes[name]
        pending: dict[str, torch.Tensor] = {}

        def piece(s, name=name, kind=kind, read=read, shape=shape, pending=pending):
            if not pending:  # the first piece read quantizes the weight; the others are handed out as they are read
                full, whole = getattr(read, "exact", read), []

                def check(t, want):
                    if tuple(t.shape) != want:
                        what = "" if want == shape else " per expert"
                        raise QuantError(f"tensor {hf_name(name)} has shape {tuple(t.shape)}{what}, expected {want}")
                    return t

                def get_expert(e):
                    if hasattr(read, "expert"):
                        return check(read.expert(e), shape[1:])
                    if not whole:
                        whole.append(check(full(), shape))
                    return whole[0][e]

                pending.update(quantize_weight(scheme, name, kind, lambda: check(full(), shape), get_expert, shape[0]))
            return pending.pop(s)

        lead = shape[:-2]
        for s in scheme.specs(lead, shape[-2], shape[-1]):
            out[hf_name(name + s)] = (f, lambda s=s, piece=piece: piece(s))
    return out


def _write(dst: Path, cfg: ModelConfig, tensors: Iterator[tuple[str, torch.Tensor, bool]], *, dtype,
           max_shard_bytes: int, copy_from: Path | None = None, passthrough: dict[str, Path] | None = None,
           log=None) -> Path:
    """Write a checkpoint directory atomically (beside dst, renamed into place) from a stream of tensors."""
    from safetensors import safe_open

    from .io import atomic_dir
    from .weights import CHECKPOINT_FILES, hf_name

    with atomic_dir(dst) as tmp:
        w = _ShardWriter(tmp, max_shard_bytes, safetensors_metadata(cfg))
        for name, t, quantized in tensors:
            if dtype is not None and t.is_floating_point() and not quantized:
                t = t.to(dtype)
            if log is not None and name.startswith("layers.") and name.endswith(".layer_scalar"):
                log(f"layer {int(name.split('.')[1]) + 1}/{cfg.num_hidden_layers}")
            w.add(hf_name(name), t)
        by_file: dict[Path, list[str]] = {}
        for key, f in (passthrough or {}).items():  # vision-tower tensors, copied through untouched
            by_file.setdefault(f, []).append(key)
        for f, keys in by_file.items():
            with safe_open(str(f), framework="pt") as h:
                for key in keys:
                    w.add(key, h.get_tensor(key))
        w.finish()
        cfg.save(tmp / "config.json")
        if copy_from is not None:
            for fname in CHECKPOINT_FILES[1:]:
                if (copy_from / fname).exists():
                    (tmp / fname).write_bytes((copy_from / fname).read_bytes())
    return dst


def quantize_checkpoint(src, dst, qcfg: QuantConfig, *, dtype: torch.dtype | None = None,
                        max_shard_bytes: int = DEFAULT_SHARD_BYTES, log=None) -> Path:
    """Quantize checkpoint `src` into `dst`, streaming: each weight quantized is read (not mapped), quantized (one
    expert at a time) and written before the next, the rest copied from the memory-mapped source, so memory holds
    about one shard.

    dtype converts the tensors that stay at full precision (embedding, norms, router); None keeps the source's
    (bf16 for a GGUF source, whose block formats decode to float32).
    """
    from .gguf_model import GGUFFile, linked_file
    from .weights import checkpoint_entries, hf_name, load_model, resolve

    ckpt = resolve(src)
    gpath = linked_file(ckpt)
    if gpath is not None:  # a GGUF: dequantize one tensor (one expert) at a time, never the whole model
        model, _ = checkpoint_entries(ckpt)
        g, kept = GGUFFile(gpath), dtype or torch.bfloat16
        tensors = _stream(model, qcfg, lambda name, like: g.tensor(hf_name(name)),
                          lambda name, like, e: g.expert(hf_name(name), e),
                          lambda name, like: g.tensor(hf_name(name), dtype=kept))
        return _write(Path(dst), qcfg.apply_to(model.cfg), tensors, dtype=kept,
                      max_shard_bytes=max_shard_bytes, copy_from=ckpt, log=log)
    model = load_model(ckpt, quiet=True)  # built on meta, tensors memory-mapped: nothing is copied yet
    if QuantConfig.of(model.cfg) is not None:
        raise QuantError(f"{src} is already quantized ({QuantConfig.of(model.cfg).scheme}); "
                         "quantize the full-precision checkpoint")
    state = model.state_dict()
    # the weights quantized are read rather than taken through the map (whose pages would stay resident until the
    # end: for the 47 GiB bf16 26B, the whole file), a stacked expert weight once for all its experts
    _, entries = checkpoint_entries(ckpt)
    current: dict[str, torch.Tensor] = {}

    def read(name: str) -> torch.Tensor:
        r = entries[hf_name(name)][1]
        return getattr(r, "exact", r)()

    def get_expert(name: str, like: torch.Tensor, e: int) -> torch.Tensor:
        if name not in current:
            current.clear()
            current[name] = read(name)
        w = current[name][e]
        if e == like.shape[0] - 1:
            current.clear()
        return w

    tensors = _stream(model, qcfg, lambda name, like: read(name), get_expert, lambda name, like: state[name])
    return _write(Path(dst), qcfg.apply_to(model.cfg), tensors, dtype=dtype, max_shard_bytes=max_shard_bytes,
                  copy_from=Path(model.source), passthrough=getattr(model, "passthrough", {}), log=log)


def convert_checkpoint(src, dst, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES, log=None) -> QuantConfig | None:
    """Rewrite an llm-compressor (compressed-tensors) or ModelOpt checkpoint into dgemma's layout, which loads memory-mapped
    (the original converts in memory at every load). Streamed: one layer is converted and written at a time. The
    result is loaded back before it is renamed into place. Returns its QuantConfig."""
    from .compressed import foreign_config
    from .io import atomic_dir
    from .weights import CHECKPOINT_FILES, checkpoint_entries, load_config, load_model, resolve

    src = resolve(src)
    if foreign_config(src, load_config(src)) is None:
        raise QuantError(f"{src} is not an llm-compressor (compressed-tensors) or ModelOpt checkpoint; give "
                         "--scheme to quantize it")
    model, entries = checkpoint_entries(src)
    dst = Path(dst)
    with atomic_dir(dst) as tmp:
        w = _ShardWriter(tmp, max_shard_bytes, safetensors_metadata(model.cfg))
        for key, (_, read) in entries.items():
            if log is not None and key.endswith(".experts.down_proj"):
                log(f"layer {int(key.split('.')[3]) + 1}/{model.cfg.num_hidden_layers}")
            w.add(key, read())
        w.finish()
        model.cfg.save(tmp / "config.json")
        for fname in CHECKPOINT_FILES[1:]:
            if (src / fname).exists():
                (tmp / fname).write_bytes((src / fname).read_bytes())
        load_model(tmp, quiet=True)  # every tensor where dgemma expects it (or the error, and dst untouched)
    return QuantConfig.of(model.cfg)


def write_random_quantized(cfg: ModelConfig, dst, qcfg: QuantConfig, *, seed: int = 0,
                           dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                           log=None) -> Path:
    """A randomly initialised, quantized checkpoint written layer by layer, without ever building the float model
    (the 26B preset is ~100 GB in fp32). Initialisation follows `DiffusionGemma.init_weights`: normal(0, std)
    weights, norms and scales at one. Full-precision tensors are stored in `dtype`."""
    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    g = torch.Generator().manual_seed(seed)
    std = cfg.initializer_range

    def ones(name: str) -> bool:
        return (name.endswith(("norm.weight", "router.scale", "per_expert_scale", "layer_scalar"))
                or "layernorm" in name)

    def get(name, like):
        if ones(name):
            return torch.ones(like.shape, dtype=dtype)
        if name.endswith("bias"):
            return torch.zeros(like.shape, dtype=dtype)
        return (torch.randn(like.shape, generator=g) * std).to(dtype)

    def get_expert(name, like, e):
        return torch.randn(like.shape[1:], generator=g) * std

    tensors = _stream(model, qcfg, get, get_expert)
    return _write(Path(dst), qcfg.apply_to(cfg), tensors, dtype=None, max_shard_bytes=max_shard_bytes, log=log)


__all__ = ["QuantConfig", "QuantError", "QuantLinear", "QuantExperts", "QuantEmbedding", "QuantRows", "Int8", "Int4", "Fp8", "Nvfp4", "quantize_model",
           "swap_modules", "prepare_for_load", "quantized_names", "quantize_checkpoint", "write_random_quantized",
           "weight_bytes", "safetensors_metadata", "convert_checkpoint"]
