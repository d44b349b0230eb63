#!/usr/bin/env bash
# Create .venv and install the project into it. Safe to run again: it reinstalls only when
# pyproject.toml changed. torch is pinned first: the CPU wheel 2.13.0 is what this project is
# tested with, and an unpinned torch would pull gigabytes of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$stamp" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
rm -f .venv/.installed-*
touch "$stamp"
echo "installed into .venv"
