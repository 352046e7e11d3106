#!/usr/bin/env bash
# On a lent GPU machine (Python 3.12, torch, transformers, peft, scikit-learn; no diffusers, omegaconf; no
# registry): install the wheels `make gpu-wheels` prepared in .whl/ and lay this repository out in /tmp/site, then
# run benchmarks/bench_gpu.py. The JSON and the log go to $OUT (the device tool's folder) or benchmarks/results/.
#   bash benchmarks/gpu_run.sh [bench_gpu.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
ls .whl/*.whl >/dev/null || { echo "no wheels in .whl/: run 'make gpu-wheels' here and carry .whl" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# mia_gen as setup.cfg maps it (package_dir): the core, with models/, attacks/, experiments/, configs/ inside
rm -rf /tmp/site/mia_gen
cp -r mia_gen /tmp/site/mia_gen
for part in models attacks experiments configs; do cp -r "$part" "/tmp/site/mia_gen/$part"; done
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 benchmarks/bench_gpu.py --out "$out/gpu.json" "$@" 2>&1 | tee "$out/gpu.log"
