"""Checkpoint round trips (dgemma <-> transformers, sharded) and one clear error per kind of bad checkpoint."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import randomize, tiny_config
from dgemma.config import ModelConfig, preset
from dgemma.model import DiffusionGemma
from dgemma.weights import CheckpointError, load_model, resolve, save_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = randomize(DiffusionGemma(tiny_config("b")), seed=7).eval()
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_model(model, d, generation_config={"max_denoising_steps": 12})
    return model, d


def _logits(model, seed=0):
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.vocab_size, (1, 9), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=g)
    with torch.no_grad():
        cache = model.new_cache(1, 64)
        enc = model.encode(prompt, cache)
        return enc, model.denoise(canvas, cache)


def _same(a_model, b_model, exact=True):
    for a, b in zip(_logits(a_model), _logits(b_model)):
        if exact:
            assert torch.equal(a, b)
        else:
            # 1e-7 apart before the head; the soft cap's sigmoid form (model.head_block_logits) maps that to up
            # to one sigmoid ulp times 2 * cap
            assert (a - b).abs().max() <= 1e-5


def test_save_load_identical_logits(saved, tmp_path):
    model, d = saved
    loaded = load_model(d)
    assert loaded.cfg.to_hf_dict() == model.cfg.to_hf_dict()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    # Loaded tensors are memory-mapped: their alignment differs from freshly allocated ones, and BLAS may pick
    # another kernel, so the in-memory model agrees to float rounding; two loads of one file agree exactly.
    _same(model, loaded, exact=False)
    save_model(loaded, tmp_path / "again")
    _same(loaded, load_model(tmp_path / "again"))
    assert json.loads((d / "generation_config.json").read_text())["max_denoising_steps"] == 12


def test_hf_layout_on_disk(saved):
    _, d = saved
    keys = set(load_file(d / "model.safetensors"))
    assert "model.decoder.embed_tokens.weight" in keys
    assert "model.encoder.language_model.layers.0.layer_scalar" in keys
    assert "model.decoder.layers.1.self_attn.v_proj.weight" not in keys  # full layer: V = K, no v_proj
    assert "model.decoder.layers.0.self_attn.v_proj.weight" in keys
    assert not any(k.startswith("lm_head") for k in keys)
    umask = os.umask(0)
    os.umask(umask)
    for f in d.iterdir():  # the mode open() gives (safetensors itself writes 0600 files)
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name


def test_dgemma_loads_transformers_save(saved, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, d = saved
    hf = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(d, dtype=torch.float32)
    hf.save_pretrained(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf", quiet=True)  # transformers' save has (random) vision weights
    assert len(loaded.passthrough) > 0
    _same(model, loaded, exact=False)
    # and the vision tensors travel through a dgemma save untouched
    save_model(loaded, tmp_path / "again")
    again = load_file(tmp_path / "again" / "model.safetensors")
    orig = load_file(tmp_path / "hf" / "model.safetensors")
    vision = [k for k in orig if k.startswith("model.encoder.vision_tower.")]
    assert vision and all(torch.equal(again[k], orig[k]) for k in vision)


def test_sharded_checkpoint_loads(saved, tmp_path):
    model, _ = saved
    save_model(model, tmp_path / "sharded", max_shard_bytes=40_000)
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    loaded = load_model(tmp_path / "sharded")
    _same(model, loaded, exact=False)
    pytest.importorskip("transformers")
    from transformers import DiffusionGemmaForBlockDiffusion

    DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / "sharded")


def test_bf16_save_and_load(saved, tmp_path):
    model, _ = saved
    save_model(model, tmp_path / "bf16", dtype=torch.bfloat16)
    loaded = load_model(tmp_path / "bf16")
    assert loaded.dtype == torch.bfloat16
    up = load_model(tmp_path / "bf16", dtype=torch.float32)
    assert up.dtype == torch.float32


def test_overwrite_in_place_keeps_files(saved, tmp_path):
    model, d = saved
    target = tmp_path / "copy"
    shutil.copytree(d, target)
    (target / "tokenizer.json").write_text("{}")
    loaded = load_model(target)
    save_model(loaded, target)
    assert (target / "tokenizer.json").read_text() == "{}"
    assert (target / "generation_config.json").exists()


# ---------------------------------------------------------------- bad checkpoints
def _copy(saved, tmp_path):
    _, d = saved
    target = tmp_path / "bad"
    shutil.copytree(d, target)
    return target


def test_missing_config(saved, tmp_path):
    d = _copy(saved, tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(d)


def test_missing_weights(saved, tmp_path):
    d = _copy(saved, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(d)


def test_wrong_model_type(saved, tmp_path):
    d = _copy(saved, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gemma3"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'gemma3'"):
        load_model(d)


def test_wrong_shape_named(saved, tmp_path):
    d = _copy(saved, tmp_path)
    t = load_file(d / "model.safetensors")
    t["model.decoder.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(t, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.decoder\.layers\.0\.mlp\.up_proj\.weight.*shape \(3, 3\)"):
        load_model(d)


def test_missing_tensor_named(saved, tmp_path):
    d = _copy(saved, tmp_path)
    t = load_file(d / "model.safetensors")
    del t["model.decoder.norm.weight"]
    save_file(t, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): model\.decoder\.norm\.weight"):
        load_model(d)


def test_truncated_safetensors(saved, tmp_path):
    d = _copy(saved, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(d)


def test_missing_shard(saved, tmp_path):
    model, _ = saved
    save_model(model, tmp_path / "s", max_shard_bytes=40_000)
    next((tmp_path / "s").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing shard"):
        load_model(tmp_path / "s")


def test_unreachable_hub_id(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(CheckpointError, match="not reachable and the model is not in the local cache"):
        resolve("google/diffusiongemma-26B-A4B-it")


def test_hub_id_from_local_cache(saved, monkeypatch, tmp_path):
    """A hub id resolves offline from the huggingface_hub cache layout (refs/main -> snapshots/<commit>)."""
    _, d = saved
    import huggingface_hub.constants as c

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-dg"
    snap = repo / "snapshots" / ("a" * 40)
    shutil.copytree(d, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve("acme/tiny-dg") == snap
    assert load_model("acme/tiny-dg").cfg.hidden_size == 48
    # a revision (a branch or tag: refs/NAME), as `serve --revision` (vLLM's) passes it through Pipeline.load
    other = repo / "snapshots" / ("b" * 40)
    shutil.copytree(d, other)
    (other / "generation_config.json").write_text(json.dumps({"max_new_tokens": 77}))
    (repo / "refs" / "v2").write_text("b" * 40)
    assert resolve("acme/tiny-dg", "v2") == other
    from dgemma.cli import build_parser, load_pipeline

    args = build_parser().parse_args(["serve", "acme/tiny-dg", "--revision", "v2", "--device", "cpu"])
    assert load_pipeline(args).max_new_tokens == 77
    # --download-dir (vLLM's): a cache directory of its own instead of huggingface_hub's
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(cache, elsewhere)
    shutil.rmtree(cache)
    with pytest.raises(CheckpointError):
        resolve("acme/tiny-dg")
    assert resolve("acme/tiny-dg", cache_dir=str(elsewhere)) == elsewhere / "models--acme--tiny-dg" / "snapshots" / (
        "a" * 40)
    args = build_parser().parse_args(["generate", "acme/tiny-dg", "x", "--download-dir", str(elsewhere),
                                      "--revision", "v2", "--device", "cpu"])
    assert load_pipeline(args).max_new_tokens == 77


def test_not_a_path_or_id():
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        resolve("./does/not/exist")


def test_config_roundtrip_and_presets():
    for name in ("26b-a4b", "tiny", "small", "bench-80m"):
        cfg = preset(name)
        assert ModelConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict()))).to_hf_dict() == cfg.to_hf_dict()
    big = preset("26b-a4b")
    assert big.layer_types.count("full_attention") == 5 and big.layer_types[5] == "full_attention"
    counts = big.param_counts()
    assert 25.0e9 < counts["total"] < 25.5e9 and 3.7e9 < counts["active"] < 3.95e9  # model card: 25.2B / 3.8B


def test_reads_transformers_per_layer_config():
    """transformers writes per_layer_config instead of global_head_dim / num_global_key_value_heads."""
    pytest.importorskip("transformers")
    from transformers import DiffusionGemmaConfig

    ours = tiny_config("b")
    theirs = DiffusionGemmaConfig(**ours.to_hf_dict()).to_dict()
    back = ModelConfig.from_hf_dict(theirs)
    assert (back.global_head_dim, back.num_global_key_value_heads) == (24, 2)
    assert back.layer_types == ours.layer_types


def test_a_tensor_read_without_the_map_is_the_mapped_one(tmp_path):
    """What load_model reads through a plain read (a tensor converted or quantized as it loads) is safetensors' own
    tensor, bit for bit, for every dtype; a truncated file is a clear error."""
    from safetensors.torch import save_file

    from dgemma.weights import _directory, _open, _Read

    g = torch.Generator().manual_seed(0)
    ts = {"f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(4, 2, generator=g).bfloat16(),
          "f16": torch.randn(7, generator=g).half(), "i8": torch.randint(-128, 127, (2, 3), dtype=torch.int8),
          "u8": torch.randint(0, 255, (6,), dtype=torch.uint8), "fp8": torch.randn(2, 4).to(torch.float8_e4m3fn),
          "scalar": torch.tensor(2.5), "empty": torch.empty(0, 3), "flag": torch.tensor([True, False])}
    f = tmp_path / "t.safetensors"
    save_file(ts, str(f), metadata={"format": "pt"})
    handle, where = _open(f), _directory(f)
    for k, want in ts.items():
        r = _Read(handle, f, k, where[k])
        got = r.exact()
        assert r.dtype == want.dtype and got.dtype == want.dtype and got.shape == want.shape, k
        assert torch.equal(got.reshape(-1).view(torch.uint8), r().reshape(-1).view(torch.uint8)), k  # the bytes
    f.write_bytes(f.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="truncated"):
        _Read(handle, f, "flag", where["flag"]).exact()
