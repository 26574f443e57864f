"""LoRA: a merged adapter gives the same logits as base + adapter; only adapters train; files; CLI merge; resume."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import randomize, tiny_config
from dgemma.model import DiffusionGemma
from dgemma.train.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRAConfig, LoRAError, LoRAExperts, LoRALinear,
                               apply_lora, has_lora, load_adapter, merge_lora, save_adapter)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process on a shared machine


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this module


def base_model(seed=1):
    return randomize(DiffusionGemma(tiny_config("a")), seed=seed).eval()


def perturb(model, seed=0):
    """Random nonzero B (a fresh adapter has B = 0 and changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.endswith(("gate_up_B", "down_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@torch.no_grad()
def logits(model, ids, canvas):
    cache = model.new_cache(ids.shape[0], 64)
    enc = model.encode(ids, cache)
    first = model.denoise(canvas, cache)
    second = model.denoise(canvas, cache, sc=model.soft_embed(first))  # the self-conditioning MLP too
    return torch.cat([enc.flatten(), first.flatten(), second.flatten()])


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 320, (2, 11), generator=g), torch.randint(0, 320, (2, 16), generator=g)


@pytest.mark.parametrize("targets", [("all",), ("q_proj", "v_proj"), ("experts",), ("all", "router")])
def test_merged_adapter_equals_base_plus_adapter(inputs, targets):
    model = base_model()
    base = logits(model, *inputs)
    names = apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=targets))
    assert names and has_lora(model)
    assert torch.equal(logits(model, *inputs), base)  # B = 0
    perturb(model)
    adapted = logits(model, *inputs)
    assert (adapted - base).abs().max() > 1e-3
    merge_lora(model)
    assert not has_lora(model)
    assert (logits(model, *inputs) - adapted).abs().max() < 1e-4
    # the merged model is a plain model: same state_dict keys as the base
    assert set(model.state_dict()) == set(base_model().state_dict())


def test_default_targets_cover_every_linear_layer_and_the_experts():
    model = base_model()
    apply_lora(model, LoRAConfig(rank=2))
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"LoRALinear", "LoRAExperts"} <= kinds
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAExperts))}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "experts"}
    assert any(n.startswith("self_conditioning.") for n, m in model.named_modules() if isinstance(m, LoRALinear))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.endswith(("_A", "_B")) for n in trainable)
    with pytest.raises(LoRAError, match="unknown LoRA target"):
        LoRAConfig(targets=("qproj",))


def test_adapter_files_roundtrip(tmp_path, inputs):
    model = base_model()
    apply_lora(model, LoRAConfig(rank=3, alpha=6.0))
    perturb(model, seed=5)
    want = logits(model, *inputs)
    save_adapter(model, tmp_path / "ad", base="some/base")
    assert (tmp_path / "ad" / ADAPTER_WEIGHTS).is_file() and (tmp_path / "ad" / ADAPTER_CONFIG).is_file()
    fresh = load_adapter(base_model(), tmp_path / "ad")
    assert torch.equal(logits(fresh, *inputs), want)
    with pytest.raises(LoRAError, match="not a LoRA adapter"):
        load_adapter(base_model(), tmp_path)


def test_lora_training_updates_only_adapters_and_resumes_exactly(tmp_path):
    from dgemma.train.data import Example
    from dgemma.train.trainer import ListDataset, TrainConfig, Trainer

    g = torch.Generator().manual_seed(0)
    exs = [Example(tuple(torch.randint(5, 320, (6,), generator=g).tolist()),
                   tuple(torch.randint(5, 320, (10,), generator=g).tolist()) + (1,)) for _ in range(8)]
    kw = dict(steps=6, batch_size=4, lr=1e-2, warmup=1, lora_rank=4, save_every=3, log_every=1)
    before = {k: v.clone() for k, v in base_model().state_dict().items()}

    def trainer(out, resume=None):
        return Trainer(base_model(), ListDataset(exs), TrainConfig(out=str(out), **kw), quiet=True, resume_from=resume)

    full = trainer(tmp_path / "full")
    curve = [full.train_step()["loss"] for _ in range(6)]
    for name, t in full.model.state_dict().items():
        if name in before:  # base weights are frozen
            assert torch.equal(t, before[name]), name
    half = trainer(tmp_path / "half")
    for _ in range(3):
        half.train_step()
    ckpt = half.save()
    assert (ckpt / ADAPTER_WEIGHTS).is_file() and not (ckpt / "model.safetensors").exists()
    resumed = trainer(tmp_path / "half", resume=ckpt)
    assert resumed.step == 3
    assert [resumed.train_step()["loss"] for _ in range(3)] == curve[3:]


