"""The engine on an accelerator: run where CUDA is (`bench/cuda_check.sh` runs them on a lent GPU), skipped here.

`DGEMMA_TEST_DEVICE=cpu` runs them on the CPU, to check the tests themselves where no GPU is at hand.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from conftest import HAVE_CXX, randomize, tiny_config
from dgemma.generate import GenerationParams, generate
from dgemma.model import DiffusionGemma
from dgemma.quant import QuantConfig, quantize_model
from dgemma.sampler import SamplerConfig

DEVICE = os.environ.get("DGEMMA_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no CUDA device (DGEMMA_TEST_DEVICE=cpu runs these on the CPU)")


def _model(dtype=torch.float32, seed=1):
    return randomize(DiffusionGemma(tiny_config("a")), seed=seed).eval().to(dtype)


def _passes(model, device):
    """Encode, denoise, denoise with self-conditioning: the three outputs as fp32 CPU tensors."""
    g = torch.Generator().manual_seed(0)
    V, T = model.cfg.vocab_size, model.cfg.canvas_length
    prompt = torch.randint(0, V, (2, 9), generator=g).to(device)
    canvas = torch.randint(0, V, (2, T), generator=g).to(device)
    with torch.no_grad():
        cache = model.new_cache(2, 64)
        enc = model.encode(prompt, cache, known_lengths=[0, 0])
        den = model.denoise(canvas, cache, known_lengths=[9, 9])
        den2 = model.denoise(canvas, cache, sc=model.soft_embed(den / 0.8), known_lengths=[9, 9])
    return [t.float().cpu() for t in (enc, den, den2)]


def test_logits_match_the_cpu():
    cpu = _model()
    dev = copy.deepcopy(cpu).to(DEVICE)
    for a, b in zip(_passes(cpu, "cpu"), _passes(dev, DEVICE)):
        assert (a - b).abs().max() < 1e-4


def test_fused_and_plain_paths_give_the_same_tokens():
    model = _model().to(DEVICE)
    T = model.cfg.canvas_length
    params = GenerationParams(max_new_tokens=2 * T, seed=3, ignore_eos=True,
                              sampler=SamplerConfig(max_denoising_steps=5, entropy_bound=0.5))
    prompts = [[2, 17, 99, 5, 230], [2, 8, 41, 77, 12, 300, 9]]
    plain = [d.tokens for d in generate(model, prompts, params, fused_head=False)]
    assert [d.tokens for d in generate(model, prompts, params, fused_head=True)] == plain
    assert [len(t) for t in plain] == [2 * T, 2 * T]


def test_a_seed_gives_the_same_tokens_twice():
    model = _model(torch.bfloat16 if DEVICE != "cpu" else torch.float32).to(DEVICE)
    params = GenerationParams(max_new_tokens=3 * model.cfg.canvas_length, seed=5, ignore_eos=True)
    prompts = [[2, 40, 41, 42], [2, 50, 51, 52, 53, 54]]
    first = [d.tokens for d in generate(model, prompts, params)]
    assert [d.tokens for d in generate(model, prompts, params)] == first


def test_a_row_gets_its_own_tokens_in_any_batch():
    """Batch invariance on the device, in bf16 (its default dtype): prompts of several lengths admitted together
    and one by one while others run give each row the tokens it gets alone. Holds bit for bit on the CPU (README,
    Randomness); on a GPU the matmul kernels are chosen by shape, so this measures whether it holds there."""
    from dgemma.generate import Done, Engine

    model = _model(torch.bfloat16).to(DEVICE)
    T = model.cfg.canvas_length
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, model.cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 23, 12, 40, 9)]
    params = [GenerationParams(max_new_tokens=2 * T, seed=s, ignore_eos=True,
                               sampler=SamplerConfig(max_denoising_steps=4)) for s in range(len(prompts))]
    alone = [generate(model, [p], prm)[0].tokens for p, prm in zip(prompts, params)]
    assert [d.tokens for d in generate(model, prompts, params)] == alone
    engine, ids, got = Engine(model, max_rows=3, max_len=256), {}, {}
    pending = list(range(len(prompts)))
    while pending or engine.busy:
        if pending and engine.free:
            i = pending.pop(0)
            ids[engine.add(prompts[i], params[i])] = i
        for ev in engine.step():
            if isinstance(ev, Done):
                got[ids[ev.request]] = ev.tokens
    assert [got[i] for i in range(len(prompts))] == alone


@pytest.mark.parametrize("scheme", [QuantConfig("int8"), QuantConfig("int4", 32)], ids=["int8", "int4"])
def test_quantized_model_runs_on_the_device(scheme):
    base = _model()
    cpu = quantize_model(copy.deepcopy(base), scheme)
    dev = copy.deepcopy(cpu).to(DEVICE)
    for a, b in zip(_passes(cpu, "cpu"), _passes(dev, DEVICE)):
        assert (a - b).abs().max() < 1e-4


def test_quantized_as_it_loads_onto_the_device(tmp_path):
    """`--quantization` with `--device cuda`: quantized on the host as it loads (dgemma quantize's bits), then moved."""
    from dgemma.weights import load_model, save_model

    save_model(_model(), tmp_path / "m")
    scheme = QuantConfig("int4", 32)
    cpu = load_model(tmp_path / "m", quantize=scheme)
    dev = load_model(tmp_path / "m", quantize=scheme, device=DEVICE)
    for k, v in dev.state_dict().items():
        assert v.device.type == torch.device(DEVICE).type and torch.equal(v.cpu(), cpu.state_dict()[k]), k
    for a, b in zip(_passes(cpu, "cpu"), _passes(dev, DEVICE)):
        assert (a - b).abs().max() < 1e-4


def test_a_denoising_step_does_not_sync(monkeypatch):
    """The canvas forward and the fused sampler step queue their kernels without waiting for the device: on CUDA
    under torch's sync debug mode set to raise (which sees every wait, also inside ops); on the CPU under HostSyncs
    with the accelerator's choices (which there cannot tell a host tensor's read from a device tensor's)."""
    from dgemma import runtime
    from dgemma import sampler as S
    from dgemma.runtime import HostSyncs

    if DEVICE == "cpu":
        monkeypatch.setattr(runtime, "host_reads_free", lambda device: False)
    model = _model(torch.bfloat16).to(DEVICE)
    V, T = model.cfg.vocab_size, model.cfg.canvas_length
    g = torch.Generator().manual_seed(0)
    cache = model.new_cache(2, 64)
    with torch.no_grad():
        model.encode(torch.randint(0, V, (2, 9), generator=g).to(DEVICE), cache, known_lengths=[0, 0])
        canvas = torch.randint(0, V, (2, T), generator=g).to(DEVICE)
        draws = S.draw_step_noise([torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)], T, V, DEVICE)
        k = torch.tensor([4, 4], device=DEVICE)
        cuda = DEVICE != "cpu"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            with HostSyncs() as syncs:
                h = model.denoise(canvas, cache, head=False, known_lengths=[9, 9])
                out = S.fused_head_step(h, model.embed_tokens.weight, model.cfg.final_logit_softcapping, k,
                                        SamplerConfig(), draws=draws, embed_scale=2.0)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    assert out.canvas.shape == (2, T)
    if not cuda:
        assert syncs.found == []


