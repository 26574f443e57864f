"""Weight-only quantization: round-trip bounds, the module swap, accuracy, checkpoints, generation and the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from conftest import randomize, tiny_config
from dgemma.cli import main as cli_main
from dgemma.generate import GenerationParams, generate
from dgemma.model import DiffusionGemma, Experts
from dgemma.quant import (Int4, Int8, QuantConfig, QuantEmbedding, QuantError, QuantExperts, QuantLinear,
                          quantize_checkpoint, quantize_model, weight_bytes, write_random_quantized)
from dgemma.sampler import SamplerConfig
from dgemma.weights import CheckpointError, load_model, save_model

SCHEMES = [QuantConfig("int8"), QuantConfig("int4", 32), QuantConfig("int4", 128), QuantConfig("fp8"),
           QuantConfig("int8", 32), QuantConfig("fp8", 16), QuantConfig("nvfp4")]


def _logits(model, seed=0):
    """Prefill, a first denoise step and a second one with self-conditioning: `[n]` fp32 logits, flattened."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.vocab_size, (2, 9), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (2, cfg.canvas_length), generator=g)
    with torch.no_grad():
        cache = model.new_cache(2, 64)
        enc = model.encode(prompt, cache)
        den = model.denoise(canvas, cache)
        den2 = model.denoise(canvas, cache, sc=model.soft_embed(den / 0.8))
    return torch.cat([enc.flatten(), den.flatten(), den2.flatten()])


def _dequantized_float_model(float_model, qmodel):
    """The float model carrying exactly the values the quantized model computes with."""
    out = copy.deepcopy(float_model)
    sd = out.state_dict()
    with torch.no_grad():
        for name, m in qmodel.named_modules():
            if isinstance(m, QuantLinear):
                sd[name + ".weight"].copy_(m.dequantize())
            elif isinstance(m, QuantExperts):
                for w in ("gate_up_proj", "down_proj"):
                    t = {s: getattr(m, w + s) for s in m.scheme.suffixes}
                    sd[f"{name}.{w}"].copy_(m.scheme.dequantize(t, torch.float32))
            elif isinstance(m, QuantEmbedding):
                sd[name + ".weight"].copy_(m.dequantize())
    return out


# ---------------------------------------------------------------- round trips
def test_int8_round_trip_bound():
    w = torch.randn(3, 40, 72) * 0.05
    t = Int8().quantize(w)
    assert t[""].dtype == torch.int8 and t[""].abs().max() <= 127 and t["_scale"].shape == (3, 40)
    err = (Int8().dequantize(t, torch.float32) - w).abs()
    assert (err <= t["_scale"][..., None] * 0.5 + 1e-7).all()  # half a step, per output channel
    assert err.pow(2).mean().sqrt() / w.std() < 0.01


