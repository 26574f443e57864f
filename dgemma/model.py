"""The DiffusionGemma text model: one Gemma-4 MoE stack that runs as a causal encoder or a bidirectional denoiser.

There is no mode inside the model. A call either *encodes* (causal mask, writes the KV cache, encoder layer
scalars) or *denoises* a canvas (bidirectional over the canvas, reads the cache without writing it, input through
the self-conditioning block, decoder layer scalars). Both are `forward` with one flag; `encode` and `denoise` name
the two uses. Parameter names follow the Hugging Face checkpoint (`model.decoder.*`) so loading is a prefix rename.

Shapes: B rows, T new tokens, H hidden size, V vocabulary, hd head dim, Hq query heads, Hkv key/value heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import runtime
from .attention import denoiser_mask, encoder_mask, no_cache_mask, same_block
from .cache import KVCache
from .config import FULL, ModelConfig


class CompileError(RuntimeError):
    """torch.compile could not build the denoiser's kernels on this machine (DiffusionGemma.compile_denoiser)."""


# The two reductions of the compiled inference regions run as opaque calls of eager's own kernels: Inductor's fused
# reductions sum in another order, which changes the last bit, and one changed bit in a logit can move a sampled
# token (then the whole canvas after it). Everything else Inductor fuses gives eager's bits (checked by the tests).
# Training (`dgemma train --compile`, gradients on) lets Inductor fuse them: no sampling to keep, and no autograd
# formula needed for the opaque ops.
@torch.library.custom_op("dgemma::rms_inv", mutates_args=())
def _rms_inv_op(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.pow(x.pow(2).mean(-1, keepdim=True) + eps, -0.5)


@_rms_inv_op.register_fake
def _(x, eps):
    return x.new_empty((*x.shape[:-1], 1))


@torch.library.custom_op("dgemma::softmax_f32", mutates_args=())
def _softmax_op(x: torch.Tensor) -> torch.Tensor:
    return F.softmax(x, dim=-1, dtype=torch.float32)


@_softmax_op.register_fake
def _(x):
    return torch.empty_like(x, dtype=torch.float32)


def rms_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    """`F.rms_norm`; under torch.compile, its reduction from eager's kernel and the rest fused, with the same bits
    (torch's fused kernel computes `x * (mean(x^2) + eps)^-0.5 * w` in that order)."""
    if not exact_under_compile():
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    y = x * _rms_inv_op(x, eps)
    return y if w is None else y * w


def softmax_f32(x: torch.Tensor) -> torch.Tensor:
    return _softmax_op(x) if exact_under_compile() else F.softmax(x, dim=-1, dtype=torch.float32)


def exact_under_compile() -> bool:
    """Tracing for torch.compile without gradients: run the ops Inductor would round differently as opaque ops."""
    return torch.compiler.is_compiling() and not torch.is_grad_enabled()


class RMSNorm(nn.Module):
    """Gemma-4 RMSNorm: `x * (mean(x^2) + eps)^-0.5 * w`, in fp32 (w multiplies directly, not 1 + w)."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The reference writes `x * torch.pow(mean(x^2) + eps, -0.5) * w` (to match JAX bit for bit); torch's
        # fused rms_norm gives the same bits (checked over shapes, scales and dtypes) in one kernel, not six.
        w = self.weight.float() if self.weight is not None else None
        return rms_norm(x.float(), w, self.eps).type_as(x)


def rope_inv_freq(cfg: ModelConfig, layer_type: str) -> torch.Tensor:
    """Inverse frequencies `[hd/2]` for one layer type.

    default: `theta^(-2i/d)` over `d = hd * partial_rotary_factor`. proportional (full layers): the first
    `partial * hd / 2` frequencies use the *whole* head dim as denominator and the rest are 0 (identity), so
    only a quarter of the 512 dims rotate.
    """
    rp = cfg.rope_parameters[layer_type]
    hd = cfg.global_head_dim if layer_type == FULL else cfg.head_dim
    theta = float(rp["rope_theta"])
    partial = float(rp.get("partial_rotary_factor", 1.0))
    if rp.get("rope_type", "default") == "proportional":
        n_rot = int(partial * hd // 2)
        rot = 1.0 / (theta ** (torch.arange(0, 2 * n_rot, 2, dtype=torch.int64).float() / hd))
        inv = torch.cat([rot, torch.zeros(hd // 2 - n_rot)]) if hd // 2 > n_rot else rot
        return inv / float(rp.get("factor", 1.0))
    d = int(hd * partial)
    return 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and *signed* sin `[B, T, hd]` for NeoX rotate-half RoPE at absolute `positions` `[B, T]`.

    The second is `[-sin, sin]` over the two halves: rotate-half's minus sign is folded into the table once per
    forward instead of negating half of every q and k (same bits: a sign flip is exact).
    """
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    sin = emb.sin()
    sin[..., :freqs.shape[-1]].neg_()
    return emb.cos().to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """`x * cos + rotate_half(x) * sin`: x `[B, T, heads, hd]`, cos/signed_sin `[B, T, hd]` from rope_cos_sin."""
    half = x.shape[-1] // 2
    rot = torch.cat([x[..., half:], x[..., :half]], dim=-1).mul_(signed_sin[:, :, None])
    return (x * cos[:, :, None]).add_(rot)


HEAD_BLOCK = 4096  # vocabulary entries per LM-head matmul on the CPU (see head_block_logits, vocab_block)
ACCEL_HEAD_BLOCK = 16384  # the same on an accelerator


def vocab_block(device) -> int:
    """Vocabulary entries per block of the LM head and the fused sampler step on `device`. The sampler's draws and
    the logits' bits depend on it, so the plain head, the fused head and the draws all take it from here.

    On the CPU a 4,096-wide block of a canvas's fp32 temporaries stays in cache between the step's ~10 passes
    over it. On a GPU, where a small op costs a kernel launch (microseconds) whatever its size, 4,096 entries
    leave each of the step's ~45 kernels per block launch-bound: at the real 262,144-token vocabulary that is
    64 blocks, ~2,900 launches a step. 16,384 cuts them 4x and keeps a block of a 256-token canvas at 16 MiB."""
    return HEAD_BLOCK if torch.device(device).type == "cpu" else ACCEL_HEAD_BLOCK


def head_block_logits(hidden: torch.Tensor, embedding: torch.Tensor, lo: int, hi: int,
                      softcap: float | None, exact: bool = False) -> torch.Tensor:
    """Soft-capped fp32 logits of vocabulary entries [lo, hi): hidden [N, H] @ E[lo:hi]^T -> [N, hi - lo].

    The LM head and the fused sampler step (which never materialises the logits) both compute logits one
    `vocab_block` at a time through this function, so a block's logits have the same bits on either path.

    At inference the cap runs in place as `2c * sigmoid(2x / c) - c`, which is `c * tanh(x / c)`: torch's CPU
    tanh is ~3x slower than its sigmoid (at the real vocabulary the cap cost a quarter of the head's matmul). It
    is exact math; the rounding differs from tanh's by ~1e-5 on logits up to the cap. `exact=True` keeps
    transformers' `tanh(x / c) * c`, bit for bit (for replaying its draws).
    """
    # a quantized embedding (quant.QuantRows) multiplies its own block
    x = (F.linear(hidden, embedding[lo:hi]) if isinstance(embedding, torch.Tensor) else
         embedding.linear(hidden, lo, hi)).float()
    if softcap:
        if x.requires_grad:  # training: autograd needs tanh's output intact
            x = torch.tanh(x / softcap) * softcap
        elif exact:  # transformers' bits, in place (x is fresh from the matmul)
            x.div_(softcap).tanh_().mul_(softcap)
        else:
            x.mul_(2.0 / softcap).sigmoid_().mul_(2.0 * softcap).sub_(softcap)
    return x


# gelu_tanh(x) = 0.5 x (1 + tanh(u)) = x * sigmoid(2u) with u = sqrt(2/pi) (x + 0.044715 x^3) = x (A + B x^2) / 2
_GELU_A = 2 * (2 / math.pi) ** 0.5
_GELU_B = _GELU_A * 0.044715


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """Gemma's gelu_pytorch_tanh. At fp32 CPU inference it runs as `x * sigmoid(x (a + b x^2))`, the same
    function in sigmoid form: torch's CPU tanh-GELU is ~2x slower, and the max error against fp64 is the same
    (5e-7). Elsewhere (autograd, bf16, CUDA's one fused kernel) it is F.gelu itself."""
    if x.requires_grad or x.dtype != torch.float32 or x.device.type != "cpu":
        return F.gelu(x, approximate="tanh")
    u = x * x
    return u.mul_(_GELU_B).add_(_GELU_A).mul_(x).sigmoid_().mul_(x)


class Attention(nn.Module):
    """Sliding or full attention. Full layers have no v_proj: V is the raw k projection (taken before k_norm)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.sliding = cfg.is_sliding(layer)
        self.window = cfg.sliding_window if self.sliding else None
        self.head_dim = hd = cfg.layer_head_dim(layer)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.layer_kv_heads(layer)
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * hd, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * hd, bias=bias) if self.sliding else None
        self.o_proj = nn.Linear(self.n_heads * hd, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.v_norm = RMSNorm(hd, cfg.rms_norm_eps, with_scale=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: "_Ctx") -> torch.Tensor:
        return self.merge(self.attend(*self.project(x, cos, sin), ctx))

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q, k, v `[B, heads, T, hd]`: the projections, the per-head norms and RoPE (no cache, no host data)."""
        B, T, _ = x.shape
        hd = self.head_dim
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, T, self.n_heads, hd)), cos, sin)
        k_raw = self.k_proj(x).view(B, T, self.n_kv, hd)
        v = self.v_norm(self.v_proj(x).view(B, T, self.n_kv, hd) if self.v_proj is not None else k_raw)
        k = apply_rope(self.k_norm(k_raw), cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        """The heads' outputs `[B, heads, T, hd]` through o_proj -> `[B, T, H]`."""
        B, _, T, hd = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * hd))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: "_Ctx") -> torch.Tensor:
        """Attention over the cached keys and the new ones (the encoder also writes the new K/V into the cache):
        `[B, heads, T, hd]`."""
        T = q.shape[2]
        cache = ctx.cache
        if cache is not None and ctx.known is not None:
            out = self._per_row(q, k, v, cache, ctx)
            if not ctx.denoise:
                cache.write(self.layer, k, v, ctx.n_valid)
            return out
        if cache is None:
            keys, values = k, v
            mask = no_cache_mask(T, causal=not ctx.denoise, window=self.window, device=q.device)
            if ctx.block is not None and not ctx.denoise:
                mask = mask | same_block(ctx.block)[:, None]
        else:
            slot_pos, slot_valid = ctx.slots[cache.capacity[self.layer]]
            keys = torch.cat([cache.k[self.layer].to(k.dtype), k], dim=2)
            values = torch.cat([cache.v[self.layer].to(v.dtype), v], dim=2)
            if ctx.denoise:
                mask = denoiser_mask(cache.lengths, slot_pos, slot_valid, T, self.window)
            else:
                mask = encoder_mask(ctx.positions, slot_pos, slot_valid, ctx.n_valid, self.window, ctx.block)
                cache.write(self.layer, k, v, ctx.n_valid)
        # Gemma 4 uses attention scale 1.0: q and k are RMS-normalised per head instead of scaled by 1/sqrt(d).
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=1.0,
                                              enable_gqa=self.n_kv != self.n_heads)

    def _per_row(self, q, k, v, cache, ctx: "_Ctx") -> torch.Tensor:
        """Attention row by row over exactly the cached keys each row can see, when the caller knows every row's
        cached length on the host (`ctx.known`, the engine does).

        The batched path attends over the whole preallocated buffer and masks the empty slots: with a context of
        8k tokens, a 256-token canvas after a 64-token prompt would compute 8,448 keys to use 320. Here each row
        takes a view of its own filled slots (no copy), so the cost follows the real context, the denoiser needs
        no mask at all, and a row's key set depends on its own context only, never on the longest row's.
        """
        cap, layer = cache.capacity[self.layer], self.layer
        kbuf, vbuf = cache.storage(layer)
        wraps = cap < cache.max_len  # a sliding ring: slot s holds the latest position congruent to s
        T = q.shape[2]
        outs = []
        for i, (slot, L) in enumerate(zip(cache.row_slots, ctx.known)):
            # an encoder row shorter than the longest (a padded prefill) attends with its own tokens only: the
            # padding's keys are masked anyway, but more keys would change how the kernel sums the rest
            nv = ctx.valid[i] if ctx.valid is not None and not ctx.denoise else T
            # positions lo..L-1: a sliding layer sees the last W - 1 of them, a full layer all of them
            lo = max(0, L - (self.window - 1)) if self.window else 0
            if wraps and L > cap:  # a ring that has wrapped: slot = position % cap, read in position order
                a, b = lo % cap, (L - 1) % cap + 1
                parts = [(a, b)] if a < b else [(a, cap), (0, b)]
            else:
                parts = [(lo, L)]
            keys = torch.cat([kbuf[slot:slot + 1, :, s:e].to(k.dtype) for s, e in parts] + [k[i:i + 1, :, :nv]],
                             dim=2)
            values = torch.cat([vbuf[slot:slot + 1, :, s:e].to(v.dtype) for s, e in parts] + [v[i:i + 1, :, :nv]],
                               dim=2)
            mask = None  # the denoiser sees every one of these keys from every canvas position
            if not ctx.denoise:
                pos = torch.arange(lo, L, device=q.device)
                mask = encoder_mask(ctx.positions[i:i + 1, :nv], pos[None],
                                    torch.ones_like(pos, dtype=torch.bool)[None], ctx.n_valid[i:i + 1], self.window,
                                    ctx.block[i:i + 1, :nv] if ctx.block is not None else None)
            out = F.scaled_dot_product_attention(q[i:i + 1, :, :nv], keys, values, attn_mask=mask, scale=1.0,
                                                 enable_gqa=self.n_kv != self.n_heads)
            outs.append(out if nv == T else F.pad(out, (0, 0, 0, T - nv)))  # the padding's outputs: unused
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class DenseMLP(nn.Module):
    """`down(gelu_tanh(gate(x)) * up(x))`: the always-on MLP beside the MoE, also the self-conditioning MLP."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Routes on the raw residual: `softmax(proj(rmsnorm(r) * scale / sqrt(H)))`, top-k renormalised, then
    multiplied by the chosen experts' per_expert_scale."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.top_k_experts
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))
        self.root = cfg.hidden_size ** -0.5

    def forward(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.norm(r) * self.scale * self.root
        probs = softmax_f32(self.proj(z))
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        return w * self.per_expert_scale[idx], idx


class Experts(nn.Module):
    """The MoE experts as stacked weights: gate_up_proj `[E, 2I, H]` (gate first), down_proj `[E, H, I]`.

    Each expert runs once over the tokens routed to it (a sort by expert, then one matmul per hit expert),
    never over every token. `dense = True` (training on a GPU, few experts: `DiffusionGemma.set_dense_experts`)
    runs every expert over every token instead, weighted 0 where not routed: the same function, more FLOPs, but
    no sort, no host sync and a handful of kernels, which is what a small model on a GPU is bound by.
    """

    dense = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def linear(self, name: str, xs: torch.Tensor, groups: "ExpertGroups") -> torch.Tensor:
        """The expert-sorted rows xs `[M, in]` times each one's expert weight `name` -> `[M, out]`. Quantized and
        LoRA experts override this, not the dispatch."""
        w = getattr(self, name)
        if groups.uniform:  # every expert over the same rows: one batched matmul
            E = w.shape[0]
            return torch.bmm(xs.view(E, -1, xs.shape[-1]), w.transpose(1, 2)).reshape(xs.shape[0], w.shape[1])
        if groups.grouped_ok(xs, w):
            return groups.grouped(xs, w)
        return groups.per_expert(xs, lambda e, rows: F.linear(rows, w[e]))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return moe_dispatch(x, weights, idx, self.num_experts, self.linear, dense=self.dense)


class ExpertGroups:
    """Rows sorted by expert: how many each expert got (`counts`, on the device), and the same on the host only
    when a per-expert loop asks for it (that read is a host sync on a GPU)."""

    def __init__(self, counts: torch.Tensor, host: list[int] | None = None):
        self.counts = counts
        self._offsets = None
        self._host = host
        self.uniform = False
        self.token: torch.Tensor | None = None  # the token each row is a copy of (`moe_dispatch` sets it)

    @classmethod
    def every_expert(cls, num_experts: int, rows: int, device) -> "ExpertGroups":
        """Each expert over the same `rows` rows (the dense layout), known on the host: no sync."""
        g = cls(torch.full((num_experts,), rows, dtype=torch.long, device=device), [rows] * num_experts)
        g.uniform = True
        return g

    @property
    def offsets(self) -> torch.Tensor:
        """Where each expert's rows end, int32 `[E]` (the layout `torch._grouped_mm` takes)."""
        if self._offsets is None:
            self._offsets = torch.cumsum(self.counts, 0).to(torch.int32)
        return self._offsets

    def host(self) -> list[int]:
        if self._host is None:
            self._host = self.counts.tolist()
        return self._host

    @staticmethod
    def grouped_ok(xs: torch.Tensor, w: torch.Tensor) -> bool:
        """One `torch._grouped_mm` call for every expert, where it takes the operands: outside autograd (its CPU
        backward fails on empty experts), fp32 or bf16 on the CPU and bf16 on CUDA, strides and addresses on 16
        bytes (the kernels refuse others: a hidden or expert size that is not a multiple of 16 bytes' worth of
        elements), and on the CPU once there are at least as many rows as experts (the kernel visits every expert,
        also the empty ones: for a decoding step's one token the loop is faster there). It gives the loop's bits
        (tests check). On CUDA it is what keeps the MoE free of host syncs: the loop reads each expert's row count
        on the host, the grouped kernel takes the offsets on the device (torch runs it as one kernel on compute
        capability 9.0 and up; on older GPUs torch itself falls back to a loop). Under torch.compile, bf16 only."""
        dtypes = (torch.float32, torch.bfloat16) if xs.device.type == "cpu" else \
            (torch.bfloat16,) if xs.device.type == "cuda" else ()
        if torch.compiler.is_compiling():  # traced (`dgemma train --compile`): torch's shape function takes bf16 only
            dtypes = tuple(d for d in dtypes if d == torch.bfloat16)
        few_rows = xs.shape[0] < w.shape[0] and runtime.host_reads_free(xs.device)
        return (_GROUPED_MM and xs.dtype == w.dtype and xs.dtype in dtypes and not few_rows
                and _aligned16(xs) and _aligned16(w)
                and not (torch.is_grad_enabled() and (xs.requires_grad or w.requires_grad)))

    def grouped(self, xs: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Each expert's rows of `xs` `[M, in]` times its `w[e]` `[out, in]`, in one `torch._grouped_mm` (where
        `grouped_ok`) -> `[M, out]`."""
        return torch._grouped_mm(xs, w.transpose(1, 2), offs=self.offsets)

    def per_expert(self, xs: torch.Tensor, fn) -> torch.Tensor:
        """`fn(e, rows)` over each hit expert's rows, concatenated in order: the general path."""
        outs, start = [], 0
        for e, n in enumerate(self.host()):
            if n:
                outs.append(fn(e, xs[start:start + n]))
                start += n
        return torch.cat(outs) if len(outs) != 1 else outs[0]


