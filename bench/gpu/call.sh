#!/usr/bin/env bash
# One call of the GPU sequence (bench/gpu/README.md): take carried part K in, then run call K's checks.
#     bash bench/gpu/call.sh K        # figures under $OUT (gpu_check.md, gpu_check.json, log.txt, receive.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
K=${1:?usage: bash bench/gpu/call.sh K}
KIT=${KCV_GPU_HOME:-/tmp/kcv-gpu}
OUT=${OUT:-$KIT/out}
PY=${PYTHON:-$(command -v python3 || command -v python)}
mkdir -p "$OUT"
"$PY" bench/gpu_kit.py receive "$K" --home "$KIT" > "$OUT/receive.txt" 2>&1
received=$?
cat "$OUT/receive.txt"
export PYTHONPATH="$KIT/site${PYTHONPATH:+:$PYTHONPATH}"
"$PY" bench/gpu_check.py --call "$K" --out "$OUT" --work "$KIT/work" > "$OUT/log.txt" 2>&1
checked=$?
grep -v '^gpu_check: .* \.\.\.$' "$OUT/log.txt" | tail -80
exit $(( received ? received : checked ))