@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("inp", [256, 200])  # 200: a short last group (the 26B model's 704 and 2112 need this)
def test_int4_round_trip_bound(g, inp):
    w = torch.randn(2, 24, inp) * 0.05 + 0.01
    s = Int4(g)
    t = s.quantize(w)
    G = -(-inp // g)
    assert t[""].shape == (2, 24, inp // 2) and t[""].dtype == torch.uint8
    assert t["_scale"].shape == t["_zero"].shape == (2, 24, G) and t["_scale"].dtype == torch.bfloat16
    deq = s.dequantize(t, torch.float32)
    scale = t["_scale"].float().repeat_interleave(g, -1)[..., :inp]
    zero = t["_zero"].float().repeat_interleave(g, -1)[..., :inp]
    # half a step, plus the bf16 rounding of the stored zero and scale at the ends of the range
    assert ((deq - w).abs() <= 0.5 * scale + 2 ** -8 * (zero.abs() + 8 * scale)).all()
    assert (deq - w).pow(2).mean().sqrt() / w.std() < 0.11
    # the packing: low nibble = input j, high nibble = input j + inp/2
    q = torch.cat([t[""] & 15, t[""] >> 4], -1)
    assert torch.equal(deq, (q.float() - 8) * scale + zero) or torch.allclose(deq, (q.float() - 8) * scale + zero,
                                                                              atol=1e-6)


def test_int4_finer_groups_are_more_accurate():
    w = torch.randn(64, 512)
    errs = [(Int4(g).dequantize(Int4(g).quantize(w), torch.float32) - w).pow(2).mean() for g in (32, 64, 128)]
    assert errs[0] < errs[1] < errs[2]


def test_quant_config_validation():
    assert QuantConfig("int4").group_size == 128
    assert QuantConfig.from_dict(QuantConfig("int4", 64).to_dict()) == QuantConfig("int4", 64)
    ig = QuantConfig("fp8", ignore=("b", "a", "b"))
    assert ig.ignore == ("a", "b") and QuantConfig.from_dict(ig.to_dict()) == ig
    assert "ignore" not in QuantConfig("int8").to_dict()  # configs without it are written as before
    assert "embeddings" not in QuantConfig("int8").to_dict()
    emb = QuantConfig("int4", 32, embeddings=True)
    assert emb.to_dict()["embeddings"] is True and QuantConfig.from_dict(emb.to_dict()) == emb
    assert QuantConfig("int8").group_size is None and QuantConfig("fp8", 32).group_size == 32
    for bad in [dict(scheme="int3"), dict(scheme="int8", group_size=48), dict(scheme="fp8", group_size=0),
                dict(scheme="int4", group_size=48), dict(scheme="int8", ignore="layers.0.experts"),
                dict(scheme="int8", embeddings="yes")]:
        with pytest.raises(QuantError):
            QuantConfig(**bad)
    with pytest.raises(QuantError, match="quant_method"):
        QuantConfig.from_dict({"quant_method": "gptq", "bits": 4})
    with pytest.raises(QuantError, match="config_groups"):
        QuantConfig.from_dict({"quant_method": "compressed-tensors", "format": "float-quantized"})


# ---------------------------------------------------------------- modules
@pytest.mark.parametrize("qcfg", SCHEMES, ids=lambda q: f"{q.scheme}-{q.group_size}")
def test_linear_and_experts_compute_with_the_dequantized_weights(qcfg):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True)
    q = QuantLinear.from_linear(lin, qcfg.make())
    x = torch.randn(2, 5, 64)
    assert torch.allclose(q(x), F.linear(x, q.dequantize(), lin.bias), atol=1e-5)

    cfg = tiny_config("b")
    ex = randomize(DiffusionGemma(cfg)).layers[0].experts
    qx = QuantExperts.from_experts(ex, qcfg.make())
    ref = copy.deepcopy(ex)
    with torch.no_grad():
        for w in ("gate_up_proj", "down_proj"):
            getattr(ref, w).copy_(qx.scheme.dequantize({s: getattr(qx, w + s) for s in qx.scheme.suffixes},
                                                       torch.float32))
    x = torch.randn(11, cfg.hidden_size)
    w, idx = torch.rand(11, cfg.top_k_experts), torch.randint(0, cfg.num_experts, (11, cfg.top_k_experts))
    assert torch.allclose(qx(x, w, idx), ref(x, w, idx), atol=1e-5)


@pytest.mark.parametrize("qcfg", SCHEMES, ids=lambda q: f"{q.scheme}-{q.group_size}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 40])
def test_quantized_experts_grouped_equal_one_at_a_time(qcfg, dtype, tokens, monkeypatch):
    """With at least as many rows as experts every expert is expanded at once for one grouped matmul: the same
    bits as dequantizing one expert at a time (with an empty expert in the middle; 1 token takes the loop)."""
    import dgemma.quant as Q

    cfg = tiny_config("b")  # 6 experts, top-3
    qx = QuantExperts.from_experts(randomize(DiffusionGemma(cfg)).layers[0].experts, qcfg.make())
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, cfg.hidden_size, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(cfg.num_experts, generator=g)[:cfg.top_k_experts] for _ in range(tokens)])
    idx = torch.where(idx == 2, 0, idx)
    w = torch.rand(tokens, cfg.top_k_experts, generator=g).to(dtype)
    calls = []
    grouped_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or grouped_mm(*a, **k))
    with torch.no_grad():
        grouped = qx(x, w, idx)
        assert len(calls) == (2 if tokens > 1 else 0)  # gate_up and down
        monkeypatch.setitem(Q.STACK_BUDGET, "cpu", 0)  # too big to expand: one expert at a time
        loop = qx(x, w, idx)
        assert len(calls) == (2 if tokens > 1 else 0)
    assert torch.equal(grouped, loop)


