"""llm-compressor (compressed-tensors) checkpoints: written by the compressed-tensors library itself (the oracle for
the format), loaded by dgemma into its quantized modules, and converted into dgemma's layout."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from conftest import randomize, tiny_config
from dgemma.cli import main as cli_main
from dgemma.model import DiffusionGemma
from dgemma.quant import QuantConfig, QuantExperts, QuantLinear, convert_checkpoint, quantize_model, weight_bytes
from dgemma.weights import CheckpointError, dgemma_name, load_model, save_model, state_for_save
from test_quant import _logits

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import dequantize  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam  # noqa: E402

# RedHatAI's ignore list for DiffusionGemma's FP8-dynamic release: LM head, embeddings, routers, self-conditioning.
IGNORE = ["lm_head", "re:.*embed.*", "re:.*router.*", "re:.*self_conditioning.*"]
INT8_CHANNEL_PACKED = dict(weights=QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True))
FP8_BLOCK = dict(weights=QuantizationArgs(num_bits=8, type="float", strategy="block", block_structure=[16, 32],
                                          symmetric=True))

# (id, scheme arguments, format, int4 group size, the dgemma scheme it loads as)
CASES = [
    ("fp8-dynamic", PRESET_SCHEMES["FP8_DYNAMIC"], "float-quantized", None, "fp8"),
    ("fp8-tensor", PRESET_SCHEMES["FP8"], "float-quantized", None, "fp8"),
    ("w8a8-int8", PRESET_SCHEMES["W8A8"], "int-quantized", None, "int8"),
    ("w8a16-channel-packed", INT8_CHANNEL_PACKED, "pack-quantized", None, "int8"),
    ("w4a16", PRESET_SCHEMES["W4A16"], "pack-quantized", 32, "int4"),
    ("w4a16-asym", PRESET_SCHEMES["W4A16_ASYM"], "pack-quantized", 32, "int4"),
    ("w8a16-int8-groups", PRESET_SCHEMES["W8A16"], "pack-quantized", 32, "int8"),
    ("fp8-blocks", FP8_BLOCK, "float-quantized", None, "fp8"),
    ("nvfp4", PRESET_SCHEMES["NVFP4A16"], "nvfp4-pack-quantized", None, "nvfp4"),
    ("nvfp4-w4a4", PRESET_SCHEMES["NVFP4"], "nvfp4-pack-quantized", None, "nvfp4"),
]


def _split_experts(state: dict) -> dict:
    """HF's fused experts -> per-expert Linears `experts.{e}.{gate,up,down}_proj.weight` (the release layout)."""
    for k in [k for k in state if k.endswith("experts.gate_up_proj")]:
        gu, dn = state.pop(k), state.pop(k.replace("gate_up_proj", "down_proj"))
        inner, p = gu.shape[1] // 2, k[: -len(".gate_up_proj")]
        for e in range(gu.shape[0]):
            state[f"{p}.{e}.gate_proj.weight"] = gu[e, :inner].clone()
            state[f"{p}.{e}.up_proj.weight"] = gu[e, inner:].clone()
            state[f"{p}.{e}.down_proj.weight"] = dn[e].clone()
    return state


