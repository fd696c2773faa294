#!/usr/bin/env bash
# The GPU check on a CUDA machine with no internet, in under 10 minutes: see bench/gpu_check.py for what it measures.
#
# Packages the machine's Python lacks travel as wheels in .whl/ (ignored by git). Fetch them where pip works:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl gguf bitsandbytes "transformers>=5,<6" "peft>=0.17" huggingface_hub
# (pure-Python wheels come as py3-none-any and match any platform).
set -euo pipefail
cd "$(dirname "$0")/.."
# the project's .venv where there is one (this repository's setup), else the machine's python3 (a GPU image)
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_check: $PY has no torch; run it with PYTHON=/path/to/python (one with torch, CUDA build) or carry wheels in .whl/" >&2
  exit 2
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/memcore-site .whl/*.whl
  export PYTHONPATH=/tmp/memcore-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
"$PY" - <<'PY'
import importlib
for name in ("torch", "transformers", "peft", "gguf", "bitsandbytes", "safetensors", "regex", "filelock"):
    try:
        m = importlib.import_module(name)
        print(f"  {name:<13} {getattr(m, '__version__', '?')}")
    except Exception as e:
        print(f"  {name:<13} MISSING ({type(e).__name__}): rows that need it will say so")
PY
exec timeout 590 "$PY" bench/gpu_check.py "$@"
