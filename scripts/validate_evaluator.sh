#!/usr/bin/env bash
# Checks our PyTorch evaluator against ADM's published numbers for its own sample batch:
#   admnet_guided_upsampled_imagenet256.npz vs VIRTUAL_imagenet256_labeled.npz (both from
#   openai/guided-diffusion's evaluations/README.md) must give IS 215.837, FID 3.94256,
#   sFID 6.14043, Precision 0.8265, Recall 0.5309.
# Tolerance: FID/sFID +-0.01, IS +-0.5, Precision/Recall +-0.002. Exit code 1 if any is outside.
#   ADM_DIR=/data/adm INCEPTION_WEIGHTS=/weights/weights-inception-2015-12-05-6726825d.pth \
#     bash scripts/validate_evaluator.sh [--device cuda] [--batch-size 250]
# About 60k Inception passes: minutes on a GPU, hours on a CPU.
set -euo pipefail
# Paths are relative to the folder you run it from (it does not cd); it uses .venv like scripts/test.sh.
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo_root/scripts/setup_env.sh"
adm_dir="${ADM_DIR:-.}"
ref_batch="$adm_dir/VIRTUAL_imagenet256_labeled.npz"
sample_batch="$adm_dir/admnet_guided_upsampled_imagenet256.npz"
for file in "$ref_batch" "$sample_batch"; do
  if [ ! -f "$file" ]; then
    echo "error: $file not found; download it from the links in openai/guided-diffusion's evaluations/README.md and set ADM_DIR to its folder." >&2
    exit 2
  fi
done
json="$(mktemp -d)/metrics.json"
python "$repo_root/generation/evaluate.py" "$ref_batch" "$sample_batch" \
  --inception-weights "${INCEPTION_WEIGHTS:-pretrained/weights-inception-2015-12-05-6726825d.pth}" \
  --output-json "$json" "$@"
python - "$json" <<'PY'
import json
import sys

ours = json.load(open(sys.argv[1]))
# metric: (ADM's published value, tolerance)
expected = {"inception_score": (215.837, 0.5), "fid": (3.94256, 0.01), "sfid": (6.14043, 0.01),
            "precision": (0.8265, 0.002), "recall": (0.5309, 0.002)}
failed = []
print(f"{'metric':<16}{'ADM':>10}{'ours':>12}{'diff':>10}{'tol':>8}")
for name, (adm, tolerance) in expected.items():
    diff = ours[name] - adm
    ok = abs(diff) <= tolerance
    failed += [] if ok else [name]
    print(f"{name:<16}{adm:>10.5f}{ours[name]:>12.5f}{diff:>+10.5f}{tolerance:>8}  {'ok' if ok else 'OUT OF TOLERANCE'}")
if failed:
    sys.exit(f"evaluator differs from ADM's published values beyond tolerance: {', '.join(failed)}")
print("evaluator matches ADM's published values within tolerance")
PY
