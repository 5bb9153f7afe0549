#!/bin/bash
# How much of a pull survives being SIGKILLed again and again (the OOM killer, a preempted machine): a node
# serving a 100 MiB random file, then five pulls into a new store at 15 MiB/s, each SIGKILLed 2 s after its
# start; prints the bytes the node sent and those the download kept (whole chunks and parts).
# Usage: benchmarks/kill_loop.sh [PYTHONPATH of the code to measure] (default: this checkout's src)
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
SRC=${1:-$HERE/src}
PY=${PYTHON:-$HERE/.venv/bin/python}
WORK=$(mktemp -d)
PORT=${PORT:-37561}
trap 'kill -- -$NODE 2>/dev/null || true; rm -rf "$WORK"' EXIT
"$PY" -c "import random,os,sys; d=sys.argv[1]; os.makedirs(d); open(d+'/model.safetensors','wb').write(random.Random(1).randbytes(100<<20)); open(d+'/config.json','w').write('{}')" "$WORK/src"
MODELDEPOT_HOME=$WORK/node PYTHONPATH=$SRC "$PY" -m modeldepot import "$WORK/src" --repo acme/big > /dev/null
MODELDEPOT_HOME=$WORK/node PYTHONPATH=$SRC setsid "$PY" -m modeldepot serve --port "$PORT" > "$WORK/node.log" 2>&1 &
NODE=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/api/depot/v1/health" > /dev/null && break; sleep 0.1; done
sent() { curl -s "http://127.0.0.1:$PORT/metrics" | awk '/^modeldepot_http_sent_bytes_total/ {s+=$2} END {printf "%d", s}'; }
before=$(sent)
export MODELDEPOT_HOME=$WORK/puller HF_ENDPOINT=http://127.0.0.1:$PORT MODELDEPOT_MAX_DOWNLOAD_RATE=15MiB/s PYTHONPATH=$SRC
for _ in 1 2 3 4 5; do
  setsid "$PY" -m modeldepot pull acme/big > /dev/null 2>&1 &
  P=$!; sleep 2; kill -9 -- -$P 2>/dev/null || true; wait $P 2>/dev/null || true
done
after=$(sent)
"$PY" - "$before" "$after" <<'PYEOF'
import sys
from modeldepot import Depot
from modeldepot.hashing import chunk_span
before, after = int(sys.argv[1]), int(sys.argv[2])
with Depot(create=False) as depot:
    [entry] = [f for f in depot.get_manifest("acme/big").files if f.path == "model.safetensors"]
    if depot.has_file("acme/big", "model.safetensors"):
        kept = entry.size
    else:
        log = depot.store.partials.read_log(entry.sha256 or "")
        kept = 0 if log is None else sum(chunk_span(i, log.size, log.chunk_size)[1] for i in log.logged) + sum(log.parts.values())
print(f"sent by the node: {(after - before) / 2**20:.1f} MiB; kept for the resume: {kept / 2**20:.1f} MiB "
      f"({kept / max(1, after - before):.0%})")
PYEOF