def write_ct(model, out, scheme_args, fmt, group_size=None, ignore=IGNORE, split=True, groups=None):
    """A compressed-tensors checkpoint of `model`, compressed by compressed-tensors' own compressor. Returns
    {HF weight key: the weight compressed-tensors decompresses it to, in float32}."""
    kw = copy.deepcopy(scheme_args)
    if group_size:
        kw["weights"] = kw["weights"].model_copy(update={"group_size": group_size})
    scheme = QuantizationScheme(targets=["Linear"], **kw)
    comp = BaseCompressor.get_value_from_registry(fmt)
    state = state_for_save(model)
    state = _split_experts(state) if split else state
    a, tensors, deq = scheme.weights, {}, {}
    for k, w in state.items():
        linear = k.endswith(("_proj.weight", ".proj.weight")) and w.ndim == 2
        if not linear or any(re.match(p[3:], k) for p in ignore if p.startswith("re:")):
            tensors[k] = w
            continue
        w = w.float()
        o, i = w.shape
        if a.strategy == "channel":
            lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        elif a.strategy == "tensor":
            lo, hi = w.min().reshape(1), w.max().reshape(1)
        elif a.strategy == "block":
            (bo, bi), o2, i2 = a.block_structure, -(-o // a.block_structure[0]), -(-i // a.block_structure[1])
            wb = torch.nn.functional.pad(w, (0, i2 * bi - i, 0, o2 * bo - o)).view(o2, bo, i2, bi)
            lo, hi = wb.amin((1, 3)), wb.amax((1, 3))
        else:  # group, tensor_group
            wg = w.view(o, i // a.group_size, a.group_size)
            lo, hi = wg.amin(-1), wg.amax(-1)
        if a.strategy == "tensor_group":  # NVFP4: a global scale, then e4m3 scales per group of 16
            glob = generate_gparam(w.min().reshape(1), w.max().reshape(1))
            scale, _ = calculate_qparams(lo, hi, a, global_scale=glob)
            d = comp.compress({"weight": w, "weight_scale": scale, "weight_global_scale": glob}, scheme)
            codes = unpack_fp4_from_uint8(d["weight_packed"], o, i, dtype=torch.float32)
            deq[k] = dequantize(x_q=codes, scale=d["weight_scale"].float(), args=a, global_scale=glob,
                                dtype=torch.float32)  # its decompress, in float32 rather than bf16
        else:
            scale, zp = calculate_qparams(lo, hi, a)
            scale = scale.to(torch.bfloat16)  # as llm-compressor stores them for a bf16 model
            d = comp.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme)
            deq[k] = comp.decompress({**d, "weight_scale": d["weight_scale"].float()}, scheme)["weight"].float()
        tensors.update({f"{k[:-len('.weight')]}.{n}": t for n, t in d.items()})
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    qc = QuantizationConfig(config_groups=groups or {"group_0": scheme}, format=fmt, ignore=ignore,
                            quantization_status="compressed").to_dict()
    model.cfg.save(out / "config.json")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(cfg))
    return deq


def _with_weights(model, deq):
    """The float model carrying exactly the weights compressed-tensors decompresses to."""
    ref = copy.deepcopy(model)
    sd = ref.state_dict()
    with torch.no_grad():
        for k, w in deq.items():
            m = re.match(r"(.*experts)\.(\d+)\.(gate|up|down)_proj\.weight$", k)
            if not m:
                sd[dgemma_name(k)].copy_(w)
                continue
            name, e, which = dgemma_name(m.group(1)), int(m.group(2)), m.group(3)
            if which == "down":
                sd[name + ".down_proj"][e].copy_(w)
            else:
                rows = slice(0, w.shape[0]) if which == "gate" else slice(w.shape[0], 2 * w.shape[0])
                sd[name + ".gate_up_proj"][e, rows].copy_(w)
    return ref


@pytest.fixture(scope="module")
def model():
    return randomize(DiffusionGemma(tiny_config("a")), seed=3).eval()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_loads_with_the_weights_compressed_tensors_decompresses_to(model, tmp_path, case):
    _, args, fmt, g, scheme = case
    deq = write_ct(model, tmp_path / "ct", args, fmt, g)
    q = load_model(tmp_path / "ct", dtype=torch.float32)
    rec = q.cfg.extra["quantization_config"]
    groups = g or (args["weights"].block_structure or [None, None])[1]  # a block's inputs are a row's groups
    groups = 16 if scheme == "nvfp4" else groups
    assert rec["quant_method"] == "dgemma" and rec["scheme"] == scheme and rec["group_size"] == groups
    assert rec["ignore"] == ["self_conditioning.down_proj", "self_conditioning.gate_proj", "self_conditioning.up_proj"]
    assert isinstance(q.layers[0].self_attn.q_proj, QuantLinear) and isinstance(q.layers[0].experts, QuantExperts)
    assert isinstance(q.self_conditioning.gate_proj, torch.nn.Linear)  # kept in floats, as the checkpoint has it
    ref = _with_weights(model, deq)
    sd = ref.state_dict()
    for name, m in q.named_modules():  # bit for bit: the same codes, scales and zero points
        if isinstance(m, QuantLinear):
            assert torch.equal(m.dequantize(), sd[name + ".weight"]), name
        elif isinstance(m, QuantExperts):
            for w in ("gate_up_proj", "down_proj"):
                got = m.scheme.dequantize({s: getattr(m, w + s) for s in m.scheme.suffixes}, torch.float32)
                assert torch.equal(got, sd[f"{name}.{w}"]), (name, w)
    # fp8 / int8 scale the matmul's output rather than the weight: float rounding only
    assert (_logits(q) - _logits(ref)).abs().max() < 1e-4


