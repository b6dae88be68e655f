#!/usr/bin/env bash
# Every GPU check and benchmark of dfakd in one script, within about 8 minutes on one card (a benchmark,
# not a test: it prints and writes figures, it asserts nothing but that each part ran).
#
#   bash bench/gpu.sh                    # on a GPU machine: figures under $OUT (default bench/results/gpu-<date>)
#   BENCH_QUICK=1 bash bench/gpu.sh      # anywhere (CPU included): every part for a few steps, tiny models
#
# Parts (each under its own time limit; a part that runs out of time is reported and the script goes on):
#   1. checks: tests/test_cuda_sync.py (no host sync in train/distill/search steps) and the CUDA variants
#      of tests/test_fast_paths.py;
#   2. the step table against the floor (six methods + search), resnet32x4 -> resnet8x4, batch 64:
#      fp32 and bf16 (+channels-last), eager and CUDA-graphed (--compile reduce-overhead);
#   3. 1 against 4 concurrent distillation jobs on one GPU through the local pool (DFAKD_GPU_SLOTS), wall
#      clock (quick: 1 against 2);
#   4. projections: 240-epoch resnet32x4 -> resnet8x4 CIFAR-100 distillation, and the paper's 200-epoch
#      WRN-28-4 -> WRN-16-4 DFA run with its search (3 groups x 20 epochs, batch 64), from measured steps.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
QUICK="${BENCH_QUICK:-0}"
OUT="${OUT:-bench/results/gpu-$(date +%F)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BUDGET_S="${BENCH_BUDGET_S:-470}"
PY="${PYTHON:-python}"
START=$(date +%s)
DEVICE="${BENCH_DEVICE:-$($PY -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# part NAME LIMIT_S CMD...: run CMD with at most LIMIT_S seconds (less if the budget is nearly spent)
part() {
  local name="$1" limit="$2"; shift 2
  local rest; rest=$(left)
  if (( rest < 15 )); then note "SKIPPED $name: the ${BUDGET_S}s budget is spent"; return 0; fi
  (( limit > rest )) && limit=$rest
  local t0; t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$? dt=$(( $(date +%s) - t0 ))
  if (( rc == 124 || rc == 137 )); then note "TIMEOUT $name after ${dt}s (limit ${limit}s): $OUT/$name.txt"
  elif (( rc != 0 )); then note "FAILED  $name (rc $rc, ${dt}s): $OUT/$name.txt"; FAILED=1
  else note "ok      $name (${dt}s)"; fi
}
FAILED=0
note "dfakd bench/gpu.sh on $DEVICE, quick=$QUICK, $(date -u +%FT%TZ), out $OUT"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$SUMMARY" 2>&1

if [ "$QUICK" = 1 ]; then
  PAIR=(--teacher resnet20 --student resnet8 --classes 10)
  SIZE=(--repeats 1 --warmup 1 --eval-images 64 --data-images 256 --data-batches 2 --batch 16)
  METHODS_ALL=kd,dfa; METHODS_FP32_GRAPH=kd
  WRN=(--teacher resnet20 --student resnet8 --classes 10)
  JOBS_EPOCHS=1; JOB_ARCHS=(resnet20 resnet8); JOB_BATCH=16; NJOBS=2  # 1 against 2 jobs
else
  PAIR=(--teacher resnet32x4 --student resnet8x4 --classes 100)
  SIZE=(--batch 64)
  METHODS_ALL=kd,fitnet,at,ofd,dkd,dfa; METHODS_FP32_GRAPH=kd,ofd,dfa
  WRN=(--teacher wrn_28_4 --student wrn_16_4 --classes 100)
  JOBS_EPOCHS=3; JOB_ARCHS=(resnet32x4 resnet8x4); JOB_BATCH=64; NJOBS=4
fi

# ---------------------------------------------------------------------------------------- 1. checks
if [ "$QUICK" = 1 ]; then
  part checks 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_sync.py -k "train and fp32"
else
  part checks 75 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_sync.py tests/test_fast_paths.py -k cuda
fi

# ------------------------------------------------------------------------------------ 2. step table
bench() { # NAME LIMIT PRECISION CHANNELS_LAST METHODS [extra bench/run.py args...]
  local name="$1" limit="$2" prec="$3" cl="$4" meth="$5"; shift 5
  part "$name" "$limit" "$PY" bench/run.py --device "$DEVICE" "${PAIR[@]}" "${SIZE[@]}" --precision "$prec" \
    --channels-last "$cl" --methods "$meth" --compare-modes '' --quiet --json "$OUT/$name.json" "$@"
}
bench steps-fp32-eager 60 fp32 false "$METHODS_ALL"
bench steps-bf16-eager 60 bf16 true "$METHODS_ALL"
if [ "$DEVICE" = cuda ]; then
  # inductor compiles every figure's step: the bf16 table gets all six methods, fp32 three (time budget)
  bench steps-bf16-graphs 150 bf16 true "$METHODS_ALL" --compile reduce-overhead
  bench steps-fp32-graphs 90 fp32 false "$METHODS_FP32_GRAPH" --compile reduce-overhead
else
  note "SKIPPED steps-*-graphs: CUDA graphs need a GPU (torch.compile on a 2-core CPU takes minutes a figure)"
fi

