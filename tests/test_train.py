"""The training objective (SPEC §5): corruption, block-causal attention, self-conditioning, data, loop, resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _gemma_tok import gemma4_dir, gemma4_tok, gemma_source  # noqa: F401  (pytest fixtures)
from conftest import randomize, tiny_config
from dgemma.model import DiffusionGemma
from dgemma.train.data import IGNORE, DataError, Example, draw_for, load_jsonl, make_batch
from dgemma.train.loss import ObjectiveConfig, TrainCache, objective
from dgemma.train.noise import corrupt, draw, example_generator
from dgemma.train.trainer import ListDataset, TrainConfig, Trainer, TrainError, lr_factor

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this module


@pytest.fixture(scope="module")
def model():
    # tiny "a": window 8 < the contexts below, canvas 16, two sliding + two full layers
    return randomize(DiffusionGemma(tiny_config("a")), seed=1)


def examples(cfg, spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Example(tuple(torch.randint(5, cfg.vocab_size, (p,), generator=g).tolist()),
                    tuple(torch.randint(5, cfg.vocab_size, (r,), generator=g).tolist()) + (1,)) for p, r in spec]


def batch_for(cfg, exs, *, step=0, sc_prob=0.0, blocks=None, with_ar=True):
    draws = draw_for(exs, [example_generator(0, step, i) for i in range(len(exs))], canvas=cfg.canvas_length,
                     vocab=cfg.vocab_size, eps=1e-3, sc_prob=sc_prob)
    if blocks is not None:
        draws = [type(d)(d.t, b, d.self_condition, d.uniforms, d.tokens) for d, b in zip(draws, blocks)]
    return make_batch(exs, draws, canvas=cfg.canvas_length, pad=0, with_ar=with_ar)


def canvas_logits(model, b):
    cache = TrainCache(model.cfg, b.rows)
    model.forward(b.enc_ids, cache, n_valid=b.enc_len, head=False)
    cache.anchor(b.canvas_start)
    return model.forward(b.noisy, cache, denoise=True)


# ---------------------------------------------------------------- noise
def test_corruption_rate_matches_t():
    V, T = 50, 20_000
    clean = torch.full((T,), 7)
    for t in (0.05, 0.3, 0.7, 0.95):
        d = draw(torch.Generator().manual_seed(int(t * 100)), 1, T, V, 1e-3, 0.5)
        noisy, hit = corrupt(clean, t, d.uniforms, d.tokens)
        sd = math.sqrt(t * (1 - t) / T)
        assert abs(hit.float().mean().item() - t) < 5 * sd
        # replacements are uniform over the whole vocabulary (specials included): no mask token
        counts = torch.bincount(noisy[hit], minlength=V).float()
        expected = hit.sum().item() / V
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < V + 6 * math.sqrt(2 * V)
        assert torch.equal(noisy[~hit], clean[~hit])


def test_noise_level_block_and_sc_are_uniform():
    ts, blocks, sc = [], [], []
    for i in range(4000):
        d = draw(example_generator(3, 0, i), 4, 8, 10, 0.01, 0.5)
        ts.append(d.t), blocks.append(d.block), sc.append(d.self_condition)
    ts = torch.tensor(ts)
    assert ts.min() >= 0.01 and ts.max() < 1
    assert abs(ts.mean().item() - 0.505) < 0.02
    assert all(abs(blocks.count(b) / 4000 - 0.25) < 0.03 for b in range(4))
    assert abs(sum(sc) / 4000 - 0.5) < 0.03


def test_layout_prompt_clean_response_eos_padded(model):
    cfg = model.cfg
    T = cfg.canvas_length
    ex = examples(cfg, [(5, 20)])[0]  # 21 response tokens -> 2 blocks, EOS-filled to 32
    b = batch_for(cfg, [ex], blocks=[1])
    assert b.enc_ids[0, :5].tolist() == list(ex.prompt)  # the prompt is never corrupted
    assert b.enc_ids[0, 5:26].tolist() == list(ex.response)  # the encoder sees the clean response
    assert b.canvas_start.tolist() == [5 + T]
    assert b.clean[0].tolist() == list(ex.response[T:]) + [1] * (2 * T - 21)  # EOS padding is supervised
    # AR targets: next token of every response position, nothing on the prompt
    tgt = b.ar_targets[0]
    assert (tgt[:4] == IGNORE).all() and tgt[4:25].tolist() == list(ex.response) and (tgt[25:] == IGNORE).all()


# ---------------------------------------------------------------- the block-causal mask
def test_training_canvas_equals_inference_canvas(model):
    """The training denoiser pass gives the logits the inference engine computes after prefilling the prompt
    and committing the earlier blocks one by one through the ring cache (window 8 < context)."""
    cfg = model.cfg
    T = cfg.canvas_length
    exs = examples(cfg, [(5, 40), (9, 20), (3, 60)])
    b = batch_for(cfg, exs, blocks=[2, 1, 3])
    with torch.no_grad():
        got = canvas_logits(model, b)
        for i, ex in enumerate(exs):
            cache = model.new_cache(1, 256)
            ctx = b.enc_ids[i, :int(b.canvas_start[i])]
            model.encode(ctx[None, :len(ex.prompt)], cache)
            for s in range(len(ex.prompt), len(ctx), T):
                model.encode(ctx[None, s:s + T], cache)
            want = model.denoise(b.noisy[i:i + 1], cache)
            assert (want - got[i:i + 1]).abs().max() < 1e-4


def test_canvas_never_sees_its_clean_target_or_later_blocks(model):
    cfg = model.cfg
    exs = examples(cfg, [(6, 50), (4, 45)])
    b = batch_for(cfg, exs, blocks=[1, 0])
    with torch.no_grad():
        base = canvas_logits(model, b)
        # scramble everything from each canvas's start on (its clean target and every later block)
        bad = b.enc_ids.clone()
        for i in range(b.rows):
            s = int(b.canvas_start[i])
            bad[i, s:] = torch.randint(5, cfg.vocab_size, (bad.shape[1] - s,))
        b2 = type(b)(**{**vars(b), "enc_ids": bad})
        assert torch.equal(canvas_logits(model, b2), base)
        # ...while an earlier clean token does matter
        early = b.enc_ids.clone()
        early[0, int(b.canvas_start[0]) - 1] += 1
        b3 = type(b)(**{**vars(b), "enc_ids": early})
        assert (canvas_logits(model, b3)[0] - base[0]).abs().max() > 1e-4


def test_canvas_loss_has_no_gradient_from_later_positions(model):
    """Gradient check: d(canvas loss)/d(input embedding) is exactly 0 at every position >= the canvas start."""
    cfg = model.cfg
    exs = examples(cfg, [(6, 50), (4, 45)])
    b = batch_for(cfg, exs, blocks=[1, 2], sc_prob=1.0)
    grabbed = []

    def hook(mod, inp, out):
        if out.shape[1] == b.enc_ids.shape[1] and not grabbed:
            out.retain_grad()
            grabbed.append(out)
    h = model.embed_tokens.register_forward_hook(hook)
    try:
        loss, _ = objective(model, b, ObjectiveConfig(ar_weight=0.0), canvas_norm=1.0, ar_norm=1.0)
        loss.backward()
    finally:
        h.remove()
        model.zero_grad(set_to_none=True)
    g = grabbed[0].grad.abs().sum(-1)
    for i in range(b.rows):
        s = int(b.canvas_start[i])
        assert (g[i, s:] == 0).all()
        assert (g[i, :s] > 0).any()


def test_kvcache_scatter_path_matches_train_cache(model):
    """The engine's KVCache with sliding_ring=False, anchored at the canvas start, gives the same loss and
    gradients: the cache's scatter_ writes carry gradient into the encoder too."""
    from dgemma.cache import KVCache

    cfg = model.cfg
    exs = examples(cfg, [(6, 50), (4, 30)])
    b = batch_for(cfg, exs, blocks=[2, 1])

    def run(make_cache):
        model.zero_grad(set_to_none=True)
        cache = make_cache()
        model.forward(b.enc_ids, cache, n_valid=b.enc_len, head=False)
        cache.lengths = b.canvas_start.clone()
        logits = model.forward(b.noisy, cache, denoise=True)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b.clean.flatten())
        loss.backward()
        return loss.item(), model.layers[0].self_attn.k_proj.weight.grad.clone()

    l1, g1 = run(lambda: TrainCache(cfg, b.rows))
    l2, g2 = run(lambda: KVCache(cfg, b.rows, b.enc_ids.shape[1], sliding_ring=False))
    model.zero_grad(set_to_none=True)
    assert abs(l1 - l2) < 1e-5 and (g1 - g2).abs().max() < 1e-4 * g1.abs().max() and g1.abs().sum() > 0