_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _aligned16(t: torch.Tensor) -> bool:
    """Every stride but the unit one on a multiple of 16 bytes, and on an accelerator the address too
    (`torch._grouped_mm`'s rule: its CPU kernel takes any address, with the same bits). A memory-mapped checkpoint's
    weights sit wherever the file put them, 4 or 8 bytes off for most tensors of an fp32 safetensors file."""
    size = t.element_size()
    return ((t.device.type == "cpu" or t.data_ptr() % 16 == 0)
            and all(st == 1 or st * size % 16 == 0 for st in t.stride()))


def expert_counts(flat: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many of the routed (token, expert) pairs `flat` `[N * k]` went to each expert, `[E]` int64, computed
    where `flat` lives without reading anything back: `torch.bincount` on CUDA reads the largest index on the host
    first (a sync per MoE layer)."""
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def moe_dispatch(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, num_experts: int, linear,
                 dense: bool = False) -> torch.Tensor:
    """Route tokens to experts: x `[N, H]`, weights/idx `[N, k]` -> `[N, H]`.

    The (token, expert) pairs are sorted by expert so each hit expert runs one matmul over exactly its tokens
    (`linear(name, rows, groups)`, for gate_up_proj then down_proj); the activation runs once over all the pairs,
    and the outputs, scaled by their routing weights, are summed back per token.
    dense: every expert over every token (`Experts.dense`), the unrouted ones weighted 0.
    """
    N, k = idx.shape
    if N == 0:
        return torch.zeros_like(x)
    if dense:
        groups = ExpertGroups.every_expert(num_experts, N, x.device)
        groups.token = torch.arange(N, device=x.device).repeat(num_experts)
        gate_up = linear("gate_up_proj", x.repeat(num_experts, 1), groups)
        inner = gate_up.shape[-1] // 2
        act = gelu_tanh(gate_up[:, :inner]) * gate_up[:, inner:]
        w = torch.zeros(N, num_experts, dtype=weights.dtype, device=x.device).scatter(1, idx, weights)
        out = linear("down_proj", act, groups).view(num_experts, N, -1) * w.t()[:, :, None]
        return out.sum(0).to(x.dtype)
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // k
    groups = ExpertGroups(expert_counts(flat, num_experts))
    groups.token = token
    xs = x[token]
    gate_up = linear("gate_up_proj", xs, groups)
    inner = gate_up.shape[-1] // 2
    act = gelu_tanh(gate_up[:, :inner]) * gate_up[:, inner:]
    out = linear("down_proj", act, groups) * weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, token, out.to(x.dtype))


LAYER_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
               "post_feedforward_layernorm_1", "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2")


class Block(nn.Module):
    """Attention, then the dense MLP in parallel with the MoE, three post-norms, and the per-layer scalar."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, layer)
        self.mlp = DenseMLP(H, cfg.intermediate_size)
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        for name in LAYER_NORMS:
            setattr(self, name, RMSNorm(H, eps))
        # Two scalars: the checkpoint stores the decoder's and the encoder's separately (buffers are not tied).
        self.register_buffer("layer_scalar", torch.ones(1))
        self.register_buffer("encoder_layer_scalar", torch.ones(1))
        self.compiled = False  # DiffusionGemma.compile_denoiser

    def forward(self, h: torch.Tensor, cos, sin, ctx: "_Ctx") -> torch.Tensor:
        # Three regions of fixed shapes around the two parts that read host data (the cache's lengths, the
        # experts' row counts); `compiled_regions` swaps in torch.compile'd copies on the denoiser's canvas pass.
        project, mix, finish = compiled_regions() if ctx.denoise and self.compiled else _REGIONS
        q, k, v = project(self, h, cos, sin)
        r, dense, x, w, idx = mix(self, h, self.self_attn.attend(q, k, v, ctx))
        moe = self.experts(x, w, idx)
        return finish(self, r, dense, moe, self.layer_scalar if ctx.denoise else self.encoder_layer_scalar)

    def _project(self, h, cos, sin):
        return self.self_attn.project(self.input_layernorm(h), cos, sin)

    def _mix(self, h, attn):
        """The residual after attention; the dense MLP's branch; the MoE's input and routing."""
        r = h + self.post_attention_layernorm(self.self_attn.merge(attn))
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(r)))
        flat = r.reshape(-1, r.shape[-1])
        w, idx = self.router(flat)  # routes on the raw residual, not a normed copy
        return r, dense, self.pre_feedforward_layernorm_2(flat), w, idx

    def _finish(self, r, dense, moe, scalar):
        return (r + self.post_feedforward_layernorm(dense + self.post_feedforward_layernorm_2(moe.reshape(r.shape)))
                ) * scalar


