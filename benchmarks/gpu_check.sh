#!/usr/bin/env bash
# The GPU check: run once on a CUDA machine (it finishes within 10 minutes) and commit benchmarks/results/gpu_check.json.
#   bash benchmarks/gpu_check.sh            # needs a Python with dinoqpm's requirements (pip install -e . on that machine)
# Nothing depends on it; the CPU dry run of the same code is `python benchmarks/gpu_check.py --device cpu --images 32`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
timeout 570 "$PY" benchmarks/gpu_check.py --device cuda "$@"