@pytest.mark.parametrize("inp,out", [(96, 40), (40, 24)])
def test_int8_in_bf16_matches_dequantize(inp, out):
    """bf16 (the default on CPUs with native bf16) dequantizes too: (40, 24) crashed torch's _weight_int8pack_mm."""
    torch.manual_seed(0)
    q = QuantLinear.from_linear(torch.nn.Linear(inp, out, bias=False), Int8())
    x = torch.randn(3, 7, inp)
    y = q(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == (3, 7, out)
    assert torch.allclose(y.float(), F.linear(x, q.dequantize()), atol=3e-2, rtol=2e-2)


def test_swap_targets_everything_but_router_and_embedding():
    model = quantize_model(randomize(DiffusionGemma(tiny_config("a"))), QuantConfig("int8"))
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(n.endswith("router.proj") for n in linears)
    assert not any(isinstance(m, Experts) for m in model.modules())
    assert isinstance(model.layers[0].self_attn.q_proj, QuantLinear)
    assert isinstance(model.self_conditioning.down_proj, QuantLinear)
    assert model.embed_tokens.weight.dtype == torch.float32 and model.dtype == torch.float32
    assert model.cfg.extra["quantization_config"] == {"quant_method": "dgemma", "scheme": "int8", "group_size": None}
    with pytest.raises(QuantError, match="already quantized"):
        quantize_model(model, QuantConfig("int4"))


# ---------------------------------------------------------------- the embedding / tied LM head
EMBEDDING_SCHEMES = [QuantConfig("int8", embeddings=True), QuantConfig("int4", 32, embeddings=True),
                     QuantConfig("nvfp4", embeddings=True)]


@pytest.mark.parametrize("qcfg", EMBEDDING_SCHEMES, ids=lambda q: q.scheme)
def test_quantized_embedding_computes_with_its_dequantized_rows(qcfg):
    """--embeddings: the input embedding, the LM head and the self-conditioning matmul all read the dequantized
    matrix, one vocabulary block at a time (9,000 entries: three CPU blocks, the last short), and give the logits
    of the float model that holds it."""
    base = randomize(DiffusionGemma(tiny_config("a", vocab_size=9000)), seed=1)
    qmodel = quantize_model(copy.deepcopy(base), qcfg)
    assert isinstance(qmodel.embed_tokens, QuantEmbedding) and qmodel.dtype == torch.float32
    assert qmodel.embed_tokens.weight.dtype == {"int8": torch.int8, "int4": torch.uint8, "nvfp4": torch.uint8}[
        qcfg.scheme]
    ref = _dequantized_float_model(base, qmodel)
    assert (_logits(qmodel) - _logits(ref)).abs().max() < 1e-4  # the float model's soft embedding is one matmul
    E, R = qmodel.embedding(), ref.embedding()
    ids = torch.tensor([[0, 8999, 4096], [5, 5, 4095]])
    assert torch.equal(E[ids], R[ids]) and torch.equal(E[torch.tensor(7)], R[7]) and E[4096:8192].shape == (4096, 64)
    p = torch.softmax(torch.randn(3, 9000), -1)
    assert torch.allclose(E.matmul(p, 4096), p @ R, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_generation_with_a_quantized_embedding(fused):
    """Generation on an embedding-quantized model gives the tokens of the float model holding its dequantized
    weights, on the fused and the plain paths, with an infill's pinned tokens (their embeddings gathered as
    self-conditioning) and log-probabilities."""
    base = randomize(DiffusionGemma(tiny_config("a", vocab_size=9000)), seed=2).eval()
    qmodel = quantize_model(copy.deepcopy(base), QuantConfig("int8", embeddings=True))
    ref = _dequantized_float_model(base, qmodel)
    T = base.cfg.canvas_length
    params = GenerationParams(max_new_tokens=2 * T, seed=3, logprobs=2, sampler=SamplerConfig(max_denoising_steps=4),
                              ignore_eos=True, fixed={T - 3: 11, T - 2: 12, T - 1: 13})
    a = generate(qmodel, [[5, 6, 7], [9]], params, fused_head=fused)
    b = generate(ref, [[5, 6, 7], [9]], params, fused_head=fused)
    assert [d.tokens for d in a] == [d.tokens for d in b] and len(a[0].tokens) > 0
    assert all(torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5) for x, y in zip(a, b))


# ---------------------------------------------------------------- accuracy
@pytest.mark.parametrize("qcfg", SCHEMES, ids=lambda q: f"{q.scheme}-{q.group_size}")
def test_swapped_model_equals_float_model_with_dequantized_weights(cfg_name, qcfg):
    """The swap itself adds nothing: all the error is the weights' rounding."""
    base = randomize(DiffusionGemma(tiny_config(cfg_name)), seed=1)
    qmodel = quantize_model(copy.deepcopy(base), qcfg)
    assert (_logits(qmodel) - _logits(_dequantized_float_model(base, qmodel))).abs().max() < 1e-4


def _tempered(cfg_name):
    """transformers' init (normal(0, 0.02), norms at one) with every expert active and q/k-norm weights at
    hd^-1/4. Random init otherwise makes the logits a discontinuous function of the weights: top-k routing flips on
    near-ties, and q.k with unit-RMS q, k and attention scale 1 has variance head_dim, so attention is nearly
    argmax. A trained model has neither property; int8 noise then moves logits by ~1-2% of their spread."""
    cfg = tiny_config(cfg_name)
    model = DiffusionGemma(cfg.replace(top_k_experts=cfg.num_experts)).init_weights(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("q_norm.weight", "k_norm.weight")):
                p.fill_(p.shape[0] ** -0.25)
    return model


@pytest.mark.parametrize("qcfg,max_err", [(SCHEMES[0], 2.5e-2), (SCHEMES[1], 0.3), (SCHEMES[2], 0.3),
                                          (SCHEMES[3], 0.1), (SCHEMES[6], 0.3)],
                         ids=["int8", "int4-32", "int4-128", "fp8", "nvfp4"])
def test_logit_error_vs_fp32(cfg_name, qcfg, max_err):
    base = _tempered(cfg_name)
    ref = _logits(base)
    err = (_logits(quantize_model(copy.deepcopy(base), qcfg)) - ref).abs()
    assert err.max() < max_err
    assert err.mean() < {"int8": 0.025, "fp8": 0.1, "int4": 0.3, "nvfp4": 0.4}[qcfg.scheme] * ref.std()


# ---------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    model = randomize(DiffusionGemma(tiny_config("a")), seed=3).eval()
    d = tmp_path_factory.mktemp("quant") / "float"
    save_model(model, d, generation_config={"max_denoising_steps": 6})
    return model, d


@pytest.mark.parametrize("qcfg", SCHEMES[:2], ids=["int8", "int4-32"])
def test_save_load_quantized(float_ckpt, tmp_path, qcfg):
    model, _ = float_ckpt
    qmodel = quantize_model(copy.deepcopy(model), qcfg)
    save_model(qmodel, tmp_path / "q", dtype=torch.bfloat16)  # dtype applies to the float tensors only
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"] == qcfg.to_dict()
    with safe_open(str(tmp_path / "q" / "model.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["dgemma_quantization"]) == qcfg.to_dict()
        code = f.get_tensor("model.decoder.layers.0.self_attn.q_proj.weight")
        assert code.dtype == (torch.int8 if qcfg.scheme == "int8" else torch.uint8)
        assert f.get_tensor("model.decoder.layers.0.experts.gate_up_proj_scale").dtype == \
            (torch.float32 if qcfg.scheme == "int8" else torch.bfloat16)
        assert f.get_tensor("model.decoder.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.decoder.layers.0.router.proj.weight").dtype == torch.bfloat16
    save_model(qmodel, tmp_path / "q32")
    a, b = load_model(tmp_path / "q32"), load_model(tmp_path / "q32")
    assert isinstance(a.layers[0].experts, QuantExperts) and isinstance(a.layers[1].mlp.up_proj, QuantLinear)
    assert torch.equal(_logits(a), _logits(b))  # two loads of one file: identical
    assert (_logits(a) - _logits(qmodel)).abs().max() < 1e-5  # memory-mapped vs in memory: float rounding
    # a dtype on load converts the float tensors, never the codes or the scales
    c = load_model(tmp_path / "q", dtype=torch.float32)
    assert c.layers[0].self_attn.q_proj.weight.dtype == code.dtype and c.dtype == torch.float32
    assert c.layers[0].self_attn.q_proj.weight_scale.dtype == qmodel.layers[0].self_attn.q_proj.weight_scale.dtype


@pytest.mark.parametrize("embeddings", [False, True], ids=["layers", "with-embedding"])
def test_streamed_quantize_equals_in_memory(float_ckpt, tmp_path, embeddings):
    model, src = float_ckpt
    qcfg = QuantConfig("int4", 64, embeddings=embeddings)
    quantize_checkpoint(src, tmp_path / "q", qcfg, max_shard_bytes=20_000)
    assert (tmp_path / "q" / "model.safetensors.index.json").exists()  # several shards
    assert json.loads((tmp_path / "q" / "generation_config.json").read_text())["max_denoising_steps"] == 6
    loaded = load_model(tmp_path / "q")
    mem = quantize_model(copy.deepcopy(model), qcfg)
    for (k, a), (k2, b) in zip(sorted(loaded.state_dict().items()), sorted(mem.state_dict().items())):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    with pytest.raises(QuantError, match="already quantized"):
        quantize_checkpoint(tmp_path / "q", tmp_path / "qq", qcfg)


@pytest.mark.parametrize("qcfg", [QuantConfig("int8"), QuantConfig("int4", 64, embeddings=True),
                                  QuantConfig("nvfp4")], ids=["int8", "int4-64-embeddings", "nvfp4"])
def test_quantize_at_load_equals_quantize_then_load(float_ckpt, tmp_path, qcfg):
    """`load_model(..., quantize=)` (`--quantization`): the same tensors, bit for bit, as `dgemma quantize` into a
    directory and loading that; the float tensors kept converted to the dtype asked."""
    _, src = float_ckpt
    quantize_checkpoint(src, tmp_path / "q", qcfg)
    want = load_model(tmp_path / "q", dtype=torch.bfloat16)
    got = load_model(src, dtype=torch.bfloat16, quantize=qcfg)
    assert QuantConfig.of(got.cfg) == qcfg
    assert got.state_dict().keys() == want.state_dict().keys()
    for k, a in got.state_dict().items():
        b = want.state_dict()[k]
        assert a.dtype == b.dtype and torch.equal(a, b), k
    assert got.embed_tokens.__class__ is want.embed_tokens.__class__
    assert torch.equal(_logits(got), _logits(want))


def test_quantize_at_load_errors(float_ckpt, tmp_path, capsys):
    _, src = float_ckpt
    quantize_checkpoint(src, tmp_path / "q", QuantConfig("int8"))
    with pytest.raises(CheckpointError, match=r"already quantized \(int8\)"):
        load_model(tmp_path / "q", quantize=QuantConfig("int4"))
    # a weight of the wrong shape: named, as a plain load names it
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, tmp_path / "bad")
    sd = load_file(str(tmp_path / "bad" / "model.safetensors"))
    for key in ("model.decoder.layers.0.self_attn.q_proj.weight", "model.decoder.layers.1.experts.down_proj"):
        sd[key] = sd[key][..., :-2].contiguous()
    save_file(sd, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers.0.self_attn.q_proj.weight has shape \(\d+, \d+\), expected"):
        load_model(tmp_path / "bad", quantize=QuantConfig("int4", 32))
    sd["model.decoder.layers.0.self_attn.q_proj.weight"] = load_file(str(src / "model.safetensors"))[
        "model.decoder.layers.0.self_attn.q_proj.weight"]
    save_file(sd, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers.1.experts.down_proj has shape"):
        load_model(tmp_path / "bad", quantize=QuantConfig("int8"))
    for model, flags, msg in [(src, ["--quantization", "int3"], "unknown quantization scheme 'int3'"),
                              (src, ["--quantization", "int4", "--quantization-group-size", "48"],
                               "group size must be one of"),
                              (src, ["--quantization-group-size", "32"], "go with --quantization"),
                              (src, ["--quantization-embeddings"], "go with --quantization"),
                              (tmp_path / "q", ["--quantization", "int4"], "already quantized (int8)")]:
        assert cli_main(["generate", str(model), "x", "--max-new-tokens", "4", *flags]) == 2, flags
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    from dgemma.cli import build_parser, load_pipeline

    args = build_parser().parse_args(["generate", str(src), "x", "--quantization", "int8",
                                      "--quantization-embeddings", "--device", "cpu"])
    pipe = load_pipeline(args)
    assert isinstance(pipe.model.embed_tokens, QuantEmbedding)
    assert QuantConfig.of(pipe.model.cfg) == QuantConfig("int8", embeddings=True)


def test_random_preset_writer(tmp_path):
    cfg = tiny_config("c")
    write_random_quantized(cfg, tmp_path / "r", QuantConfig("int4", 32), seed=1, max_shard_bytes=50_000)
    model = load_model(tmp_path / "r", dtype=torch.float32)
    assert isinstance(model.layers[2].experts, QuantExperts) and model.dtype == torch.float32
    out = _logits(model)
    assert torch.isfinite(out).all() and out.std() > 0
    assert weight_bytes(cfg, QuantConfig("int4", 32), torch.bfloat16) == sum(
        f.stat().st_size for f in (tmp_path / "r").glob("*.safetensors")) - _headers(tmp_path / "r")


def _headers(d):
    import struct

    return sum(8 + struct.unpack("<Q", f.read_bytes()[:8])[0] for f in d.glob("*.safetensors"))


def test_load_errors(float_ckpt, tmp_path):
    model, src = float_ckpt
    save_model(quantize_model(copy.deepcopy(model), QuantConfig("int8")), tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quant_method 'fp8'"):
        load_model(tmp_path / "q")
    # config.json says int8, but the weights are float
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = QuantConfig("int8").to_dict()
    import shutil

    shutil.copytree(src, tmp_path / "f")
    (tmp_path / "f" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="dtype|missing"):
        load_model(tmp_path / "f")


def test_weight_bytes():
    from dgemma.config import preset

    cfg = preset("26b-a4b")
    fp32, int8, int4 = (weight_bytes(cfg, q) for q in (None, QuantConfig("int8"), QuantConfig("int4")))
    assert 100e9 < fp32 < 101.5e9  # 25.2B parameters
    assert int4 < int8 / 1.7 and int8 < fp32 / 3.4
    # --embeddings: the 738M-entry embedding from bf16 (1.38 GiB) to int8 (0.69) / int4 g128 (0.35)
    for q, saved in [(QuantConfig("int8"), 0.68), (QuantConfig("int4"), 1.0)]:
        emb = QuantConfig(q.scheme, q.group_size, embeddings=True)
        assert abs((weight_bytes(cfg, q, torch.bfloat16) - weight_bytes(cfg, emb, torch.bfloat16)) / 2**30
                   - saved) < 0.02


# ---------------------------------------------------------------- generation
def test_generate_on_quantized_model(float_ckpt, tmp_path):
    _, src = float_ckpt
    quantize_checkpoint(src, tmp_path / "q", QuantConfig("int4", 32))
    model = load_model(tmp_path / "q")
    params = GenerationParams(max_new_tokens=2 * model.cfg.canvas_length, sampler=SamplerConfig(max_denoising_steps=3),
                              ignore_eos=True)
    done = generate(model, [[5, 6, 7], [9, 10]], params)
    assert [len(d.tokens) for d in done] == [2 * model.cfg.canvas_length] * 2
    assert all(0 <= t < model.cfg.vocab_size for d in done for t in d.tokens)


# ---------------------------------------------------------------- CLI
def _cli(capsys, *args):
    rc = cli_main(["quantize", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_quantize(float_ckpt, tmp_path, capsys):
    _, src = float_ckpt
    rc, out, err = _cli(capsys, src, tmp_path / "q4", "--scheme", "int4", "--group-size", "32", "--quiet")
    assert rc == 0, err
    assert "int4 group 32" in out
    assert json.loads((tmp_path / "q4" / "config.json").read_text())["quantization_config"]["group_size"] == 32
    assert isinstance(load_model(tmp_path / "q4").layers[0].self_attn.o_proj, QuantLinear)
    rc, out, err = _cli(capsys, "--random-preset", "tiny", tmp_path / "r8", "--scheme", "int8", "--quiet")
    assert rc == 0, err
    assert load_model(tmp_path / "r8").cfg.extra["quantization_config"]["scheme"] == "int8"
    from dgemma.cli import info_dict

    full, q4 = info_dict(str(src)), info_dict(str(tmp_path / "q4"))  # info reports the quantized sizes
    assert q4["quantization"]["scheme"] == "int4" and "quantization" not in full
    assert q4["weights_bytes"]["float32"] < full["weights_bytes"]["float32"]
    assert q4["files_bytes"] < full["files_bytes"]
    # and, for a full-precision one, what each scheme would make of it (the rest in bf16): as written
    assert "quantized_weights_bytes" not in q4
    rc, out, err = _cli(capsys, src, tmp_path / "q8b", "--scheme", "int8", "--dtype", "bfloat16", "--quiet")
    assert rc == 0, err
    held = sum(t.numel() * t.element_size() for t in load_model(tmp_path / "q8b").state_dict().values())
    assert full["quantized_weights_bytes"]["int8"] == held
    rc, out, err = _cli(capsys, src, tmp_path / "q8e", "--scheme", "int8", "--embeddings", "--quiet")
    assert rc == 0, err
    assert "int8, embedding too" in out
    q8e = load_model(tmp_path / "q8e")
    assert isinstance(q8e.embed_tokens, QuantEmbedding) and q8e.cfg.extra["quantization_config"]["embeddings"]
    assert info_dict(str(tmp_path / "q8e"))["quantization"]["embeddings"] is True


@pytest.mark.parametrize("args,msg", [
    (["{src}", "{dst}", "--scheme", "int3"], "unknown quantization scheme 'int3'"),
    (["{src}", "{dst}"], "give --scheme"),
    (["{src}", "{dst}", "--scheme", "int8", "--group-size", "48"], "group size must be one of"),
    (["{src}", "{dst}", "--scheme", "int4", "--group-size", "100"], "group size must be one of"),
    (["{tmp}/nope", "{dst}", "--scheme", "int8"], "no checkpoint directory"),
    (["{src}", "{tmp}/afile/sub", "--scheme", "int8"], "is not a directory"),
    (["{src}", "{src}", "--scheme", "int8"], "not SRC"),
    (["{src}", "{tmp}", "--scheme", "int8"], "already exists"),
    (["{src}", "{tmp}", "--scheme", "int8", "--overwrite"], "not a checkpoint directory"),
    (["--random-preset", "huge", "{dst}", "--scheme", "int8"], "unknown preset"),
])
def test_cli_errors_are_one_line_and_leave_nothing(float_ckpt, tmp_path, capsys, args, msg):
    _, src = float_ckpt
    (tmp_path / "afile").write_text("x")
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, out, err = _cli(capsys, *(a.format(src=src, dst=tmp_path / "out", tmp=tmp_path) for a in args))
    assert rc == 2
    assert msg in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no DST, no temporary directory


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_fp8_and_fp4_decoding_is_exact(dtype):
    """The CPU's bit-moving decoders of e4m3 (codes_to) and e2m1 (Nvfp4.dequantize) against torch's own e4m3
    conversion and the e2m1 table, on every code."""
    from dgemma.quant import E2M1, Nvfp4, codes_to

    q = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    ok = ~torch.isnan(q.to(torch.float32))  # 0x7f, 0xff: e4m3fn's NaNs, never a weight
    assert torch.equal(codes_to(q, dtype)[ok], q.to(dtype)[ok])
    b = torch.arange(256, dtype=torch.uint8).view(16, 16)  # every byte: every pair of nibbles
    t = {"": b, "_scale": torch.ones(16, 2, dtype=torch.float8_e4m3fn), "_global": torch.ones(16)}
    want = torch.stack((E2M1[(b & 15).long()], E2M1[(b >> 4).long()]), -1).flatten(-2)
    assert torch.equal(Nvfp4().dequantize(t, dtype), want.to(dtype))