def test_self_conditioning_two_passes(model):
    """Pass 2 gets softmax(pass-1 logits) @ E * scale for the SC rows and zero for the others; pass 1 is
    computed without gradient and only the second pass is trained."""
    cfg = model.cfg
    exs = examples(cfg, [(5, 30), (7, 12), (4, 20)])
    b = batch_for(cfg, exs, sc_prob=0.5)
    b.self_condition = torch.tensor([True, False, True])
    loss, st = objective(model, b, ObjectiveConfig(ar_weight=0.0), canvas_norm=float(b.clean.numel()), ar_norm=1.0)
    with torch.no_grad():
        cache = TrainCache(cfg, b.rows)
        model.forward(b.enc_ids, cache, n_valid=b.enc_len, head=False)
        cache.anchor(b.canvas_start)
        first = model.forward(b.noisy, cache, denoise=True)
        sc = model.soft_embed(first) * b.self_condition[:, None, None]
        second = model.forward(b.noisy, cache, denoise=True, sc=sc)
        want = torch.nn.functional.cross_entropy(second.flatten(0, 1), b.clean.flatten())
        no_sc = model.forward(b.noisy, cache, denoise=True)
    assert abs(loss.item() - want.item()) < 1e-5
    assert torch.equal(second[1], no_sc[1])  # a row without SC is exactly the plain pass
    assert (second[0] - no_sc[0]).abs().max() > 1e-4
    loss.backward()
    assert model.self_conditioning.gate_proj.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def _objective_grads(model, b, *, checkpointing: bool):
    """Loss, every gradient and the bytes autograd keeps for the backward, of one objective call."""
    model.gradient_checkpointing_enable(checkpointing)
    model.zero_grad(set_to_none=True)
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = objective(model, b, ObjectiveConfig(), canvas_norm=float(b.clean.numel()), ar_norm=10.0)
        loss.backward()
    finally:
        model.gradient_checkpointing_disable()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads, sum(kept)


