#!/usr/bin/env bash
# Peak memory of weir forwarding a large upload on a route by model (the body's first bytes read
# for "model", the rest streamed) against the same upload on a path route: weir's VmHWM growth
# over the idle process while a 16 MiB body passes to a backend that drains it.
#
# usage: benches/body_scan_memory.sh [SIZE_MIB=16]
# needs: curl, python3. WEIR_BIN=path uses that weir binary instead of building this checkout's.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-16}
if [ -n "${WEIR_BIN:-}" ]; then BIN=$WEIR_BIN; else cargo build --release --quiet; BIN=target/release/weir; fi
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# A backend that reads the body in 64 KiB pieces and answers with its length: nothing held.
cat >"$work/drain.py" <<'PY'
import http.server, sys
class Drain(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        left, n = int(self.headers.get("content-length", "0")), 0
        while left:
            chunk = self.rfile.read(min(left, 65536))
            if not chunk:
                break
            left -= len(chunk); n += len(chunk)
        body = str(n).encode()
        self.send_response(200); self.send_header("content-length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Drain).serve_forever()
PY
python3 "$work/drain.py" 18601 & pids+=($!)

python3 - "$work/body.json" "$SIZE" <<'PY'
import sys
with open(sys.argv[1], "wb") as f:
    f.write(b'{"model": "chat", "input": "')
    f.write(b"x" * (int(sys.argv[2]) * 1024 * 1024))
    f.write(b'"}')
PY

run() { # NAME PORT ROUTE-LINES
  mkdir -p "$work/state-$1"
  cat >"$work/$1.toml" <<TOML
[listener]
addr = "127.0.0.1:$2"
max_request_body = "1GiB"
[admin]
addr = "127.0.0.1:$(($2 + 100))"
[state]
dir = "$work/state-$1"
[[versions]]
model = "chat"
version = "v1"
backends = ["http://127.0.0.1:18601"]
[[routes]]
name = "chat"
prefix = "/v1"
stable = "chat@v1"
$3
TOML
  $BIN --log-level warn serve --config "$work/$1.toml" & local pid=$!
  pids+=($pid)
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$(($2 + 100))/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
  # Warm up the connection pool and allocator with small requests, then measure.
  for _ in $(seq 20); do curl -fs -o /dev/null "http://127.0.0.1:$2/v1/embeddings" -d '{"model": "chat"}'; done
  local before after got
  before=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status")
  got=$(curl -fs "http://127.0.0.1:$2/v1/embeddings" -H 'content-type: application/json' --data-binary @"$work/body.json")
  after=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status")
  printf '%-24s forwarded %s bytes; peak RSS %6d KiB before, %6d KiB after: +%d KiB\n' "$1" "$got" "$before" "$after" $((after - before))
  kill $pid
}
echo "== a ${SIZE} MiB upload through weir, peak RSS (VmHWM) of the weir process"
run "route by path" 18610 ""
run "route by model" 18620 'model = "chat"'
