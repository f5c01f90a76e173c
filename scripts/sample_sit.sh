#!/usr/bin/env bash
# FID-50K samples of a SiT checkpoint as in USP's tables (USP's sample_sit.sh): SiT-XL/2, 256 px,
# Linear/velocity transport, cfg 1.0, per-process batch 128, fp32 with TF32, MODE=SDE (the paper's; Euler-
# Maruyama, 250 steps, sigma diffusion, Mean last step of 0.04) or MODE=ODE (dopri5, atol 1e-6, rtol 1e-3); then
# ADM's evaluation (scripts/eval.sh) when REF_BATCH is set. (USP's script passes the mode as "sde", which its own
# sample_ddp.py rejects; SDE is what it means.) The full command is printed before it starts.
#
#   CKPT=results/000-SiT-XL-2-VAE-simple-usp/checkpoints/0400000.pt MODE=ODE REF_BATCH=VIRTUAL_imagenet256_labeled.npz \
#   INCEPTION_WEIGHTS=pretrained/weights-inception-2015-12-05-6726825d.pth bash scripts/sample_sit.sh
# The official SiT-XL-2-256x256.pt works too (MODEL=SiT-XL/2). Rerunning the same command resumes an
# interrupted run. Multi-node: as scripts/train_sit.sh (MASTER_ADDR/MASTER_PORT, NNODES or WORLD_SIZE, NODE_RANK or RANK, GPUS; see scripts/launch.sh).
# Extra arguments are appended, e.g. `--sampling-method Heun` (SDE) or `--precision bf16`.
# VAE_PATH: a local sd-vae-ft-ema diffusers folder (offline nodes; without it the hub id stabilityai/sd-vae-ft-ema
# is downloaded).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
CKPT=${CKPT:?set CKPT to the SiT checkpoint (training checkpoint or official state dict)}
MODEL=${MODEL:-SiT-XL/2-VAE-simple}
MODE=${MODE:-SDE}
CFG_SCALE=${CFG_SCALE:-1.0}
SAMPLE_DIR=${SAMPLE_DIR:-samples/$(echo "$MODEL" | tr '/' '-')-$(basename "$CKPT" .pt)-$MODE-cfg-$CFG_SCALE-seed-0}

case "$MODE" in
  ODE) SAMPLER_FLAGS=(--sampling-method dopri5 --atol 1e-6 --rtol 1e-3) ;;
  SDE) SAMPLER_FLAGS=(--sampling-method Euler --diffusion-form sigma --diffusion-norm 1.0
                      --last-step Mean --last-step-size 0.04) ;;
  *) echo "MODE must be ODE or SDE, got $MODE" >&2; exit 2 ;;
esac

launch -m generation.sample_ddp "$MODE" \
  --model "$MODEL" \
  --ckpt "$CKPT" \
  --image-size 256 \
  --num-classes 1000 \
  --vae ema ${VAE_PATH:+--vae-path "$VAE_PATH"} \
  --path-type Linear \
  --prediction velocity \
  "${SAMPLER_FLAGS[@]}" \
  --num-sampling-steps 250 \
  --cfg-scale "$CFG_SCALE" \
  --num-fid-samples 50000 \
  --per-proc-batch-size 128 \
  --precision fp32 \
  --tf32 \
  --global-seed 0 \
  --sample-dir "$SAMPLE_DIR" \
  "$@"

if [ "$NODE_RANK" = "0" ] && [ -n "${REF_BATCH:-}" ]; then
  bash "$repo_root/scripts/eval.sh" "$REF_BATCH" "$SAMPLE_DIR.npz"
fi
