#!/usr/bin/env bash
# SiT-XL/2 initialised from a USP checkpoint and trained with REPA (the USP README's "USP + REPA" row:
# FID 6.26 at 400K steps, 256 px, no guidance; no released checkpoint): USP's SiT recipe (Linear path, velocity,
# global batch 256, lr 1e-4, 400K steps, fp32 with TF32 as USP's SiT train.py) plus REPA's alignment with REPA's
# settings: DINOv2-B/14 patch tokens as the target, projector after block 8 (2048-wide MLP), proj-coeff 0.5,
# gradient clipping at 1.0.
#
# One node (8 GPUs):
#   DATA_PATH=/data/imagenet/train FINETUNE=/ckpt/usp_vit_xlarge_patch_vae.pth \
#   REPA_ENCODER=/ckpt/dinov2_vitb14_pretrain.pth bash scripts/train_sit_repa.sh
# N nodes: every node runs the same command with MASTER_ADDR/MASTER_PORT, NNODES (or WORLD_SIZE) = N,
# NODE_RANK (or RANK) = its index and GPUS per node (scripts/launch.sh); the global batch stays 256.
# From scratch (REPA's own 400K-step row, FID 7.9; REPA releases only its 4M-step SiT-XL/2): FINETUNE=none,
# which also switches to REPA's data/precision settings
# (sd-vae-ft-mse, no flips, fp16, no sigma outputs; see GENERATION.md "Differences from the official code").
# With cached latents and features:
#   ... bash scripts/train_sit_repa.sh --cached-path CACHE --repa-feature-cache FEATURES
# Extra arguments are appended, e.g. `--resume results/000-SiT-XL-2-VAE-simple-usp-repa`.
# VAE_PATH: a local sd-vae-ft-ema diffusers folder (sd-vae-ft-mse with FINETUNE=none) for offline nodes; without it
# the hub copy is downloaded.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
DATA_PATH=${DATA_PATH:?set DATA_PATH to the ImageNet train folder}
FINETUNE=${FINETUNE:?set FINETUNE to the USP pretraining checkpoint (or none to train from scratch)}
REPA_ENCODER=${REPA_ENCODER:?set REPA_ENCODER to dinov2_vitb14_pretrain.pth (or the timm hub tag when online)}

INIT_FLAGS=(--finetune "$FINETUNE")
EXP_NAME=usp-repa
DEFAULT_MODEL=SiT-XL/2-VAE-simple  # USP's SiT: affine block norms that take the pretrained encoder's
if [ "$FINETUNE" = "none" ]; then
  # REPA's own setting: its SiT (no sigma outputs), sd-vae-ft-mse latents, no flips, fp16 autocast.
  INIT_FLAGS=(--vae mse --no-random-flip --precision fp16 --model-kwargs '{"learn_sigma": false}')
  EXP_NAME=repa
  DEFAULT_MODEL=SiT-XL/2
fi
MODEL=${MODEL:-$DEFAULT_MODEL}

launch -m generation.train \
  --model "$MODEL" \
  --data-path "$DATA_PATH" \
  --image-size 256 \
  --num-classes 1000 \
  --vae ema ${VAE_PATH:+--vae-path "$VAE_PATH"} \
  --path-type Linear \
  --prediction velocity \
  --global-batch-size 256 \
  --max-steps 400000 \
  --ckpt-every 50000 \
  --log-every 100 \
  --eval-every 50000 \
  --cfg-scale 1.0 \
  --num-sampling-steps 250 \
  --precision fp32 \
  --repa \
  --enc-type dinov2-vit-b \
  --repa-encoder-path "$REPA_ENCODER" \
  --encoder-depth 8 \
  --projector-dim 2048 \
  --proj-coeff 0.5 \
  --max-grad-norm 1.0 \
  --results-dir results \
  --exp-name "$EXP_NAME" \
  "${INIT_FLAGS[@]}" \
  "$@"
