#!/usr/bin/env bash
# The project's test command: sets up .venv on a fresh machine, then runs the CPU test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k transfer`.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo_root/scripts/setup_env.sh"
cd "$repo_root"
exec python -m pytest "$@"
