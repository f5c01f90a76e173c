#!/usr/bin/env bash
# FID-50K samples of a DiT checkpoint as in USP's tables (USP's sample_dit.sh): DiT-XL/2, 256 px, 250 DDPM
# steps, cfg 1.0, per-process batch 128, fp32 with TF32; then ADM's evaluation (scripts/eval.sh) when REF_BATCH
# is set. The full command is printed before it starts.
#
#   CKPT=results/000-DiT-XL-2-VAE-simple-usp/checkpoints/0400000.pt REF_BATCH=VIRTUAL_imagenet256_labeled.npz \
#   INCEPTION_WEIGHTS=pretrained/weights-inception-2015-12-05-6726825d.pth bash scripts/sample_dit.sh
# The official DiT-XL-2-256x256.pt works too (MODEL=DiT-XL/2). Rerunning the same command resumes an
# interrupted run. Multi-node: as scripts/train_dit.sh (MASTER_ADDR/MASTER_PORT, NNODES or WORLD_SIZE, NODE_RANK or RANK, GPUS; see scripts/launch.sh).
# Extra arguments are appended, e.g. `--sampler ddim --num-sampling-steps 50` or `--precision bf16`.
# VAE_PATH: a local sd-vae-ft-ema diffusers folder (offline nodes; without it the hub id stabilityai/sd-vae-ft-ema
# is downloaded).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
CKPT=${CKPT:?set CKPT to the DiT checkpoint (training checkpoint or official state dict)}
MODEL=${MODEL:-DiT-XL/2-VAE-simple}
CFG_SCALE=${CFG_SCALE:-1.0}
SAMPLE_DIR=${SAMPLE_DIR:-samples/$(echo "$MODEL" | tr '/' '-')-$(basename "$CKPT" .pt)-cfg-$CFG_SCALE-seed-0}

launch -m generation.sample_ddp \
  --model "$MODEL" \
  --ckpt "$CKPT" \
  --image-size 256 \
  --num-classes 1000 \
  --vae ema ${VAE_PATH:+--vae-path "$VAE_PATH"} \
  --sampler ddpm \
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
