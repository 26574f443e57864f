#!/usr/bin/env bash
# The Sudoku recipe end to end (see recipes/sudoku.md). Run from the repository root; everything goes under runs/.
# Each stage can be run alone: ./recipes/sudoku.sh data | train | resume | eval | ship; on a lent GPU: gpu, collect
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
    --steps "${STEPS:-900}" --batch-size "${BATCH:-512}" --lr "${LR:-1e-3}" --warmup "${WARMUP:-200}" \
    --weight-decay 0.01 --beta2 0.98 --save-every "${SAVE_EVERY:-500}" --keep 2 --eval-every "${EVAL_EVERY:-1000}" \
    --eval-puzzles 100 --eval-steps 12 --log-every 50 --bf16 --workers "$WORKERS" --threads "$THREADS" \
    --moe "${MOE:-auto}" ${COMPILE:+--compile} ${INIT:+--init-from "$INIT"} > "$RUN.log" 2>&1 < /dev/null &
  echo "training in the background (pid $!): tail -f $RUN.log"
}

gpu() {
  # On a lent GPU (recipes/sudoku.md, the runbook): time the training step for a few batch sizes, MoE layouts and
  # torch.compile (bench/train_step.py), then start the fastest as a run sized to TRAIN_SECONDS of wall time.
  # The learning rate grows with the square root of the batch (1e-3 at 512, at most 2e-3).
  timeout "${BENCH_SECONDS:-360}" $PY bench/train_step.py ${INIT:+--init "$INIT"} --bf16 --threads "$THREADS" --steps 4 \
    --configs "${CONFIGS:-512:sorted,512:dense,1024:dense,2048:dense,2048:dense:compile}" \
    --out "$RUN-train_step.json" | tee "$RUN-train_step.log" || true
  local batch moe compile step_s
  eval "$(grep '^BEST' "$RUN-train_step.log" | tail -1 | cut -d' ' -f2-)"  # batch= moe= compile= step_s=
  [ -n "${step_s:-}" ] || { echo "no training config could be timed" >&2; return 1; }
  STEPS=$($PY -c "print(max(100, int(${TRAIN_SECONDS:-1200} / ($step_s * 1.15))))") \
  LR=$($PY -c "print(round(min(2e-3, 1e-3 * ($batch / 512) ** 0.5), 6))") \
  WARMUP=100 BATCH=$batch MOE=$moe COMPILE=$([ "$compile" = 1 ] && echo 1) train
}

collect() {
  # The run's final weights, or its newest checkpoint's, into DEST (default $OUT) as 15 MiB parts of one tar
  # (the device tool brings back files of at most 16 MiB): cat DEST/weights.tgz.* | tar xz
  local src dest=${DEST:-$OUT}
  src=$(ls -d "$RUN"/final 2>/dev/null || ls -d "$RUN"/checkpoints/step-* 2>/dev/null | tail -1)
  [ -n "$src" ] || { echo "nothing to collect in $RUN" >&2; return 1; }
  tar cz --exclude=trainer_state.pt "$src" "$RUN"/log.jsonl "$RUN".log | split -b 15M - "$dest/weights.tgz."
  echo "collected $src"
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
  # bf16 weights into the package (16.5 MB; the shipped-model test allows 20 MB, and bf16 solves as many boards as
  # the fp32 master weights: BENCHMARKS.md), with the loss curve, the commands, the evaluation and checksums.
  # LOG= a log of every stage when the run continued another (--init-from), steps numbered across the stages;
  # MACHINE= where it trained (default: this machine), NOTES= free text for TRAINING.json.
  $PY -m dgemma.tasks.ship "$RUN/final" dgemma/models/sudoku --log "${LOG:-$RUN/log.jsonl}" --dtype bfloat16 \
    --eval "$RUN/eval_30_36.json" --eval "$RUN/eval_24_29.json" --command "./recipes/sudoku.sh data && ./recipes/sudoku.sh train  # see recipes/sudoku.sh" \
    ${MACHINE:+--machine "$MACHINE"} ${NOTES:+--notes "$NOTES"}
}

case "${1:-}" in
  data) data ;; train) train ;; resume) resume ;; eval) eval_ ;; ship) ship ;; gpu) gpu ;; collect) collect ;;
  *) echo "usage: $0 data|train|resume|eval|ship|gpu|collect" >&2; exit 2 ;;
esac
