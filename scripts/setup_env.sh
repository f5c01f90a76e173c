#!/usr/bin/env bash
# Creates .venv (if missing) and installs the pinned requirements into it.
# Sourced by scripts/test.sh and scripts/demo.sh so both set up a fresh machine the same way.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${USP_VENV:-$repo_root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  python3 -m venv "$venv"
fi
stamp="$venv/.requirements.sha256"
wanted="$(sha256sum "$repo_root/requirements.txt" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
  echo "[setup] installing requirements into $venv (first run takes a few minutes)"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$repo_root/requirements.txt"
  echo "$wanted" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
