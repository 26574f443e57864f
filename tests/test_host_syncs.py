"""No host syncs inside a denoising step on an accelerator, checked on the CPU.

On a GPU every read of a tensor's values on the host (`.item()`, `.tolist()`, a truth test, `torch.bincount`,
boolean-mask indexing) waits for all queued kernels. The paths that read values on the CPU, where it is free, pick
another way where `runtime.host_reads_free(device)` is False; these tests set it False on the CPU, run a whole
denoising step (the canvas forward and the sampler step) under `runtime.HostSyncs`, and find nothing. They also
check that those choices give the CPU's own tokens, so the GPU path runs no code the CPU tests leave out.
"""

from __future__ import annotations

import pytest
import torch

import dgemma.model as M
import dgemma.sampler as S
from conftest import randomize, tiny_config
from dgemma import runtime
from dgemma.generate import GenerationParams, generate
from dgemma.model import DiffusionGemma, Experts, expert_counts
from dgemma.runtime import HostSyncs
from dgemma.sampler import SamplerConfig


@pytest.fixture
def accelerator(monkeypatch):
    """The choices made on a device where reading values on the host is a sync."""
    monkeypatch.setattr(runtime, "host_reads_free", lambda device: False)


def test_host_syncs_sees_python_and_aten_reads():
    t = torch.arange(6)
    methods = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__")}
    for read in (lambda: t.sum().item(), lambda: t.tolist(), lambda: bool(t.max() > 2), lambda: int(t[0]),
                 lambda: t[t > 2], lambda: torch.bincount(t), lambda: t.nonzero()):
        with HostSyncs() as syncs:
            read()
        assert syncs.found, read
    with HostSyncs() as syncs:
        (t * 2).cumsum(0).argsort()
        t[torch.tensor([1, 3])]
    assert syncs.found == [] and syncs.ops >= 4
    assert all(getattr(torch.Tensor, name) is m for name, m in methods.items())  # put back on exit
    assert t.sum().item() == 15