def _checkpointed(layer: Block, h: torch.Tensor, cos, sin, ctx: "_Ctx") -> torch.Tensor:
    """`layer(h, cos, sin, ctx)` under activation checkpointing (`DiffusionGemma.gradient_checkpointing_enable`).

    The backward runs the layer a second time. An encoder layer also writes its K/V into the cache, which by then
    holds them (and the denoiser has read them, with gradients flowing back into the first run's tensors): the rerun
    must see the cache as the first run did and leave it as it is, which the cache does in `replay` (the training
    cache, `train.loss.TrainCache`; an inference cache is written under no_grad and never gets here).
    """
    cache = ctx.cache if not ctx.denoise else None
    if cache is None:
        return checkpoint(layer, h, cos, sin, ctx, use_reentrant=False)
    if not hasattr(cache, "replay"):
        raise ValueError(f"gradient checkpointing of an encoder pass needs a cache that can replay its writes; "
                         f"{type(cache).__name__} cannot (train through train.loss.TrainCache)")
    index = layer.self_attn.layer
    before = cache.layer_state(index)
    rerun = False

    def run(x):
        nonlocal rerun
        if not rerun:  # the forward's own run
            rerun = True
            return layer(x, cos, sin, ctx)
        with cache.replay(index, before):
            return layer(x, cos, sin, ctx)

    return checkpoint(run, h, use_reentrant=False)


