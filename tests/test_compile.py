"""`--compile`: the denoiser's canvas pass through torch.compile gives the eager pass's bits, hence the same tokens."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import HAVE_CXX, randomize, tiny_config
from dgemma.generate import GenerationParams, generate
from dgemma.model import DiffusionGemma
from dgemma.quant import QuantConfig, quantize_model

pytestmark = pytest.mark.skipif(not HAVE_CXX, reason="torch.compile (Inductor) needs a C++ compiler on the CPU")


def _passes(model, rows=2):
    """Encode a prompt, then a first denoise step and one with self-conditioning, through the engine's per-row
    attention (known lengths) and through the masked batch path; every output, hidden states and logits."""
    g = torch.Generator().manual_seed(0)
    V, T = model.cfg.vocab_size, model.cfg.canvas_length
    prompt = torch.randint(0, V, (rows, 9), generator=g)
    canvas = torch.randint(0, V, (rows, T), generator=g)
    outs = []
    with torch.no_grad():
        cache = model.new_cache(rows, 64)
        outs.append(model.encode(prompt, cache, known_lengths=[0] * rows))
        d = model.denoise(canvas, cache, known_lengths=[9] * rows)
        outs += [d, model.denoise(canvas, cache, sc=model.soft_embed(d / 0.8), known_lengths=[9] * rows)]
        outs.append(model.denoise(canvas, cache, head=False))  # no known lengths: the masked path
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_denoiser_gives_eager_bits(dtype):
    model = randomize(DiffusionGemma(tiny_config("a")), seed=1).eval().to(dtype)
    compiled = copy.deepcopy(model).compile_denoiser()
    assert all(layer.compiled for layer in compiled.layers) and not any(layer.compiled for layer in model.layers)
    for rows in (2, 1):  # a second row count: torch recompiles with dynamic shapes
        for a, b in zip(_passes(model, rows), _passes(compiled, rows)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_compiled_int8_in_bf16_gives_eager_bits(scheme):
    """Inductor would rewrite int8's dequantize + matmul into `_weight_int8pack_mm` (other bits; crashes on some
    shapes): under compile it runs as an opaque op (fp8 codes go through the same op)."""
    model = randomize(DiffusionGemma(tiny_config("a")), seed=1).eval().to(torch.bfloat16)
    model = quantize_model(model, QuantConfig(scheme))
    compiled = copy.deepcopy(model).compile_denoiser()
    for a, b in zip(_passes(model), _passes(compiled)):
        assert torch.equal(a, b)


def test_compiled_generation_same_tokens():
    model = randomize(DiffusionGemma(tiny_config("a")), seed=1).eval()
    compiled = copy.deepcopy(model).compile_denoiser()
    prompts = [[2, 17, 99, 5, 230], [2, 8, 41, 77, 12, 300, 9, 64, 3, 11, 150]]
    params = GenerationParams(max_new_tokens=3 * model.cfg.canvas_length, seed=4, ignore_eos=True)
    eager = generate(model, prompts, params)
    fast = generate(compiled, prompts, params)
    assert [d.tokens for d in fast] == [d.tokens for d in eager]
    assert [len(d.tokens) for d in fast] == [3 * model.cfg.canvas_length] * 2
    # switching it off again is the eager model
    compiled.compile_denoiser(False)
    assert not any(layer.compiled for layer in compiled.layers)
