#!/usr/bin/env bash
# The GPU check of issue #14 (the step at the roofline on GPUs), one script, run from the project root:
#
#   bash .gpu/run_on_gpu.sh bash benchmarks/gpu_check.sh                 # on a GPU machine: sized for < 5 minutes
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh  # every part at tiny shapes, on a CPU
#
# (a) python3 -m pytest -q tests/test_cuda.py (skipped if the file or pytest is absent);
# (b) benchmarks/train_step.py for relu gated jumprelu topk batchtopk at 768x24576 and 2304x65536, batch 4096,
#     in fp32, tf32 and bf16 (--warmup 3 --steps 10), all in one process (benchmarks/gpu_check.py steps);
#     expected on an H100/H200 (estimated, not yet measured): ~1-2 s per run at 768x24576, 2-11 s at 2304x65536
#     (fp32 gated the slowest: 7 passes of 1.2 TFLOP at ~50 TFLOP/s, three times over with the roofline and the
#     reference), ~100 s in all; runs that would start past the budget are recorded as skipped;
# (c) python3 -m saelab.cli.train of each variant in trainer.precision 32-true, tf32 and bf16-mixed: one fanout
#     multirun (the jobs that can share an activation stream train together) on the offline default model and
#     corpus, data.train_tokens 204800 (400 steps of 512), ~40-60 s; held-out FVU and L0 against 32-true;
# (e) the large shapes (issue #24): python -m benchmarks.gpu_check steps --large $LARGE (JumpReLU and ReLU at
#     2304x262144 with 16,384 tokens, TopK at 2304x1048576 with 4,096), tf32, 1+3 steps each, lean (saelab's step
#     alone), with a slice of one step checked against plain torch; expected ~10-20 s a run on an H100/H200 (the
#     TopK run needs ~95 GiB: out of memory on an H100, recorded as such); appended to steps.jsonl and steps.log;
# (d) SAELens's step (benchmarks/saelens_step.py: 4 variants, fp32 and bf16) and sparsify's TopK step
#     (benchmarks/sparsify_step.py), each where it imports from .gpu/saelens/ (a pip --target directory with
#     sae-lens and/or eai-sparsify and their dependencies); skipped with a note when the directory is absent.
# It ends by printing one report: the parts' status, the step table and the quality table. A part that fails or
# runs out of time is reported there and the script goes on. Files, under $OUT when set (the GPU harness
# collects it; at most 8 files) or a temporary directory: report.md, steps.jsonl, quality.json, pytest.log,
# steps.log, train.log, libraries.log, libraries.jsonl.
#
# Environment: GPU_CHECK_DEVICE (cuda | cpu, default cuda), GPU_CHECK_SMOKE=1 (tiny shapes: d_in 64, d_sae 512,
# batch 256, 2 steps; training on data=synthetic, 2 steps), GPU_CHECK_BUDGET_S (default 285: no part starts
# work past it), PYTHON (default python3 if it imports torch, else .venv/bin/python), GPU_CHECK_KEEP=1 (keep
# the training runs' directories), SAELAB_KERNELS (passed through; recorded in the JSON), and to narrow the
# check: GPU_CHECK_VARIANTS, GPU_CHECK_STEP_PRECISIONS, GPU_CHECK_TRAIN_PRECISIONS (comma lists);
# GPU_CHECK_SAELENS_DIR (default .gpu/saelens) is where part (d) finds sae-lens and eai-sparsify;
# GPU_CHECK_PARTS (default abecd) runs only the parts named (e.g. bc), the others reported as skipped;
# GPU_CHECK_LARGE (default: benchmarks/gpu_check.py's LARGE) the large-shape runs of part (e).
set -uo pipefail

DEVICE=${GPU_CHECK_DEVICE:-cuda}
SMOKE=${GPU_CHECK_SMOKE:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-285}
VARIANTS=${GPU_CHECK_VARIANTS:-relu,gated,jumprelu,topk,batchtopk}
STEP_PRECISIONS=${GPU_CHECK_STEP_PRECISIONS:-bf16,tf32,fp32}  # fp32 last: the slowest, first skipped if time runs out
TRAIN_PRECISIONS=${GPU_CHECK_TRAIN_PRECISIONS:-32-true,tf32,bf16-mixed}
SAELENS_DIR=${GPU_CHECK_SAELENS_DIR:-.gpu/saelens}
WANTED=${GPU_CHECK_PARTS:-abecd}
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif python3 -c 'import torch' 2>/dev/null; then
  PY=python3
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
fi
T0=$(date +%s)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOG=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_out.XXXXXX")}  # kept: the report and the logs
mkdir -p "$LOG"
[ "${GPU_CHECK_KEEP:-0}" = 1 ] || trap 'rm -rf "$TMP"' EXIT
PARTS=$TMP/parts.tsv
: > "$PARTS"
rm -f "$LOG/steps.jsonl" "$LOG/libraries.jsonl"

