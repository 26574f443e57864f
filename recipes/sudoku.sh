#!/usr/bin/env bash
# The Sudoku recipe end to end (see recipes/sudoku.md). Run from the repository root; everything goes under runs/.
# Each stage can be run alone: ./recipes/sudoku.sh data | train | resume | eval
set -euo pipefail
PY=${PY:-.venv/bin/python}
DATA=runs/sudoku-data
RUN=${RUN:-runs/sudoku}
THREADS=${THREADS:-1}      # torch CPU threads; 2 on this machine only if nothing else runs
WORKERS=${WORKERS:-3}      # processes building batches ahead of the trainer
GEN_WORKERS=${GEN_WORKERS:-$(nproc)}  # processes generating puzzles

data() {
  mkdir -p "$DATA"
  # 120k training puzzles over a broad clue range (each served with a fresh random symmetry every epoch: ~10 min),
  # a 200-puzzle validation set for the checks during training, and the two 1,000-puzzle test sets.
  $PY -m dgemma.cli sudoku gen --out $DATA/train.jsonl      --n 120000 --clues 24-45 --seed 1    --workers "$GEN_WORKERS"
  $PY -m dgemma.cli sudoku gen --out $DATA/valid.jsonl      --n 200    --clues 24-36 --seed 1003 --workers "$GEN_WORKERS"
  $PY -m dgemma.cli sudoku gen --out $DATA/test_30_36.jsonl --n 1000   --clues 30-36 --seed 1001 --workers "$GEN_WORKERS"
  $PY -m dgemma.cli sudoku gen --out $DATA/test_24_29.jsonl --n 1000   --clues 24-29 --seed 1002 --workers "$GEN_WORKERS"
}

train() {
  # Meant for one CUDA GPU: on an H100 a step takes ~1 s (bf16 autocast, 3 loader workers building batches ahead;
  # THREADS=4 there). Without a GPU the same command runs on the CPU (--device auto), at minutes a step here.
  # Runs in the background: follow $RUN.log; resumable at any time with `resume`. INIT=CKPT continues training a
  # Sudoku checkpoint (new optimizer and schedule) instead of starting a new model.
  setsid nohup $PY -m dgemma.cli sudoku train --data $DATA/train.jsonl --eval-data $DATA/valid.jsonl --out "$RUN" \
    --steps "${STEPS:-900}" --batch-size 512 --lr 1e-3 --warmup 200 --weight-decay 0.01 --beta2 0.98 \
    --save-every 500 --keep 2 --eval-every 1000 --eval-puzzles 100 --eval-steps 12 --log-every 50 \
    --bf16 --workers "$WORKERS" --threads "$THREADS" ${INIT:+--init-from "$INIT"} > "$RUN.log" 2>&1 < /dev/null &
  echo "training in the background (pid $!): tail -f $RUN.log"
}

resume() {
  setsid nohup $PY -m dgemma.cli sudoku train --resume --out "$RUN" >> "$RUN.log" 2>&1 < /dev/null &
  echo "resumed in the background (pid $!): tail -f $RUN.log"
}

eval_() {
  # early-stopping runs at each budget and greedy AR (add the fixed-step runs by dropping --no-fixed)
  $PY -m dgemma.cli sudoku eval "$RUN/final" --data $DATA/test_30_36.jsonl --n 1000 --steps 12,24,48 --no-fixed \
    --json "$RUN/eval_30_36.json" --threads "$THREADS"
  $PY -m dgemma.cli sudoku eval "$RUN/final" --data $DATA/test_24_29.jsonl --n 1000 --steps 12,24,48 --no-fixed \
    --json "$RUN/eval_24_29.json" --threads "$THREADS"
}

ship() {
  # fp32 weights into the package, with the loss curve, the commands, the evaluation and checksums
  $PY -m dgemma.tasks.ship "$RUN/final" dgemma/models/sudoku --log "$RUN/log.jsonl" --dtype float32 \
    --eval "$RUN/eval_30_36.json" --eval "$RUN/eval_24_29.json" --command "./recipes/sudoku.sh data && ./recipes/sudoku.sh train  # see recipes/sudoku.sh"
}

case "${1:-}" in
  data) data ;; train) train ;; resume) resume ;; eval) eval_ ;; ship) ship ;;
  *) echo "usage: $0 data|train|resume|eval|ship" >&2; exit 2 ;;
esac
