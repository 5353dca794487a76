#!/usr/bin/env bash
# The project installed as the README says (`pip install -e .`, NO extras) into a fresh virtual environment, then
# every module imported and every subcommand run once on `tiny` (issue 19, item 10): an import the code makes but
# pyproject.toml does not declare (as scipy once was) fails here, where the test extra would have hidden it.
#
#     bash .ci/smoke_noextras.sh            # .ci/run calls it after the tests; about 8 minutes on 2 cores
#
# PAG_SMOKE_DIR (default: a fresh temporary folder) holds the venv, the cache, the runs and the logs.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
W=${PAG_SMOKE_DIR:-$(mktemp -d -t pag-smoke-XXXXXX)}
rm -rf "$W/work" && mkdir -p "$W/home" "$W/work"  # a PAG_SMOKE_DIR given again keeps only its venv
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export HOME="$W/home" PAG_CACHE="$W/cache" RAY_USAGE_STATS_ENABLED=0
unset PAG_PRESET PAG_REDIS_URL RAY_ADDRESS
REDIS_PID=""
free_port() { python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

step() {  # step NAME COMMAND...: run it in $W/work, its output in $W/NAME.log, the log's tail if it fails
    local name=$1 t0=$SECONDS; shift
    echo "smoke: $name: $*"
    if ! (cd "$W/work" && "$@") >"$W/$name.log" 2>&1; then
        echo "smoke: FAILED: $name (exit code above; last lines of $W/$name.log):" >&2
        tail -n 40 "$W/$name.log" >&2
        exit 1
    fi
    echo "smoke:   ok in $((SECONDS - t0)) s"
}

cleanup() {
    if command -v ray >/dev/null 2>&1; then ray stop --force >/dev/null 2>&1 || true; fi
    if [ -n "$REDIS_PID" ]; then kill "$REDIS_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT

if [ ! -x "$W/venv/bin/pag" ]; then  # a PAG_SMOKE_DIR given again keeps its venv
    step install bash -c "python3 -m venv '$W/venv' && '$W/venv/bin/python' -m pip install -q -c '$REPO/.ci/constraints.txt' -e '$REPO'"
fi
export PATH="$W/venv/bin:$PATH"

# every module of the project's packages, imported in the bare install (optional extras must be imported lazily,
# behind a clear error, never at module level)
step import-all python - "$REPO" <<'EOF'
import importlib, pkgutil, sys
from pathlib import Path
repo = Path(sys.argv[1])
skip = {"tests", "bench", "docs", "build", "runs"}
failed = []
count = 0
for top in sorted(p for p in repo.iterdir() if (p / "__init__.py").exists() and p.name not in skip):
    for info in pkgutil.walk_packages([str(top)], prefix=top.name + "."):
        if info.name.endswith("__main__"):
            continue
        count += 1
        try:
            importlib.import_module(info.name)
        except Exception as exc:  # noqa: BLE001 -- the list is the report
            failed.append(f"{info.name}: {type(exc).__name__}: {exc}")
print(f"{count} modules imported, {len(failed)} failed")
for line in failed:
    print("  " + line)
sys.exit(1 if failed else 0)
EOF

step config pag config --preset tiny
step datasets pag datasets
step sft pag sft --preset tiny --steps 20 --out "$W/work/sft"
# a redis-server of the smoke's own: the training run's buffer stays in it for `pag buffer` afterwards
PORT=$(free_port)
redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$W" >"$W/redis.log" 2>&1 &
REDIS_PID=$!
URL="redis://127.0.0.1:$PORT/0"
step train pag train --steps 3 --run-name smoke --runs-dir runs --no-report --redis-url "$URL" \
    model.sft_checkpoint="$W/work/sft"
step adapt pag adapt --checkpoint runs/smoke -n 2 "a red car parked on a street"
step eval pag eval --methods plain,pag:runs/smoke --datasets coco --limit 2 --rewrites 2 --name smoke --runs-dir runs
step ipgo pag ipgo --no-ray --iterations 2 --run-name smoke-ipgo --runs-dir runs "a red car parked on a street"

step buffer-stats pag buffer stats --run smoke --redis-url "$URL"
step buffer-top pag buffer top 2 --run smoke --redis-url "$URL"
# workers act on a live cluster: a local Ray of the smoke's own, on a free port (Ray's default GCS port is
# Redis's 6379, which a machine running redis-server has taken); `ray stop` at the end stops every local Ray
RAY_PORT=$(free_port)
RAY="127.0.0.1:$RAY_PORT"
export RAY_AUTH_MODE=token  # `ray start` turns token auth on; a client given an address sends the token only so
step ray-start ray start --head --port "$RAY_PORT" --num-cpus 2 --include-dashboard false
step workers-scale pag workers scale 1 --run smoke --ray-address "$RAY" --redis-url "$URL" --preset tiny
step workers-list pag workers list --run smoke --ray-address "$RAY"
step workers-stop pag workers scale 0 --run smoke --ray-address "$RAY"
echo "smoke: every subcommand ran in the no-extras install ($W)"
