#!/usr/bin/env bash
# The whole issue-12 suite on a lent GPU machine, in ONE device `run` call (bench/gpu_device.md):
#
#     bash bench/gpu_device.sh            # with .whl/ and .deb/ carried, $OUT set by the device tool
#
# 1. installs the Python packages the machine lacks from the carried wheels (.whl/) into /tmp/site,
# 2. unpacks redis-server from the carried Debian packages (.deb/) into /tmp/redis (never into /),
# 3. prints what the machine is, then runs bench/gpu.py --preset sd14-arch --device cuda with a time
#    budget that ends well inside the 10-minute limit, writing $OUT/gpu.json, gpu.md and gpu.log.
# Every step says what failed; a missing redis-server only skips the parts that need it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pag-gpu-out}
SITE=${PAG_SITE:-/tmp/site}
REDIS_DIR=${PAG_REDIS_DIR:-/tmp/redis}
BUDGET=${PAG_GPU_BUDGET_S:-450}
PY=${PYTHON:-python3}
WHL=${PAG_WHL_DIR:-.whl}
DEB=${PAG_DEB_DIR:-.deb}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1
start=$(date +%s)

echo "== wheels"
if ls "$WHL"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHL"/*.whl \
        || { echo "pip install of $WHL/*.whl failed"; exit 3; }
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "no $WHL/ folder: using the machine's packages only"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

echo "== redis-server"
if ls "$DEB"/*.deb >/dev/null 2>&1; then
    mkdir -p "$REDIS_DIR"
    for f in "$DEB"/*.deb; do dpkg -x "$f" "$REDIS_DIR" || echo "could not unpack $f"; done
    export PATH="$REDIS_DIR/usr/bin:$PATH"
    export LD_LIBRARY_PATH="$REDIS_DIR/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if command -v redis-server >/dev/null; then
    redis-server --version || echo "redis-server does not start here:"
    ldd "$(readlink -f "$(command -v redis-server)")" | grep "not found" || true
else
    echo "no redis-server: the reward worker, overlap and e2e parts will be skipped"
fi

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv 2>/dev/null \
    || echo "nvidia-smi unavailable"
"$PY" - <<'EOF'
import importlib, sys
for name in ("torch", "transformers", "diffusers", "open_clip", "pydantic", "redis", "ray"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as exc:  # noqa: BLE001 — a report, not a check
        print(f"{name}: not importable ({type(exc).__name__}: {exc})")
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
sys.exit(0)
EOF

echo "== bench/gpu.py (budget ${BUDGET}s; set up took $(( $(date +%s) - start ))s)"
DEVICE=${PAG_GPU_DEVICE:-cuda}
PRESET=${PAG_GPU_PRESET:-sd14-arch}
PYTHONUNBUFFERED=1 timeout $(( BUDGET + 90 )) "$PY" bench/gpu.py --preset "$PRESET" --device "$DEVICE" \
    --budget-s "$BUDGET" --out "$OUT/gpu.json" ${PAG_GPU_ARGS:-}
status=$?
echo "== done in $(( $(date +%s) - start ))s, exit $status; results in $OUT/gpu.json and $OUT/gpu.md"
exit $status
