#!/usr/bin/env bash
# The default code model end to end (see recipes/code.md). Run from the repository root; everything goes under runs/.
# Each stage can be run alone: ./recipes/code.sh data | train | resume | eval | ship
set -euo pipefail
PY=${PY:-.venv/bin/python}
DATA=runs/code-data
RUN=${RUN:-runs/code}
THREADS=${THREADS:-1}      # torch CPU threads; 2 on this machine only if nothing else runs
WORKERS=${WORKERS:-3}      # processes building batches ahead of the trainer

data() {
  # the standard library of this Python: tokenizer (BPE 8,192), tokenized training split, held-out files (~1 min)
  $PY -m dgemma.cli code data --out $DATA
}

train() {
  # The shipped model: 1,000 steps on one CUDA GPU (an H100: 15 min, sharing it with the Sudoku run; bf16 autocast,
  # 3 loader workers building batches ahead; THREADS=4 there). Without a GPU the same command runs on the CPU
  # (--device auto), far more slowly: minutes a step on this 2-core machine.
  # Runs in the background: follow $RUN.log; resumable at any time with `resume`.
  setsid nohup $PY -m dgemma.cli code train --data $DATA --out "$RUN" --steps "${STEPS:-1000}" --batch-size 256 \
    --lr 1e-3 --warmup 200 --weight-decay 0.1 --beta2 0.98 --save-every 500 --keep 2 --eval-every 1000 \
    --eval-examples 256 --log-every 50 --bf16 --workers "$WORKERS" --threads "$THREADS" > "$RUN.log" 2>&1 < /dev/null &
  echo "training in the background (pid $!): tail -f $RUN.log"
}

resume() {
  setsid nohup $PY -m dgemma.cli code train --resume --out "$RUN" >> "$RUN.log" 2>&1 < /dev/null &
  echo "resumed in the background (pid $!): tail -f $RUN.log"
}

eval_() {
  $PY -m dgemma.cli code eval "$RUN/final" --data $DATA --n 200 --steps 16 --json "$RUN/eval.json" --threads "$THREADS"
}

ship() {
  # bf16 weights into the package, with the loss curve, the command and checksums (tests/test_shipped.py checks them)
  $PY -m dgemma.tasks.ship "$RUN/final" dgemma/models/code --log "$RUN/log.jsonl" --dtype bfloat16 \
    --eval "$RUN/eval.json" --machine "${MACHINE:-NVIDIA H100 80GB HBM3, torch 2.11.0+cu130 (bf16 autocast)}" \
    --command "./recipes/code.sh data && THREADS=4 ./recipes/code.sh train  # see recipes/code.sh"
}

case "${1:-}" in
  data) data ;; train) train ;; resume) resume ;; eval) eval_ ;; ship) ship ;;
  *) echo "usage: $0 data|train|resume|eval|ship" >&2; exit 2 ;;
esac
