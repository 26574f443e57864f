"""dgemma.runtime: the CPU's default dtype and the allocator setting every engine process makes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dgemma.pipeline import default_dtype
from dgemma.runtime import cpu_bf16_native, cpu_dtype

ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_bf16 avx512_vnni\n"
SAPPHIRE = "flags\t\t: avx2 avx512f amx_bf16 amx_tile amx_int8\n"
AVX2 = "flags\t\t: fpu sse2 avx avx2 fma f16c\n"


def test_bf16_is_native_only_with_a_bf16_dot_product():
    assert cpu_bf16_native(ZEN4) and cpu_bf16_native(SAPPHIRE)
    assert not cpu_bf16_native(AVX2)
    assert not cpu_bf16_native("vendor_id : whatever\n")  # no flags line (not x86): fp32


def test_default_dtype_rule(monkeypatch):
    import dgemma.runtime as R

    assert default_dtype("cuda") == torch.bfloat16
    monkeypatch.delenv("DGEMMA_CPU_DTYPE", raising=False)
    monkeypatch.setattr(R, "cpu_bf16_native", lambda: True)
    assert cpu_dtype() == default_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(R, "cpu_bf16_native", lambda: False)
    assert cpu_dtype() == default_dtype("cpu") == torch.float32
    monkeypatch.setenv("DGEMMA_CPU_DTYPE", "bfloat16")  # the pin wins over the CPU
    assert default_dtype("cpu") == torch.bfloat16
    monkeypatch.setenv("DGEMMA_CPU_DTYPE", "float16")
    with pytest.raises(ValueError, match="DGEMMA_CPU_DTYPE"):
        default_dtype("cpu")


PROBE = """
from dgemma.runtime import tune_cpu_allocator, allocator_state
state = tune_cpu_allocator()
assert tune_cpu_allocator() == state  # once per process
print(state, allocator_state())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_allocator_is_tuned_once_per_process_unless_opted_out():
    """The setting is applied (glibc accepted both mallopt calls) and `DGEMMA_MALLOC=system` leaves malloc alone.
    What it buys is measured by wall clock (BENCHMARKS.md, session 10), not here: a page-fault count over repeated
    4 MiB allocations proved no test, since glibc's own dynamic mmap threshold also reuses such blocks after the
    first free, and both settings saw 0-6 fresh blocks out of 50 at random in this VM."""
    env = {k: v for k, v in os.environ.items() if k != "DGEMMA_MALLOC"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    if out.stdout.split()[0] == "unsupported":  # not glibc (musl)
        pytest.skip("no mallopt in this C library")
    assert out.stdout.split() == ["tuned", "tuned"]
    out = subprocess.run([sys.executable, "-c", PROBE], env={**env, "DGEMMA_MALLOC": "system"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["system", "system"]
