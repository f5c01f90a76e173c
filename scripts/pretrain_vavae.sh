#!/usr/bin/env bash
# USP pretraining on VA-VAE latents (USP README, last table row "USP + VAVAE"): masked latent modeling with an
# encoder of LightningDiT blocks (SwiGLU, RMSNorm, 2-D RoPE) so every encoder weight transfers into
# LightningDiT-XL/1: lightningdit_xlarge_patch_vae on 16x16x32 VA-VAE latents of 256 px ImageNet crops (patch 1),
# mask ratio 0.75, norm_pix_loss, batch 64 per GPU, blr 1.5e-4, wd 0.05, 40 warmup epochs, 800 (or EPOCHS=1600)
# epochs - USP's pretraining recipe; USP does not publish its VA-VAE pretraining length.
#
#   DATA_PATH=/data/imagenet VAE_PATH=/weights/vavae-imagenet256-f16d32-dinov2 bash scripts/pretrain_vavae.sh
# VAE_PATH: a download of huggingface.co/hustvl/vavae-imagenet256-f16d32-dinov2 (the .pt and latents_stats.pt).
# Multi-node: as scripts/pretrain.sh (MASTER_ADDR/MASTER_PORT, NNODES, NODE_RANK; see scripts/launch.sh).
# Extra arguments are appended, e.g. `--resume output_pretrain/...` or `--use_cached --cached_path CACHE`
# (a cache made with `python -m util.latent_cache --vae_version vavae_f16d32 --input_size 256 --crop center ...`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
DATA_PATH=${DATA_PATH:?set DATA_PATH to the ImageNet folder that holds train/}
VAE_PATH=${VAE_PATH:?set VAE_PATH to the VA-VAE folder (vavae-imagenet256-f16d32-dinov2.pt + latents_stats.pt)}
MODEL=${MODEL:-lightningdit_xlarge_patch_vae}
EPOCHS=${EPOCHS:-800}
ACCUM_ITER=${ACCUM_ITER:-1}
OUTPUT_DIR=${OUTPUT_DIR:-output_pretrain/${MODEL}_vavae_${EPOCHS}ep}

launch -m pretrain.main_pretrain \
  --model "$MODEL" \
  --vae_version vavae_f16d32 \
  --vae_path "$VAE_PATH" \
  --input_size 256 \
  --batch_size 64 \
  --accum_iter "$ACCUM_ITER" \
  --norm_pix_loss \
  --mask_ratio 0.75 \
  --epochs "$EPOCHS" \
  --warmup_epochs 40 \
  --blr 1.5e-4 \
  --weight_decay 0.05 \
  --precision bf16 \
  --num_workers 10 \
  --save_every 20 \
  --data_path "$DATA_PATH" \
  --output_dir "$OUTPUT_DIR" \
  --log_dir "$OUTPUT_DIR" \
  "$@"
