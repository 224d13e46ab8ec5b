#!/usr/bin/env bash
# End-to-end load: two built-in model servers, weir in front (10% canary), wrk as the client.
# Measures the backend directly and through weir in the same run, ROUNDS times, and reports the
# medians and the ratio, so the figure is about weir's overhead rather than this machine's mood.
#
# usage: benches/load.sh [DURATION=10s] [CONNECTIONS=64] [ROUNDS=3]
# needs: wrk (apt-get install wrk); everything else is built here. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-10s}
CONNS=${2:-64}
ROUNDS=${3:-3}
THREADS=2
B1=127.0.0.1:19101 B2=127.0.0.1:19102 PROXY=127.0.0.1:19180 ADMIN=127.0.0.1:19190

command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }
cargo build --release --quiet
BIN=target/release/weir
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT

$BIN --log-level warn demo-backend --listen $B1 --model chat --version v1 & pids+=($!)
$BIN --log-level warn demo-backend --listen $B2 --model chat --version v2 & pids+=($!)
$BIN --log-level warn serve --stable chat@v1=http://$B1 --candidate chat@v2=http://$B2 \
  --weight 10% --listen $PROXY --admin $ADMIN --state-dir "$(mktemp -d)" & pids+=($!)
for _ in $(seq 100); do
  curl -fs http://$ADMIN/readyz >/dev/null 2>&1 && curl -fs http://$B1/healthz >/dev/null 2>&1 && break
  sleep 0.1
done

# Prints "requests_per_second p50_ms p99_ms" for one wrk run.
run_wrk() {
  wrk -t$THREADS -c"$CONNS" -d"$DURATION" --latency "$1" | awk '
    /Requests\/sec/ { rps = $2 }
    $1 == "50%" { p50 = $2 } $1 == "99%" { p99 = $2 }
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    END { printf "%s %.3f %.3f\n", rps, ms(p50), ms(p99) }'
}
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

direct=() proxied=()
for r in $(seq "$ROUNDS"); do
  direct+=("$(run_wrk http://$B1/ping)")
  proxied+=("$(run_wrk http://$PROXY/ping)")
  echo "round $r: direct ${direct[-1]} | weir ${proxied[-1]}" >&2
done
col() { printf '%s\n' "$@" | awk -v c="$COL" '{ print $c }' | median; }
COL=1 d_rps=$(col "${direct[@]}"); COL=1 p_rps=$(col "${proxied[@]}")
COL=2 d_p50=$(col "${direct[@]}"); COL=2 p_p50=$(col "${proxied[@]}")
COL=3 d_p99=$(col "${direct[@]}"); COL=3 p_p99=$(col "${proxied[@]}")
echo
echo "median of $ROUNDS rounds, wrk -t$THREADS -c$CONNS -d$DURATION, GET /ping, 10% canary"
printf '%-22s %12s %10s %10s\n' "" "req/s" "p50 ms" "p99 ms"
printf '%-22s %12s %10s %10s\n' "backend direct" "$d_rps" "$d_p50" "$d_p99"
printf '%-22s %12s %10s %10s\n' "through weir" "$p_rps" "$p_p50" "$p_p99"
awk -v a="$p_rps" -v b="$d_rps" 'BEGIN { printf "weir / direct throughput: %.2fx\n", a / b }'
curl -fs http://$ADMIN/metrics | grep -E '^weir_requests_total.*2xx' || true
