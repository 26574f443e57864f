#!/usr/bin/env bash
# Issue 6's CUDA checks in one device call: the device tests, then `dgemma bench --device cuda`.
#
# The lent GPU machine has torch with CUDA but not dgemma's pinned transformers (the reference engine needs 5.23.0,
# which has DiffusionGemma). Here, once, fetch that wheel into an ignored folder that the call carries:
#
#     echo /.whl/ >> .git/info/exclude
#     .venv/bin/python -m pip download --no-deps --only-binary=:all: -d .whl transformers==5.23.0
#
# then, with the device tool: run(command="bash bench/cuda_check.sh", carry=[".whl"], timeout_s=540).
# Results come back under $OUT: device-tests.log, bench-cuda.json (the bench's table is in the output).
# About 6 minutes on an H100 (session 3: the bench alone, 16 steps, five engines, 3 repeats, took ~4).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/dgemma-cuda-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PY:-python3}"
DEVICE="${DEVICE:-cuda}"        # DEVICE=cpu DGEMMA_TEST_DEVICE=cpu VOCABS=4500 PY=.venv/bin/python: a dry run here
VOCABS="${VOCABS:-8192,262144}"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
"$PY" - <<'EOF'
import torch, transformers
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "-", "transformers", transformers.__version__)
EOF
# The device tests (tests/test_device.py: CPU parity, fused = plain, reproducible seeds, batch invariance in bf16
# (bit for bit on the CPU; on a GPU unknown until this runs), int8/int4, a step without host syncs under
# torch.cuda.set_sync_debug_mode("error"), --compile's bits, the vision tower and an image prompt, a training step
# with and without activation checkpointing).
"$PY" -m pytest -q -p no:cacheprovider tests/test_device.py 2>&1 | tee "$OUT/device-tests.log"
# The CPU bench's settings (8 steps, 3 repeats) on the GPU, bf16 for every engine, the compiled engine beside eager.
"$PY" -m dgemma.bench --device "$DEVICE" --vocabs "$VOCABS" --steps 8 --repeats 3 \
    --engines dgemma-diffusion,dgemma-compiled,dgemma-int8,transformers,forward --out "$OUT/bench-cuda.json"
