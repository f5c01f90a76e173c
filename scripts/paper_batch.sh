#!/usr/bin/env bash
# Sourced after launch.sh by the recipes whose paper setting is an effective batch (pretrain, finetune, linprobe):
# one place that picks --accum_iter from the GPU count, so that any number of GPUs runs the paper's batch and lr.
#
#   paper_batch PAPER_BATCH BATCH_SIZE BLR   sets ACCUM_ITER (unless the user set it) to reach PAPER_BATCH with
#                                            BATCH_SIZE per GPU on NNODES x GPUS GPUs, then prints the batch and
#                                            the lr --blr gives; says in one sentence when the batch is not reached.
paper_batch() {
  local paper=$1 per_gpu=$2 blr=$3 gpus=$((NNODES * GPUS))
  local per_step=$((per_gpu * gpus))
  if [ -z "${ACCUM_ITER:-}" ]; then
    ACCUM_ITER=$(( (paper + per_step / 2) / per_step ))  # nearest whole number, at least 1
    ACCUM_ITER=$(( ACCUM_ITER > 0 ? ACCUM_ITER : 1 ))
  fi
  local batch=$((per_step * ACCUM_ITER))
  if [ "$batch" -ne "$paper" ]; then
    printf "[recipe] %s GPUs x --batch_size %s x --accum_iter %s cannot make the paper's batch %s, so this run uses batch %s and the lr --blr scales to it (BATCH_SIZE sets the per-GPU batch).\n" \
      "$gpus" "$per_gpu" "$ACCUM_ITER" "$paper" "$batch" >&2
  fi
  printf '[recipe] effective batch %s = --batch_size %s x %s GPUs x --accum_iter %s; lr = %s x batch / 256 = %s\n' \
    "$batch" "$per_gpu" "$gpus" "$ACCUM_ITER" "$blr" "$(awk -v b="$batch" -v blr="$blr" 'BEGIN { printf "%.4g", blr * b / 256 }')" >&2
}