def test_expert_counts_equal_bincount():
    flat = torch.randint(0, 7, (50,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(expert_counts(flat, 9), torch.bincount(flat, minlength=9))
    assert torch.equal(expert_counts(flat[:0], 3), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden,inner", [(30, 14), (64, 33), (36, 20)])
def test_experts_of_any_size_run(dtype, hidden, inner, monkeypatch):
    """torch's grouped matmul refuses strides off 16 bytes (a hidden size of 30 in fp32, 36 in bf16): those
    layers take the per-expert loop, with the same results."""
    cfg = tiny_config("b").replace(hidden_size=hidden, moe_intermediate_size=inner)
    ex = Experts(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(ex.gate_up_proj.shape, generator=g) * 0.2)
        ex.down_proj.copy_(torch.randn(ex.down_proj.shape, generator=g) * 0.2)
    ex = ex.to(dtype)
    x = torch.randn(40, hidden, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(cfg.num_experts, generator=g)[:cfg.top_k_experts] for _ in range(40)])
    w = torch.rand(40, cfg.top_k_experts, generator=g).to(dtype)
    with torch.no_grad():
        out = ex(x, w, idx)
        monkeypatch.setattr(M, "_GROUPED_MM", False)
        assert torch.equal(out, ex(x, w, idx))


def _step(model, rows, fused, block=None):
    """One engine-shaped denoising step after a prefill: the canvas forward with the rows' lengths known on the
    host, then the sampler step (LM head fused, or over the plain head's logits)."""
    cfg = model.cfg
    V, T = cfg.vocab_size, cfg.canvas_length
    g = torch.Generator().manual_seed(0)
    lengths = [5 + 3 * r for r in range(rows)]
    cache = model.new_cache(rows, 64)
    prompt = torch.randint(0, V, (rows, max(lengths)), generator=g)
    gens = [torch.Generator().manual_seed(10 + r) for r in range(rows)]
    with torch.no_grad():
        model.encode(prompt, cache, n_valid=torch.tensor(lengths), known_lengths=[0] * rows)
        canvas = torch.randint(0, V, (rows, T), generator=g)
        sc = torch.randn(rows, T, cfg.hidden_size, generator=g).to(model.dtype)
        draws = S.draw_step_noise(gens, T, V, block=block)
        k = torch.full((rows,), 3)
        E, cap = model.embed_tokens.weight, cfg.final_logit_softcapping
        with HostSyncs() as syncs:
            h = model.denoise(canvas, cache, sc=sc, head=False, known_lengths=lengths)
            if fused:
                out = S.fused_head_step(h, E, cap, k, SamplerConfig(), draws=draws, embed_scale=2.0, block=block)
            else:
                out = S.fused_step(model.logits(h), k, SamplerConfig(), draws=draws, embedding=E, embed_scale=2.0,
                                   block=block)
    return syncs, out


@pytest.mark.parametrize("name", ["a", "b", "c"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-head", "plain-head"])
def test_a_denoising_step_reads_nothing_on_the_host(accelerator, name, dtype, fused):
    model = randomize(DiffusionGemma(tiny_config(name)), seed=2).eval().to(dtype)
    for block in (None, 96):  # the vocabulary in one block, and in four
        syncs, _ = _step(model, 2, fused, block)
        assert syncs.found == []


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_quantized_denoising_step_reads_nothing_on_the_host(accelerator, scheme):
    """int8 / int4 experts expand every expert at once for the grouped matmul on a canvas pass (same bits as one
    at a time: tests/test_quant.py), so they read no row counts either."""
    from dgemma.quant import QuantConfig, quantize_model

    model = quantize_model(randomize(DiffusionGemma(tiny_config("a")), seed=2).eval(),
                           QuantConfig(scheme, 32 if scheme == "int4" else None)).to(torch.bfloat16)
    syncs, _ = _step(model, 2, True)
    assert syncs.found == []


def test_the_cpu_path_does_read_on_the_host():
    """Without the accelerator's choices the same step does read values (the check above is not vacuous): the
    known lengths are checked against the cache, and the sampler copies switched rows by index (over several
    vocabulary blocks: 320 entries in blocks of 96)."""
    model = randomize(DiffusionGemma(tiny_config("a")), seed=2).eval()
    syncs, _ = _step(model, 2, True, block=96)
    assert "Tensor.tolist" in syncs.found and "aten.nonzero" in syncs.found


def test_the_accelerator_choices_give_the_cpu_tokens(monkeypatch):
    model = randomize(DiffusionGemma(tiny_config("b")), seed=4).eval()
    T = model.cfg.canvas_length
    params = GenerationParams(max_new_tokens=2 * T, seed=3, ignore_eos=True,
                              sampler=SamplerConfig(max_denoising_steps=5, entropy_bound=0.5))
    prompts = [[2, 17, 99, 5, 230], [2, 8, 41]]
    cpu = [d.tokens for d in generate(model, prompts, params, fused_head=True)]
    monkeypatch.setattr(runtime, "host_reads_free", lambda device: False)
    assert [d.tokens for d in generate(model, prompts, params, fused_head=True)] == cpu


def test_the_engine_takes_the_vocab_block_from_one_place(monkeypatch):
    """An accelerator's wider block (`vocab_block`) reaches the plain head, the draws and the fused step alike:
    fused = plain token for token, and the tokens differ from the CPU block's (the draws depend on the block)."""
    model = randomize(DiffusionGemma(tiny_config("a")), seed=1).eval()
    T = model.cfg.canvas_length
    params = GenerationParams(max_new_tokens=2 * T, seed=7, ignore_eos=True,
                              sampler=SamplerConfig(max_denoising_steps=4, entropy_bound=0.5))
    prompts = [[2, 17, 99, 5], [2, 8, 41, 77, 12]]
    default = [d.tokens for d in generate(model, prompts, params, fused_head=True)]
    for mod in (M, S):
        monkeypatch.setattr(mod, "vocab_block", lambda device: 96)  # 320 entries: 4 blocks, the last ragged
    fused = [d.tokens for d in generate(model, prompts, params, fused_head=True)]
    assert [d.tokens for d in generate(model, prompts, params, fused_head=False)] == fused
    assert fused != default


def test_vocab_block_by_device():
    assert M.vocab_block("cpu") == M.HEAD_BLOCK == S.FUSED_BLOCK
    assert M.vocab_block(torch.device("cuda", 1)) == M.ACCEL_HEAD_BLOCK > M.HEAD_BLOCK


def test_the_engine_sends_a_steps_inputs_before_the_forward(monkeypatch):
    """A copy from pageable host memory to a GPU waits for the device: the engine makes each step's draws and
    steps-remaining on the device before it queues the canvas forward, when the device is idle anyway."""
    model = randomize(DiffusionGemma(tiny_config("a")), seed=1).eval()
    order = []
    denoise, draw = model.denoise, S.draw_step_noise
    monkeypatch.setattr(model, "denoise", lambda *a, **k: order.append("forward") or denoise(*a, **k))
    monkeypatch.setattr(S, "draw_step_noise", lambda *a, **k: order.append("draws") or draw(*a, **k))
    params = GenerationParams(max_new_tokens=model.cfg.canvas_length, seed=7, ignore_eos=True,
                              sampler=SamplerConfig(max_denoising_steps=3, confidence_threshold=0.0))
    for fused in (True, False):
        order.clear()
        generate(model, [[2, 17, 99, 5], [2, 8]], params, fused_head=fused)
        assert order == ["draws", "forward"] * 3