def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_far_less(model):
    """Activation checkpointing (`--gradient-checkpointing`): the backward reruns each layer, the encoder's
    against the cache as it was (its K/V, which the denoiser read, stay); the same loss and bit-identical
    gradients (AR loss, self-conditioning rows and plain rows), with under a tenth of what autograd keeps (the
    loss's logits are recomputed too). Inference (no gradients) runs as before, and an encoder pass into an
    inference cache under gradients is a clear error."""
    cfg = model.cfg
    b = batch_for(cfg, examples(cfg, [(5, 30), (7, 12), (4, 20)]), sc_prob=0.5)
    b.self_condition = torch.tensor([True, False, True])
    l0, g0, kept0 = _objective_grads(model, b, checkpointing=False)
    l1, g1, kept1 = _objective_grads(model, b, checkpointing=True)
    assert l0 == l1 and g0.keys() == g1.keys() and len(g0) == sum(1 for _ in model.parameters())
    assert all(torch.equal(g0[k], g1[k]) for k in g0), [k for k in g0 if not torch.equal(g0[k], g1[k])]
    assert kept1 < 0.1 * kept0, (kept1, kept0)
    with torch.no_grad():
        want = canvas_logits(model, b)
        model.gradient_checkpointing_enable()
        try:
            assert torch.equal(canvas_logits(model, b), want)
        finally:
            model.gradient_checkpointing_disable()
    model.gradient_checkpointing_enable()
    try:
        with pytest.raises(ValueError, match="cannot"):
            model.encode(b.enc_ids, model.new_cache(b.rows, 64))
    finally:
        model.gradient_checkpointing_disable()


