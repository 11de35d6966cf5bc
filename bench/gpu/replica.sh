#!/usr/bin/env bash
# The GPU test machine's Python environment, replicated here (../shared/GPU.md): Python 3.12, torch 2.11 and the
# packages it lists, no DALI, PyAV or ffmpeg binary; then every carried part is taken in by the same command the
# real calls run (bench/gpu/call.sh K, whose checks stop at "no CUDA GPU" here), then the preflight.
#     bash bench/gpu/replica.sh       # downloads ~4 GB the first time; ends with "preflight: ready" or what is missing
set -euo pipefail
cd "$(dirname "$0")/../.."
REPLICA=${REPLICA:-/tmp/kcv-replica}
PY312=${PY312:-$(command -v python3.12 || ls "$HOME"/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | head -1)}
[ -x "$PY312" ] || { echo "replica: needs a Python 3.12 (set PY312=...)" >&2; exit 2; }
if [ ! -f "$REPLICA/venv/.complete" ]; then
    rm -rf "$REPLICA/venv" && mkdir -p "$REPLICA"
    "$PY312" -m venv "$REPLICA/venv"
    "$REPLICA/venv/bin/python" -m pip install -q -r bench/gpu/replica-requirements.txt
    touch "$REPLICA/venv/.complete"
fi
# a PATH like that machine's: no ffmpeg, ffprobe or ffplay binary
rm -rf "$REPLICA/bin" && mkdir -p "$REPLICA/bin"
for f in /usr/local/bin/* /usr/bin/* /bin/*; do
    case "$(basename "$f")" in ffmpeg|ffprobe|ffplay|python*|pip*) ;; *) ln -sf "$f" "$REPLICA/bin/" 2>/dev/null || true ;; esac
done
[ -f .gpu-part1/manifest.json ] || .venv/bin/python bench/gpu_kit.py prepare
parts=$(python3 -c "import json; print(json.load(open('.gpu-part1/manifest.json'))['parts'])")
export PATH="$REPLICA/venv/bin:$REPLICA/bin" KCV_GPU_HOME="$REPLICA/kit"
unset PYTHONPATH
rm -rf "$KCV_GPU_HOME"
for k in $(seq 1 "$parts"); do
    OUT="$REPLICA/out$k" bash bench/gpu/call.sh "$k" || true
done
PYTHONPATH="$KCV_GPU_HOME/site" python bench/gpu_check.py --preflight --work "$KCV_GPU_HOME/work"
