#!/usr/bin/env bash
# Classification fine-tuning (SFT) of a USP-pretrained ViT on SD-VAE (d8) latents of 224 px ImageNet crops,
# with MAE's ViT-B recipe: effective batch 1024 (32 per GPU; --accum_iter computed from the GPU count: 8 GPUs 4),
# 100 epochs, blr 5e-4, layer decay 0.65, wd 0.05, drop path 0.1, RandAugment, mixup 0.8, cutmix 1.0,
# label smoothing 0.1, random erasing 0.25, Mixup/CutMix on the latents (USP's default; --image_mix mixes pixels),
# fp16 autocast with a GradScaler, the VAE encoder under the same fp16 autocast (USP's main_finetune without
# --use_fp32). The full command is printed before it starts. USP releases no fine-tuned classifier; reference: MAE
# ViT-B/16 in pixel space reaches 83.6% top-1 (MODEL=vit_base_patch16, no VAE). ViT-L: MODEL=vit_large_patch16_vae EPOCHS=50 LAYER_DECAY=0.75 DROP_PATH=0.2.
#
# One node:   DATA_PATH=/data/imagenet VAE_PATH=/weights/sd-vae-ft-ema FINETUNE=usp_pretrain.pth \
#               bash scripts/finetune.sh
# N nodes:    run on every node with the same MASTER_ADDR/MASTER_PORT and NNODES, and NODE_RANK = 0..NNODES-1:
#             MASTER_ADDR=node0 NNODES=4 NODE_RANK=1 DATA_PATH=... VAE_PATH=... FINETUNE=... bash scripts/finetune.sh
# DATA_PATH holds train/<class>/<image> and val/<class>/<image>. Extra arguments are appended, e.g.
# `--resume OUTPUT_DIR`, `--eval --resume OUTPUT_DIR/checkpoint-best.pth`, `--model_ema`, `--train_vae`,
# `--vae_version d16 --vae_path kl16.ckpt`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
DATA_PATH=${DATA_PATH:?set DATA_PATH to the ImageNet folder that holds train/ and val/}
FINETUNE=${FINETUNE:?set FINETUNE to the USP pretraining checkpoint (checkpoint-*.pth)}
MODEL=${MODEL:-vit_base_patch16_vae}
EPOCHS=${EPOCHS:-100}
BATCH_SIZE=${BATCH_SIZE:-32}          # per GPU, as MAE
source "$(dirname "${BASH_SOURCE[0]}")/paper_batch.sh"
paper_batch 1024 5e-4  # sets ACCUM_ITER: 4 on one 8-GPU node
LAYER_DECAY=${LAYER_DECAY:-0.65}
DROP_PATH=${DROP_PATH:-0.1}
OUTPUT_DIR=${OUTPUT_DIR:-output_finetune/${MODEL}_${EPOCHS}ep}
VAE_ARGS=()
if [[ "$MODEL" == *_vae ]]; then
  VAE_PATH=${VAE_PATH:?set VAE_PATH to a local sd-vae-ft-ema diffusers folder (or kl16.ckpt with --vae_version d16)}
  VAE_ARGS=(--vae_version "${VAE_VERSION:-d8}" --vae_path "$VAE_PATH")
fi

launch -m pretrain.main_finetune \
  --model "$MODEL" \
  "${VAE_ARGS[@]}" \
  --finetune "$FINETUNE" \
  --input_size 224 \
  --batch_size "$BATCH_SIZE" \
  --accum_iter "$ACCUM_ITER" \
  --epochs "$EPOCHS" \
  --warmup_epochs 5 \
  --blr 5e-4 \
  --layer_decay "$LAYER_DECAY" \
  --weight_decay 0.05 \
  --drop_path "$DROP_PATH" \
  --mixup 0.8 \
  --cutmix 1.0 \
  --smoothing 0.1 \
  --reprob 0.25 \
  --aa rand-m9-mstd0.5-inc1 \
  --nb_classes 1000 \
  --precision fp16 \
  --vae_precision fp16 \
  --num_workers 10 \
  --dist_eval \
  --data_path "$DATA_PATH" \
  --output_dir "$OUTPUT_DIR" \
  --log_dir "$OUTPUT_DIR" \
  "$@"
