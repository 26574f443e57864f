"""The code recipe: corpus split, tokenizer, the three example kinds, fixed infill suffixes, evaluation, CLI errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from dgemma.tasks import code as CO
from dgemma.tasks import code_eval as CE
from dgemma.tokenizer import Tokenizer
from dgemma.train.data import draw_for, make_batch

ROOT = Path(__file__).resolve().parent.parent

FUNCS = '''
def add(a, b):
    """Return a + b."""
    return a + b


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)
        return len(self.items)

    def pop(self):
        if not self.items:
            raise IndexError("pop from empty stack")
        return self.items.pop()


def mean(values):
    total = 0
    for v in values:
        total += v
    return total / len(values)
'''


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    for i in range(24):
        (root / f"mod{i}.py").write_text(f"# module {i}\nimport os\n" + FUNCS.replace("add", f"add{i}") * 2)
    (root / "pkg").mkdir()
    (root / "pkg" / "util.py").write_text(FUNCS)
    (root / "broken.py").write_text("def f(:\n    pass\n")  # does not parse: left out
    (root / "latin1.py").write_bytes(b"x = '\xe9'\n")  # not UTF-8: left out
    (root / "site-packages").mkdir()
    (root / "site-packages" / "dep.py").write_text("x = 1\n")  # third-party: left out
    return root


@pytest.fixture(scope="module")
def data(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    manifest = CO.build_data(out, root=corpus, vocab_size=400)
    return out, manifest


def test_corpus_filter_and_split(corpus, data):
    files = dict(CO.list_files(corpus))
    assert "broken.py" not in files and "latin1.py" not in files and "site-packages/dep.py" not in files
    assert "pkg/util.py" in files and len(files) == 25
    out, m = data
    held = set(m["heldout_paths"])
    assert held == {p for p in files if CO.is_held_out(p)}
    assert m["train_files"] + m["heldout_files"] == len(files)
    # the held-out files are not in the training tokens
    tok = Tokenizer.from_dir(out / "tokenizer")
    n_train = sum(len(tok.encode(t, add_bos=False)) for p, t in files.items() if p not in held)
    assert np.load(out / "train.npy").size == m["train_tokens"] == n_train
    assert [r[0] for r in CO.heldout_files(out)] == sorted(held)


def test_held_out_share_is_stable():
    names = [f"lib/mod{i}.py" for i in range(4000)]
    share = sum(map(CO.is_held_out, names)) / len(names)
    assert 0.02 < share < 0.04
    assert [CO.is_held_out(n) for n in names[:50]] == [CO.is_held_out(n) for n in names[:50]]


def test_tokenizer_specials_and_lines(data):
    tok = Tokenizer.from_dir(data[0] / "tokenizer")
    assert [tok.token_to_id(t) for t in CO.SPECIALS] == list(range(len(CO.SPECIALS)))
    assert (tok.bos_id, tok.pad_id, tok.eos_id) == (CO.BOS, CO.PAD, CO.EOS)
    assert CO.TURN_END in tok.eos_ids
    text = "def f(x):\n    return x\n\n"
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text
    assert ids.count(CO.newline_id(tok)) == 3  # a newline is always its own token
    chat = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert chat[0] == CO.BOS and CO.SPECIALS.index("<|turn>") in chat


def test_examples(data):
    out, _ = data
    ds = CO.load_dataset(out, seed=3, canvas=32)
    T, nl = 32, ds.newline
    kinds = {"completion": 0, "infill": 0, "fim": 0}
    for i in range(300):
        ex = ds.example(i, 0)
        assert ex == ds.example(i, 0) and ex.prompt[0] == CO.BOS
        if CO.FIM_MIDDLE in ex.prompt:
            kinds["fim"] += 1
            p = ex.prompt
            assert p[1] == CO.FIM_PREFIX and p.index(CO.FIM_PREFIX) < p.index(CO.FIM_SUFFIX) < p.index(CO.FIM_MIDDLE)
            assert p[-1] == CO.FIM_MIDDLE and ex.response[-1] == CO.EOS and len(ex.response) <= T
        elif ex.fixed:
            kinds["infill"] += 1
            assert len(ex.response) == T and 1 <= ex.fixed <= T // 2
            middle = [t for t in ex.response[:T - ex.fixed] if t != CO.EOS]
            # middle + suffix is a contiguous piece of one file, starting at a line start (the prompt's end)
            piece = middle + list(ex.response[T - ex.fixed:])
            flat = ds.tokens.tolist()
            assert any(flat[j:j + len(piece)] == piece for j in range(len(flat) - len(piece) + 1))
        else:
            kinds["completion"] += 1
            assert len(ex.response) <= T + 1 and len(ex.prompt) <= 1 + CO.PMAX
        if len(ex.prompt) > 1 and CO.FIM_MIDDLE not in ex.prompt:
            assert ex.prompt[-1] == nl  # cuts fall on line starts
    assert all(v > 30 for v in kinds.values()), kinds
    assert ds.example(5, 0) != ds.example(5, 1)  # a fresh example per epoch


def test_fixed_suffix_stays_clean(data):
    ds = CO.load_dataset(data[0], seed=0, canvas=32)
    exs = [ex for ex in (ds.example(i, 0) for i in range(200)) if ex.fixed][:8]
    gens = [torch.Generator().manual_seed(i) for i in range(len(exs))]
    draws = draw_for(exs, gens, canvas=32, vocab=400, eps=0.999, sc_prob=0.0)  # t ~ 1: nearly all noise
    b = make_batch(exs, draws, canvas=32, pad=0)
    for i, ex in enumerate(exs):
        assert torch.equal(b.noisy[i, 32 - ex.fixed:], b.clean[i, 32 - ex.fixed:])
        assert not b.corrupted[i, 32 - ex.fixed:].any()
        assert b.corrupted[i, :32 - ex.fixed].float().mean() > 0.5


def test_eval_helpers():
    src = textwrap.dedent(FUNCS)
    task = CE.Task("x.py", 0, 0, prefix=src.split("    total = 0")[0], middle="", suffix="\n\nx = 1\n")
    gen = "    total = 0\n    return total\nprint('outside')\n"
    body = CE.completion_body(gen, indent=0)
    assert body == "    total = 0\n    return total\n"
    assert CE.parses(task, body) and not CE.parses(task, "    return (\n") and not CE.parses(task, "  \n")
    assert CE.first_line("\n   \n    x = 1  \n y") == "    x = 1"


def test_functions_and_eval_end_to_end(data, tmp_path):
    from dgemma.pipeline import Pipeline, save_pipeline
    from dgemma.weights import init_random

    out, _ = data
    tok = Tokenizer.from_dir(out / "tokenizer")
    tasks = CE.functions([("m.py", FUNCS)], tok, 10, canvas=96)
    assert {t.line for t in tasks} == {2, 8, 11, 15}  # mean() ends the file: no suffix to infill against
    for t in tasks:
        assert t.prefix + t.middle + t.suffix == FUNCS and CE.parses(t, t.middle)
    cfg = CO.model_config(vocab_size=400, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                          layer_types=["sliding_attention", "full_attention"], num_attention_heads=2,
                          num_key_value_heads=1, head_dim=16, global_head_dim=16, moe_intermediate_size=16,
                          num_experts=4, canvas_length=96, sliding_window=16)
    pipe = Pipeline(init_random(cfg, seed=0), tok, CO.generation_config(4))
    assert pipe.has_fim()
    prefix = pipe.encode("def f(x):\n")
    fim = pipe.fim_prompt(prefix, "\nprint(f(1))\n" * 40)
    assert fim[:2] == [CO.BOS, CO.FIM_PREFIX] and fim[2:len(prefix) + 1] == prefix[1:] and fim[-1] == CO.FIM_MIDDLE
    assert fim[len(prefix) + 1] == CO.FIM_SUFFIX and len(fim) == len(prefix) + 3 + 96 // 4  # a quarter-canvas
    ckpt = save_pipeline(pipe, tmp_path / "m")
    out = Path(shutil.copytree(out, tmp_path / "data"))
    (out / "heldout.jsonl").write_text(json.dumps({"path": "m.py", "text": FUNCS}) + "\n")
    report = CE.run_eval(str(ckpt), str(out), n=2, steps=4, loss_examples=4)
    names = [r["setting"] for r in report["results"]]
    assert names == list(CE.SETTINGS)
    for r in report["results"]:
        assert r["functions"] == 2 and 0 <= r["parses"] <= 1 and r["tokens_per_s"] > 0
    assert report["heldout_loss"]["diffusion_loss"] > 0 and report["heldout_loss"]["ar_loss"] > 0
    assert "held-out loss" in CE.format_report(report)
    again = CE.run_eval(str(ckpt), str(out), n=2, steps=4, loss_examples=0,
                        settings=("completion:diffusion", "completion:top_p@0", "completion:ar-draft"))
    assert again["results"][0]["samples"] == report["results"][0]["samples"]  # a fixed seed decodes the same
    assert again["results"][1]["setting"] == "completion:top_p@0" and again["results"][1]["functions"] == 2
    refined = again["results"][2]  # AR's answer refined by diffusion: both passes counted
    assert refined["functions"] == 2 and 0 <= refined["draft_changed_share"] <= 1
    assert "draft changed" in CE.format_row(refined)


def cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dgemma.cli", "code", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env=env)


def test_cli_errors(tmp_path):
    r = cli("data", "--out", str(tmp_path / "d"), "--source", str(tmp_path / "missing"))
    assert r.returncode == 2 and "source directory not found" in r.stderr and "Traceback" not in r.stderr
    r = cli("train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--steps", "1")
    assert r.returncode == 2 and "not a code data directory" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