def test_convert_into_dgemmas_layout(model, tmp_path, capsys):
    write_ct(model, tmp_path / "ct", PRESET_SCHEMES["FP8_DYNAMIC"], "float-quantized")
    direct = load_model(tmp_path / "ct")
    assert cli_main(["quantize", str(tmp_path / "ct"), str(tmp_path / "conv"), "--max-shard-gib", "0.0001"]) == 0
    assert "converted from compressed-tensors, fp8, 3 layers kept in floats" in capsys.readouterr().out
    assert (tmp_path / "conv" / "model.safetensors.index.json").exists()  # streamed into several shards
    cfg = json.loads((tmp_path / "conv" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "dgemma" and cfg["quantization_config"]["scheme"] == "fp8"
    conv = load_model(tmp_path / "conv")
    a, b = direct.state_dict(), conv.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert conv.layers[1].experts.gate_up_proj.dtype == torch.float8_e4m3fn
    # a second conversion of a dgemma checkpoint, or --scheme on a compressed one, is a clear error
    assert cli_main(["quantize", str(tmp_path / "ct"), str(tmp_path / "x"), "--scheme", "int4"]) == 2
    assert "already quantized (compressed-tensors fp8)" in capsys.readouterr().err
    with pytest.raises(Exception, match="not an llm-compressor .compressed-tensors. or ModelOpt checkpoint"):
        convert_checkpoint(tmp_path / "conv", tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_fp8_scheme_quantize_and_save(model, tmp_path):
    """`dgemma quantize --scheme fp8` writes dgemma's own FP8 (the layout converted checkpoints use)."""
    save_model(model, tmp_path / "f")
    assert cli_main(["quantize", str(tmp_path / "f"), str(tmp_path / "q"), "--scheme", "fp8", "--quiet"]) == 0
    q = load_model(tmp_path / "q")
    assert q.layers[0].experts.down_proj.dtype == torch.float8_e4m3fn
    assert q.self_conditioning.gate_proj.weight.dtype == torch.float8_e4m3fn  # dgemma quantizes it
    w = model.layers[0].self_attn.q_proj.weight
    err = (q.layers[0].self_attn.q_proj.dequantize() - w).abs() / w.abs().amax(1, keepdim=True)
    assert err.max() <= 16 / 448 * 1.001  # e4m3: a row's max is 448, its binade [256, 448] has steps of 32


def test_quantized_router_is_dequantized_and_float_experts_are_stacked(model, tmp_path):
    """A router that the checkpoint quantizes stays a float Linear in dgemma (dequantized); experts that it
    keeps in floats, split per expert or fused, are stacked back and recorded in `ignore`."""
    ignore = ["lm_head", "re:.*embed.*", "re:.*experts.*"]
    deq = write_ct(model, tmp_path / "split", PRESET_SCHEMES["FP8_DYNAMIC"], "float-quantized", ignore=ignore)
    q = load_model(tmp_path / "split", dtype=torch.float32)
    ref = _with_weights(model, deq)
    assert type(q.layers[0].router.proj) is torch.nn.Linear
    assert torch.equal(q.layers[0].router.proj.weight, ref.layers[0].router.proj.weight)
    assert not torch.equal(q.layers[0].router.proj.weight, model.layers[0].router.proj.weight)  # it was quantized
    assert isinstance(q.self_conditioning.gate_proj, QuantLinear)
    assert [n for n in q.cfg.extra["quantization_config"]["ignore"]] == [f"layers.{i}.experts" for i in range(4)]
    assert torch.equal(q.layers[2].experts.gate_up_proj, model.layers[2].experts.gate_up_proj)
    assert (_logits(q) - _logits(ref)).abs().max() < 1e-4
    # `dgemma info` counts the experts the checkpoint keeps in floats at float size: the loaded model's bytes
    from dgemma.cli import info_dict

    est = info_dict(str(tmp_path / "split"))
    assert est["quantization"]["ignore"] == q.cfg.extra["quantization_config"]["ignore"]
    held = sum(t.numel() * t.element_size() for t in q.state_dict().values())  # its scales are bf16, not fp32
    assert abs(est["weights_bytes"]["float32"] - held) < 0.01 * held
    assert held > 1.5 * weight_bytes(q.cfg, QuantConfig("fp8"))  # as if the experts were fp8 too

    write_ct(model, tmp_path / "fused", PRESET_SCHEMES["FP8_DYNAMIC"], "float-quantized", split=False)
    q = load_model(tmp_path / "fused", dtype=torch.float32)  # fused 3-D experts: the quantizer skipped them
    assert type(q.layers[0].experts).__name__ == "Experts"
    assert len(q.cfg.extra["quantization_config"]["ignore"]) == 4 + 3


def _config_error(tmp_path, model, **change):
    write_ct(model, tmp_path / "ct", PRESET_SCHEMES["FP8_DYNAMIC"], "float-quantized")
    path = tmp_path / "ct" / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in change.items():
        cfg["quantization_config"][k] = v
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "ct")
    return str(e.value)


@pytest.mark.parametrize("change,msg", [
    (dict(format="mxfp4-pack-quantized"), "--scheme nvfp4"),
    (dict(format="sparse-24-bitmask"), "not supported"),
    (dict(config_groups={"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "strategy": "channel", "symmetric": True}}}), "channel strategy"),
    (dict(config_groups={"a": {"targets": ["re:.*experts.*"], "weights": {
        "num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": True}},
        "b": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                                                  "symmetric": True}}}), "mixes weight schemes"),
    (dict(config_groups={}), "no config_groups"),
], ids=["mxfp4", "sparse", "int4-channel", "mixed", "empty"])
def test_unsupported_configs_are_clear_errors(model, tmp_path, change, msg):
    assert msg in _config_error(tmp_path, model, **change)


def test_broken_tensors_are_clear_errors(model, tmp_path):
    from safetensors.torch import load_file, save_file

    write_ct(model, tmp_path / "ct", PRESET_SCHEMES["W4A16"], "pack-quantized", 32)
    f = tmp_path / "ct" / "model.safetensors"
    good = load_file(str(f))
    bad = {k: v for k, v in good.items() if k != "model.decoder.layers.1.experts.2.up_proj.weight_scale"}
    save_file(bad, str(f))
    with pytest.raises(CheckpointError, match="some experts are quantized and some are not"):
        load_model(tmp_path / "ct")
    bad = dict(good)
    bad["model.decoder.layers.0.self_attn.q_proj.weight_scale"] = good[
        "model.decoder.layers.0.self_attn.q_proj.weight_scale"][:, :1].contiguous()
    save_file(bad, str(f))
    with pytest.raises(CheckpointError, match="groups of 32 need"):
        load_model(tmp_path / "ct")


def test_nvfp4_scheme_writes_llm_compressors_codes(model, tmp_path):
    """`--scheme nvfp4` quantizes as compressed-tensors does (global scale, e4m3 group scales, e2m1 codes rounded
    to nearest, ties to even): on every layer both quantize, the same bytes."""
    write_ct(model, tmp_path / "ct", PRESET_SCHEMES["NVFP4A16"], "nvfp4-pack-quantized")
    theirs = dict(load_model(tmp_path / "ct").named_modules())
    ours = quantize_model(copy.deepcopy(model), QuantConfig("nvfp4"))
    compared = 0
    for name, m in ours.named_modules():
        if isinstance(m, (QuantLinear, QuantExperts)) and isinstance(theirs.get(name), type(m)):
            for n, t in m.named_buffers(recurse=False):
                assert torch.equal(t.float(), getattr(theirs[name], n).float()), (name, n)
            compared += 1
    assert compared == 2 * 8 + 2 * 7  # q, k, v, o, the dense MLP, the experts; full layers have no v_proj


def _as_modelopt(ct_dir, out, algo, sidecar=False):
    """A compressed-tensors checkpoint rewritten into NVIDIA ModelOpt's export names, as vLLM's ModelOpt loader
    reads them (no ModelOpt library here): NVFP4 `weight` (uint8 e2m1 pairs), `weight_scale` (e4m3 per 16) and
    `weight_scale_2` (1 / the global scale); FP8 `weight` and a scalar `weight_scale`; `input_scale`s as noise."""
    from safetensors.torch import load_file, save_file

    t = load_file(str(ct_dir / "model.safetensors"))
    new = {}
    for k, v in t.items():
        if k.endswith(".weight_packed"):
            new[k[: -len("_packed")]] = v
        elif k.endswith(".weight_global_scale"):
            new[k.replace("weight_global_scale", "weight_scale_2")] = (1.0 / v.float()).reshape(())
            new[k.replace("weight_global_scale", "input_scale")] = torch.ones(())
        elif k.endswith(".weight_scale") and algo == "FP8":
            new[k] = v.float().reshape(())
        else:
            new[k] = v
    out.mkdir()
    save_file(new, str(out / "model.safetensors"))
    cfg = json.loads((ct_dir / "config.json").read_text())
    mo = {"quant_algo": algo, "group_size": 16, "exclude_modules": ["lm_head", "*router*", "*self_conditioning*"]}
    if sidecar:  # ModelOpt's older exports: hf_quant_config.json beside a config.json without it
        del cfg["quantization_config"]
        (out / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"}, "quantization": mo}))
    else:
        cfg["quantization_config"] = {"quant_method": "modelopt", **mo}
    (out / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("algo,sidecar", [("NVFP4", False), ("NVFP4", True), ("FP8", False)],
                         ids=["nvfp4", "nvfp4-hf_quant_config", "fp8-tensor"])
def test_modelopt_exports(model, tmp_path, algo, sidecar, capsys):
    args, fmt = ((PRESET_SCHEMES["NVFP4A16"], "nvfp4-pack-quantized") if algo == "NVFP4"
                 else (PRESET_SCHEMES["FP8"], "float-quantized"))
    deq = write_ct(model, tmp_path / "ct", args, fmt)
    _as_modelopt(tmp_path / "ct", tmp_path / "mo", algo, sidecar)
    q = load_model(tmp_path / "mo", dtype=torch.float32)
    assert q.cfg.extra["quantization_config"]["scheme"] == ("nvfp4" if algo == "NVFP4" else "fp8")
    sd = _with_weights(model, deq).state_dict()
    for name, m in q.named_modules():  # scale * scale_2 vs scale / global: the same to float32's last bit or so
        if isinstance(m, QuantLinear):
            torch.testing.assert_close(m.dequantize(), sd[name + ".weight"], rtol=3e-7, atol=0)
    assert cli_main(["quantize", str(tmp_path / "mo"), str(tmp_path / "conv"), "--quiet"]) == 0
    assert "converted from modelopt" in capsys.readouterr().out
    conv = load_model(tmp_path / "conv", dtype=torch.float32)
    assert all(torch.equal(a.float(), b.float()) for a, b in zip(q.state_dict().values(), conv.state_dict().values()))
    from dgemma.cli import info_dict

    assert info_dict(str(tmp_path / "mo"))["quantization"]["format"] == algo


def test_modelopt_unsupported_algo(model, tmp_path):
    write_ct(model, tmp_path / "ct", PRESET_SCHEMES["FP8"], "float-quantized")
    _as_modelopt(tmp_path / "ct", tmp_path / "mo", "W4A8_AWQ")
    with pytest.raises(CheckpointError, match="ModelOpt quant_algo 'W4A8_AWQ' is not supported"):
        load_model(tmp_path / "mo")
