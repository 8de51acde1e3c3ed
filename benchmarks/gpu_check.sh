#!/usr/bin/env bash
# The GPU check in one call on the GPU machine (benchmarks/README.md): install the carried wheels (.whl/,
# made here by benchmarks/fetch_gpu_wheels.py), then run benchmarks/gpu_check.py on CUDA. Results and the
# log go to $OUT when the device tool sets it (they come back from there), and to benchmarks/results/.
# Extra arguments go to gpu_check.py (e.g. --parts training_stages).
set -o pipefail
cd "$(dirname "$0")/.."
SITE=${GPU_CHECK_SITE:-/tmp/site}
OUT_DIR=${OUT:-benchmarks/results}
ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_check.sh: no wheels in .whl/ (carry .whl; fetch: benchmarks/fetch_gpu_wheels.py)"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 2
# The repository root too: autorule_lib is not installed on that machine (here `make setup` installs it).
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 benchmarks/fetch_gpu_wheels.py --install-fallbacks --target "$SITE" ||
  echo "gpu_check.sh: installing fallback wheels failed; going on with the image's own versions"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
python3 benchmarks/gpu_check.py --device cuda --out "$OUT_DIR/gpu_check.md" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
rc=$?
[ "$OUT_DIR" = benchmarks/results ] || cp "$OUT_DIR/gpu_check.md" benchmarks/results/ 2>/dev/null
exit $rc
