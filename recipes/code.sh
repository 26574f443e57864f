#!/usr/bin/env bash
# The default code model end to end (see recipes/code.md). Run from the repository root; everything goes under runs/.
# Each stage can be run alone: ./recipes/code.sh data | train | resume | eval | ship
set -euo pipefail
PY=${PY:-.venv/bin/python}
DATA=runs/code-data
RUN=${RUN:-runs/code}
THREADS=${THREADS:-1}      # 1 leaves the other core to the Sudoku run; OpenMP threads competing with other jobs stall

data() {
  # the standard library of this Python: tokenizer (BPE 8,192), tokenized training split, held-out files (~1 min)
  $PY -m dgemma.cli code data --out $DATA
}

train() {
  # Long: run it in the background (nohup) and follow $RUN.log; resumable at any time with `resume`.
  nohup $PY -m dgemma.cli code train --data $DATA --out "$RUN" --steps 800 --batch-size 16 --lr 2e-3 --warmup 50 \
    --weight-decay 0.01 --beta2 0.98 --save-every 50 --keep 2 --eval-every 200 --eval-examples 64 --log-every 10 \
    --threads "$THREADS" > "$RUN.log" 2>&1 &
  echo "training in the background (pid $!): tail -f $RUN.log"
}

resume() {
  nohup $PY -m dgemma.cli code train --resume --out "$RUN" >> "$RUN.log" 2>&1 &
  echo "resumed in the background (pid $!): tail -f $RUN.log"
}

eval_() {
  $PY -m dgemma.cli code eval "$RUN/final" --data $DATA --n 200 --steps 16 --json "$RUN/eval.json" --threads "$THREADS"
}

ship() {
  # bf16 weights into the package, with the loss curve, the command and checksums (tests/test_shipped.py checks them)
  $PY -m dgemma.tasks.ship "$RUN/final" dgemma/models/code --log "$RUN/log.jsonl" --dtype bfloat16 \
    --eval "$RUN/eval.json" --command "./recipes/code.sh data && ./recipes/code.sh train  # see recipes/code.sh"
}

case "${1:-}" in
  data) data ;; train) train ;; resume) resume ;; eval) eval_ ;; ship) ship ;;
  *) echo "usage: $0 data|train|resume|eval|ship" >&2; exit 2 ;;
esac
