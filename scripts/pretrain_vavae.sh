#!/usr/bin/env bash
# USP pretraining on VA-VAE latents (USP README, last table row "USP + VAVAE"): scripts/pretrain.sh's recipe (mask
# ratio 0.75, norm_pix_loss, batch 4096 at any GPU count, blr 1.5e-4, wd 0.05, 40 warmup epochs, 800 or EPOCHS=1600
# epochs; USP publishes neither its VA-VAE pretraining length nor a checkpoint) with an encoder of LightningDiT blocks (SwiGLU, RMSNorm, 2-D
# RoPE), lightningdit_xlarge_patch_vae, on 16x16x32 VA-VAE latents of 256 px crops (patch 1), so every encoder
# weight transfers into LightningDiT-XL/1 (scripts/train_lightningdit.sh FINETUNE=...).
#
#   DATA_PATH=/data/imagenet VAE_PATH=/weights/vavae-imagenet256-f16d32-dinov2 bash scripts/pretrain_vavae.sh
# VAE_PATH: a download of huggingface.co/hustvl/vavae-imagenet256-f16d32-dinov2 (the .pt and latents_stats.pt).
# Multi-node and extra arguments: as scripts/pretrain.sh (the flags below come after its own, so they win).
set -euo pipefail
export MODEL=${MODEL:-lightningdit_xlarge_patch_vae}
export EPOCHS=${EPOCHS:-800}
export OUTPUT_DIR=${OUTPUT_DIR:-output_pretrain/${MODEL}_vavae_${EPOCHS}ep}
exec bash "$(dirname "${BASH_SOURCE[0]}")/pretrain.sh" --vae_version vavae_f16d32 --input_size 256 "$@"
