"""Process-level settings for running the model on the CPU: the C allocator, and the dtype the CPU runs fastest.

Every forward allocates and frees many tensors of 0.1-32 MiB: a layer's activations, the expert rows, the
sampler's vocabulary blocks. glibc's malloc serves each one of those above its mmap threshold (128 KiB to start)
with a fresh `mmap` and gives it back with `munmap` when it is freed, and returns the freed top of its heap to the
OS above the trim threshold. Either way the next tensor is new memory, and its first touch page-faults one 4 KiB
page at a time. In a VM a fault costs microseconds: on this project's 2-core machine the experts of one layer
took ~800 faults per call: 3.4-6.1 ms against 1.8 ms without them (BENCHMARKS.md, "Session 10").

`tune_cpu_allocator` raises both thresholds once per process, so freed blocks stay in the heap and are reused
without faulting: the effect of the jemalloc or tcmalloc preload that CPU inference guides recommend, with no
extra library. Blocks above 32 MiB (glibc's ceiling for the mmap threshold) keep their own mappings: their
faults are amortised over that much work. Peak memory is unchanged, memory freed after the peak is kept for reuse
rather than returned. `DGEMMA_MALLOC=system` leaves the allocator as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30

_state: str | None = None


def tune_cpu_allocator() -> str:
    """Raise glibc malloc's mmap and trim thresholds (once per process). Returns what happened: "tuned",
    "system" (DGEMMA_MALLOC=system), or "unsupported" (not Linux with glibc: nothing to do)."""
    global _state
    if _state is not None:
        return _state
    if os.environ.get("DGEMMA_MALLOC", "").lower() == "system":
        _state = "system"
        return _state
    _state = "unsupported"
    if not sys.platform.startswith("linux"):
        return _state
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return _state
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD):
        _state = "tuned"
    return _state


def allocator_state() -> str:
    """What `tune_cpu_allocator` did in this process ("not tuned" before it ran)."""
    return _state or "not tuned"


# ---------------------------------------------------------------- the CPU's dtype
CPU_DTYPES = ("float32", "bfloat16")
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 instructions that multiply bf16 pairs into fp32 sums


def cpu_bf16_native(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16, read from /proc/cpuinfo's flags).

    There oneDNN's bf16 matmuls run at ~4x the fp32 rate (a 2-core Zen 4: 690-830 against 150-180 GFLOP/s on the
    model's shapes; BENCHMARKS.md). Without them torch emulates bf16 and its matmuls are slower than fp32."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:  # not Linux: fp32, the safe choice
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return any(f in flags for f in _BF16_FLAGS)
    return False


def cpu_dtype():
    """The dtype the CPU runs the model in by default: bf16 where it is native, fp32 elsewhere.
    DGEMMA_CPU_DTYPE=float32|bfloat16 overrides the choice (a `--dtype` flag overrides both)."""
    import torch

    pinned = os.environ.get("DGEMMA_CPU_DTYPE", "").strip().lower()
    if pinned:
        if pinned not in CPU_DTYPES:
            raise ValueError(f"DGEMMA_CPU_DTYPE={pinned!r}: use one of {', '.join(CPU_DTYPES)}")
        return getattr(torch, pinned)
    return torch.bfloat16 if cpu_bf16_native() else torch.float32
