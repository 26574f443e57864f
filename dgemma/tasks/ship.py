"""Put a trained checkpoint into the package (`dgemma/models/<name>`) with what a reader needs to trust it.

    python -m dgemma.tasks.ship RUN/final dgemma/models/NAME --log RUN/log.jsonl --dtype bfloat16 \
        --command "dgemma code train ..." [--eval RUN/eval.json]

writes the checkpoint (weights in `--dtype`), `loss_curve.csv` and `loss_curve.svg` (from the run's log.jsonl),
`TRAINING.json` (commands, steps, wall time, machine, evaluation, the checkpoint files' sizes) and `SHA256SUMS`
over every other file (`sha256sum -c` reads it; tests/test_shipped.py checks it). Everything is written beside
the target and renamed into place.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
from pathlib import Path

CURVE_KEYS = ("step", "loss", "diffusion_loss", "ar_loss", "eval_diffusion_loss", "eval_ar_loss", "solve_rate")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_sums(directory: Path) -> None:
    lines = [f"{sha256(p)}  {p.name}" for p in sorted(directory.iterdir()) if p.is_file() and p.name != "SHA256SUMS"]
    (directory / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def check_sums(directory: str | Path) -> list[str]:
    """Files whose checksum differs from SHA256SUMS, or that are missing (an empty list: intact)."""
    directory = Path(directory)
    bad = []
    for line in (directory / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        p = directory / name
        if not p.is_file() or sha256(p) != digest:
            bad.append(name)
    return bad


def read_log(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: r[k] for k in CURVE_KEYS if k in r} for r in rows if "step" in r]


def svg_curve(rows: list[dict], title: str) -> str:
    """A dependency-free SVG of the training (and held-out) loss against the step."""
    W, H, L, B = 640, 360, 56, 40
    series = {k: [(r["step"], r[k]) for r in rows if k in r]
              for k in ("loss", "diffusion_loss", "ar_loss", "eval_diffusion_loss", "eval_ar_loss")}
    series = {k: v for k, v in series.items() if v}
    xs = [x for v in series.values() for x, _ in v]
    ys = [y for v in series.values() for _, y in v]
    x0, x1, y0, y1 = 0, max(xs), 0.0, max(ys) * 1.05
    colors = {"loss": "#222", "diffusion_loss": "#1f77b4", "ar_loss": "#d62728", "eval_diffusion_loss": "#17becf",
              "eval_ar_loss": "#ff7f0e"}

    def pt(x, y):
        return f"{L + (x - x0) / max(x1 - x0, 1) * (W - L - 10):.1f},{H - B - (y - y0) / (y1 - y0) * (H - B - 30):.1f}"

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="{W / 2}" y="16" text-anchor="middle" font-size="13">{title}</text>']
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        _, py = pt(0, y).split(",")
        out.append(f'<line x1="{L}" x2="{W - 10}" y1="{py}" y2="{py}" stroke="#eee"/>'
                   f'<text x="{L - 4}" y="{py}" text-anchor="end">{y:.2f}</text>')
    for i in range(5):
        x = x0 + (x1 - x0) * i / 4
        px, _ = pt(x, y0).split(",")
        out.append(f'<text x="{px}" y="{H - B + 14}" text-anchor="middle">{x:.0f}</text>')
    out.append(f'<text x="{W / 2}" y="{H - 6}" text-anchor="middle">optimizer step</text>')
    for j, (k, v) in enumerate(series.items()):
        dash = ' stroke-dasharray="5,3"' if k.startswith("eval") else ""
        out.append(f'<polyline fill="none" stroke="{colors[k]}" stroke-width="1.5"{dash} '
                   f'points="{" ".join(pt(x, y) for x, y in v)}"/>')
        out.append(f'<text x="{W - 170}" y="{34 + 14 * j}" fill="{colors[k]}">{k.replace("_", " ")}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def run_wall_s(log: Path, src: Path) -> int | None:
    """Wall time of the run from the log's clock ("time", written by the trainer): per stage (a run continued
    from another's checkpoint numbers its steps on and marks its rows with "stage"), the first to the last line,
    scaled to the stage's steps (its first line comes a few steps in); idle time between stages is not counted.
    Without a clock: the run's train_config.json (written at its start) to the checkpoint's files."""
    rows = [r for r in map(json.loads, filter(str.strip, log.read_text().splitlines())) if "time" in r and "step" in r]
    total, start, prev_end = 0.0, 0, 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i].get("stage") != rows[i - 1].get("stage"):
            first, last = rows[start], rows[i - 1]
            if last["step"] > first["step"]:
                total += (last["time"] - first["time"]) * (last["step"] - prev_end) / (last["step"] - first["step"])
            start, prev_end = i, last["step"]
    if total > 0:
        return round(total)
    cfg = log.parent / "train_config.json"
    return round((src / "config.json").stat().st_mtime - cfg.stat().st_mtime) if cfg.is_file() else None


def ship(src: str | Path, dst: str | Path, *, log: str | Path, dtype: str = "float32", commands: list[str],
         evaluation: list[str | Path] | None = None, notes: str = "", machine: str | None = None) -> Path:
    import torch

    from ..io import atomic_dir
    from ..pipeline import Pipeline
    from ..weights import save_model

    src, dst = Path(src), Path(dst)
    pipe = Pipeline.load(str(src), dtype=torch.float32, device="cpu", quiet=True)
    rows = read_log(Path(log))
    wall = run_wall_s(Path(log), src)
    with atomic_dir(dst) as tmp:
        ck = save_model(pipe.model, tmp / "ckpt", dtype=getattr(torch, dtype),
                        generation_config=pipe.generation_config, tokenizer=pipe.tokenizer)
        files = {}
        for p in sorted(ck.iterdir()):
            files[p.name] = p.stat().st_size
            p.rename(tmp / p.name)
        ck.rmdir()
        keys = [k for k in CURVE_KEYS if any(k in r for r in rows)]
        (tmp / "loss_curve.csv").write_text(",".join(keys) + "\n" + "\n".join(
            ",".join(str(r.get(k, "")) for k in keys) for r in rows) + "\n")
        (tmp / "loss_curve.svg").write_text(svg_curve(rows, f"{dst.name}: training loss (nats/token)"))
        info = {"source_run": str(src), "commands": commands, "steps": rows[-1]["step"] if rows else None,
                "wall_s": wall, "weights_dtype": dtype, "parameters": pipe.model.num_params(),
                "machine": machine or f"{platform.machine()}, {platform.processor() or 'cpu'}, "
                                      f"torch {torch.__version__}",
                "notes": notes, "files": files}
        if evaluation:
            info["evaluation"] = {Path(e).name: json.loads(Path(e).read_text()) for e in evaluation}
        (tmp / "TRAINING.json").write_text(json.dumps(info, indent=2) + "\n")
        write_sums(tmp)
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dgemma.tasks.ship", description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--log", required=True, help="the run's log.jsonl")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--command", action="append", required=True, help="a command that trained it (repeatable)")
    ap.add_argument("--eval", action="append", help="an evaluation JSON to record (repeatable)")
    ap.add_argument("--notes", default="")
    ap.add_argument("--machine", help="where it was trained (default: this machine)")
    a = ap.parse_args(argv)
    out = ship(a.src, a.dst, log=a.log, dtype=a.dtype, commands=a.command, evaluation=a.eval, notes=a.notes,
               machine=a.machine)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"shipped {a.src} -> {out} ({size / 2**20:.1f} MiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
