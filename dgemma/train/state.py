"""Training checkpoints: the model (HF format) or the LoRA adapter, plus the trainer state, written atomically.

    <out>/train_config.json             the run's options and data sources (written once, read by --resume)
    <out>/log.jsonl                     one line of metrics per logged step (cut back to the checkpoint on resume)
    <out>/checkpoints/step-00000500/    config.json + model.safetensors (+ tokenizer, generation_config), or the
                                        adapter files; trainer_state.pt (optimizer, scheduler, step, RNG states,
                                        data position, dataset fingerprint)
    <out>/final/                        the last weights (model or adapter), for generate / merge / eval

Each checkpoint directory is built beside its final name and renamed into place (`io.atomic_dir`), so a kill at any
moment leaves complete checkpoints only; leftovers of an interrupted write are hidden `.step-*.tmp` directories,
removed on the next start.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from ..io import atomic_dir, atomic_write_text
from .lora import has_lora, save_adapter

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "train_config.json"
LOG_FILE = "log.jsonl"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointStateError(ValueError):
    """A run directory that cannot be resumed (nothing saved, or saved by a different run)."""


def check_writable(out: Path) -> None:
    """Fail early and clearly when the output directory cannot be created or written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointStateError(f"cannot write to the output directory {out}: {e.strerror or e}") from None


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    d = Path(out) / "checkpoints"
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest(out: Path) -> tuple[int, Path] | None:
    found = checkpoints(out)
    return found[-1] if found else None


def remove_stale(out: Path) -> None:
    """Delete half-written checkpoint directories left by a killed run."""
    for d in (Path(out) / "checkpoints", Path(out)):
        if d.is_dir():
            for p in d.iterdir():
                if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(out: Path, step: int, model, trainer_state: dict, *, tokenizer=None,
                    generation_config: dict | None = None, base: str | None = None, keep: int = 0) -> Path:
    """Write checkpoint `step` atomically; keep only the newest `keep` (0 = all)."""
    path = Path(out) / "checkpoints" / f"step-{step:08d}"
    with atomic_dir(path) as tmp:
        write_weights(model, tmp, tokenizer=tokenizer, generation_config=generation_config, base=base)
        torch.save(trainer_state, tmp / STATE_FILE)
    if keep:
        for _, old in checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def write_weights(model, into: Path, *, tokenizer=None, generation_config=None, base=None) -> None:
    """The model's weights into an existing (temporary) directory: the adapter alone if it has one."""
    from ..weights import save_model

    if has_lora(model):
        save_adapter(model, into, base=base, into=into)
        return
    # save_model renames its own temporary directory onto `into`; `into` is itself inside an atomic_dir.
    save_model(model, into, tokenizer=tokenizer, generation_config=generation_config)


def save_final(out: Path, model, **kw) -> Path:
    path = Path(out) / "final"
    with atomic_dir(path) as tmp:
        write_weights(model, tmp, **kw)
    return path


def load_state(ckpt: Path) -> dict:
    try:
        return torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointStateError(f"cannot read {Path(ckpt) / STATE_FILE}: {e}") from None


def save_run_config(out: Path, conf: dict) -> None:
    atomic_write_text(Path(out) / CONFIG_FILE, json.dumps(conf, indent=2, sort_keys=True) + "\n")


def load_run_config(out: Path) -> dict:
    p = Path(out) / CONFIG_FILE
    if not p.is_file():
        raise CheckpointStateError(f"{out} is not a training run directory (no {CONFIG_FILE}); nothing to resume")
    return json.loads(p.read_text())


def truncate_log(out: Path, step: int) -> None:
    """Drop log lines of steps after `step` (written by the interrupted run after its last checkpoint)."""
    p = Path(out) / LOG_FILE
    if not p.is_file():
        return
    keep = []
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if rec.get("step", 0) <= step:
            keep.append(line)
    atomic_write_text(p, "".join(line + "\n" for line in keep))


def read_log(out: Path) -> list[dict]:
    p = Path(out) / LOG_FILE
    if not p.is_file():
        return []
    out_ = []
    for line in p.read_text().splitlines():
        try:
            out_.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out_
