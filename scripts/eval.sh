#!/usr/bin/env bash
# ADM-parity evaluation of a sample batch: IS, FID, sFID, Precision, Recall (+ a JSON next to it).
#   bash scripts/eval.sh REF.npz SAMPLE.npz [extra generation.evaluate flags, e.g. --batch-size 250]
# REF.npz: ADM's reference batch (e.g. VIRTUAL_imagenet256_labeled.npz from openai/guided-diffusion's
# evaluations README) or one made by scripts/make_reference_batch.py. SAMPLE.npz: sample_ddp.py's output.
# INCEPTION_WEIGHTS: local weights-inception-2015-12-05-6726825d.pth (torch-fidelity v0.2.0 release asset).
# Paths are relative to the folder you run it from (it does not cd); it uses .venv like scripts/test.sh.
set -euo pipefail
if [ "$#" -lt 2 ]; then
  echo "usage: bash scripts/eval.sh REF.npz SAMPLE.npz [--batch-size N] [--device cuda|cpu]" >&2
  exit 2
fi
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo_root/scripts/setup_env.sh"
ref_batch="$1"; sample_batch="$2"; shift 2
exec python "$repo_root/generation/evaluate.py" "$ref_batch" "$sample_batch" \
  --inception-weights "${INCEPTION_WEIGHTS:-pretrained/weights-inception-2015-12-05-6726825d.pth}" "$@"
