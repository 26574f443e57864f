"""The models shipped in the package: files intact (SHA256SUMS), size limits, loading, deterministic generation;
and the ship step itself on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from dgemma.assets import SHIPPED_DIR, shipped_model
from dgemma.generate import GenerationParams
from dgemma.tasks.code import EOS as CO_EOS
from dgemma.tasks.ship import check_sums, ship

ROOT = Path(__file__).resolve().parent.parent


def _shipped(name: str) -> Path:
    try:
        return shipped_model(name)
    except FileNotFoundError:
        pytest.skip(f"no shipped {name} model in {SHIPPED_DIR}")


@pytest.mark.parametrize("name,limit_mb", [("code", 60), ("sudoku", 20)])
def test_files_intact_and_small(name, limit_mb):
    path = _shipped(name)
    assert check_sums(path) == []
    listed = {line.split("  ", 1)[1] for line in (path / "SHA256SUMS").read_text().splitlines()}
    assert listed == {p.name for p in path.iterdir() if p.is_file()} - {"SHA256SUMS"}
    assert sum(p.stat().st_size for p in path.iterdir()) < limit_mb * 2**20
    info = json.loads((path / "TRAINING.json").read_text())
    assert info["commands"] and info["steps"] and (path / "loss_curve.svg").is_file()
    assert {n: (path / n).stat().st_size for n in info["files"]} == info["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(info["files"])


def test_code_model_generates_deterministically():
    from dgemma.pipeline import Pipeline

    pipe = Pipeline.load(str(_shipped("code")), dtype=torch.float32, device="cpu", quiet=True)
    prompt = "def add(a, b):\n"
    a = pipe.generate([prompt], seed=3, steps=8)[0]
    b = pipe.generate([prompt], seed=3, steps=8)[0]
    assert a.tokens == b.tokens and a.text and a.stats["canvases"] >= 1
    ar1, ar2 = (pipe.generate([prompt], ar=True, max_new_tokens=24)[0] for _ in range(2))
    assert ar1.tokens == ar2.tokens and len(ar1.tokens) > 0
    fill = pipe.infill("def double(x):\n", "\n\nprint(double(2))\n", seed=0, steps=8)
    assert fill.tokens == pipe.infill("def double(x):\n", "\n\nprint(double(2))\n", seed=0, steps=8).tokens
    assert pipe.has_fim()  # so the same weights infill left to right too, through a FIM prompt
    ar_fill = pipe.infill("def double(x):\n", "\n\nprint(double(2))\n", ar=True)
    assert ar_fill.stats["mode"] == "ar" and CO_EOS not in ar_fill.tokens


def test_sudoku_model_solves_fresh_boards():
    # the shipped model solves ~93% of held-out 30-36-clue boards at N=12 (README); 24 boards no file holds
    # (a generator seed the recipe never uses), decoded twice with its own sampler: the same tokens, and most solved
    from dgemma.sampler import SamplerConfig
    from dgemma.tasks.sudoku import generate as gen_puzzles
    from dgemma.tasks.sudoku_eval import Setting, evaluate
    from dgemma.weights import load_model, read_generation_config

    path = _shipped("sudoku")
    model = load_model(path, dtype=torch.float32, quiet=True).eval()
    sampler = SamplerConfig.from_generation_config(read_generation_config(path)).replace(max_denoising_steps=12)
    pairs = [(r["prompt"], r["response"]) for r in gen_puzzles(24, (30, 36), seed=4242)]
    setting = Setting("N=12", GenerationParams(max_new_tokens=81, seed=0, sampler=sampler))
    a, b = (evaluate(model, pairs, setting) for _ in range(2))
    assert {k: v for k, v in a.items() if k != "wall_s"} == {k: v for k, v in b.items() if k != "wall_s"}
    assert a["solve_rate"] >= 0.75 and a["mean_steps"] <= 12, a


def test_default_model_cli():
    _shipped("code")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "dgemma.cli", "generate", "def add(a, b):\n", "--steps", "4",
                        "--max-new-tokens", "16", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stats"]["mode"] == "diffusion"


# ---------------------------------------------------------------- the ship step
def test_ship_writes_checksums_and_curve(tmp_path):
    from dgemma.pipeline import Pipeline, save_pipeline
    from dgemma.weights import init_random, load_model

    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text("{}")
    src = save_pipeline(Pipeline(init_random(tiny_config("a"), seed=0)), run / "final")
    (run / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 / s, "diffusion_loss": 2.0 / s,
                                                       "ar_loss": 3.0 / s}) + "\n" for s in range(1, 6)))
    dst = ship(src, tmp_path / "models" / "tiny", log=run / "log.jsonl", dtype="bfloat16",
               commands=["dgemma train ..."])
    assert check_sums(dst) == []
    assert "<polyline" in (dst / "loss_curve.svg").read_text()
    assert (dst / "loss_curve.csv").read_text().splitlines()[0] == "step,loss,diffusion_loss,ar_loss"
    a = load_model(src, dtype=torch.float32, quiet=True)
    b = load_model(dst, dtype=torch.float32, quiet=True)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p.to(torch.bfloat16).float(), q), n  # bf16 on disk, nothing else changed
    with open(dst / "model.safetensors", "r+b") as f:  # one flipped byte is caught
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert check_sums(dst) == ["model.safetensors"]


def test_wall_time_comes_from_the_log_clock(tmp_path):
    # a run trained elsewhere (a lent GPU) is shipped here: its wall time is the log's, not the file dates'
    from dgemma.tasks.ship import run_wall_s

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0, "time": 1000.0 + 60 * s}) + "\n" for s in (1, 2, 9)))
    assert run_wall_s(log, tmp_path) == 540  # 480 s over steps 1-9, scaled to the 9 steps
    # a continued run: each stage's own span (scaled to its steps), not the days between the two
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0, "time": t, **({"stage": 2} if s > 10 else {})}) + "\n"
                           for s, t in ((5, 100.0), (10, 200.0), (15, 90000.0), (20, 90050.0))))
    assert run_wall_s(log, tmp_path) == 200 + 100
    log.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert run_wall_s(log, tmp_path) is None  # no clock and no train_config.json: unknown, not a guess