if [ "$SMOKE" = 1 ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny tensors: a second thread only contends (2x slower under load)
  SHAPES=64x512 BATCH=256 WARMUP=1 STEPS=2 SYNC_STEPS=2 LARGE=${GPU_CHECK_LARGE:-relu:64x512:256,topk:64x512:256}
  TRAIN_ARGS=(data=synthetic sae.d_sae=512 data.train_tokens=512 data.batch_size=256 eval.tokens=512)
else
  SHAPES=768x24576,2304x65536 BATCH=4096 WARMUP=3 STEPS=10 SYNC_STEPS=3 LARGE=${GPU_CHECK_LARGE:-}
  TRAIN_ARGS=(data.cache=off data.train_tokens=204800)
fi
[ "$DEVICE" = cpu ] && TRAIN_ARGS+=(trainer.accelerator=cpu model.device=cpu)
C_RESERVE=$([ "$SMOKE" = 1 ] && echo 40 || echo 75)  # what (c) needs, kept back from (a), (b) and (e)
E_RESERVE=0  # what (e) needs, kept back from (a) and (b) when it runs
[[ $WANTED == *e* ]] && E_RESERVE=$([ "$SMOKE" = 1 ] && echo 20 || echo 60)

count_ok() { local n; n=$(grep -c '"status": "ok"' "$1" 2>/dev/null); echo "${n:-0}"; }
say() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*" >&2; }
left() { echo $(( T0 + BUDGET - $(date +%s) - ${1:-0} )); }
# part <name> <rc> <start> <note>: one row of the parts table
part() {
  local status
  case $2 in
    0) status=ok ;;
    124|137) status=timeout ;;
    skip) status=skipped ;;
    *) status="failed (exit $2)" ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$1" "$status" "$(( $(date +%s) - $3 ))" "$4" >> "$PARTS"
}
# run_for <seconds> <command...>: the command under a wall-clock limit (exit 124 when it is reached)
run_for() {
  local limit=$1
  shift
  [ "$limit" -ge 1 ] || return 124
  timeout -k 10 "$limit" "$@"
}

say "device $DEVICE, python $PY, budget ${BUDGET}s, files in $LOG"

# (a) the CUDA tests -----------------------------------------------------------------------------------------
part_a() {
  local start limit rc summary
  start=$(date +%s)
  if [ ! -f tests/test_cuda.py ]; then
    part "a. pytest tests/test_cuda.py" skip "$start" "tests/test_cuda.py absent"
  elif ! "$PY" -c 'import pytest' 2>/dev/null; then
    part "a. pytest tests/test_cuda.py" skip "$start" "pytest not installed (its wheels go in .gpu/whl: README)"
  else
    say "(a) pytest tests/test_cuda.py"
    limit=$(left $(( C_RESERVE + E_RESERVE + 60 )))
    [ "$limit" -gt 60 ] && limit=60
    run_for "$limit" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$LOG/pytest.log" 2>&1
    rc=$?
    [ $rc = 5 ] && rc=0  # no test collected: reported by the summary line
    summary=$(grep -E '(passed|failed|skipped|error|no tests ran)' "$LOG/pytest.log" | tail -1)
    part "a. pytest tests/test_cuda.py" $rc "$start" "$summary"
  fi
}

# (b) the step grid: restarted after a run that kills the process (it is then recorded as crashed) -----------
part_b() {
  local start limit rc note attempt
  say "(b) train_step: $VARIANTS x $SHAPES x $STEP_PRECISIONS, batch $BATCH, $WARMUP+$STEPS steps"
  start=$(date +%s)
  rc=124
  for attempt in 1 2 3 4 5; do
    limit=$(left $(( C_RESERVE + E_RESERVE )))
    [ "$limit" -ge 5 ] || { rc=124; break; }
    run_for "$limit" "$PY" -m benchmarks.gpu_check steps --jsonl "$LOG/steps.jsonl" --device "$DEVICE" \
      --shapes "$SHAPES" --variants "$VARIANTS" --precisions "$STEP_PRECISIONS" --batch "$BATCH" \
      --warmup "$WARMUP" --steps "$STEPS" --sync-steps "$SYNC_STEPS" --budget-s $(( limit - 10 )) \
      >> "$LOG/steps.log" 2>&1
    rc=$?
    { [ $rc = 0 ] || [ $rc = 1 ] || [ $rc = 124 ] || [ $rc = 137 ]; } && break  # done, or out of time
    say "(b) the process died (exit $rc, attempt $attempt): continuing after the run it was on"
  done
  note="$(count_ok "$LOG/steps.jsonl") runs ok"
  [ $rc = 1 ] && rc=0 && note="$note; some runs failed (see the step table, steps.log)"
  part "b. benchmarks/train_step.py grid" $rc "$start" "$note"
}