def test_gradient_checkpointing_over_a_quantized_base_with_lora(model):
    """QLoRA with activation checkpointing: the same adapter gradients as without (int4 g32, embedding too)."""
    import copy

    from dgemma.quant import QuantConfig, quantize_model
    from dgemma.train.lora import LoRAConfig, apply_lora

    qmodel = quantize_model(copy.deepcopy(model), QuantConfig("int4", 32, embeddings=True))
    apply_lora(qmodel, LoRAConfig(rank=4), seed=3)
    with torch.no_grad():
        for n, p in qmodel.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.02)
    cfg = model.cfg
    b = batch_for(cfg, examples(cfg, [(6, 25), (4, 9)], seed=4), sc_prob=0.5)
    b.self_condition = torch.tensor([True, False])
    l0, g0, kept0 = _objective_grads(qmodel, b, checkpointing=False)
    l1, g1, kept1 = _objective_grads(qmodel, b, checkpointing=True)
    assert l0 == l1 and g0.keys() == g1.keys() and len(g0) > 20
    assert all(torch.equal(g0[k], g1[k]) for k in g0)
    assert kept1 < 0.5 * kept0, (kept1, kept0)


def test_loss_chunks_follow_the_vocabulary_and_give_the_same_loss(model):
    """The loss materialises at most 8,192 rows of logits at once, fewer for wide vocabularies (512 at the real
    262,144: 512 MiB in fp32), recomputing each chunk in the backward; chunking changes the loss and gradients
    by float rounding only."""
    assert ObjectiveConfig().ce_rows(262_144) == 512 and ObjectiveConfig().ce_rows(8192) == 8192
    assert ObjectiveConfig().ce_rows(16) == 8192 and ObjectiveConfig(ce_elements=1).ce_rows(320) == 1
    cfg = model.cfg
    b = batch_for(cfg, examples(cfg, [(5, 30), (7, 12)]))
    grads = []
    for ocfg in (ObjectiveConfig(), ObjectiveConfig(ce_chunk=7)):
        model.zero_grad(set_to_none=True)
        loss, st = objective(model, b, ocfg, canvas_norm=float(b.clean.numel()), ar_norm=10.0)
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    model.zero_grad(set_to_none=True)
    (l0, g0), (l1, g1) = grads
    assert l0 == pytest.approx(l1, abs=1e-5) and g0.keys() == g1.keys()
    assert all((g0[k] - g1[k]).abs().max() <= 1e-5 * (1 + g0[k].abs().max()) for k in g0)


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8+e"])
def test_blocked_soft_embedding_equals_the_softmax_of_the_logits(kind):
    """At wide vocabularies the first self-conditioning pass never holds its logits: softmax @ E accumulated block by
    block against a running max equals soft_embed(logits) to float rounding (a 9,000-entry vocabulary: 3 CPU
    blocks), for fp32, bf16 and a quantized embedding; the objective then gives the plain path's loss."""
    import copy

    from dgemma.quant import QuantConfig, quantize_model

    m = randomize(DiffusionGemma(tiny_config("a", vocab_size=9000)), seed=5)
    if kind == "bf16":
        m = m.to(torch.bfloat16)
    elif kind == "int8+e":
        m = quantize_model(copy.deepcopy(m), QuantConfig("int8", embeddings=True))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 16, m.cfg.hidden_size, generator=g).to(m.dtype) * 4
    with torch.no_grad():
        want, got = m.soft_embed(m.logits(h)), m.soft_embed_hidden(h)
    assert got.shape == want.shape and got.dtype == want.dtype
    tol = 1e-2 if kind == "bf16" else 1e-5  # bf16: the result rounded (0.6% of its largest here)
    assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()
    if kind != "fp32":
        return
    cfg = m.cfg
    b = batch_for(cfg, examples(cfg, [(5, 30), (7, 12)]), sc_prob=0.5)
    b.self_condition = torch.tensor([True, True])
    wide = ObjectiveConfig(ce_elements=cfg.vocab_size * 64)  # 64-row loss chunks: the wide-vocabulary path
    assert wide.ce_rows(cfg.vocab_size) < wide.ce_chunk
    with torch.no_grad():
        plain, _ = objective(m, b, ObjectiveConfig(), canvas_norm=float(b.clean.numel()), ar_norm=10.0)
        blocked, _ = objective(m, b, wide, canvas_norm=float(b.clean.numel()), ar_norm=10.0)
    assert blocked.item() == pytest.approx(plain.item(), abs=1e-5)


