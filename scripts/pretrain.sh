#!/usr/bin/env bash
# USP pretraining (masked latent modeling) with the paper's recipe (USP's PRETRAIN.md command and main_pretrain.py
# defaults): vit_base_patch_vae (MODEL=vit_large_patch_vae / vit_xlarge_patch_vae for L / XL) on SD-VAE (d8)
# latents of 224 px ImageNet crops, mask ratio 0.75, norm_pix_loss, batch 64 per GPU on 64 GPUs (8 nodes x 8),
# blr 1.5e-4, wd 0.05 (cls/mask tokens decayed), 40 warmup epochs, 800 (or EPOCHS=1600) epochs, fp16 autocast with
# a GradScaler, the VAE encoder under the same fp16 autocast, checkpoints at epochs 0, 40, 80, ... and the last.
# The full command is printed before it starts.
#
# One node:   DATA_PATH=/data/imagenet VAE_PATH=/weights/sd-vae-ft-ema bash scripts/pretrain.sh
# N nodes:    run on every node with the same MASTER_ADDR/MASTER_PORT and NNODES, and NODE_RANK = 0..NNODES-1:
#             MASTER_ADDR=node0 NNODES=4 NODE_RANK=1 DATA_PATH=... VAE_PATH=... bash scripts/pretrain.sh
# DATA_PATH holds train/<class>/<image>. Extra arguments are appended, e.g. `--resume output_pretrain`,
# `--use_cached --cached_path CACHE`, `--model vit_large_patch_vae`, `--vae_version d16 --vae_path kl16.ckpt`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
DATA_PATH=${DATA_PATH:?set DATA_PATH to the ImageNet folder that holds train/}
VAE_PATH=${VAE_PATH:?set VAE_PATH to a local sd-vae-ft-ema diffusers folder (or kl16.ckpt with --vae_version d16)}
MODEL=${MODEL:-vit_base_patch_vae}
EPOCHS=${EPOCHS:-800}                # the released USP weights use 1600
ACCUM_ITER=${ACCUM_ITER:-1}
OUTPUT_DIR=${OUTPUT_DIR:-output_pretrain/${MODEL}_${EPOCHS}ep}

launch -m pretrain.main_pretrain \
  --model "$MODEL" \
  --vae_version d8 \
  --vae_path "$VAE_PATH" \
  --input_size 224 \
  --batch_size 64 \
  --accum_iter "$ACCUM_ITER" \
  --norm_pix_loss \
  --mask_ratio 0.75 \
  --epochs "$EPOCHS" \
  --warmup_epochs 40 \
  --blr 1.5e-4 \
  --weight_decay 0.05 \
  --precision fp16 \
  --vae_precision fp16 \
  --num_workers 10 \
  --save_every 40 \
  --data_path "$DATA_PATH" \
  --output_dir "$OUTPUT_DIR" \
  --log_dir "$OUTPUT_DIR" \
  "$@"
