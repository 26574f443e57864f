"""The JSON every bench script of this folder writes: its results with the machine, the threads and the command
that reproduces them, written atomically."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dgemma.io import atomic_write_text  # noqa: E402


def write_results(path: str, script: str, argv: list[str] | None, threads: int, **fields) -> None:
    """Write `fields` to `path` with the machine, `threads` and `python bench/SCRIPT ARGS`, and say so."""
    out = {"machine": platform.processor() or platform.machine(), "threads": threads, **fields,
           "command": f"python bench/{script} " + " ".join(argv if argv is not None else sys.argv[1:])}
    atomic_write_text(path, json.dumps(out, indent=1))
    print(f"wrote {path}")
