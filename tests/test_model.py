"""The model's fast kernels against their plain definitions, bit for bit, and the bench's FLOP count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import dgemma.model as M
from conftest import randomize, tiny_config
from dgemma.bench import canvas_forward_flops
from dgemma.model import DiffusionGemma, Experts, RMSNorm, apply_rope, moe_dispatch, rope_cos_sin


def _loop_moe(ex: Experts, x, w, idx):
    """The MoE by its definition: every token through each of its experts, one token at a time."""
    y = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[n, j])
            gate, up = F.linear(x[n:n + 1], ex.gate_up_proj[e]).chunk(2, dim=-1)
            y[n] += (F.linear(M.gelu_tanh(gate) * up, ex.down_proj[e]) * w[n, j])[0]
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [0, 1, 7, 40])
def test_grouped_experts_equal_the_per_expert_loop(dtype, tokens, monkeypatch):
    cfg = tiny_config("b")  # 6 experts, top-3
    ex = Experts(cfg)
    g = torch.Generator().manual_seed(tokens)
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(ex.gate_up_proj.shape, generator=g) * 0.2)
        ex.down_proj.copy_(torch.randn(ex.down_proj.shape, generator=g) * 0.2)
    ex = ex.to(dtype)
    x = torch.randn(tokens, cfg.hidden_size, generator=g).to(dtype)
    # experts 1 and 4 get no tokens: empty groups in the middle of the grouped matmul
    idx = torch.stack([torch.randperm(cfg.num_experts, generator=g)[:cfg.top_k_experts] for _ in range(tokens)]) \
        if tokens else torch.zeros(0, cfg.top_k_experts, dtype=torch.long)
    idx = torch.where(idx == 1, 0, torch.where(idx == 4, 5, idx))
    w = torch.rand(tokens, cfg.top_k_experts, generator=g).to(dtype)
    with torch.no_grad():
        grouped = ex(x, w, idx)
        # an accelerator's choice: the grouped matmul also for fewer rows than experts (no host read of the counts)
        monkeypatch.setattr(M.runtime, "host_reads_free", lambda device: False)
        always_grouped = ex(x, w, idx)
        monkeypatch.setattr(M, "_GROUPED_MM", False)
        loop = ex(x, w, idx)
    assert torch.equal(grouped, loop) and torch.equal(always_grouped, loop)
    assert grouped.shape == x.shape
    if tokens and dtype == torch.float32:
        torch.testing.assert_close(grouped, _loop_moe(ex, x, w, idx), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_off_16_bytes_in_memory_take_the_grouped_matmul_on_the_cpu(dtype, monkeypatch):
    """A memory-mapped checkpoint's weights sit where the file put them (most tensors of an fp32 safetensors file
    4 or 8 bytes off 16): the CPU's grouped matmul takes any address, with the loop's bits."""
    cfg = tiny_config("b")
    ex = Experts(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ex.parameters():  # each weight 1 element past an aligned buffer's start
            buf = torch.empty(p.numel() + 1, dtype=dtype)
            p.data = buf[1:].view(p.shape).copy_(torch.randn(p.shape, generator=g) * 0.2)
    assert ex.gate_up_proj.data_ptr() % 16 and ex.down_proj.data_ptr() % 16
    x = torch.randn(40, cfg.hidden_size, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(cfg.num_experts, generator=g)[:cfg.top_k_experts] for _ in range(40)])
    w = torch.rand(40, cfg.top_k_experts, generator=g).to(dtype)
    calls = []
    grouped_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or grouped_mm(*a, **k))
    with torch.no_grad():
        grouped = ex(x, w, idx)
        assert len(calls) == 2  # gate_up and down
        monkeypatch.setattr(M, "_GROUPED_MM", False)
        assert torch.equal(grouped, ex(x, w, idx))


def test_experts_train_through_the_loop():
    """Under autograd (training) the per-expert loop runs, and gradients reach every hit expert."""
    cfg = tiny_config("a")
    ex = randomize(DiffusionGemma(cfg)).layers[0].experts
    x = torch.randn(9, cfg.hidden_size, requires_grad=True)
    w, idx = torch.rand(9, 2), torch.randint(0, cfg.num_experts, (9, 2))
    moe_dispatch(x, w, idx, ex.num_experts, ex.linear).square().sum().backward()
    hit = idx.unique()
    assert x.grad is not None and ex.gate_up_proj.grad[hit].abs().sum(dim=(1, 2)).gt(0).all()


def _routed(cfg, tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cfg.hidden_size, generator=g)
    idx = torch.stack([torch.randperm(cfg.num_experts, generator=g)[:cfg.top_k_experts] for _ in range(tokens)])
    return x, torch.rand(tokens, cfg.top_k_experts, generator=g), idx


def test_dense_experts_compute_the_routed_function_and_its_gradients():
    """`dense` runs every expert over every token, weighted 0 where not routed: the same outputs and gradients as
    the routed path (to float rounding), for the plain, quantized and LoRA experts."""
    from dgemma.quant import Int8, QuantExperts
    from dgemma.train.lora import LoRAConfig, apply_lora

    cfg = tiny_config("b")  # 6 experts, top-3
    model = randomize(DiffusionGemma(cfg))
    x, w, idx = _routed(cfg, 23)
    ex = model.layers[0].experts
    quant = QuantExperts.from_experts(ex, Int8())
    for mod in (ex, quant):
        sorted_ = mod(x, w, idx)
        mod.dense = True
        torch.testing.assert_close(mod(x, w, idx), sorted_, rtol=1e-5, atol=1e-6)
        mod.dense = False
    xg = x.clone().requires_grad_(True)
    grads = []
    for dense in (False, True):
        ex.dense = dense
        ex.zero_grad()
        xg.grad = None
        ex(xg, w, idx).square().sum().backward()
        grads.append((xg.grad.clone(), ex.gate_up_proj.grad.clone(), ex.down_proj.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the model switch reaches LoRA experts too, and the adapted model gives the same logits either way
    apply_lora(model, LoRAConfig(4, 8.0, ("all",)), seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or n.endswith("_B"):
                p.normal_(0, 0.1)
    ids = torch.randint(5, cfg.vocab_size, (2, 9))
    routed = model(ids, denoise=True)
    model.set_dense_experts(True)
    assert all(layer.experts.dense and layer.experts.base.dense for layer in model.layers)  # LoRAExperts(Experts)
    torch.testing.assert_close(model(ids, denoise=True), routed, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_rope_keep_the_reference_bits(dtype):
    g = torch.Generator().manual_seed(0)
    for shape, scale in (((2, 37, 64), 1.0), ((1, 9, 4, 32), 30.0), ((3, 5, 48), 1e-3)):
        x = (torch.randn(shape, generator=g) * scale).to(dtype)
        for norm in (RMSNorm(shape[-1]), RMSNorm(shape[-1], with_scale=False)):
            if norm.weight is not None:
                norm.weight.data = torch.rand(shape[-1], generator=g) * 2
            xf = x.float()  # transformers' Gemma4RMSNorm, op for op
            ref = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + norm.eps, -0.5)
            ref = (ref * norm.weight.float() if norm.weight is not None else ref).type_as(x)
            assert torch.equal(norm(x), ref)
    cfg = tiny_config("a")
    q = torch.randn(2, 7, 4, cfg.head_dim, generator=g).to(dtype)
    positions = torch.arange(7)[None].expand(2, 7) + torch.tensor([[0], [5]])
    cos, signed_sin = rope_cos_sin(M.rope_inv_freq(cfg, cfg.layer_types[0]), positions, dtype)
    half = cfg.head_dim // 2
    sin = torch.cat([-signed_sin[..., :half], signed_sin[..., half:]], dim=-1)  # the plain sin table
    rotate_half = torch.cat([-q[..., half:], q[..., :half]], dim=-1)
    assert torch.equal(apply_rope(q, cos, signed_sin), q * cos[:, :, None] + rotate_half * sin[:, :, None])


@pytest.mark.parametrize("name", ["a", "b", "c"])
@pytest.mark.parametrize("sc", [False, True])
def test_bench_flop_count_matches_torch_counter(name, sc, monkeypatch):
    """`canvas_forward_flops` (the numerator of the bench's share of peak) against torch's own FLOP counter,
    with attention in its math form and the experts in their loop so that every matmul is visible to it."""
    cfg = tiny_config(name)
    model = randomize(DiffusionGemma(cfg)).eval()
    prompt = 13
    cache = model.new_cache(1, prompt + cfg.canvas_length)
    g = torch.Generator().manual_seed(1)
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=g)
    s = torch.randn(1, cfg.canvas_length, cfg.hidden_size, generator=g) if sc else None
    monkeypatch.setattr(M, "_GROUPED_MM", False)
    with torch.no_grad():
        model.encode(torch.randint(0, cfg.vocab_size, (1, prompt), generator=g), cache, known_lengths=[0])
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            model.denoise(canvas, cache, sc=s, known_lengths=[prompt])
    assert counter.get_total_flops() == canvas_forward_flops(cfg, prompt, self_conditioning=sc)


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_padded_prefill_gives_each_row_its_own_bits(name):
    """Prompts of several lengths encoded in one padded pass (the engine's prefill) give each row the hidden states
    and cached K/V it gets alone, bit for bit: with `valid_lengths` a row's attention never sums over the padding
    (masked, but more keys change how the kernel adds up the rest; that made a request's tokens depend on the
    lengths of the prompts it arrived with). In bf16, where every matmul here rounds a row the same whatever the
    rows beside it; fp32's CPU matmuls round a few rows (under 12, as an expert may get) differently from many
    (README, Randomness)."""
    model = randomize(DiffusionGemma(tiny_config(name)), seed=3).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    lengths = [5, 23, 12, 40]
    prompts = [torch.randint(3, model.cfg.vocab_size, (n,), generator=g) for n in lengths]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
    with torch.no_grad():
        cache = model.new_cache(len(lengths), 128)
        h = model.encode(ids, cache, n_valid=torch.tensor(lengths), head=False, known_lengths=[0] * len(lengths),
                         valid_lengths=lengths)
        for i, p in enumerate(prompts):
            one = model.new_cache(1, 128)
            h1 = model.encode(p[None], one, head=False, known_lengths=[0])
            assert torch.equal(h[i, :len(p)], h1[0]), (i, (h[i, :len(p)] - h1[0]).abs().max())
            for layer in range(model.cfg.num_hidden_layers):
                (k, v), (k1, v1) = cache.storage(layer), one.storage(layer)
                n = min(len(p), one.capacity[layer])  # a sliding ring's slots (its last one is trash)
                assert torch.equal(k[i, :, :n], k1[0, :, :n]) and torch.equal(v[i, :, :n], v1[0, :, :n])
