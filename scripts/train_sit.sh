#!/usr/bin/env bash
# SiT-XL/2 finetuned from a USP checkpoint at 256 px: Linear path, velocity prediction, global batch 256,
# 400K steps (USP's generation recipe).
#
# Multi-node: every node runs this script with the same MASTER_ADDR/MASTER_PORT, NNODES (or WORLD_SIZE) = number of nodes,
# NODE_RANK (or RANK) = this node's index and GPUS = GPUs per node (the variables the original scripts read).
#   DATA_PATH=/data/imagenet/train FINETUNE=/ckpt/usp_vit_xlarge_patch_vae_1600ep.pth bash scripts/train_sit.sh
# Extra arguments are appended, e.g. `--resume results/000-SiT-XL-2-VAE-simple-usp` or `--cached-path CACHE`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
DATA_PATH=${DATA_PATH:?set DATA_PATH to the ImageNet train folder}
FINETUNE=${FINETUNE:?set FINETUNE to the USP pretraining checkpoint}
MODEL=${MODEL:-SiT-XL/2-VAE-simple}

launch -m generation.train \
  --model "$MODEL" \
  --data-path "$DATA_PATH" \
  --finetune "$FINETUNE" \
  --image-size 256 \
  --num-classes 1000 \
  --vae ema \
  --path-type Linear \
  --prediction velocity \
  --global-batch-size 256 \
  --max-steps 400000 \
  --ckpt-every 50000 \
  --log-every 100 \
  --eval-every 10000 \
  --cfg-scale 4.0 \
  --num-sampling-steps 250 \
  --precision bf16 \
  --results-dir results \
  --exp-name usp \
  "$@"
