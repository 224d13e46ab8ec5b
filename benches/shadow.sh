#!/usr/bin/env bash
# What mirroring costs the clients: two built-in model servers (stable fast, candidate very slow),
# and two weirs in front of them, identical except that one mirrors 100% of requests to the slow
# candidate. Rounds of wrk alternate between the two weirs; the report is the median p99 of each
# and their ratio (target: mirroring adds at most 10%), weir's peak RSS while mirroring, and the
# mirror outcomes, which show the in-flight limit holding (most shadows dropped, not queued).
#
# usage: benches/shadow.sh [DURATION=5s] [CONNECTIONS=32] [ROUNDS=3]
# needs: wrk (apt-get install wrk) and curl; everything else is built here. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-5s}
CONNS=${2:-32}
ROUNDS=${3:-3}
THREADS=2
STABLE_LATENCY=5ms
CANDIDATE_LATENCY=2s
MAX_IN_FLIGHT=64 # [shadow] max_in_flight default; quick mode has no flag for it
S=127.0.0.1:19201 C=127.0.0.1:19202
PLAIN=127.0.0.1:19280 PLAIN_ADMIN=127.0.0.1:19290
MIRROR=127.0.0.1:19281 MIRROR_ADMIN=127.0.0.1:19291

command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }
cargo build --release --quiet
BIN=target/release/weir
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

$BIN --log-level warn demo-backend --listen $S --model chat --version v1 --latency $STABLE_LATENCY & pids+=($!)
$BIN --log-level warn demo-backend --listen $C --model chat --version v2 --latency $CANDIDATE_LATENCY & pids+=($!)
serve() { # LISTEN ADMIN STATE [extra flags]; exec, so $! is weir itself (for kill and VmHWM)
  exec $BIN --log-level warn serve --stable chat@v1=http://$S --candidate chat@v2=http://$C --weight 0% \
    --listen "$1" --admin "$2" --state-dir "$3" "${@:4}"
}
serve $PLAIN $PLAIN_ADMIN "$work/plain" & pids+=($!)
serve $MIRROR $MIRROR_ADMIN "$work/mirror" --mirror 100% & pids+=($!)
mirror_pid=$!
for _ in $(seq 100); do
  curl -fs http://$PLAIN_ADMIN/readyz >/dev/null 2>&1 && curl -fs http://$MIRROR_ADMIN/readyz >/dev/null 2>&1 &&
    curl -fs http://$S/healthz >/dev/null 2>&1 && curl -fs http://$C/healthz >/dev/null 2>&1 && break
  sleep 0.1
done

cat >"$work/chat.lua" <<'EOF'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"chat","messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":16}'
EOF
# The request must work before it is measured: a 4xx would make a fast, meaningless benchmark.
for addr in $PLAIN $MIRROR; do
  curl -fsS -o /dev/null -X POST -H 'content-type: application/json' \
    -d '{"model":"chat","messages":[{"role":"user","content":"hi"}]}' \
    http://$addr/v1/chat/completions
done

# Prints "requests_per_second p50_ms p99_ms non2xx" for one wrk run against weir at $1.
run_wrk() {
  wrk -t$THREADS -c"$CONNS" -d"$DURATION" --latency -s "$work/chat.lua" "http://$1/v1/chat/completions" | awk '
    /Requests\/sec/ { rps = $2 }
    /Non-2xx or 3xx responses/ { bad = $NF }
    $1 == "50%" { p50 = $2 } $1 == "99%" { p99 = $2 }
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    END { printf "%s %.3f %.3f %d\n", rps, ms(p50), ms(p99), bad }'
}
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
seconds() { awk -v d="$1" 'BEGIN { n = d + 0; if (d ~ /ms$/) n /= 1000; else if (d ~ /m$/) n *= 60; print n }'; }
mirror_outcome() {
  curl -fs http://$MIRROR_ADMIN/metrics |
    awk -v o="$1" '/^weir_mirror_requests_total/ && index($0, "outcome=\"" o "\"") { s += $NF } END { print s + 0 }'
}
# Shadows still held by the slow candidate would spill into the next round: let them finish.
settle=$(awk -v c="$(seconds $CANDIDATE_LATENCY)" 'BEGIN { print c * 1.2 + 0.5 }')

plain=() mirrored=()
for r in $(seq "$ROUNDS"); do
  plain+=("$(run_wrk $PLAIN)")
  mirrored+=("$(run_wrk $MIRROR)")
  echo "round $r: no mirror ${plain[-1]} | mirror 100% ${mirrored[-1]}  (req/s p50 p99 non2xx)" >&2
  sleep "$settle"
done
col() { printf '%s\n' "$@" | awk -v c="$COL" '{ print $c }' | median; }
COL=1 a_rps=$(col "${plain[@]}"); COL=1 b_rps=$(col "${mirrored[@]}")
COL=2 a_p50=$(col "${plain[@]}"); COL=2 b_p50=$(col "${mirrored[@]}")
COL=3 a_p99=$(col "${plain[@]}"); COL=3 b_p99=$(col "${mirrored[@]}")
bad=$(printf '%s\n' "${plain[@]}" "${mirrored[@]}" | awk '{ s += $4 } END { print s + 0 }')
hwm=$(awk '/^VmHWM/ { print $2, $3 }' /proc/$mirror_pid/status)
sent=$(mirror_outcome sent) dropped=$(mirror_outcome dropped) failed=$(mirror_outcome failed)
timeout=$(mirror_outcome timeout) too_large=$(mirror_outcome too_large)
# Each permit is held about CANDIDATE_LATENCY, so in each round at most MAX_IN_FLIGHT shadows start
# per CANDIDATE_LATENCY, plus one batch whose permits free after the round ends.
bound=$(awk -v r="$ROUNDS" -v d="$(seconds "$DURATION")" -v c="$(seconds $CANDIDATE_LATENCY)" -v m=$MAX_IN_FLIGHT \
  'BEGIN { print int(m * r * (d / (c * 0.9) + 1)) + 1 }')

echo
echo "median of $ROUNDS rounds, wrk -t$THREADS -c$CONNS -d$DURATION, POST /v1/chat/completions"
echo "stable latency $STABLE_LATENCY, candidate latency $CANDIDATE_LATENCY, weight 0%"
printf '%-22s %12s %10s %10s\n' "" "req/s" "p50 ms" "p99 ms"
printf '%-22s %12s %10s %10s\n' "weir, no mirror" "$a_rps" "$a_p50" "$a_p99"
printf '%-22s %12s %10s %10s\n' "weir, mirror 100%" "$b_rps" "$b_p50" "$b_p99"
awk -v a="$a_p99" -v b="$b_p99" 'BEGIN { r = b / a; printf "p99 mirror / no mirror: %.2fx (target <= 1.10: %s)\n", r, r <= 1.10 ? "met" : "MISSED" }'
awk -v a="$a_rps" -v b="$b_rps" 'BEGIN { printf "throughput mirror / no mirror: %.2fx\n", b / a }'
echo "non-2xx client responses: $bad"
echo "weir (mirror) peak RSS: $hwm"
echo "mirror outcomes: sent=$sent dropped=$dropped failed=$failed timeout=$timeout too_large=$too_large"
verdict=held
[ "$sent" -le "$bound" ] || verdict=EXCEEDED
echo "in-flight limit ($MAX_IN_FLIGHT, ~$CANDIDATE_LATENCY per shadow): sent $sent <= $bound: $verdict"
