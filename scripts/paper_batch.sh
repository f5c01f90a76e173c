#!/usr/bin/env bash
# Sourced after launch.sh by the recipes whose paper setting is an effective batch (pretrain, finetune, linprobe):
# one place that picks --accum_iter (or, above the paper's GPU count, a smaller per-GPU batch) from the GPU count,
# so that any number of GPUs runs the paper's batch and lr.
#
#   paper_batch PAPER_BATCH BLR   with BATCH_SIZE per GPU on NNODES x GPUS GPUs: sets ACCUM_ITER (unless the user
#                                 set it) to reach PAPER_BATCH, or lowers BATCH_SIZE when one step of it on every
#                                 GPU is already larger; prints the batch and the lr --blr gives, and says in one
#                                 sentence when the paper's batch cannot be reached.
paper_batch() {
  local paper=$1 blr=$2 gpus=$((NNODES * GPUS))
  if [ -z "${ACCUM_ITER:-}" ]; then
    if [ $((BATCH_SIZE * gpus)) -gt "$paper" ] && [ $((paper % gpus)) -eq 0 ]; then
      BATCH_SIZE=$((paper / gpus))  # more GPUs than the paper's: a smaller per-GPU batch keeps the total
    fi
    local per_step=$((BATCH_SIZE * gpus))
    ACCUM_ITER=$(( (paper + per_step / 2) / per_step ))  # nearest whole number, at least 1
    ACCUM_ITER=$(( ACCUM_ITER > 0 ? ACCUM_ITER : 1 ))
  fi
  local batch=$((BATCH_SIZE * gpus * ACCUM_ITER))
  if [ "$batch" -ne "$paper" ]; then
    local why="cannot make the paper's batch $paper, so this run uses batch $batch and the lr --blr scales to it"
    printf "[recipe] %s GPUs x --batch_size %s x --accum_iter %s %s (BATCH_SIZE sets the per-GPU batch).\n" \
      "$gpus" "$BATCH_SIZE" "$ACCUM_ITER" "$why" >&2
  fi
  printf '[recipe] effective batch %s = --batch_size %s x %s GPUs x --accum_iter %s; lr = %s x batch / 256 = %s\n' \
    "$batch" "$BATCH_SIZE" "$gpus" "$ACCUM_ITER" "$blr" \
    "$(awk -v b="$batch" -v blr="$blr" 'BEGIN { printf "%.4g", blr * b / 256 }')" >&2
}