_REGIONS = (Block._project, Block._mix, Block._finish)
_COMPILED: tuple | None = None


def compiled_regions() -> tuple:
    """`Block`'s three regions through torch.compile (Inductor), made once per process and shared by every layer
    and model: the blocks are arguments, so layers of one shape share a graph. Shapes are static on first use and
    turn dynamic if a second row count or canvas length shows up (torch's automatic dynamic shapes)."""
    global _COMPILED
    if _COMPILED is None:
        from torch import _dynamo

        # one graph per layer kind (sliding / full), per weight format and per static/dynamic shape
        _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, 64)
        # emulate_precision_casts: round every bf16/fp16 intermediate as eager does (one rounding per op, not one
        # per fused kernel), so the fused regions give eager's bits in every dtype.
        _COMPILED = tuple(torch.compile(f, options={"emulate_precision_casts": True}) for f in _REGIONS)
    return _COMPILED


class SelfConditioning(nn.Module):
    """`post_norm(e_canvas + MLP(pre_norm(s)))` where s is the previous step's soft embedding (0 on a first step)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H = cfg.hidden_size
        self.pre_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.post_norm = RMSNorm(H, cfg.rms_norm_eps, with_scale=False)
        self.gate_proj = nn.Linear(H, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(H, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, H, bias=False)

    def forward(self, e: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        if s is None:
            # MLP(pre_norm(0)) = 0 exactly (no biases), so skip the work: the input is just post_norm(e).
            return self.post_norm(e)
        n = self.pre_norm(s)
        return self.post_norm(e + self.down_proj(gelu_tanh(self.gate_proj(n)) * self.up_proj(n)))


class _Ctx:
    """What every layer of one forward needs to know: the cache, the flag, positions and slot layouts."""

    __slots__ = ("cache", "denoise", "positions", "n_valid", "slots", "known", "valid", "block")

    def __init__(self, cache, denoise, positions, n_valid, slots, known=None, valid=None, block=None):
        self.cache, self.denoise, self.positions, self.n_valid, self.slots = cache, denoise, positions, n_valid, slots
        self.known = known
        self.valid = valid  # n_valid as host ints, where the caller knows them (with `known`)
        self.block = block  # [B, T] image-span id of each new token (-1 text), or None: no image in this forward


class DiffusionGemma(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_conditioning = SelfConditioning(cfg)
        self.gradient_checkpointing = False  # gradient_checkpointing_enable
        self.rebuild_buffers()

    def rebuild_buffers(self, device=None) -> None:
        """(Re)create the non-persistent RoPE tables, e.g. after loading onto a model built on the meta device."""
        for kind in sorted(set(self.cfg.layer_types)):  # fixed order: DDP pairs buffers by position across processes
            inv = rope_inv_freq(self.cfg, kind)
            self.register_buffer(f"inv_freq_{kind}", inv if device is None else inv.to(device), persistent=False)

    # ------------------------------------------------------------------ helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype  # a float tensor whatever is quantized (the embedding may hold int8 codes)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def embedding(self):
        """The embedding / tied LM head matrix `[V, H]` as the model reads it: the weight tensor, or on a model whose
        embedding is quantized (`dgemma quantize --embeddings`) a `quant.QuantRows`, which gathers and slices
        the same way, dequantizing only what is read."""
        E = self.embed_tokens
        return E.weight if isinstance(E, nn.Embedding) else E.rows(self.dtype)

    def embed_scale(self, dtype=None) -> torch.Tensor:
        # The scale is rounded to the weight dtype first (bf16: sqrt(2816) = 53.0, not 53.07), as the reference does.
        return torch.tensor(self.cfg.embed_scale, dtype=torch.float32).to(dtype or self.dtype)

    def soft_embed(self, sc_logits: torch.Tensor) -> torch.Tensor:
        """Self-conditioning input from the previous step's processed logits: `softmax(l) @ E * scale` `[B,T,H]`."""
        E = self.embedding()
        p = F.softmax(sc_logits, dim=-1, dtype=torch.float32).to(E.dtype)
        soft = p @ E if isinstance(E, torch.Tensor) else E.matmul(p, vocab_block(p.device))
        return soft * self.embed_scale(E.dtype)

    def soft_embed_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """`soft_embed(logits(h))` without the logits: the softmax over the vocabulary is accumulated one `vocab_block`
        at a time against a running max (as flash attention's softmax), so `[..., V]` is never held. Training's first
        self-conditioning pass feeds its second this way at wide vocabularies (at the real 262,144 the logits and
        softmax of one canvas row would be 512 MiB). Equal to `soft_embed(logits(h))` to float rounding."""
        E, V, H = self.embedding(), self.cfg.vocab_size, self.cfg.hidden_size
        flat = h.reshape(-1, H)
        top = torch.full((flat.shape[0], 1), -math.inf, dtype=torch.float32, device=h.device)
        total = torch.zeros_like(top)
        acc = torch.zeros(flat.shape[0], H, dtype=torch.float32, device=h.device)
        block = vocab_block(h.device)
        for lo in range(0, V, block):
            hi = min(lo + block, V)
            x = head_block_logits(flat, E, lo, hi, self.cfg.final_logit_softcapping)
            new = torch.maximum(top, x.amax(-1, keepdim=True))
            carry = torch.exp(top - new)  # 0 on the first block
            e = torch.exp(x - new)
            total = total * carry + e.sum(-1, keepdim=True)
            acc = acc * carry + (e.to(E.dtype) @ E[lo:hi]).float()
            top = new
        return (acc / total).to(E.dtype).view(*h.shape[:-1], H) * self.embed_scale(E.dtype)

    def logits(self, h: torch.Tensor, blocked: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tied LM head, in fp32, soft-capped: `cap * tanh(h E^T / cap)`, `[..., H] -> [..., V]`.

        blocked=True computes `vocab_block` entries per matmul, the bits the fused sampler step sees; blocked=False
        is one matmul over the whole vocabulary, the bits transformers' lm_head gives (for replaying its draws).
        out: a contiguous fp32 buffer of the result's size to write into (blocked only). Reusing one matters at
        large vocabularies: a fresh 256 MiB tensor is new memory, and touching it costs ~90 ms of page faults here.
        """
        E, V = self.embedding(), self.cfg.vocab_size
        if not blocked:
            return head_block_logits(h, E, 0, V, self.cfg.final_logit_softcapping, exact=True)
        flat = h.reshape(-1, h.shape[-1])
        if out is None:
            out = torch.empty(flat.shape[0], V, dtype=torch.float32, device=h.device)
        elif out.dtype != torch.float32 or out.numel() != flat.shape[0] * V or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous float32 tensor of {flat.shape[0] * V} elements")
        out = out.view(flat.shape[0], V)
        block = vocab_block(h.device)
        for lo in range(0, V, block):
            hi = min(lo + block, V)
            out[:, lo:hi] = head_block_logits(flat, E, lo, hi, self.cfg.final_logit_softcapping)
        return out.view(*h.shape[:-1], V)

    def new_cache(self, rows: int, max_len: int, **kw) -> KVCache:
        kw.setdefault("dtype", self.dtype)
        kw.setdefault("device", self.device)
        return KVCache(self.cfg, rows, max_len, **kw)

    # ------------------------------------------------------------------ forward
    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, *, denoise: bool = False,
                sc: torch.Tensor | None = None, n_valid: torch.Tensor | None = None,
                head: bool = True, known_lengths: list[int] | None = None,
                adapters: list[int] | None = None, valid_lengths: list[int] | None = None,
                images: list | None = None) -> torch.Tensor:
        """Run the stack over `ids` `[B, T]` placed right after each row's cached context.

        denoise=False (encode): causal; writes the K/V of the first `n_valid[b]` tokens of each row into `cache`
            and advances its lengths. Used for prefill, for committing a canvas, and for autoregressive decoding.
        denoise=True: bidirectional over the canvas, reads the cache and leaves it untouched; `sc` `[B, T, H]` is
            the self-conditioning soft embedding (None on a canvas's first step).
        known_lengths: every row's cached length as host ints (exactly `cache.lengths`), when the caller tracks
            them: attention then reads only each row's filled slots (see `Attention._per_row`).
        valid_lengths: with known_lengths, `n_valid` as host ints: each row's attention then runs over its own
            tokens only, not the padding up to the longest row's (so a row's bits do not depend on the others).
        adapters: each row's LoRA adapter, 0 = none, on a model serving several (`adapters.attach_adapters`).
        images (encode only): per row, a list of (offset, features `[n, H]`): the input embeddings of the n new
            tokens from `offset` are the features (an image's soft tokens, `vision.VisionTower.features`), and
            those n tokens attend to each other both ways. A span is never cut by the forward's end.
        Returns fp32 soft-capped logits `[B, T, V]`, or the final-normed hidden states if head=False.
        """
        sel = getattr(self, "served_adapters", None)
        if sel is None:
            if adapters is not None and any(adapters):
                raise ValueError("this model serves no LoRA adapters")
            return self._forward(ids, cache, denoise, sc, n_valid, head, known_lengths, valid_lengths, images)
        if adapters is not None and len(adapters) != ids.shape[0]:
            raise ValueError("adapters needs one adapter per row")
        sel.set(adapters, ids.shape[1], ids.device)
        try:
            return self._forward(ids, cache, denoise, sc, n_valid, head, known_lengths, valid_lengths, images)
        finally:
            sel.clear()

    def _forward(self, ids, cache, denoise, sc, n_valid, head, known_lengths, valid_lengths=None,
                 images=None) -> torch.Tensor:
        B, T = ids.shape
        if cache is not None:
            lengths = cache.lengths
            if n_valid is None:
                n_valid = torch.full((B,), T, dtype=torch.long, device=ids.device)
            if not denoise:
                cache.check_room(n_valid)
            positions = lengths[:, None] + torch.arange(T, device=ids.device)[None, :]
            slots = None if known_lengths is not None else \
                {cap: cache.slot_positions(cap) for cap in set(cache.capacity)}
        else:
            positions = torch.arange(T, device=ids.device)[None, :].expand(B, T)
            slots = None
        if known_lengths is not None:
            if cache is None or len(known_lengths) != B:
                raise ValueError("known_lengths needs a cache and one length per row")
            # A wrong length would silently drop or add keys. The check is free where the lengths live on the
            # host (the CPU, where the tests run); on a GPU it would be a sync, so there they are trusted.
            if runtime.host_reads_free(lengths.device) and lengths.tolist() != list(known_lengths):
                raise ValueError(f"known_lengths {list(known_lengths)} differ from the cache's {lengths.tolist()}")
        if valid_lengths is not None and (known_lengths is None or len(valid_lengths) != B
                                          or not all(0 < v <= T for v in valid_lengths)):
            raise ValueError("valid_lengths needs known_lengths and one length in 1..T per row")
        block = None
        if images is not None and any(images):
            if denoise or len(images) != B:
                raise ValueError("images go into the encoder, one list per row")
            block = torch.full((B, T), -1, dtype=torch.long, device=ids.device)
        ctx = _Ctx(cache, denoise, positions, n_valid, slots, known_lengths, valid_lengths, block)

        E = self.embed_tokens
        h = (E(ids) if isinstance(E, nn.Embedding) else self.embedding()[ids]) * self.embed_scale()
        if block is not None:
            for b, row in enumerate(images):
                for j, (off, feats) in enumerate(row or ()):
                    n = feats.shape[0]
                    if not 0 <= off <= T - n:
                        raise ValueError(f"an image's {n} tokens at {off} do not fit in {T}")
                    h[b, off:off + n] = feats.to(h.dtype)
                    block[b, off:off + n] = j
        if denoise:
            h = self.self_conditioning(h, sc)
        rope = {kind: rope_cos_sin(getattr(self, f"inv_freq_{kind}"), positions, h.dtype)
                for kind in set(self.cfg.layer_types)}
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for layer, block in zip(self.layers, self.cfg.layer_types):
            h = _checkpointed(layer, h, *rope[block], ctx) if recompute else layer(h, *rope[block], ctx)
        if cache is not None and not denoise:
            cache.advance(n_valid)
        h = self.norm(h)
        return self.logits(h) if head else h

    def encode(self, ids, cache, n_valid=None, head=True, known_lengths=None, adapters=None, valid_lengths=None,
               images=None):
        return self.forward(ids, cache, denoise=False, n_valid=n_valid, head=head, known_lengths=known_lengths,
                            adapters=adapters, valid_lengths=valid_lengths, images=images)

    def denoise(self, canvas, cache, sc=None, head=True, known_lengths=None, adapters=None):
        return self.forward(canvas, cache, denoise=True, sc=sc, head=head, known_lengths=known_lengths,
                            adapters=adapters)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> "DiffusionGemma":
        """Random weights as transformers initialises them (normal(0, 0.02), norms and scales at one)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.cfg.initializer_range
        for name, p in self.named_parameters():
            if name.endswith(("norm.weight", "router.scale", "per_expert_scale")) or "layernorm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    def compile_denoiser(self, enable: bool = True, warm_up: bool = True) -> "DiffusionGemma":
        """Run the denoiser's canvas pass through torch.compile (`--compile`; off by default: BENCHMARKS.md).

        What compiles is each layer's three fixed-shape regions (`Block.forward`): norms, projections, RoPE, the
        dense MLP, the router and the residual sums, fused by Inductor. Attention over the cache and the experts'
        dispatch stay eager (they read host data), and so does the encoder, whose length changes with every
        prompt. The compiled pass gives the eager pass's bits (the reductions run as eager's kernels, bf16
        intermediates are rounded as eager rounds them), so a seed gives the same tokens. warm_up: compile now, on
        a one-row canvas, instead of on the first request (a missing C++ compiler then fails here, as a
        CompileError)."""
        if enable and getattr(self, "served_adapters", None) is not None:
            raise CompileError("torch.compile does not apply to a model serving several LoRA adapters; run "
                               "without --compile")
        for layer in self.layers:
            layer.compiled = enable
        if enable and warm_up:
            canvas = torch.zeros(1, self.cfg.canvas_length, dtype=torch.long, device=self.device)
            try:
                with torch.no_grad():
                    self.denoise(canvas, self.new_cache(1, 1), known_lengths=[0], head=False)
            except Exception as e:  # Inductor's failures come as many types (no compiler, no headers, ...)
                for layer in self.layers:
                    layer.compiled = False
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise CompileError(f"torch.compile failed on this machine ({first[:300]}); run without --compile"
                                   ) from e
        return self

    def gradient_checkpointing_enable(self, enable: bool = True) -> "DiffusionGemma":
        """Activation checkpointing (`dgemma train --gradient-checkpointing`, transformers' method of the same name):
        a forward that records gradients keeps only each layer's input, and the backward runs the layer again to
        get what it needs. The activations kept fall from every layer's (attention, the dense MLP, every expert's
        inner rows) to one hidden state per layer, for one more forward's time; losses and gradients stay the same.
        Inference (no gradients) is unaffected."""
        self.gradient_checkpointing = enable
        return self

    def gradient_checkpointing_disable(self) -> "DiffusionGemma":
        return self.gradient_checkpointing_enable(False)

    def set_dense_experts(self, dense: bool) -> "DiffusionGemma":
        """Every expert over every token (see `Experts`), in every MoE layer, quantized and LoRA ones included."""
        for m in self.modules():
            if hasattr(m, "num_experts") and hasattr(m, "dense"):
                m.dense = dense
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