# (e) the large shapes, lean, with the slice check -------------------------------------------------------------
part_e() {
  local start limit rc
  start=$(date +%s)
  limit=$(left "$C_RESERVE")
  [ "$limit" -gt 90 ] && limit=90
  if [ "$limit" -lt 15 ]; then
    part "e. large shapes (slice check)" skip "$start" "time budget spent"
    return
  fi
  say "(e) large shapes: ${LARGE:-the default set}"
  run_for "$limit" "$PY" -m benchmarks.gpu_check steps --jsonl "$LOG/steps.jsonl" --device "$DEVICE" \
    --large "${LARGE:-$("$PY" -c 'from benchmarks.gpu_check import LARGE; print(LARGE)')}" --warmup 1 --steps 3 \
    --budget-s $(( limit - 10 )) >> "$LOG/steps.log" 2>&1
  rc=$?
  [ $rc = 1 ] && rc=0  # a run failed (e.g. out of memory): the large-shape table says which
  part "e. large shapes (slice check)" $rc "$start" "$(grep -c '"large": true, "status": "ok"' "$LOG/steps.jsonl")/$(tr ',' '\n' <<< "${LARGE:-x,x,x}" | wc -l) runs ok"
}

# (c) training in each precision, one fanout multirun ---------------------------------------------------------
part_c() {
  local start rc jobs
  say "(c) saelab.cli.train: sae=$VARIANTS x trainer.precision=$TRAIN_PRECISIONS (fanout)"
  start=$(date +%s)
  run_for "$(left 5)" "$PY" -m saelab.cli.train -m hydra/launcher=fanout "sae=$VARIANTS" \
    "trainer.precision=$TRAIN_PRECISIONS" logger=none "hydra.sweep.dir=$TMP/train" "paths.output_dir=$TMP/outputs" \
    callbacks.progress_bar.refresh_rate=0 callbacks.model_checkpoint.every_n_train_steps=100000 "${TRAIN_ARGS[@]}" \
    > "$LOG/train.log" 2>&1
  rc=$?
  jobs=$(( $(tr ',' '\n' <<< "$VARIANTS" | wc -l) * $(tr ',' '\n' <<< "$TRAIN_PRECISIONS" | wc -l) ))
  part "c. saelab.cli.train ($TRAIN_PRECISIONS)" $rc "$start" \
    "$(find "$TMP/train" -name metrics.json 2>/dev/null | wc -l) of $jobs jobs wrote metrics.json"
}

# (d) SAELens's and sparsify's steps ------------------------------------------------------------------------
part_d() {
  local start limit rc
  start=$(date +%s)
  if [ ! -d "$SAELENS_DIR" ]; then
    part "d. SAELens and sparsify steps" skip "$start" "no $SAELENS_DIR/ (README, GPU check: how to add it)"
  elif [ "$(left)" -lt 25 ]; then
    part "d. SAELens and sparsify steps" skip "$start" "time budget spent"
  else
    say "(d) SAELens's and sparsify's steps"
    limit=$(left 5)
    PYTHONPATH="$(cd "$SAELENS_DIR" && pwd)${PYTHONPATH:+:$PYTHONPATH}" run_for "$limit" "$PY" \
      -m benchmarks.gpu_check libraries --jsonl "$LOG/libraries.jsonl" --device "$DEVICE" --shapes "$SHAPES" --batch "$BATCH" \
      --warmup "$WARMUP" --steps "$STEPS" --budget-s $(( limit - 15 )) > "$LOG/libraries.log" 2>&1
    rc=$?
    [ $rc = 1 ] && rc=0  # some runs failed: the step table says which
    part "d. SAELens and sparsify steps" $rc "$start" "$(count_ok "$LOG/libraries.jsonl") runs ok"
  fi
}

declare -A PART_NAMES=([a]="a. pytest tests/test_cuda.py" [b]="b. benchmarks/train_step.py grid"
                        [c]="c. saelab.cli.train ($TRAIN_PRECISIONS)" [d]="d. SAELens and sparsify steps"
                        [e]="e. large shapes (slice check)")
for p in a b e c d; do
  if [[ $WANTED == *$p* ]]; then
    "part_$p"
  else
    part "${PART_NAMES[$p]}" skip "$(date +%s)" "not in GPU_CHECK_PARTS=$WANTED"
  fi
done

# The report ------------------------------------------------------------------------------------------------
REPORT_ARGS=(--steps-jsonl "$LOG/steps.jsonl" --sweep "$TMP/train" --parts "$PARTS" --variants "$VARIANTS"
             --train-precisions "$TRAIN_PRECISIONS" --out "$LOG/report.md" --quality-json "$LOG/quality.json")
[ -f "$LOG/libraries.jsonl" ] && REPORT_ARGS+=(--libraries-jsonl "$LOG/libraries.jsonl")
say "done in $(( $(date +%s) - T0 ))s"
echo
"$PY" -m benchmarks.gpu_check report "${REPORT_ARGS[@]}"
