#!/usr/bin/env bash
# LightningDiT-XL/1 on VA-VAE latents, the official 64-epoch recipe (hustvl/LightningDiT
# configs/reproductions/lightningdit_xl_vavae_f16d32_64ep_cfg.yaml): SwiGLU + RoPE + RMSNorm blocks, Linear
# path with velocity prediction, logit-normal times, MSE + velocity cosine loss, AdamW lr 2e-4 beta2 0.95 (no
# weight decay), global batch 1024, 80000 steps (64 epochs of ImageNet), bf16, EMA 0.9999, no gradient clipping
# (the official config sets no max_grad_norm; add `--max-grad-norm N` to clip). With FINETUNE set the model starts
# from a USP checkpoint (scripts/pretrain_vavae.sh: USP + VAVAE, FID 4.2 / 1.81 at cfg 10), else from scratch
# (reproduces hustvl's released lightningdit-xl-imagenet256-64ep.pt: FID 5.14 / 2.11; USP's table: 5.18 / 2.15;
# USP releases no USP + VAVAE checkpoint).
#
#   CACHE=/data/imagenet256_vavae_cache VAE_PATH=/weights/vavae-imagenet256-f16d32-dinov2 \
#     FINETUNE=output_pretrain/lightningdit_xlarge_patch_vae_vavae_800ep/checkpoint-799.pth bash scripts/train_lightningdit.sh
# CACHE: `python -m pretrain.cache_latents --data_path /data/imagenet/train --cached_path CACHE --vae_version vavae_f16d32
#   --vae_path VAE_PATH --input_size 256` (add --latent_stats to compute latents_stats.pt without the released one,
#   then pass `--latent-stats CACHE/latents_stats.pt`). DATA_PATH instead of CACHE encodes online (slower).
# Multi-node: MASTER_ADDR/MASTER_PORT, NNODES, NODE_RANK, GPUS (scripts/launch.sh). Extra arguments are appended,
# e.g. `--resume results/000-LightningDiT-XL-1-usp`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
VAE_PATH=${VAE_PATH:?set VAE_PATH to the VA-VAE folder (vavae-imagenet256-f16d32-dinov2.pt + latents_stats.pt)}
MODEL=${MODEL:-LightningDiT-XL/1}
if [ -n "${CACHE:-}" ]; then DATA_ARGS=(--cached-path "$CACHE"); else
  DATA_ARGS=(--data-path "${DATA_PATH:?set CACHE (a VA-VAE latent cache) or DATA_PATH (ImageNet train folder)}"); fi
INIT_ARGS=(--exp-name scratch)
if [ -n "${FINETUNE:-}" ]; then INIT_ARGS=(--finetune "$FINETUNE" --exp-name usp); fi

launch -m generation.train \
  --model "$MODEL" \
  "${DATA_ARGS[@]}" \
  "${INIT_ARGS[@]}" \
  --image-size 256 \
  --num-classes 1000 \
  --vae-version vavae_f16d32 \
  --vae-path "$VAE_PATH" \
  --use-swiglu --use-rope --use-rmsnorm \
  --path-type Linear \
  --prediction velocity \
  --use-lognorm \
  --use-cosine-loss \
  --lr 2e-4 \
  --beta2 0.95 \
  --global-batch-size 1024 \
  --max-steps 80000 \
  --epochs 64 \
  --ema-decay 0.9999 \
  --precision bf16 \
  --ckpt-every 20000 \
  --log-every 100 \
  --eval-every 20000 \
  --cfg-scale 10.0 \
  --timestep-shift 0.3 \
  --num-sampling-steps 250 \
  --results-dir results \
  "$@"