def test_grouped_experts_stay_out_of_a_traced_fp32_forward(monkeypatch):
    """`dgemma train --compile` on the CPU in fp32: torch's shape function for the grouped expert matmul takes
    bf16 only, so a traced forward without gradients (self-conditioning's first pass) takes the loop."""
    from dgemma.model import ExpertGroups

    xs, w = torch.zeros(8, 16), torch.zeros(4, 16, 16)
    assert ExpertGroups.grouped_ok(xs, w) == hasattr(torch, "_grouped_mm")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not ExpertGroups.grouped_ok(xs, w)
    assert ExpertGroups.grouped_ok(xs.bfloat16(), w.bfloat16()) == hasattr(torch, "_grouped_mm")


# ---------------------------------------------------------------- the loop
def tiny_trainer(tmp_path, exs, eval_data=None, **kw):
    m = randomize(DiffusionGemma(tiny_config("a")), seed=2)
    cfg = TrainConfig(out=str(tmp_path), **{"steps": 40, "batch_size": 4, "lr": 3e-3, "warmup": 5,
                                             "save_every": 0, "log_every": 5, **kw})
    return Trainer(m, ListDataset(exs), cfg, eval_data=eval_data, quiet=True)


def test_loss_falls_on_a_tiny_overfit_run(tmp_path):
    cfg = tiny_config("a")
    tr = tiny_trainer(tmp_path, examples(cfg, [(6, 14), (5, 20), (7, 10), (4, 16)]), steps=60)
    first = [tr.train_step()["loss"] for _ in range(3)]
    for _ in range(54):
        tr.train_step()
    last = [tr.train_step()["loss"] for _ in range(3)]
    assert sum(last) < 0.5 * sum(first)


def test_gradient_accumulation_matches_one_batch(tmp_path):
    cfg = tiny_config("a")
    exs = examples(cfg, [(6, 14), (5, 40), (7, 10), (4, 16)])
    a = tiny_trainer(tmp_path / "a", exs, steps=3)
    b = tiny_trainer(tmp_path / "b", exs, steps=3, micro_batch=1)
    for _ in range(3):
        ma, mb = a.train_step(), b.train_step()
        assert abs(ma["loss"] - mb["loss"]) < 1e-5
    # Adam divides by sqrt(v): float noise in near-zero gradients can move a weight by up to ~lr per step.
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert (pa - pb).abs().max() < 1e-3


