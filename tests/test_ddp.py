"""Data parallel: `torchrun --nproc_per_node=2` (gloo, CPU) follows the same loss curve as one process with the
doubled batch, because every example's noise and every loss normalisation are independent of the split."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--set", "vocab_size=16", "--set", "eos_token_id=[1]", "--set", "hidden_size=32",
        "--set", "num_hidden_layers=2", "--set", 'layer_types=["sliding_attention","full_attention"]',
        "--set", "canvas_length=8", "--threads", "1"]


def _session_and_workers(pid: int, marker: str) -> list[int]:
    """The processes to stop: `pid`'s, and every process whose command line holds `marker` (torchrun starts its
    workers in sessions of their own, so killing torchrun's process group leaves them running)."""
    pids = [pid]
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
    return pids


def run(cmd: list[str], env: dict, marker: str, timeout: float = 150) -> subprocess.CompletedProcess:
    """Run `cmd` in its own session, its output in files (a worker left behind cannot hold a pipe open). If it
    outlives `timeout`, it and every process whose command line holds `marker` get SIGABRT, which
    PYTHONFAULTHANDLER turns into a Python traceback of each thread on stderr, then SIGKILL; the test fails with
    that stderr, so a hang says where it hung."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=ROOT,
                                env={**env, "PYTHONFAULTHANDLER": "1"}, start_new_session=True)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGABRT, signal.SIGKILL):
                for pid in _session_and_workers(proc.pid, marker):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pid, sig) if pid == proc.pid else os.kill(pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
            err.seek(0)
            raise AssertionError(f"{' '.join(cmd[:6])} ... hung for {timeout} s; its stderr:\n"
                                 f"{err.read()[-6000:]}") from None
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


def curve(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


def test_two_process_ddp_matches_one_process(tmp_path):
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt_ids": [2] + torch.randint(5, 16, (int(p),), generator=g).tolist(),
                                        "response_ids": torch.randint(5, 16, (int(r),), generator=g).tolist()}) + "\n"
                            for p, r in zip(torch.randint(2, 6, (16,), generator=g),
                                            torch.randint(1, 14, (16,), generator=g))))
    common = ["train", "--data", str(data), *TINY, "--steps", "6", "--batch-size", "8", "--lr", "3e-3",
              "--warmup", "2", "--log-every", "1", "--save-every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = run([sys.executable, "-m", "dgemma.cli", *common, "--out", str(tmp_path / "one")], env, str(tmp_path))
    assert one.returncode == 0, one.stderr
    # two ranks of 4 examples each, and each rank accumulates two micro-batches of 2, with activation checkpointing
    # (the same gradients: DDP's reducer sees each parameter's gradient once, when the rerun layer's backward ends)
    two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "dgemma.cli", *common, "--micro-batch", "2", "--gradient-checkpointing",
               "--out", str(tmp_path / "two")], env, str(tmp_path))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(abs(a[s] - b[s]) < 1e-5 for s in a), (a, b)
    wa = load_file(tmp_path / "one" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "two" / "final" / "model.safetensors")
    # Adam divides by sqrt(v), so float noise in near-zero gradients may move a weight by up to ~lr per step
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-3
