#!/usr/bin/env bash
# SiT-XL/2 finetuned from a USP checkpoint at 256 px with USP's generation recipe: Linear path, velocity
# prediction, global batch 256, 400K steps, AdamW lr 1e-4, EMA 0.9999, fp32 with TF32 (as SiT's train.py),
# checkpoints every 50K steps, EMA previews (and, with --num-fid-samples 50000 --fid-ref-batch REF, FID with the
# SDE sampler in fp32, 250 steps, cfg 1.0, as USP's training-time evaluation) every 50K steps.
# Reproduces USP's released SiT_XL-2 (huggingface.co/GD-ML/USP-Image_Generation: FID 7.35 at 400K steps, no
# guidance; MODEL=SiT-B/2-VAE-simple with the B encoder for SiT_B-2 22.10). The full command is printed first.
#
# Multi-node: every node runs this script with the same MASTER_ADDR/MASTER_PORT, NNODES (or WORLD_SIZE) = number of nodes,
# NODE_RANK (or RANK) = this node's index and GPUS = GPUs per node (the variables the original scripts read).
#   DATA_PATH=/data/imagenet/train FINETUNE=/ckpt/usp_vit_xlarge_patch_vae_1600ep.pth bash scripts/train_sit.sh
# Extra arguments are appended, e.g. `--resume results/000-SiT-XL-2-VAE-simple-usp` or `--cached-path CACHE`.
# VAE_PATH: a local sd-vae-ft-ema diffusers folder (offline nodes; without it the hub id stabilityai/sd-vae-ft-ema
# is downloaded); INCEPTION_WEIGHTS: the FID hook's local Inception file (weights-inception-2015-12-05-6726825d.pth).
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
  --vae ema ${VAE_PATH:+--vae-path "$VAE_PATH"} \
  --path-type Linear \
  --prediction velocity \
  --global-batch-size 256 \
  --max-steps 400000 \
  --ckpt-every 50000 \
  --log-every 100 \
  --eval-every 50000 \
  --cfg-scale 1.0 \
  ${INCEPTION_WEIGHTS:+--inception-weights "$INCEPTION_WEIGHTS"} \
  --num-sampling-steps 250 \
  --per-proc-batch-size 128 \
  --precision fp32 \
  --results-dir results \
  --exp-name usp \
  "$@"