def test_dense_experts_train_like_the_routed_ones(tmp_path):
    """--moe dense (the GPU layout) follows the routed run's loss curve to float rounding; `auto` picks it on CUDA
    only; --compile leaves evaluation eager (no graph is built by evaluate)."""
    from dgemma.train.trainer import dense_experts

    cfg = tiny_config("a")
    exs = examples(cfg, [(6, 14), (5, 40), (7, 10), (4, 16)])
    a = tiny_trainer(tmp_path / "a", exs, steps=3, moe="sorted")
    b = tiny_trainer(tmp_path / "b", exs, steps=3, moe="dense")
    assert not a.model.layers[0].experts.dense and b.model.layers[0].experts.dense
    for _ in range(3):
        assert a.train_step()["loss"] == pytest.approx(b.train_step()["loss"], abs=1e-5)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert dense_experts("auto", cfg, cuda) and not dense_experts("auto", cfg, cpu)
    assert not dense_experts("auto", cfg.replace(num_experts=64, top_k_experts=2), cuda)
    assert dense_experts("dense", cfg, cpu) and not dense_experts("sorted", cfg, cuda)
    with pytest.raises(TrainError, match="--moe"):
        TrainConfig(out=str(tmp_path), moe="fast")
    c = tiny_trainer(tmp_path / "c", exs, steps=3, compile=True, eval_data=ListDataset(exs[:2]))
    torch._dynamo.utils.counters.clear()
    ev = c.evaluate()
    assert math.isfinite(ev["eval_loss"]) and torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0