@pytest.mark.skipif(DEVICE == "cpu" and not HAVE_CXX, reason="torch.compile needs a C++ compiler on the CPU")
def test_compiled_denoiser_gives_eager_bits_on_the_device():
    model = _model(torch.bfloat16).to(DEVICE)
    compiled = copy.deepcopy(model).compile_denoiser()
    for a, b in zip(_passes(model, DEVICE), _passes(compiled, DEVICE)):
        assert torch.equal(a, b)


def test_images_on_the_device():
    """The vision tower and an image prompt on the device: features as on the CPU, and a generation that runs."""
    import numpy as np
    from PIL import Image as PILImage

    from dgemma import vision

    cfg = tiny_config("a", image_token_id=300, boi_token_id=301, eoi_token_id=302, vision_soft_tokens_per_image=70)
    cpu = randomize(DiffusionGemma(cfg), seed=2).eval()
    vision.attach_vision(cpu, {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                               "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16,
                               "position_embedding_size": 128, "standardize": True}, seed=4)
    arr = (np.random.default_rng(0).random((100, 150, 3)) * 255).astype(np.uint8)
    image = vision.preprocess(PILImage.fromarray(arr), max_soft_tokens=70)
    want = vision.vision_tower(cpu).features(image)
    dev = copy.deepcopy(cpu).to(DEVICE)  # the tower is not a submodule: it follows the model on its next use
    got = vision.vision_tower(dev).features(image)
    assert got.device.type == torch.device(DEVICE).type
    assert (got.float().cpu() - want).abs().max().item() < 1e-4
    prompt = [2, 5, 6] + vision.image_ids(cfg, image) + [8, 9]
    params = GenerationParams(max_new_tokens=32, sampler=SamplerConfig(max_denoising_steps=4), seed=3,
                              images=(image,))
    a, b = generate(dev, [prompt], params)[0], generate(cpu, [prompt], params)[0]
    assert len(a.tokens) == len(b.tokens) or a.finish_reason == "stop"


def test_a_training_step_on_the_device_with_and_without_checkpointing():
    """The training objective on the device (encoder + AR loss, both self-conditioning passes, backward) gives the
    CPU's loss and gradients, and activation checkpointing gives the same ones there (to the kernels' rounding:
    some CUDA backward kernels sum in a run-dependent order)."""
    from test_train import batch_for, examples

    from dgemma.train.loss import ObjectiveConfig, objective

    cpu = randomize(DiffusionGemma(tiny_config("a")), seed=1)
    cfg = cpu.cfg
    b = batch_for(cfg, examples(cfg, [(5, 30), (7, 12), (4, 20)]), sc_prob=0.5)
    b.self_condition = torch.tensor([True, False, True])

    def step(model, batch, checkpointing):
        model.gradient_checkpointing_enable(checkpointing).zero_grad(set_to_none=True)
        loss, _ = objective(model, batch, ObjectiveConfig(), canvas_norm=float(batch.clean.numel()), ar_norm=10.0)
        loss.backward()
        return loss.item(), {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}

    want_loss, want = step(cpu, b, False)
    dev = copy.deepcopy(cpu).to(DEVICE)
    for checkpointing in (False, True):
        loss, grads = step(dev, b.to(DEVICE), checkpointing)
        assert loss == pytest.approx(want_loss, abs=1e-4) and grads.keys() == want.keys()
        assert all((grads[k] - want[k]).abs().max() <= 1e-3 * (1 + want[k].abs().max()) for k in want), checkpointing
