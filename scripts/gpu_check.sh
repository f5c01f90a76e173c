#!/usr/bin/env bash
# GPU readiness check: correctness steps, then throughput; a verdict, one JSON and one table under --out.
#   bash scripts/gpu_check.sh --out gpu_check_out            # one H100/H200, a verdict within 8 minutes
#   bash scripts/gpu_check.sh --out /tmp/gc --dry-run        # tiny scale on CPU/gloo (CI, no GPU)
# Python: $PYTHON if set, else the repo's .venv if it exists, else python3 from PATH (on a GPU machine
# that is the system's own CUDA torch: never run scripts/setup_env.sh there, it installs the pinned CPU wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" scripts/gpu_check.py "$@"