def test_lr_schedule():
    f = [lr_factor(s, 10, 100, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[55] == pytest.approx(0.55, abs=0.01) and f[99] > 0.1
    assert all(x >= y for x, y in zip(f[10:], f[11:]))


# ---------------------------------------------------------------- data files
def write(path: Path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def test_jsonl_records_and_line_numbered_errors(tmp_path):
    from dgemma.tasks.sudoku import tokenizer

    tok = tokenizer()
    kw = dict(vocab=16, eos=1, canvas=16, max_len=200)
    good = write(tmp_path / "ok.jsonl", [{"prompt": "12.", "response": "345"}, "",
                                         {"prompt_ids": [2, 6], "response_ids": [7, 1]},
                                         {"messages": [{"role": "user", "content": "1."},
                                                       {"role": "assistant", "content": "99"}]}])
    exs = load_jsonl(good, tok, **kw)
    assert exs[0] == Example((2, 6, 7, 5), (8, 9, 10, 1))
    assert exs[1] == Example((2, 6), (7, 1))  # an already terminated response gets no second EOS
    assert exs[2].response == (14, 14, 1)
    cases = [
        ({"prompt": "1"}, "missing field 'response'"),
        ("{not json", "not valid JSON"),
        ([1, 2], "expected a JSON object"),
        ({"prompt": 3, "response": "1"}, "field 'prompt' must be a string"),
        ({"messages": [{"role": "user", "content": "1"}, {"role": "user", "content": "2"}]}, "role 'assistant'"),
        ({"prompt_ids": [2, 99], "response_ids": [1]}, "outside the vocabulary"),
    ]
    for rec, msg in cases:
        bad = write(tmp_path / "bad.jsonl", [{"prompt": "1", "response": "2"}, rec])
        with pytest.raises(DataError, match=rf"bad.jsonl:2: .*{msg}"):
            load_jsonl(bad, tok, **kw)


def test_chat_records_use_the_chat_template(tmp_path, gemma4_tok):
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    f = write(tmp_path / "chat.jsonl", [{"messages": msgs}])
    ex = load_jsonl(f, gemma4_tok, vocab=gemma4_tok.vocab_size, eos=1, eos_set={1, 106, 50}, canvas=16, max_len=999)[0]
    assert list(ex.prompt) == gemma4_tok.encode_chat(msgs[:1], add_generation_prompt=True)
    assert gemma4_tok.decode(ex.response[:-1]) == "Hello!"
    assert ex.response[-1] == 106  # a model turn ends with <turn|>, one of DiffusionGemma's EOS ids


# ---------------------------------------------------------------- the CLI: resume after kill -9, bad input
TINY = ["--preset", "tiny", "--set", "vocab_size=16", "--set", "eos_token_id=[1]", "--set", "hidden_size=32",
        "--set", "num_hidden_layers=2", "--set", 'layer_types=["sliding_attention","full_attention"]',
        "--set", "canvas_length=8", "--threads", "1"]


def cli(*args, wait=True, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "dgemma.cli", *args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(0)
    recs = [{"prompt_ids": [2] + torch.randint(5, 16, (int(n),), generator=g).tolist(),
             "response_ids": torch.randint(5, 16, (int(r),), generator=g).tolist()}
            for n, r in zip(torch.randint(2, 6, (24,), generator=g), torch.randint(1, 14, (24,), generator=g))]
    return write(d / "train.jsonl", recs)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())}


def test_resume_after_kill_reproduces_the_loss_curve(tmp_path, data):
    from safetensors.torch import load_file

    args = ["train", "--data", str(data), *TINY, "--steps", "30", "--batch-size", "4", "--lr", "3e-3",
            "--warmup", "3", "--log-every", "1", "--save-every", "5", "--keep", "2"]
    full = cli(*args, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    # the same run, killed with SIGKILL once a mid-run checkpoint exists
    run = tmp_path / "killed"
    p = cli(*args, "--out", str(run), wait=False)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step-00000010").is_dir():
        assert p.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (run / "final").exists() and max(losses(run)) < 30
    resumed = cli("train", "--resume", "--out", str(run))
    assert resumed.returncode == 0, resumed.stderr
    want, got = losses(tmp_path / "full"), losses(run)
    assert sorted(got) == list(range(1, 31))
    assert all(got[s] == want[s] for s in want), [(s, want[s], got[s]) for s in want if got[s] != want[s]]
    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(run / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((run / "checkpoints").iterdir())) == 2  # --keep 2


def test_loader_workers_and_gradient_checkpointing_give_the_same_run(tmp_path, data):
    # batches built ahead in 2 worker processes are the inline batches, and activation checkpointing gives the
    # same gradients: the same loss curve, the same weights
    from safetensors.torch import load_file

    args = ["train", "--data", str(data), *TINY, "--steps", "6", "--batch-size", "4", "--log-every", "1"]
    a = cli(*args, "--out", str(tmp_path / "inline"))
    b = cli(*args, "--out", str(tmp_path / "workers"), "--workers", "2")
    c = cli(*args, "--out", str(tmp_path / "ckpt"), "--gradient-checkpointing")
    assert a.returncode == b.returncode == c.returncode == 0, a.stderr + b.stderr + c.stderr
    assert losses(tmp_path / "inline") == losses(tmp_path / "workers") == losses(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "train_config.json").read_text())["train"]["gradient_checkpointing"] is True
    wa = load_file(tmp_path / "inline" / "final" / "model.safetensors")
    for other in ("workers", "ckpt"):
        wb = load_file(tmp_path / other / "final" / "model.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa), other


@pytest.mark.parametrize("lines,msg", [
    (['{"prompt_ids": [2, 5], "response_ids": [6]}', '{"prompt_ids": [2, 5]'], "train.jsonl:2: not valid JSON"),
    (['{"prompt_ids": [2, 5]}'], "train.jsonl:1: missing field 'response_ids'"),
])
def test_bad_dataset_is_one_line_and_leaves_no_checkpoint(tmp_path, lines, msg):
    bad = write(tmp_path / "train.jsonl", lines)
    p = cli("train", "--data", str(bad), *TINY, "--steps", "2", "--out", str(tmp_path / "run"))
    assert p.returncode == 2 and msg in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unwritable_output_and_bad_options(tmp_path, data):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for extra, msg in [(["--out", str(blocker / "run")], "cannot write to the output directory"),
                       (["--out", str(tmp_path / "r"), "--lora-targets", "nope", "--lora-rank", "2"],
                        "unknown LoRA target"),
                       (["--out", str(tmp_path / "r2"), "--set", "hidden_sizee=3"], "unknown model config field")]:
        p = cli("train", "--data", str(data), *TINY, "--steps", "2", *extra)
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "checkpoints").exists()
    p = cli("train", "--resume", "--out", str(tmp_path / "nothing"))
    assert p.returncode == 2 and "nothing to resume" in p.stderr