def test_cli_lora_train_then_merge(tmp_path, inputs):
    from dgemma.weights import load_model, save_model

    base_dir = tmp_path / "base"
    save_model(base_model(), base_dir)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"prompt_ids": [2, {5 + i}, 9], "response_ids": [{7 + i}, 8, 1]}}\n' for i in range(8)))
    run = subprocess.run([sys.executable, "-m", "dgemma.cli", "train", "--model", str(base_dir), "--data", str(data),
                          "--out", str(tmp_path / "run"), "--lora-rank", "4", "--steps", "3", "--batch-size", "4",
                          "--lr", "1e-2", "--threads", "1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, env=ENV)
    assert run.returncode == 0, run.stderr
    final = tmp_path / "run" / "final"
    assert (final / ADAPTER_WEIGHTS).stat().st_size < (base_dir / "model.safetensors").stat().st_size / 3
    merged = subprocess.run([sys.executable, "-m", "dgemma.cli", "train", "merge", str(base_dir), str(final),
                             str(tmp_path / "merged")], capture_output=True, text=True, cwd=ROOT, timeout=300, env=ENV)
    assert merged.returncode == 0, merged.stderr
    with_adapter = load_adapter(load_model(base_dir, quiet=True), final).eval()
    out = load_model(tmp_path / "merged", quiet=True).eval()
    assert (logits(out, *inputs) - logits(with_adapter, *inputs)).abs().max() < 1e-4
    assert (logits(out, *inputs) - logits(base_model(), *inputs)).abs().max() > 1e-4  # training did something


def test_adapter_loads_folded_into_its_base(tmp_path, inputs):
    # the fine-tune -> generate/serve loop without a merged copy on disk: `MODEL --adapter DIR`, or the adapter
    # directory alone (it records its base), gives the weights `dgemma train merge` writes, bit for bit
    from dgemma.pipeline import Pipeline
    from dgemma.quant import QuantConfig, quantize_checkpoint
    from dgemma.train.run import merge
    from dgemma.weights import CheckpointError, load_model, save_model

    base_dir = save_model(base_model(), tmp_path / "base")
    model = base_model()
    apply_lora(model, LoRAConfig(rank=4))
    perturb(model)
    adapter = save_adapter(model, tmp_path / "adapter", base=str(base_dir))
    merged = load_model(merge(str(base_dir), str(adapter), str(tmp_path / "merged")), quiet=True)
    want = merged.state_dict()
    for pipe in (Pipeline.load(str(base_dir), adapter=str(adapter), dtype=torch.float32, device="cpu", quiet=True),
                 Pipeline.load(str(adapter), dtype=torch.float32, device="cpu", quiet=True)):
        got = pipe.model.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert (logits(merged, *inputs) - logits(base_model(), *inputs)).abs().max() > 1e-3  # the adapter counts

    # an adapter whose base is gone, one for another base, and a quantized base: one clear error each
    orphan = save_adapter(model, tmp_path / "orphan", base=str(tmp_path / "gone"))
    with pytest.raises(CheckpointError, match="is a LoRA adapter for .*gone.*--adapter"):
        Pipeline.load(str(orphan), device="cpu", quiet=True)
    other = save_model(randomize(DiffusionGemma(tiny_config("b")), seed=0), tmp_path / "other")
    with pytest.raises(LoRAError, match="does not fit the model|shape"):
        Pipeline.load(str(other), adapter=str(adapter), device="cpu", quiet=True)
    # over a quantized base (QLoRA) the adapter stays unmerged: the LoRA-wrapped quantized model itself
    quantize_checkpoint(base_dir, tmp_path / "q8", QuantConfig("int8"))
    pipe = Pipeline.load(str(tmp_path / "q8"), adapter=str(adapter), dtype=torch.float32, device="cpu", quiet=True)
    assert has_lora(pipe.model) and isinstance(pipe.model.layers[0].self_attn.q_proj, LoRALinear)
    want = load_adapter(load_model(tmp_path / "q8", quiet=True), adapter).eval()
    assert torch.equal(logits(pipe.model, *inputs), logits(want, *inputs))
    with pytest.raises(LoRAError, match="cannot be folded into int8-quantized weights"):
        merge(str(tmp_path / "q8"), str(adapter), str(tmp_path / "merged-q8"))
    assert not (tmp_path / "merged-q8").exists()
    with pytest.raises(LoRAError, match="not a LoRA adapter directory"):
        Pipeline.load(str(base_dir), adapter=str(tmp_path), device="cpu", quiet=True)
    r = subprocess.run([sys.executable, "-m", "dgemma.cli", "generate", str(base_dir), "hi", "--adapter",
                        str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300, env=ENV)
    assert r.returncode == 2 and "not a LoRA adapter directory" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- QLoRA: LoRA over a quantized base
def _dequantized(float_model, qmodel):
    from test_quant import _dequantized_float_model

    return _dequantized_float_model(float_model, qmodel)


def _loss_and_grads(model, ids, canvas):
    cache = model.new_cache(ids.shape[0], 64)
    model.encode(ids, cache)
    h = model.denoise(canvas, cache, head=False)
    loss = model.logits(h).logsumexp(-1).mean()
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("qcfg", ["int8", "int4-32+e"])
def test_qlora_gradients_equal_lora_over_the_dequantized_weights(inputs, qcfg):
    """LoRA over a quantized checkpoint (QLoRA) trains the adapter of the float model holding the dequantized
    weights: the same loss and adapter gradients. The frozen quantized matmuls keep no weight for backward (they
    dequantize again there): what autograd saves is what it saves for the activations alone, where a plain
    dequantize-then-matmul would keep a float copy of every layer."""
    import dgemma.quant as Q

    scheme, _, rest = qcfg.partition("-")
    q = Q.QuantConfig(scheme, int(rest[:2]) if rest else None, embeddings=rest.endswith("+e"))
    base = base_model()
    qmodel = Q.quantize_model(copy.deepcopy(base), q)
    fmodel = _dequantized(base, qmodel)
    for m in (qmodel, fmodel):
        apply_lora(m, LoRAConfig(rank=4), seed=3)
        perturb(m)
    lq, gq = _loss_and_grads(qmodel, *inputs)
    lf, gf = _loss_and_grads(fmodel, *inputs)
    assert abs(lq - lf) < 1e-5 and gq.keys() == gf.keys() and len(gq) > 20
    # int8 scales its matmul's output, the float model its weight: float rounding apart
    assert all((gq[k] - gf[k]).abs().max() <= 1e-4 * gf[k].abs().max() for k in gq)
    assert not any(p.requires_grad for n, p in qmodel.named_parameters() if "lora" not in n and not
                   n.endswith(("_A", "_B")))

    def saved_bytes(model):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            cache = model.new_cache(inputs[0].shape[0], 64)
            model.encode(inputs[0], cache)
            model.denoise(inputs[1], cache, head=False).sum()
        return sum(total)

    ours = saved_bytes(qmodel)
    plain = Q.quant_linear
    try:  # the naive path: autograd through dequantize + matmul
        Q.quant_linear = lambda scheme, x, t, dequantize_first=False: (
            torch.nn.functional.linear(x, scheme.dequantize(t, x.dtype)) if dequantize_first else scheme.linear(x, t))
        naive = saved_bytes(qmodel)
    finally:
        Q.quant_linear = plain
    weights = sum(m.in_features * m.out_features * 4 for m in qmodel.modules() if isinstance(m, Q.QuantLinear))
    assert naive - ours > 0.9 * weights


def test_qlora_train_serve_and_merge_loop(tmp_path, inputs, capsys):
    """`dgemma train --model QUANTIZED --lora-rank R` (QLoRA), then the adapter served unmerged over the quantized
    base, and merged into the full-precision one; a full fine-tune of a quantized checkpoint is a clear error."""
    from dgemma.pipeline import Pipeline
    from dgemma.quant import QuantConfig, QuantLinear, quantize_checkpoint
    from dgemma.weights import load_model, save_model

    base_dir = save_model(base_model(), tmp_path / "base")
    qdir = quantize_checkpoint(base_dir, tmp_path / "q4", QuantConfig("int4", 32))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"prompt_ids": [2, {5 + i}, 9], "response_ids": [{7 + i}, 8, 1]}}\n' for i in range(8)))
    common = ["--data", str(data), "--steps", "3", "--batch-size", "4", "--lr", "1e-2", "--threads", "1"]
    run = subprocess.run([sys.executable, "-m", "dgemma.cli", "train", "--model", str(qdir), "--out",
                          str(tmp_path / "run"), "--lora-rank", "4", *common],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, env=ENV)
    assert run.returncode == 0, run.stderr
    final = tmp_path / "run" / "final"
    pipe = Pipeline.load(str(final), dtype=torch.float32, device="cpu", quiet=True)  # its base: the int4 copy
    q_proj = pipe.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoRALinear) and isinstance(q_proj.base, QuantLinear)
    assert (logits(pipe.model, *inputs) - logits(load_model(qdir, quiet=True).eval(), *inputs)).abs().max() > 1e-4
    merged = subprocess.run([sys.executable, "-m", "dgemma.cli", "train", "merge", str(base_dir), str(final),
                             str(tmp_path / "merged")], capture_output=True, text=True, cwd=ROOT, timeout=300, env=ENV)
    assert merged.returncode == 0, merged.stderr
    full = subprocess.run([sys.executable, "-m", "dgemma.cli", "train", "--model", str(qdir), "--out",
                           str(tmp_path / "full"), *common], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=ENV)
    assert full.returncode == 2 and "int4-quantized" in full.stderr and "--lora-rank" in full.stderr
    assert "Traceback" not in full.stderr and not (tmp_path / "full" / "final").exists()

    # `--quantization int4` on the full-precision base (no quantized copy on disk): the same base bits, so the same
    # adapter, bit for bit; the adapter records it, and loads over its base quantized the same way
    run2 = subprocess.run([sys.executable, "-m", "dgemma.cli", "train", "--model", str(base_dir), "--quantization",
                           "int4", "--quantization-group-size", "32", "--out", str(tmp_path / "run2"),
                           "--lora-rank", "4", *common], capture_output=True, text=True, cwd=ROOT, timeout=300, env=ENV)
    assert run2.returncode == 0, run2.stderr
    final2 = tmp_path / "run2" / "final"
    a, b = load_file(str(final / ADAPTER_WEIGHTS)), load_file(str(final2 / ADAPTER_WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    conf = json.loads((final2 / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(base_dir)
    assert conf["dgemma_base_quantization"] == QuantConfig("int4", 32).to_dict()
    pipe2 = Pipeline.load(str(final2), dtype=torch.float32, device="cpu", quiet=True)
    assert isinstance(pipe2.model.layers[0].self_attn.q_proj.base, QuantLinear)
    assert torch.equal(logits(pipe2.model, *inputs), logits(pipe.model, *inputs))
    # a base that is a quantized checkpoint already loads as it is
    pipe3 = Pipeline.load(str(qdir), adapter=str(final2), dtype=torch.float32, device="cpu", quiet=True)
    assert torch.equal(logits(pipe3.model, *inputs), logits(pipe.model, *inputs))
    from dgemma.cli import UsageError, _server_pipeline, _server_settings, build_parser
    from dgemma.cli import main as cli_main

    # `serve BASE --lora NAME=ADAPTER` over a base not quantized as the adapter's was: a warning, not silence
    for extra, warned in (([], True), (["--quantization", "int4", "--quantization-group-size", "32"], False)):
        capsys.readouterr()
        args = build_parser().parse_args(["serve", str(base_dir), "--lora", f"q={final2}", "--device", "cpu",
                                          "--dtype", "float32", *extra])
        with pytest.raises(UsageError, match="no tokenizer.json"):  # checked after the adapters (ids-only model)
            _server_pipeline(args, _server_settings(args))
        err = capsys.readouterr().err
        assert ("trained over a base quantized as int4" in err) == warned, err

    capsys.readouterr()
    for extra, msg in [(["--model", str(base_dir)], "train LoRA adapters over them (--lora-rank R"),
                       (["--lora-rank", "4", "--preset", "tiny"], "--quantization quantizes the --model")]:
        assert cli_main(["train", "--out", str(tmp_path / "bad"), "--quantization", "int8", *common, *extra]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "bad").exists()
