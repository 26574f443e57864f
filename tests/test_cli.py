"""The `dgemma` command line: real subprocesses, readable errors, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import randomize, tiny_config
from dgemma.model import DiffusionGemma
from dgemma.weights import save_model


def run(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "dgemma.cli", *args], capture_output=True, text=True, timeout=120)
    if check:
        assert p.returncode == 0, p.stderr
    return p


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "tiny"
    save_model(randomize(DiffusionGemma(tiny_config("a")), seed=1), d,
               generation_config={"max_denoising_steps": 8, "t_min": 0.4, "t_max": 0.8})
    return d


def test_info_checkpoint(ckpt):
    out = run("info", str(ckpt)).stdout
    assert "4 (2 sliding, 2 full)" in out and "max_denoising_steps 8" in out
    d = json.loads(run("info", str(ckpt), "--json").stdout)
    assert d["parameters"]["total"] == DiffusionGemma(tiny_config("a")).num_params()
    assert d["special_tokens"]["eos"] == [1, 106, 50]


def test_info_preset_real_model():
    d = json.loads(run("info", "26b-a4b", "--preset", "--json").stdout)
    assert 25.1e9 < d["parameters"]["total"] < 25.3e9  # model card: 25.2B
    assert round(d["parameters"]["active"] / 1e9, 1) == 3.8


@pytest.mark.parametrize("args,msg", [
    (("info", "/no/such/dir"), "no checkpoint directory"),
    (("info", "nope", "--preset"), "unknown preset"),
])
def test_info_errors_are_one_line(args, msg):
    p = run(*args, check=False)
    assert p.returncode == 2
    assert msg in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
