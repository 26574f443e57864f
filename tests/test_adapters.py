"""Multi-LoRA serving: several adapters over one base, chosen per row (`dgemma.adapters`, `dgemma serve --lora`)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from conftest import randomize, tiny_config
from dgemma.adapters import AdapterError, attach_adapters
from dgemma.generate import AR, GenerationError, GenerationParams, generate
from dgemma.model import CompileError, DiffusionGemma
from dgemma.sampler import SamplerConfig
from dgemma.train.lora import LoRAConfig, apply_lora, load_adapter, save_adapter

TARGETS = [("all",), ("q_proj", "v_proj", "o_proj"), ("experts", "gate_proj", "down_proj")]


@pytest.fixture(scope="module")
def base():
    return randomize(DiffusionGemma(tiny_config("a")), seed=1).eval()


def make_adapter(base, path, targets, seed, rank=4):
    """A LoRA adapter with random, non-zero B (a trained one's shape), saved as `dgemma train` saves it."""
    m = copy.deepcopy(base)
    apply_lora(m, LoRAConfig(rank=rank, alpha=2.0 * rank, targets=targets), seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("lora_B", "_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return save_adapter(m, path)


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    return [str(make_adapter(base, d / f"ad{i}", t, i)) for i, t in enumerate(TARGETS)]


@pytest.fixture(scope="module")
def served(base, adapters):
    m = copy.deepcopy(base)
    attach_adapters(m, adapters)
    return m


def test_each_row_gets_its_own_adapter(base, adapters, served):
    """One batch, four rows: the base and three adapters (attention, dense MLP, experts, self-conditioning MLP);
    each row's encoder and denoiser outputs are its own adapter's, as the unmerged LoRA model gives them."""
    cfg = base.cfg
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (4, 12), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (4, cfg.canvas_length), generator=g)
    sc = torch.randn(4, cfg.canvas_length, cfg.hidden_size, generator=g)
    which = [0, 1, 2, 3]
    with torch.no_grad():
        cache = served.new_cache(4, 64)
        h = served.encode(ids, cache, known_lengths=[0] * 4, adapters=which)
        out = served.denoise(canvas, cache, sc=sc, known_lengths=[12] * 4, adapters=which)
        plain = base.denoise(canvas, _filled(base, ids), sc=sc, known_lengths=[12] * 4)
        for row, a in enumerate(which):
            ref = copy.deepcopy(base)
            if a:
                load_adapter(ref, adapters[a - 1])
            rc = ref.new_cache(4, 64)
            hr = ref.encode(ids, rc, known_lengths=[0] * 4)
            outr = ref.denoise(canvas, rc, sc=sc, known_lengths=[12] * 4)
            assert (h[row] - hr[row]).abs().max() < 1e-5
            assert (out[row] - outr[row]).abs().max() < 1e-4
            if a:  # and the adapter does change the output
                assert (out[row] - plain[row]).abs().max() > 1e-2
        # without adapters (or with adapter 0 everywhere) the served model is the base, bit for bit
        for which in (None, [0, 0, 0, 0]):
            again = served.denoise(canvas, _filled(served, ids), sc=sc, known_lengths=[12] * 4, adapters=which)
            assert torch.equal(again, plain)


def _filled(model, ids):
    cache = model.new_cache(ids.shape[0], 64)
    model.encode(ids, cache, known_lengths=[0] * ids.shape[0])
    return cache


def test_engine_rows_of_different_adapters(base, adapters, served):
    """Through the engine: a row's tokens are those it gets alone with its adapter, whatever the other rows run;
    rows of one prompt but different adapters do not share its encoding."""
    p = torch.randint(3, base.cfg.vocab_size, (15,), generator=torch.Generator().manual_seed(4)).tolist()
    steps = SamplerConfig(max_denoising_steps=4)
    for mode in ({}, {"mode": AR}):
        params = [GenerationParams(max_new_tokens=20, seed=7, sampler=steps, adapter=a, **mode) for a in (0, 1, 3, 1)]
        together = generate(served, [p] * 4, params)
        alone = [generate(served, [p], [prm])[0] for prm in params]
        assert [d.tokens for d in together] == [d.tokens for d in alone]
        assert [d.stats["cached_prompt_tokens"] for d in together] == [0, 0, 0, len(p)]
        assert together[1].tokens != together[0].tokens  # seed alike, adapter not
        assert alone[0].tokens == generate(base, [p], params[0])[0].tokens
    with pytest.raises(GenerationError, match="adapter must be 0 .the base. or one"):
        generate(served, [p], GenerationParams(max_new_tokens=4, adapter=4))
    with pytest.raises(GenerationError, match="adapter must be 0 .the base. or one"):
        generate(base, [p], GenerationParams(max_new_tokens=4, adapter=1))


def test_quantized_base(base, adapters):
    """An adapter is served unmerged, so it runs over a quantized base (which `--adapter` cannot fold into)."""
    from dgemma.quant import QuantConfig, quantize_model

    q = quantize_model(copy.deepcopy(base), QuantConfig("int8"))
    plain = copy.deepcopy(q)
    attach_adapters(q, adapters)
    p = torch.randint(3, base.cfg.vocab_size, (10,), generator=torch.Generator().manual_seed(5)).tolist()
    prm = GenerationParams(max_new_tokens=16, seed=2, mode=AR)
    assert generate(q, [p], prm)[0].tokens == generate(plain, [p], prm)[0].tokens
    ids = torch.tensor([p, p])
    with torch.no_grad():
        a = q.encode(ids, q.new_cache(2, 32), known_lengths=[0, 0], adapters=[0, 1])
        ref = copy.deepcopy(base)
        load_adapter(ref, adapters[0])
        r = ref.encode(ids, ref.new_cache(2, 32), known_lengths=[0, 0])
    # the adapter's row follows the unquantized adapter model to int8's rounding, and differs from the base row
    assert (a[1] - r[1]).abs().max() < (a[1] - a[0]).abs().max()


def test_adapter_over_a_base_quantized_as_it_loads(base, adapters, tmp_path):
    """`--adapter` with `--quantization`: the base quantized as it loads, the adapter kept unmerged over it."""
    from dgemma.pipeline import Pipeline
    from dgemma.quant import QuantConfig, QuantLinear, quantize_model
    from dgemma.train.lora import LoRALinear
    from dgemma.weights import save_model

    save_model(base, tmp_path / "base")
    pipe = Pipeline.load(str(tmp_path / "base"), adapter=adapters[1], quantization="int8", dtype=torch.float32,
                         device="cpu", quiet=True)
    q_proj = pipe.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoRALinear) and isinstance(q_proj.base, QuantLinear)
    ref = quantize_model(copy.deepcopy(base), QuantConfig("int8"))
    load_adapter(ref, adapters[1])
    ids = torch.randint(3, base.cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = pipe.model.encode(ids, pipe.model.new_cache(1, 16))
        b = ref.encode(ids, ref.new_cache(1, 16))
    assert torch.allclose(a, b, atol=1e-5)


def test_bad_adapters(base, adapters, served, tmp_path):
    other = randomize(DiffusionGemma(tiny_config("c")), seed=1)
    wrong = make_adapter(other, tmp_path / "other", ("q_proj",), 0)
    with pytest.raises(AdapterError, match="other"):
        attach_adapters(copy.deepcopy(base), [adapters[0], str(wrong)])
    with pytest.raises(AdapterError, match="not a LoRA adapter"):
        attach_adapters(copy.deepcopy(base), [str(tmp_path)])
    with pytest.raises(AdapterError, match="already"):
        attach_adapters(served, adapters)
    with pytest.raises(CompileError, match="adapters"):
        copy.deepcopy(served).compile_denoiser(warm_up=False)
    with pytest.raises(ValueError, match="serves no LoRA"):
        base.encode(torch.tensor([[5, 6]]), base.new_cache(1, 8), known_lengths=[0], adapters=[1])


def test_serve_cli_rejects_a_bad_lora_flag(tmp_path):
    from dgemma.cli import UsageError, _lora_module

    r = subprocess.run([sys.executable, "-m", "dgemma.cli", "serve", "--lora", "nonsense"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "NAME=PATH" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(UsageError, match="not a LoRA adapter"):
        _lora_module(f"x={tmp_path}")
