#!/usr/bin/env bash
# Linear probe of a USP-pretrained ViT on SD-VAE (d8) latents with MAE's recipe: frozen encoder, BatchNorm
# (no affine) + linear head on the cls token, LARS, effective batch 16384 (512 per GPU; --accum_iter computed
# from the GPU count: 8 GPUs 4), 90 epochs, blr 0.1, no weight decay, MAE's TF-style RandomResizedCrop + flip only,
# fp16 autocast with a GradScaler and the VAE encoder under the same fp16 autocast (USP's main_linprobe).
# The full command is printed before it starts. USP releases no probe weights; reference: MAE ViT-B/16 in pixel
# space reaches 68.0% top-1 (MODEL=vit_base_patch16, no VAE).
#
# One node:   DATA_PATH=/data/imagenet VAE_PATH=/weights/sd-vae-ft-ema FINETUNE=usp_pretrain.pth \
#               bash scripts/linprobe.sh
# N nodes:    run on every node with the same MASTER_ADDR/MASTER_PORT and NNODES, and NODE_RANK = 0..NNODES-1:
#             MASTER_ADDR=node0 NNODES=4 NODE_RANK=1 DATA_PATH=... VAE_PATH=... FINETUNE=... bash scripts/linprobe.sh
# DATA_PATH holds train/ and val/. Extra arguments are appended, e.g. `--resume OUTPUT_DIR`, `--global_pool`,
# `--use_cached --cached_path CACHE` (a latent cache of train/ made with `python -m pretrain.cache_latents --crop eval`;
# only flips remain as augmentation), `--vae_version d16 --vae_path kl16.ckpt`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
DATA_PATH=${DATA_PATH:?set DATA_PATH to the ImageNet folder that holds train/ and val/}
FINETUNE=${FINETUNE:?set FINETUNE to the USP pretraining checkpoint (checkpoint-*.pth)}
MODEL=${MODEL:-vit_base_patch16_vae}
EPOCHS=${EPOCHS:-90}
BATCH_SIZE=${BATCH_SIZE:-512}          # per GPU, as MAE
source "$(dirname "${BASH_SOURCE[0]}")/paper_batch.sh"
paper_batch 16384 0.1  # sets ACCUM_ITER: 4 on one 8-GPU node
OUTPUT_DIR=${OUTPUT_DIR:-output_linprobe/${MODEL}_${EPOCHS}ep}
VAE_ARGS=()
if [[ "$MODEL" == *_vae ]]; then
  VAE_PATH=${VAE_PATH:?set VAE_PATH to a local sd-vae-ft-ema diffusers folder (or kl16.ckpt with --vae_version d16)}
  VAE_ARGS=(--vae_version "${VAE_VERSION:-d8}" --vae_path "$VAE_PATH")
fi

launch -m pretrain.main_linprobe \
  --model "$MODEL" \
  "${VAE_ARGS[@]}" \
  --cls_token \
  --finetune "$FINETUNE" \
  --input_size 224 \
  --batch_size "$BATCH_SIZE" \
  --accum_iter "$ACCUM_ITER" \
  --epochs "$EPOCHS" \
  --warmup_epochs 10 \
  --blr 0.1 \
  --weight_decay 0.0 \
  --nb_classes 1000 \
  --precision fp16 \
  --vae_precision fp16 \
  --num_workers 10 \
  --dist_eval \
  --data_path "$DATA_PATH" \
  --output_dir "$OUTPUT_DIR" \
  --log_dir "$OUTPUT_DIR" \
  "$@"