# ------------------------------------------------------------------------- 3. 1 against 4 jobs a GPU
concurrency() {
  local work="$OUT/jobs" data
  rm -rf "$work"; mkdir -p "$work"
  if [ "$QUICK" = 1 ]; then  # a tiny ImageFolder: 10 classes x 8 images, 32x32
    data="$work/imgs"
    "$PY" - "$data" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for split in ("train", "test"):
    for c in range(10):
        d = Path(sys.argv[1]) / split / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
EOF
    printf 'dataset: {name: imagefolder, root: %s}\n' "$data" > "$work/job.yaml"
  else
    data="$work/mnist5k"
    dfakd prepare-data mnist5k --root "$data" || return 1
    printf 'dataset: {name: mnist5k, root: %s}\n' "$data" > "$work/job.yaml"
  fi
  cat >> "$work/job.yaml" <<EOF
recipe: {epochs: $JOBS_EPOCHS, batch_size: $JOB_BATCH, lr: 0.05, schedule: cosine}
runtime: {device: $DEVICE, threads: 2}
tracking: {enabled: false}
distill: {method: kd}
teacher: {arch: ${JOB_ARCHS[0]}, checkpoint: $work/teacher/best.pt}
model: {arch: ${JOB_ARCHS[1]}}
EOF
  dfakd train -c "$work/job.yaml" --set model.arch="${JOB_ARCHS[0]}" --set recipe.epochs=1 -o "$work/teacher" \
    > "$work/teacher.log" 2>&1 || { tail -20 "$work/teacher.log"; return 1; }
  local slots t0 wall
  for slots in 1 "$NJOBS"; do
    t0=$(date +%s.%N)
    for seed in $(seq 0 $((NJOBS - 1))); do  # launched at once; the pool lets $slots of them on the GPU at a time
      DFAKD_GPU_POOL=1 DFAKD_GPU_SLOTS=$slots DFAKD_GPU_LOCK_DIR="$work/locks-$slots" \
        dfakd distill -c "$work/job.yaml" --set seed=$seed -o "$work/k$slots-s$seed" > "$work/k$slots-s$seed.log" 2>&1 &
    done
    wait || true
    wall=$("$PY" -c "import time; print(f'{time.time() - $t0:.1f}')")
    local ok; ok=$(ls "$work"/k$slots-s*/result.json 2>/dev/null | wc -l)
    echo "$NJOBS distill jobs (kd ${JOB_ARCHS[0]} -> ${JOB_ARCHS[1]}, $JOBS_EPOCHS epochs), $slots per GPU:" \
      "wall ${wall}s, $ok/$NJOBS finished"
    echo "{\"slots\": $slots, \"jobs\": $NJOBS, \"finished\": $ok, \"wall_s\": $wall}" >> "$OUT/concurrency.jsonl"
    (( ok == NJOBS )) || { tail -20 "$work"/k$slots-s0.log; return 1; }
  done
}
: > "$OUT/concurrency.jsonl"
export -f concurrency
export OUT QUICK DEVICE PY JOBS_EPOCHS JOB_BATCH NJOBS
export JOB_ARCHS_0="${JOB_ARCHS[0]}" JOB_ARCHS_1="${JOB_ARCHS[1]}"
part concurrency 180 bash -c 'JOB_ARCHS=("$JOB_ARCHS_0" "$JOB_ARCHS_1"); concurrency'

# ------------------------------------------------------------------------------------ 4. projections
if [ "$QUICK" = 1 ]; then WSIZE=(--repeats 1 --warmup 1 --eval-images 64 --data-images 256 --data-batches 2)
else WSIZE=(); fi
part wrn-distill 60 "$PY" bench/run.py --device "$DEVICE" "${WRN[@]}" "${WSIZE[@]}" --batch 128 --methods dfa \
  --compare-modes '' --quiet --json "$OUT/wrn-distill.json"
part wrn-search 60 "$PY" bench/run.py --device "$DEVICE" "${WRN[@]}" "${WSIZE[@]}" --batch 64 --methods dfa \
  --compare-modes '' --quiet --json "$OUT/wrn-search.json"
proj() { # NAME ARGS...
  local name="$1"; shift
  part "$name" 30 "$PY" bench/project.py "$@" --json "$OUT/$name.json"
}
for t in steps-bf16-eager steps-bf16-graphs steps-fp32-eager steps-fp32-graphs; do
  [ -f "$OUT/$t.json" ] && proj "projection-crd-$t" --distill "$OUT/$t.json" --epochs 240 \
    --label "240 epochs, CIFAR-100 (50k images, batch from the table) [$t]"
done
if [ -f "$OUT/wrn-distill.json" ] && [ -f "$OUT/wrn-search.json" ]; then
  proj projection-wrn --distill "$OUT/wrn-distill.json" --epochs 200 --search "$OUT/wrn-search.json" \
    --search-epochs 20 --groups 3 --label "the paper's DFA run: search (3 x 20 epochs) + 200 distillation epochs"
fi

note "---- figures ($(( $(date +%s) - START ))s in all)"
for f in "$OUT"/steps-*.txt "$OUT"/concurrency.txt "$OUT"/projection-*.txt; do
  [ -f "$f" ] && { echo "== $(basename "$f")"; cat "$f"; } >> "$SUMMARY"
done
cat "$SUMMARY"
exit $FAILED
