#!/usr/bin/env bash
# The project's main job at toy scale, on CPU (sized for 10 minutes on 2 quiet cores):
# toy dataset -> tiny VAE -> latent cache -> for each of 3 seeds: USP pretraining -> linear probe and
# DiT/SiT (USP init vs scratch, paired) -> held-out loss -> convergence speed-up; samples -> toy metrics
# (+ FID/IS with --inception-weights) -> <out>/report.md with paired 95% t-intervals over the seeds.
#   bash scripts/demo.sh [--out DIR] [--fast] [--seeds N] [--first-seed S] [--set KEY=VALUE]
#                        [--redo STAGE|all] [--only STAGE] [--inception-weights PATH]
# Re-running skips finished stages; see demo/run_demo.py (the runner) and demo/stages.py (the stages).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo_root/scripts/setup_env.sh"
# Run from the caller's folder so a relative --out / --inception-weights means what the user typed.
exec python "$repo_root/demo/run_demo.py" "$@"
