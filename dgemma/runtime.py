"""Process-level settings for running the model on the CPU: the C allocator, and the dtype the CPU runs fastest;
and which paths may read tensor values on the host (`host_reads_free`, checked by `HostSyncs`).

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


# ---------------------------------------------------------------- host syncs
def host_reads_free(device) -> bool:
    """Whether reading a tensor's values on the host costs nothing on `device`: on the CPU they are already there;
    on an accelerator each read (`.item()`, `.tolist()`, a truth test, an op whose output size depends on values)
    waits for every queued kernel, so the paths that read values pick another way there. Tests patch this to
    False to run the accelerator's choices on the CPU (`HostSyncs`)."""
    import torch

    return torch.device(device).type == "cpu"


# aten ops that read tensor values on the host before they can return (on CUDA: a device-to-host copy and a wait)
SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "nonzero_static", "bincount", "unique", "_unique", "_unique2",
                      "unique_dim", "unique_consecutive", "masked_select", "equal", "is_nonzero", "histc"})
_NO_KERNEL = frozenset({"_unsafe_view", "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
                        "lift_fresh", "detach", "alias", "_reshape_alias"})
_SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")


class HostSyncs:
    """Records every operation that would make the host wait for an accelerator, while running on any device.

        with HostSyncs() as syncs:
            model.denoise(...)
        assert not syncs.found, syncs.found

    Two kinds are caught: aten ops that read values inside the op (`SYNC_OPS`: boolean-mask indexing runs
    `nonzero`, `torch.bincount` reads the largest index, ...), through a dispatch mode; and Python-side reads
    (`.item()`, `.tolist()`, `bool(t)`, ...), by wrapping those Tensor methods for the duration. `ops` counts
    every aten op dispatched, `kernels` those that compute (not views or allocations): on a GPU, about one kernel
    launch each. Run on the CPU it cannot tell which tensors would live on the device, so a read of a host tensor
    counts too. Not thread-safe (it patches torch.Tensor). On CUDA itself, `torch.cuda.set_sync_debug_mode`
    also sees the syncs inside kernels' host code (tests/test_device.py uses both).
    """

    def __init__(self) -> None:
        self.found: list[str] = []
        self.ops = 0
        self.kernels = 0
        self._mode = None
        self._saved: dict[str, object] = {}

    def __enter__(self) -> "HostSyncs":
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                outer.ops += 1
                name = func.overloadpacket.__name__
                if not func.is_view and name not in _NO_KERNEL:
                    outer.kernels += 1
                if name in SYNC_OPS or (name in ("index", "index_put", "index_put_") and _bool_index(args)):
                    outer.found.append(f"aten.{name}")
                return func(*args, **(kwargs or {}))

        for name in _SYNC_METHODS:
            original = self._saved[name] = getattr(torch.Tensor, name)

            def wrapped(t, *a, _name=name, _f=original, **k):
                outer.found.append(f"Tensor.{_name}")
                return _f(t, *a, **k)

            setattr(torch.Tensor, name, wrapped)
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        self._mode.__exit__(*exc)
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()


def _bool_index(args) -> bool:
    """Whether an aten.index / index_put call indexes with a boolean mask (which runs nonzero on the values)."""
    import torch

    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
