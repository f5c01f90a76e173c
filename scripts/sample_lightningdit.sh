#!/usr/bin/env bash
# FID-50K samples of a LightningDiT-XL/1 checkpoint with the 64-epoch settings (hustvl/LightningDiT
# configs/reproductions/lightningdit_xl_vavae_f16d32_64ep_cfg.yaml): Euler ODE with 250 steps, timestep shift 0.3,
# cfg 10 applied for t >= 0.10 (cfg_interval_start) on the first 3 latent channels (legacy), VA-VAE decoding with
# latents_stats.pt; then ADM's evaluation (scripts/eval.sh) when REF_BATCH is set. CFG_SCALE=1.0 gives the
# no-guidance column (LightningDiT 64ep: 5.14; USP + VAVAE: 4.2); the 800-epoch model uses CFG_SCALE=6.7.
#
#   CKPT=results/000-LightningDiT-XL-1-usp/checkpoints/0080000.pt VAE_PATH=/weights/vavae-imagenet256-f16d32-dinov2 \
#   REF_BATCH=VIRTUAL_imagenet256_labeled.npz INCEPTION_WEIGHTS=pretrained/weights-inception-2015-12-05-6726825d.pth \
#   bash scripts/sample_lightningdit.sh
# The released lightningdit-xl-imagenet256-64ep.pt works too. Rerunning the same command resumes. Multi-node: as
# scripts/sample_sit.sh. Extra arguments are appended, e.g. `--per-proc-batch-size 64`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
CKPT=${CKPT:?set CKPT to the LightningDiT checkpoint (training checkpoint or released state dict)}
VAE_PATH=${VAE_PATH:?set VAE_PATH to the VA-VAE folder (vavae-imagenet256-f16d32-dinov2.pt + latents_stats.pt)}
MODEL=${MODEL:-LightningDiT-XL/1}
CFG_SCALE=${CFG_SCALE:-10.0}
SAMPLE_DIR=${SAMPLE_DIR:-samples/$(echo "$MODEL" | tr '/' '-')-$(basename "$CKPT" .pt)-euler250-shift0.3-cfg-$CFG_SCALE-seed-0}

launch -m generation.sample_ddp ODE \
  --model "$MODEL" \
  --ckpt "$CKPT" \
  --image-size 256 \
  --num-classes 1000 \
  --vae-version vavae_f16d32 \
  --vae-path "$VAE_PATH" \
  --use-swiglu --use-rope --use-rmsnorm \
  --path-type Linear \
  --prediction velocity \
  --sampling-method euler \
  --num-sampling-steps 250 \
  --timestep-shift 0.3 \
  --cfg-scale "$CFG_SCALE" \
  --guidance-interval 0.10 1.0 \
  --cfg-channels legacy3 \
  --num-fid-samples 50000 \
  --per-proc-batch-size 32 \
  --global-seed 0 \
  --sample-dir "$SAMPLE_DIR" \
  "$@"

if [ "$NODE_RANK" = "0" ] && [ -n "${REF_BATCH:-}" ]; then
  bash scripts/eval.sh "$REF_BATCH" "$SAMPLE_DIR.npz"
fi
