#!/usr/bin/env bash
# GPU check of issue 24, one command on a single-GPU machine (an H200 with torch, transformers,
# accelerate and timm; no network). Every figure lands in one folder: $OUT when set (the device
# tool's), else runs/gpu_check; extra arguments go to `benchmarks/gpu_check.py run`.
#
# Prepare on the CPU machine first (both folders are git-ignored; carry them with the checkout,
# 64 MiB in all with the tracked files, of which the shipped weights are 57 MiB):
#   python benchmarks/gpu_check.py make-shards                      # -> shards/gpu_check (~4 MiB)
#   pip download webdataset==1.0.2 braceexpand --no-deps -d .whl     # pure-Python wheels (~80 KiB)
# Then, on the GPU machine:  bash benchmarks/gpu_check.sh   (about 3-5 minutes; hard limit 7:50)
# Dry run on a CPU:          bash benchmarks/gpu_check.sh --device cpu --tiny --batch 4 --steps 2 --warmup 1 \
#                              --pretrain-steps 6 --pretrain-batch 8 --workers 1 --log-every 2 --words 50 --repeats 1
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import webdataset" 2>/dev/null; then
  if ls .whl/webdataset-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site .whl/*.whl
    export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "error: webdataset is not installed and .whl/ holds no wheel: run 'pip download webdataset==1.0.2 braceexpand --no-deps -d .whl' before, and carry .whl" >&2
    exit 2
  fi
fi
if [ ! -d shards/gpu_check ] && [[ " $* " != *" --shards "* ]]; then
  echo "error: shards/gpu_check is missing: run 'python benchmarks/gpu_check.py make-shards' where Flickr8k is, and carry shards/gpu_check" >&2
  exit 2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
exec timeout 470 "$PY" benchmarks/gpu_check.py run "$@"
