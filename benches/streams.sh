#!/usr/bin/env bash
# Concurrent long-lived SSE streams, side by side: weir, nginx and HAProxy in front of one
# OpenAI-style streaming server (benches/streams.py) whose events carry the time they were
# written. Per proxy: events delivered and errors, the delay the proxy adds to an event (p50/p99
# of arrival minus write time, over the same through the backend directly), proxy CPU per event
# and RSS per open stream (peak during the run over the idle process). Proxies on core 0, the
# backend and the clients on core 1; rounds interleave the targets; medians are reported.
#
# usage: benches/streams.sh [STREAMS=1000] [EVENTS=100] [INTERVAL_MS=50] [ROUNDS=3]
#        (20 events/s per stream at the default interval; EVENTS per answer)
# needs: python3, nginx, haproxy. WEIR_BIN=path uses that weir binary instead of building one.
#
# Limit, measured 2026-12-04: the backend and the clients are Python asyncio on one core, and at
# 1,000 streams x 20 events/s they saturate it (direct p99 delay ~450 ms; at 5 events/s still
# ~180 ms), so the delay columns measure the tool, and CPU per event is flattered by the batching
# a late reader causes. Events, errors and RSS per stream are the proxies'. A compiled load tool
# is the next step (issue 22).
set -euo pipefail
cd "$(dirname "$0")/.."
STREAMS=${1:-1000}
EVENTS=${2:-100}
INTERVAL=${3:-50}
ROUNDS=${4:-3}
BACKEND=127.0.0.1:18701 WEIR=127.0.0.1:18780 ADMIN=127.0.0.1:18790 NGINX=127.0.0.1:18781 HAPROXY=127.0.0.1:18782
for tool in python3 nginx haproxy curl; do
  command -v $tool >/dev/null || { echo "$tool is missing (apt-get install -y nginx haproxy curl)" >&2; exit 1; }
done
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(nproc)" -ge 2 ]; then PROXY_CPU=(taskset -c 0) LOAD_CPU=(taskset -c 1); else PROXY_CPU=() LOAD_CPU=(); fi
TICK=$(getconf CLK_TCK)
if [ -n "${WEIR_BIN:-}" ]; then BIN=$WEIR_BIN; else cargo build --release --quiet; BIN=target/release/weir; fi
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

"${LOAD_CPU[@]}" python3 benches/streams.py backend "${BACKEND##*:}" "$EVENTS" "$INTERVAL" & pids+=($!)

mkdir -p "$work/state" "$work/nginx/logs"
cat >"$work/weir.toml" <<TOML
[listener]
addr = "$WEIR"
header_read_timeout = "120s"
[admin]
addr = "$ADMIN"
[state]
dir = "$work/state"
[[versions]]
model = "chat"
version = "v1"
backends = ["http://$BACKEND"]
[[routes]]
name = "default"
stable = "chat@v1"
TOML
"${PROXY_CPU[@]}" $BIN --log-level warn serve --config "$work/weir.toml" & pids+=($!)
weir_pid=$!

# nginx as SSE deployments set it up: no response buffering, upstream keep-alive.
cat >"$work/nginx.conf" <<CONF
worker_processes 1;
worker_rlimit_nofile 65536;
user root;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 60000; multi_accept on; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  upstream backend { server $BACKEND; keepalive 1024; }
  server {
    listen $NGINX backlog=16384;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 120s;
    }
  }
}
CONF
"${PROXY_CPU[@]}" nginx -p "$work/nginx/" -c "$work/nginx.conf" -g 'daemon off;' & pids+=($!)
nginx_pid=$!

cat >"$work/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 60000
  no strict-limits
defaults
  mode http
  timeout connect 5s
  timeout client 120s
  timeout server 120s
  timeout http-keep-alive 120s
frontend fe
  bind $HAPROXY
  default_backend be
backend be
  http-reuse always
  server b $BACKEND
CONF
"${PROXY_CPU[@]}" haproxy -db -f "$work/haproxy.cfg" 2>"$work/haproxy.log" & pids+=($!)
haproxy_pid=$!

