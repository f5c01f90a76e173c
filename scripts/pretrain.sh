#!/usr/bin/env bash
# USP pretraining (masked latent modeling) that reproduces the encoder behind USP's released DiT-XL/2 and SiT-XL/2
# weights (huggingface.co/GD-ML/USP-Image_Generation: "pretrained for 1600 epochs"): vit_xlarge_patch_vae
# (MODEL=vit_base_patch_vae / vit_large_patch_vae for the B / L rows) on SD-VAE (d8) latents of 224 px ImageNet
# crops, 1600 epochs, mask ratio 0.75, norm_pix_loss, effective batch 4096 (USP: 64 per GPU on 64 GPUs), blr 1.5e-4
# (lr 2.4e-3), wd 0.05 (cls/mask tokens decayed), 40 warmup epochs, fp16 autocast with a GradScaler, the VAE encoder
# under the same fp16 autocast, checkpoints at epochs 0, 40, 80, ... and the last.
# --accum_iter is computed to keep the batch at 4096 (8 GPUs: 8, 16: 4, 64: 1; 128 GPUs: 32 per GPU) and printed
# with the lr (scripts/paper_batch.sh); a GPU count that cannot reach 4096 is said in one sentence before the launch. The full command is
# printed before it starts.
#
# One node:   DATA_PATH=/data/imagenet VAE_PATH=/weights/sd-vae-ft-ema bash scripts/pretrain.sh
# N nodes:    run on every node with the same MASTER_ADDR/MASTER_PORT and NNODES, and NODE_RANK = 0..NNODES-1:
#             MASTER_ADDR=node0 NNODES=4 NODE_RANK=1 DATA_PATH=... VAE_PATH=... bash scripts/pretrain.sh
# DATA_PATH holds train/<class>/<image>. Extra arguments are appended, e.g. `--resume output_pretrain`,
# `--use_cached --cached_path CACHE`, `--vae_version d16 --vae_path kl16.ckpt`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
DATA_PATH=${DATA_PATH:?set DATA_PATH to the ImageNet folder that holds train/}
VAE_PATH=${VAE_PATH:?set VAE_PATH to a local sd-vae-ft-ema diffusers folder (or kl16.ckpt with --vae_version d16)}
MODEL=${MODEL:-vit_xlarge_patch_vae}
EPOCHS=${EPOCHS:-1600}               # USP's PRETRAIN.md command says 800; the released weights use 1600
BATCH_SIZE=${BATCH_SIZE:-64}         # per GPU, as USP
source "$(dirname "${BASH_SOURCE[0]}")/paper_batch.sh"
paper_batch 4096 1.5e-4  # 64 per GPU x 64 GPUs
OUTPUT_DIR=${OUTPUT_DIR:-output_pretrain/${MODEL}_${EPOCHS}ep}

launch -m pretrain.main_pretrain \
  --model "$MODEL" \
  --vae_version d8 \
  --vae_path "$VAE_PATH" \
  --input_size 224 \
  --batch_size "$BATCH_SIZE" \
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