probe='{"model":"chat","stream":true}'
for _ in $(seq 150); do
  curl -fs http://$ADMIN/readyz >/dev/null 2>&1 && curl -fsN -d "$probe" http://$NGINX/v1/chat/completions >/dev/null 2>&1 &&
    curl -fsN -d "$probe" http://$HAPROXY/v1/chat/completions >/dev/null 2>&1 &&
    curl -fsN -d "$probe" http://$WEIR/v1/chat/completions >/dev/null 2>&1 && break
  sleep 0.2
done

declare -A URL=([direct]=$BACKEND [weir]=$WEIR [nginx]=$NGINX [haproxy]=$HAPROXY)
declare -A PIDS=([direct]="" [weir]=$weir_pid [nginx]="$nginx_pid $(pgrep -P "$nginx_pid" | tr '\n' ' ')" [haproxy]=$haproxy_pid)
ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{ print $14 + $15 }' "/proc/$p/stat"))); done; echo $t; }
rss() { local t=0 p; for p in "$@"; do t=$((t + $(awk '/^VmRSS:/ { print $2 }' "/proc/$p/status"))); done; echo $t; }
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR ? v[int((NR + 1) / 2)] : "-") }'; }

# Spread the streams' starts over one interval, so their events do not all fall together.
spread=$(awk -v i="$INTERVAL" 'BEGIN { print i / 1000 }')
TARGETS=(direct weir nginx haproxy)
declare -A res=()
for r in $(seq "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    a=${URL[$t]}
    pl=${PIDS[$t]}
    idle=0 && [ -n "$pl" ] && idle=$(rss $pl)
    t0=0 && [ -n "$pl" ] && t0=$(ticks $pl)
    "${LOAD_CPU[@]}" python3 benches/streams.py client "${a%:*}" "${a##*:}" "$STREAMS" "$EVENTS" "$spread" >"$work/out" &
    client=$!
    peak=$idle
    while kill -0 $client 2>/dev/null; do
      [ -n "$pl" ] && { now=$(rss $pl); [ "$now" -gt "$peak" ] && peak=$now; }
      sleep 0.25
    done
    wait $client
    t1=0 && [ -n "$pl" ] && t1=$(ticks $pl)
    read -r events errors p50 p99 open <"$work/out"
    cpu=$(awk -v dt=$((t1 - t0)) -v tick="$TICK" -v n="$events" -v p="$pl" 'BEGIN { if (p == "" || n == 0) print "-"; else printf "%.2f", dt / tick * 1e6 / n }')
    per=$(awk -v a="$peak" -v b="$idle" -v s="$STREAMS" -v p="$pl" 'BEGIN { if (p == "") print "-"; else printf "%.1f", (a - b) * 1024 / s / 1000 }')
    res[$t]+="$events $errors $p50 $p99 $cpu $per $open"$'\n'
    echo "round $r $t: events $events errors $errors delay p50 $p50 ms p99 $p99 ms cpu $cpu us/event rss $per KB/stream (peak open $open)" >&2
  done
done
echo
echo "== $STREAMS concurrent SSE streams, $EVENTS events each, ${INTERVAL} ms apart: medians of $ROUNDS interleaved rounds"
printf '%-10s %10s %7s %12s %12s %16s %16s %18s\n' "" events errors "p50 ms" "p99 ms" "added p99 ms" "CPU us/event" "RSS KB/stream"
d99=$(awk 'NF { print $4 }' <<<"${res[direct]}" | median)
for t in "${TARGETS[@]}"; do
  m() { awk -v c="$1" 'NF { print $c }' <<<"${res[$t]}" | median; }
  p99=$(m 4)
  printf '%-10s %10s %7s %12s %12s %16s %16s %18s\n' "$t" "$(m 1)" "$(m 2)" "$(m 3)" "$p99" \
    "$(awk -v a="$p99" -v d="$d99" -v t="$t" 'BEGIN { if (t == "direct") print "-"; else printf "%.3f", a - d }')" "$(m 5)" "$(m 6)"
done
