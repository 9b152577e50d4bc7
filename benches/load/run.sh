#!/usr/bin/env bash
# benches/load/run.sh — moat side by side with direct traffic, HAProxy, NGINX and stunnel (issue 7),
# plus the sidecar-pair figures of issue 3. Loopback only, bounded, one command:
#
#   bash benches/load/run.sh                 # full run (~7 min on a quiet 2-core box, after the one-off oha build)
#   PGO=0 bash benches/load/run.sh           # the plain `dist` build instead of the profile-guided one that ships
#   DUR=3 ROUNDS=1 bash benches/load/run.sh  # shorter runs, the target rows once
#   ONLY='ka_moat_in_c32 ka_haproxy_http_c32' bash benches/load/run.sh   # a subset, by label
#
#   oha (client cert) ─TLS1.3 mTLS─> [moat inbound | haproxy | nginx | stunnel4] ──plain──> nginx backend
#   oha ─plain─> moat outbound ─mTLS─> moat inbound ─plain─> nginx backend            (the sidecar pair)
#   oha ─plain─────────────────────────────────────────────> nginx backend            (direct baseline)
#   WebSocket echo, direct and through a pair of its own (phase G, benches/load/ws_echo.sh)
#
# * One PKI for every target: certificates come from `moat ca` (ECDSA P-256, SPIFFE URI SAN only).
#   Because those certificates carry no DNS/IP name, oha runs with --insecure against every TLS target
#   (same client-side cost for all); it still presents its client certificate, which every server verifies.
# * Pinning: backend + proxies on SRV_CPU ("the pod's core"), oha and the idle-connection client on CLI_CPU.
# * Shared box: before each run, wait (<= QUIET_WAIT s) for quiet; record other_pct (CPU on the two cores not
#   charged to proxy/backend/oha); retry a run (<= RETRIES) when other_pct > OTHER_MAX. Hard cap MAX_SECONDS.
# * Every process started here is stopped by PID on exit (trap); nothing else is touched.
# * Results: $OUT/results.json, $OUT/summary.md, $OUT/runs.tsv (default OUT=benches/results).
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
ROOT=${ROOT:-${TMPDIR:-/tmp}/moat-load}
OUT=${OUT:-$REPO/benches/results}
PGO=${PGO:-1}                  # 1: measure what ships, the profile-guided build (scripts/pgo-build.sh); 0: plain `dist`
if [ "$PGO" = 1 ]; then MOAT=${MOAT:-$REPO/target/pgo/moat}; else MOAT=${MOAT:-$REPO/target/dist/moat}; fi
DUR=${DUR:-4}                  # seconds per oha run
FR_DUR=${FR_DUR:-8}            # seconds per fixed-rate run: its p99 rests on the slowest 1 % of RATE x (FR_DUR - WARM)
RATE=${RATE:-2000}             # req/s for the fixed-rate (latency) runs
H2_CONNS=${H2_CONNS:-4}; H2_STREAMS=${H2_STREAMS:-8}
IDLE_CONNS=${IDLE_CONNS:-1000}
SRV_CPU=${SRV_CPU:-0}; CLI_CPU=${CLI_CPU:-1}
OHA_VERSION=${OHA_VERSION:-1.16.0}
MAX_SECONDS=${MAX_SECONDS:-540} # cap for the whole measurement phase (the harness stays under 10 min)
QUIET_PCT=${QUIET_PCT:-15}     # wait until whole-box CPU use is <= this % ...
QUIET_WAIT=${QUIET_WAIT:-15}   # ... for at most this many seconds per run ...
QUIET_BUDGET=${QUIET_BUDGET:-60} # ... and at most this many seconds over the whole run (then: measure, flag)
OTHER_MAX=${OTHER_MAX:-15}     # retry a run if more than this % of a core went to processes not ours
RETRIES=${RETRIES:-1}
ROUNDS=${ROUNDS:-3}            # the rows the ratio and fixed-rate targets compare run this many times, interleaved
                               # (the box's speed drifts between minutes); each verdict takes the median
WARM=${WARM:-1}                # seconds excluded from the steady-state percentiles
ONLY=${ONLY:-}                 # space-separated labels to run (default: all)
BUILD=${BUILD:-1}              # 0: use $MOAT as it is
# SANITY_ONLY=1: start everything, check it answers (curl), stop.

B_PORT=18080                   # nginx backend, plain HTTP/1.1
B_H2C_PORT=18081               # nginx backend, h2c (prior knowledge) for the direct HTTP/2 baseline
MI_PORT=18443                  # moat inbound, http (forwards HTTP/1.1, as haproxy/nginx do)
MI_TCP_PORT=18446              # moat inbound, tcp
MO_PORT=15001                  # moat outbound, http -> MI_PORT
MO_TCP_PORT=15002              # moat outbound, tcp  -> MI_TCP_PORT
MIDLE_PORT=18447               # moat inbound in its own process, for idle RSS and 1,000 idle connections
NG_PORT=18543                  # nginx mTLS, resumption on (tickets + shared cache)
NG_FULL_PORT=18544             # nginx mTLS, resumption off
HA_PORT=19443                  # haproxy mTLS, mode http, tickets on
HA_TCP_PORT=19444              # haproxy mTLS, mode tcp
ST_PORT=19445                  # stunnel4 mTLS, tcp
HA_FULL_PORT=19446             # haproxy mTLS, mode http, no tickets / no cache
HA_IDLE_PORT=19450             # fresh haproxy (mode http, mTLS) for the memory phase
NG_IDLE_PORT=18550             # fresh nginx (mTLS) for the memory phase
ALL_PORTS="$B_PORT $B_H2C_PORT $MI_PORT $MI_TCP_PORT $MO_PORT $MO_TCP_PORT $NG_PORT $NG_FULL_PORT $HA_PORT $HA_TCP_PORT $ST_PORT $HA_FULL_PORT"

mkdir -p "$ROOT"/{pki,conf,logs,run,raw} "$OUT"
cd "$ROOT" || exit 1
log() { printf '[moat-load %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
CLK=$(getconf CLK_TCK)
T_START=$SECONDS

# ---------------------------------------------------------------- install / build
install_deps() {
  local need=() b
  for b in haproxy:haproxy nginx:nginx-light stunnel4:stunnel4 openssl:openssl curl:curl \
           python3:python3 taskset:util-linux ss:iproute2; do
    command -v "${b%%:*}" >/dev/null 2>&1 || need+=("${b#*:}")
  done
  if ((${#need[@]})); then
    log "apt-get install ${need[*]}"
    apt-get update -qq >/dev/null
    # RUNLEVEL=1 keeps Debian maintainer scripts from starting the packaged nginx/haproxy services.
    RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >"$ROOT/logs/apt.log" 2>&1 \
      || { log "apt-get failed, see $ROOT/logs/apt.log"; exit 1; }
  fi
  python3 -c 'import websockets.asyncio.client' 2>/dev/null || python3 -m pip install -q websockets==17.4 \
    >"$ROOT/logs/pip.log" 2>&1 || { log "pip install websockets failed, see $ROOT/logs/pip.log"; exit 1; }
  OHA=${OHA:-}
  if [ -z "$OHA" ]; then
    if [ -x "$ROOT/cargo-root/bin/oha" ]; then OHA="$ROOT/cargo-root/bin/oha"
    elif command -v oha >/dev/null 2>&1; then OHA=$(command -v oha)
    else
      log "building oha $OHA_VERSION from crates.io into $ROOT/cargo-root (one-off, ~7 min on 2 cores)"
      CARGO_TARGET_DIR="$ROOT/cargo-target" timeout 1800 nice -n 19 cargo install oha --version "$OHA_VERSION" \
        --locked --root "$ROOT/cargo-root" >"$ROOT/logs/oha-build.log" 2>&1 || { log "oha build failed"; exit 1; }
      OHA="$ROOT/cargo-root/bin/oha"
    fi
  fi
  if [ "$BUILD" = 1 ] && [ "$PGO" = 1 ]; then
    log "scripts/pgo-build.sh: instrumented build, training, optimized build (niced; ~10 min the first time)"
    (cd "$REPO" && nice -n 19 bash scripts/pgo-build.sh >"$ROOT/logs/moat-build.log" 2>&1) \
      || { log "moat PGO build failed, see $ROOT/logs/moat-build.log"; exit 1; }
  elif [ "$BUILD" = 1 ]; then
    log "cargo build --profile dist (niced)"
    (cd "$REPO" && nice -n 19 cargo build --profile dist --bin moat >"$ROOT/logs/moat-build.log" 2>&1) \
      || { log "moat build failed, see $ROOT/logs/moat-build.log"; exit 1; }
  fi
  [ -x "$MOAT" ] || { log "no moat binary at $MOAT"; exit 1; }
  # Every moat process of this run starts from one snapshot of the binary: a rebuild of target/ during
  # the run (the checkout may be shared) must not change what the later phases measure.
  MOAT_BUILT=$(date -u -r "$MOAT" +%Y-%m-%dT%H:%M:%SZ)
  cp "$MOAT" "$ROOT/moat.bin" && MOAT_SRC=$MOAT && MOAT="$ROOT/moat.bin"
  log "oha: $($OHA --version 2>/dev/null); moat: $MOAT ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null))"
}

# ---------------------------------------------------------------- PKI (moat's own CA, for every target)
make_pki() {
  local P=$ROOT/pki id
  rm -rf "$P"; mkdir -p "$P"
  "$MOAT" ca init --dir "$P/ca" --trust-domain example.org >/dev/null 2>&1 || { log "ca init failed"; exit 1; }
  "$MOAT" ca init --dir "$P/rogue-ca" --trust-domain example.org >/dev/null 2>&1 || { log "rogue ca init failed"; exit 1; }
  for id in server client loadgen peerproxy; do
    "$MOAT" ca issue --dir "$P/ca" --id "spiffe://example.org/$id" --ttl 24h \
      --cert-out "$P/$id.crt" --key-out "$P/$id.key" >/dev/null 2>&1 || { log "issue $id failed"; exit 1; }
  done
  "$MOAT" ca issue --dir "$P/rogue-ca" --id spiffe://example.org/loadgen --ttl 24h \
    --cert-out "$P/rogue.crt" --key-out "$P/rogue.key" >/dev/null 2>&1
  "$MOAT" ca bundle --dir "$P/ca" > "$P/bundle.pem" 2>/dev/null
  cat "$P/peerproxy.crt" "$P/peerproxy.key" > "$P/peerproxy.pem"
  openssl verify -CAfile "$P/bundle.pem" "$P/server.crt" "$P/loadgen.crt" "$P/peerproxy.crt" >/dev/null \
    || { log "PKI verify failed"; exit 1; }
}

# ---------------------------------------------------------------- configs
write_configs() {
  local P=$ROOT C=$ROOT/conf K=$ROOT/pki
  cat > $C/nginx-backend.conf <<EOF
daemon off; master_process on; worker_processes 1; pid $P/run/nginx-backend.pid;
error_log $P/logs/nginx-backend.err warn;
events { worker_connections 8192; }
http {
  access_log off; keepalive_requests 1000000; keepalive_timeout 60s;
  client_body_temp_path $P/run/nb-body; proxy_temp_path $P/run/nb-proxy; fastcgi_temp_path $P/run/nb-fcgi;
  uwsgi_temp_path $P/run/nb-uwsgi; scgi_temp_path $P/run/nb-scgi;
  server { listen 127.0.0.1:$B_PORT backlog=4096; default_type text/plain;
    location / { return 200 "hello from backend\n"; }
    location = /peer { return 200 "\$http_x_moat_peer_id\n"; } }
  server { listen 127.0.0.1:$B_H2C_PORT http2 backlog=4096; default_type text/plain;
    http2_max_requests 1000000;
    location / { return 200 "hello from backend\n"; } }
}
EOF
  cat > $C/nginx-mtls.conf <<EOF
daemon off; master_process on; worker_processes 1; pid $P/run/nginx-mtls.pid;
error_log $P/logs/nginx-mtls.err warn;
worker_rlimit_nofile 8192;
events { worker_connections 8192; }
http {
  access_log off; keepalive_requests 1000000; keepalive_timeout 60s; http2_max_requests 1000000;
  client_body_temp_path $P/run/nm-body; proxy_temp_path $P/run/nm-proxy; fastcgi_temp_path $P/run/nm-fcgi;
  uwsgi_temp_path $P/run/nm-uwsgi; scgi_temp_path $P/run/nm-scgi;
  upstream app { server 127.0.0.1:$B_PORT; keepalive 64; keepalive_requests 1000000; }
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_certificate $K/peerproxy.crt; ssl_certificate_key $K/peerproxy.key;
  ssl_client_certificate $K/bundle.pem; ssl_verify_client on; ssl_verify_depth 2;
  server { listen 127.0.0.1:$NG_PORT ssl http2 backlog=4096;
    ssl_session_cache shared:S:10m; ssl_session_tickets on;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_set_header X-Client-Cert-Subject \$ssl_client_s_dn; } }
  server { listen 127.0.0.1:$NG_FULL_PORT ssl http2 backlog=4096;
    ssl_session_cache off; ssl_session_tickets off;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; } }
}
EOF
  cat > $C/haproxy.cfg <<EOF
global
  nbthread 1
  maxconn 8192
  tune.ssl.cachesize 0
  pidfile $P/run/haproxy.pid
  stats socket $P/run/haproxy.sock mode 600 level user
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s
  option http-keep-alive
  http-reuse always
frontend mtls_http
  bind 127.0.0.1:$HA_PORT ssl crt $K/peerproxy.pem ca-file $K/bundle.pem verify required alpn h2,http/1.1
  http-request set-header X-Client-Cert-Subject %{+Q}[ssl_c_s_dn]
  default_backend app
frontend mtls_http_full
  bind 127.0.0.1:$HA_FULL_PORT ssl crt $K/peerproxy.pem ca-file $K/bundle.pem verify required alpn h2,http/1.1 no-tls-tickets
  default_backend app
frontend mtls_tcp
  mode tcp
  bind 127.0.0.1:$HA_TCP_PORT ssl crt $K/peerproxy.pem ca-file $K/bundle.pem verify required
  default_backend app_tcp
backend app
  server s1 127.0.0.1:$B_PORT
backend app_tcp
  mode tcp
  server s1 127.0.0.1:$B_PORT
EOF
  cat > $C/stunnel.conf <<EOF
foreground = yes
pid = $P/run/stunnel.pid
output = $P/logs/stunnel.log
debug = 3
[mtls_tcp]
accept = 127.0.0.1:$ST_PORT
connect = 127.0.0.1:$B_PORT
cert = $K/peerproxy.crt
key = $K/peerproxy.key
CAfile = $K/bundle.pem
verifyChain = yes
requireCert = yes
EOF
  # moat: one worker thread (the comparison is one core each), files identity, logs at warn (quiet under load).
  # The inbound forwards HTTP/1.1 to the backend whatever the client spoke (app_protocol = "http1",
  # the default, written out), as haproxy and nginx do here: the nginx backend on B_PORT speaks HTTP/1.1 only.
  cat > $C/moat-in.toml <<EOF
[runtime]
worker_threads = 1
[identity]
cert = "$K/server.crt"
key = "$K/server.key"
bundle = "$K/bundle.pem"
[admin]
listen = "127.0.0.1:0"
[[inbound]]
name = "in"
listen = "127.0.0.1:$MI_PORT"
forward = "127.0.0.1:$B_PORT"
protocol = "http"
app_protocol = "http1"
[[inbound]]
name = "in_tcp"
listen = "127.0.0.1:$MI_TCP_PORT"
forward = "127.0.0.1:$B_PORT"
protocol = "tcp"
EOF
  cat > $C/moat-out.toml <<EOF
[runtime]
worker_threads = 1
[identity]
cert = "$K/client.crt"
key = "$K/client.key"
bundle = "$K/bundle.pem"
[admin]
listen = "127.0.0.1:0"
[[outbound]]
name = "out"
listen = "127.0.0.1:$MO_PORT"
upstream = "127.0.0.1:$MI_PORT"
peer = "spiffe://example.org/server"
protocol = "http"
[[outbound]]
name = "out_tcp"
listen = "127.0.0.1:$MO_TCP_PORT"
upstream = "127.0.0.1:$MI_TCP_PORT"
peer = "spiffe://example.org/server"
protocol = "tcp"
EOF
  # Its own process, so idle RSS is a fresh proxy's. header_read_timeout is raised so that 1,000 idle
  # keep-alive connections stay open while they are counted (the default closes them after 10 s).
  cat > $C/moat-idle.toml <<EOF
[runtime]
worker_threads = 1
[identity]
cert = "$K/server.crt"
key = "$K/server.key"
bundle = "$K/bundle.pem"
[admin]
listen = "127.0.0.1:0"
[limits]
header_read_timeout = "120s"
[[inbound]]
name = "idle"
listen = "127.0.0.1:$MIDLE_PORT"
forward = "127.0.0.1:$B_PORT"
protocol = "http"
EOF
  # Fresh haproxy and nginx for the memory phase: one mTLS frontend each, as above, nothing served before.
  sed -e "s|^  pidfile .*|  pidfile $P/run/haproxy-idle.pid|" -e "/stats socket/d" $C/haproxy.cfg \
    | awk -v port=$HA_IDLE_PORT '/^frontend mtls_http_full/{skip=1} /^backend app$/{skip=0} !skip' \
    | sed "s|127.0.0.1:$HA_PORT |127.0.0.1:$HA_IDLE_PORT |" > $C/haproxy-idle.cfg
  sed -e "s|nginx-mtls|nginx-idle|g" -e "s|/nm-|/ni-|g" -e "s|127.0.0.1:$NG_PORT |127.0.0.1:$NG_IDLE_PORT |" \
      -e "s|shared:S:10m|shared:SI:10m|" $C/nginx-mtls.conf | grep -v "listen 127.0.0.1:$NG_FULL_PORT" \
    | awk '/ssl_session_cache off/{skip=2} skip>0{skip--; next} 1' > $C/nginx-idle.conf
  haproxy -c -q -f $C/haproxy.cfg || { log "haproxy config invalid"; exit 1; }
  haproxy -c -q -f $C/haproxy-idle.cfg || { log "haproxy-idle config invalid"; exit 1; }
}

# ---------------------------------------------------------------- process management
declare -A PID=()
start() { # name cmd... (pinned to the server core)
  local n=$1; shift
  taskset -c "$SRV_CPU" "$@" >"$ROOT/logs/$n.out" 2>&1 &
  PID[$n]=$!
}
stop() { # name
  local p=${PID[$1]:-} i
  [ -n "$p" ] || return 0
  kill -TERM "$p" 2>/dev/null
  for i in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$p" 2>/dev/null && { log "SIGKILL $1 ($p)"; kill -KILL "$p" 2>/dev/null; }
  wait "$p" 2>/dev/null
  unset "PID[$1]"
}
cleanup() { local n; for n in "${!PID[@]}"; do stop "$n"; done; }
trap cleanup EXIT
trap 'exit 130' INT TERM
tree_pids() { local p; for p in "$@"; do echo -n "$p $(ps -o pid= --ppid "$p" 2>/dev/null | tr '\n' ' ')"; done; }
cpu_ticks() { local t=0 p v; for p in "$@"; do v=$(awk '{print $14+$15}' /proc/$p/stat 2>/dev/null); t=$((t + ${v:-0})); done; echo $t; }
rss_kb() { local t=0 p v; for p in "$@"; do v=$(awk '/^VmRSS/{print $2}' /proc/$p/status 2>/dev/null); t=$((t + ${v:-0})); done; echo $t; }
hwm_kb() { local t=0 p v; for p in "$@"; do v=$(awk '/^VmHWM/{print $2}' /proc/$p/status 2>/dev/null); t=$((t + ${v:-0})); done; echo $t; }
core_busy() { awk -v c="cpu$1" '$1==c{idle=$5+$6; tot=0; for(i=2;i<=9;i++) tot+=$i; print tot-idle, tot}' /proc/stat; }
wait_port() { local i; for i in $(seq 100); do ss -ltnH "sport = :$1" | grep -q . && return 0; sleep 0.1; done; log "port $1 not listening"; return 1; }

start_all() {
  local p
  for p in $ALL_PORTS $MIDLE_PORT $HA_IDLE_PORT $NG_IDLE_PORT; do
    ss -ltnH "sport = :$p" | grep -q . && { log "port $p already in use — is another run going on?"; exit 1; }
  done
  start backend nginx -c "$ROOT/conf/nginx-backend.conf" -p "$ROOT/run/"
  start nginx   nginx -c "$ROOT/conf/nginx-mtls.conf"    -p "$ROOT/run/"
  start haproxy haproxy -db -f "$ROOT/conf/haproxy.cfg"
  start stunnel stunnel4 "$ROOT/conf/stunnel.conf"
  RUST_LOG=warn start moat_in  "$MOAT" proxy --config "$ROOT/conf/moat-in.toml"
  RUST_LOG=warn start moat_out "$MOAT" proxy --config "$ROOT/conf/moat-out.toml"
  for p in $ALL_PORTS; do wait_port "$p" || exit 1; done
  if ss -ltnH | awk '{print $4}' | grep -E ":($(echo $ALL_PORTS | tr ' ' '|'))$" | grep -vq '^127\.0\.0\.1:'; then
    log "a bench listener is not on 127.0.0.1 — aborting"; exit 1; fi
}

# ---------------------------------------------------------------- sanity
CURL_TLS=(-k --cert "$ROOT/pki/loadgen.crt" --key "$ROOT/pki/loadgen.key")
SANITY="$ROOT/raw/sanity.txt"
sanity() {
  local port good none rogue fail=0
  {
    printf '%-34s %-16s %-12s %-12s\n' "endpoint" "client cert" "no cert" "rogue-CA cert"
    printf '%-34s %-16s\n' "direct :$B_PORT" "$(curl -s -o /dev/null -w '%{http_code}/h%{http_version}' http://127.0.0.1:$B_PORT/)"
    printf '%-34s %-16s\n' "moat pair, via outbound :$MO_PORT" "$(curl -s -o /dev/null -w '%{http_code}/h%{http_version}' http://127.0.0.1:$MO_PORT/)"
    printf '%-34s %-16s\n' "moat pair h2c, via outbound :$MO_PORT" "$(curl -s -o /dev/null -w '%{http_code}/h%{http_version}' --http2-prior-knowledge http://127.0.0.1:$MO_PORT/)"
    printf '%-34s %-16s\n' "moat pair tcp, via outbound :$MO_TCP_PORT" "$(curl -s -o /dev/null -w '%{http_code}/h%{http_version}' http://127.0.0.1:$MO_TCP_PORT/)"
    for port in $MI_PORT $MI_TCP_PORT $HA_PORT $HA_FULL_PORT $HA_TCP_PORT $NG_PORT $NG_FULL_PORT $ST_PORT; do
      good=$(curl -s -o /dev/null -w '%{http_code}/h%{http_version}' "${CURL_TLS[@]}" https://127.0.0.1:$port/)
      none=$(curl -s -o /dev/null -w '%{http_code}' -k https://127.0.0.1:$port/; echo " rc=$?")
      rogue=$(curl -s -o /dev/null -w '%{http_code}' -k --cert "$ROOT/pki/rogue.crt" --key "$ROOT/pki/rogue.key" \
              https://127.0.0.1:$port/; echo " rc=$?")
      printf '%-34s %-16s %-12s %-12s\n' "https :$port" "$good" "$none" "$rogue"
      [[ $good == 200/* ]] || fail=1
    done
    echo "(000 rc=55/56 = refused in the TLS handshake or right after; nginx answers 400 inside TLS instead)"
    echo "x-moat-peer-id the backend saw: via the pair '$(curl -s http://127.0.0.1:$MO_PORT/peer)'," \
         "via the inbound '$(curl -s "${CURL_TLS[@]}" https://127.0.0.1:$MI_PORT/peer)'"
  } | tee "$SANITY" >&2
  grep -q '^moat pair, via outbound.*200' "$SANITY" || fail=1
  ((fail == 0)) || { log "sanity check failed (see above)"; exit 1; }
}

# ---------------------------------------------------------------- measurement
RUNS="$OUT/runs.tsv"
COLS='label\tgroup\ttarget\tconc\trps\tp50_ms\tp99_ms\tp999_ms\tp99_all_ms\tok\tbad\tproxy_cpu_pct\tproxy_cpu_s_per_10k\tin_cpu_s_per_10k\tout_cpu_s_per_10k\tbackend_cpu_pct\tproxy_rss_mb\tproxy_hwm_mb\tsrv_core_pct\tcli_core_pct\toha_cpu_pct\tother_pct\textra'
printf "$COLS\n" > "$RUNS.new"

snapshot() { # "a b" proxy pid groups (in-side, out-side), backend pids, oha pid
  local pin=$1 pout=$2 bp=$3 op=$4 sb st cb ct
  read -r sb st < <(core_busy "$SRV_CPU"); read -r cb ct < <(core_busy "$CLI_CPU")
  # shellcheck disable=SC2086
  echo "$(date +%s.%N) $(cpu_ticks $pin) $(cpu_ticks $pout) $(cpu_ticks $bp) $sb $st $cb $ct $(rss_kb $pin $pout) $(hwm_kb $pin $pout) $(cpu_ticks $(tree_pids $op))"
}
QUIET_SPENT=0
quiet_gate() {
  local waited=0 a b c d busy
  while :; do
    (( QUIET_SPENT >= QUIET_BUDGET )) && return 1
    read -r a b < <(awk '$1=="cpu"{idle=$5+$6; t=0; for(i=2;i<=9;i++) t+=$i; print t-idle, t}' /proc/stat); sleep 1
    read -r c d < <(awk '$1=="cpu"{idle=$5+$6; t=0; for(i=2;i<=9;i++) t+=$i; print t-idle, t}' /proc/stat)
    busy=$(( (c - a) * 100 / (d - b > 0 ? d - b : 1) ))
    (( busy <= QUIET_PCT )) && return 0
    if (( waited >= QUIET_WAIT )); then log "box still ${busy}% busy after ${waited}s — measuring anyway (see other_pct)"; return 1; fi
    (( waited == 0 )) && log "box ${busy}% busy (not us: $(ps -eo pcpu=,comm= --sort=-pcpu | head -3 | awk '{printf "%s %s%%; ", $2, $1}')) — waiting up to ${QUIET_WAIT}s"
    sleep 2; waited=$((waited + 3)); QUIET_SPENT=$((QUIET_SPENT + 3))
  done
}
want() { [ -z "$ONLY" ] || [[ " $ONLY " == *" ${1%@*} "* ]]; }   # a row's rounds (label@N) go with it
run() { # label group target conc pin-names pout-names url [oha args...]; retries noisy runs
  local label=$1 try other
  want "$label" || return 0
  for try in $(seq 0 "$RETRIES"); do
    if (( SECONDS - T_START > MAX_SECONDS )); then log "time cap (${MAX_SECONDS}s) hit, skipping $label"; return; fi
    run_once "$@"
    other=$(tail -1 "$RUNS.new" | awk -F'\t' '{print $22}')
    if [ "$try" -eq "$RETRIES" ] || [ "${other:-999}" -le "$OTHER_MAX" ] 2>/dev/null; then return; fi
    log "$label: other_pct=${other}% (someone else used the CPU) — retry $((try + 1))/$RETRIES"
    sed -i '$d' "$RUNS.new"
  done
}
run_once() {
  local label=$1 group=$2 target=$3 conc=$4 pin_names=$5 pout_names=$6 url=$7; shift 7
  local pin="" pout="" n bpids tls=() snap0 snapper extra_pid="" rc
  for n in ${pin_names//,/ }; do [ "$n" != - ] && pin+=" $(tree_pids "${PID[$n]}")"; done
  for n in ${pout_names//,/ }; do [ "$n" != - ] && pout+=" $(tree_pids "${PID[$n]}")"; done
  bpids=$(tree_pids "${PID[backend]}")
  [[ $url == https* ]] && tls=(--insecure --cert "$ROOT/pki/loadgen.crt" --key "$ROOT/pki/loadgen.key")
  local dur=$DUR; [ "$group" = fr ] && dur=$FR_DUR
  rm -f "$ROOT/run/$label.db" "$ROOT/run/$label.snap1" "$ROOT/raw/$label.extra"
  quiet_gate
  log "run $label ($target, $*)"
  taskset -c "$CLI_CPU" timeout $((dur + 60)) "$OHA" -z "${dur}s" --no-tui --worker-threads 1 --output-format json \
      -o "$ROOT/raw/$label.json" --db-url "$ROOT/run/$label.db" "${tls[@]}" "$@" "$url" 2>"$ROOT/logs/$label.err" &
  local ohapid=$!
  snap0=$(snapshot "${pin:- }" "${pout:- }" "$bpids" "$ohapid")
  # end-of-load snapshot just before the run ends (oha then writes its sqlite log; keep that out)
  ( sleep "$(awk -v d="$dur" 'BEGIN{print d - 0.3}')"; snapshot "${pin:- }" "${pout:- }" "$bpids" "$ohapid" > "$ROOT/run/$label.snap1" ) & snapper=$!
  if [[ $pin_names == haproxy ]] && [[ $group == hs ]]; then   # mid-run: did haproxy resume TLS sessions?
    ( sleep "$(awk -v d="$dur" 'BEGIN{print d / 2}')"; haproxy_info > "$ROOT/raw/$label.extra" ) & extra_pid=$!
  fi
  wait "$ohapid"; rc=$?
  wait "$snapper"; [ -n "$extra_pid" ] && wait "$extra_pid"
  python3 "$HERE/parse_run.py" "$ROOT/raw/$label.json" "$label" "$group" "$target" "$conc" "$rc" "$CLK" \
      "$([ -n "${pin// }${pout// }" ] && echo 1 || echo 0)" "$snap0" "$(cat "$ROOT/run/$label.snap1" 2>/dev/null)" \
      "$ROOT/run/$label.db" "$WARM" "$ROOT/raw/$label.extra" >> "$RUNS.new"
  rm -f "$ROOT/run/$label.snap1"
  sleep 0.5
}
haproxy_info() { python3 - "$ROOT/run/haproxy.sock" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b"show info\n"); buf = b""
while True:
    c = s.recv(65536)
    if not c: break
    buf += c
want = ("SslRate", "SslFrontendKeyRate", "SslFrontendSessionReuse_pct")
print(" ".join(l.replace(": ", "=") for l in buf.decode().splitlines() if l.split(":")[0] in want))
PY
}

sweep() { # concurrency
  local H="https://127.0.0.1" c=$1 H1=(--http-version 1.1)
  log "A) HTTP/1.1 keep-alive, closed loop, -c $c, ${DUR}s each"
  run ka_direct_c$c       ka "direct (plain HTTP)"              $c -                -        "http://127.0.0.1:$B_PORT/"  -c $c
  run ka_moat_in_c$c      ka "moat inbound (mTLS -> h1)"        $c moat_in          -        "$H:$MI_PORT/"      -c $c "${H1[@]}"
  run ka_moat_pair_c$c    ka "moat sidecar pair (out -> in)"    $c moat_in          moat_out "http://127.0.0.1:$MO_PORT/" -c $c
  run ka_haproxy_http_c$c ka "haproxy mTLS, mode http"          $c haproxy          -        "$H:$HA_PORT/"      -c $c "${H1[@]}"
  run ka_nginx_http_c$c   ka "nginx mTLS, proxy_pass"           $c nginx            -        "$H:$NG_PORT/"      -c $c "${H1[@]}"
  run ka_moat_tcp_c$c     ka "moat inbound, tcp mode"           $c moat_in          -        "$H:$MI_TCP_PORT/"  -c $c "${H1[@]}"
  run ka_stunnel_tcp_c$c  ka "stunnel4 mTLS (tcp)"              $c stunnel          -        "$H:$ST_PORT/"      -c $c "${H1[@]}"
}

measure() { # runs that targets depend on come first: if the time cap hits, the sweeps at c=1/256 go
  local H="https://127.0.0.1" H1=(--http-version 1.1)
  sweep 32
  log "B) HTTP/1.1 keep-alive, fixed ${RATE} req/s (latency-corrected), -c 32, ${FR_DUR}s each"
  local FR=(-c 32 -q "$RATE" --latency-correction)
  run fr_direct       fr "direct (plain HTTP)"           32 -       -        "http://127.0.0.1:$B_PORT/" "${FR[@]}"
  run fr_moat_in      fr "moat inbound (mTLS -> h1)"     32 moat_in -        "$H:$MI_PORT/"     "${FR[@]}" "${H1[@]}"
  run fr_moat_pair    fr "moat sidecar pair (out -> in)" 32 moat_in moat_out "http://127.0.0.1:$MO_PORT/" "${FR[@]}"
  run fr_haproxy_http fr "haproxy mTLS, mode http"       32 haproxy -        "$H:$HA_PORT/"     "${FR[@]}" "${H1[@]}"
  run fr_nginx_http   fr "nginx mTLS, proxy_pass"        32 nginx   -        "$H:$NG_PORT/"     "${FR[@]}" "${H1[@]}"
  run fr_moat_tcp     fr "moat inbound, tcp mode"        32 moat_in -        "$H:$MI_TCP_PORT/" "${FR[@]}" "${H1[@]}"
  run fr_stunnel_tcp  fr "stunnel4 mTLS (tcp)"           32 stunnel -        "$H:$ST_PORT/"     "${FR[@]}" "${H1[@]}"

  log "C) HTTP/2, ${H2_CONNS} conns x ${H2_STREAMS} streams (proxies forward HTTP/1.1 to the backend)"
  local H2=(--http2 -c "$H2_CONNS" -p "$H2_STREAMS")
  run h2_direct    h2 "direct (h2c to nginx)"              $((H2_CONNS * H2_STREAMS)) -       -        "http://127.0.0.1:$B_H2C_PORT/" "${H2[@]}"
  run h2_moat_in   h2 "moat inbound, h2 -> h1"             $((H2_CONNS * H2_STREAMS)) moat_in -        "$H:$MI_PORT/" "${H2[@]}"
  run h2_moat_pair h2 "moat pair, h2c -> out -h2-> in -> h1" $((H2_CONNS * H2_STREAMS)) moat_in moat_out "http://127.0.0.1:$MO_PORT/" "${H2[@]}"
  run h2_haproxy   h2 "haproxy mTLS, h2 -> h1"             $((H2_CONNS * H2_STREAMS)) haproxy -        "$H:$HA_PORT/" "${H2[@]}"
  run h2_nginx     h2 "nginx mTLS, h2 -> h1"               $((H2_CONNS * H2_STREAMS)) nginx   -        "$H:$NG_PORT/" "${H2[@]}"

  log "D) a new TLS connection per request (--disable-keepalive), -c 32"
  local HS=(-c 32 --disable-keepalive "${H1[@]}")
  run hs_moat_in        hs "moat inbound (no resumption by design)"      32 moat_in -       "$H:$MI_PORT/"      "${HS[@]}"
  run hs_haproxy_full   hs "haproxy, full handshakes (no tickets/cache)" 32 haproxy -       "$H:$HA_FULL_PORT/" "${HS[@]}"
  run hs_haproxy_resume hs "haproxy, tickets on (oha resumes)"           32 haproxy -       "$H:$HA_PORT/"      "${HS[@]}"
  run hs_nginx_full     hs "nginx, full handshakes"                      32 nginx   -       "$H:$NG_FULL_PORT/" "${HS[@]}"
  run hs_nginx_resume   hs "nginx, tickets + cache (oha resumes)"        32 nginx   -       "$H:$NG_PORT/"      "${HS[@]}"
  run hs_moat_tcp       hs "moat inbound tcp mode (no resumption)"       32 moat_in -       "$H:$MI_TCP_PORT/"  "${HS[@]}"
  run hs_stunnel        hs "stunnel4 (resumption on)"                    32 stunnel -       "$H:$ST_PORT/"      "${HS[@]}"
  sweep 1
  sweep 256
  log "E) tcp mode through the pair, haproxy mode tcp, -c 32"
  run ka_moat_pair_tcp_c32  ka "moat sidecar pair, tcp mode"      32 moat_in          moat_out "http://127.0.0.1:$MO_TCP_PORT/" -c 32
  run ka_haproxy_tcp_c32    ka "haproxy mTLS, mode tcp"           32 haproxy          -        "$H:$HA_TCP_PORT/"  -c 32 "${H1[@]}"
  local r
  for r in $(seq 2 "$ROUNDS"); do
    log "F) the rows the closed-loop and fixed-rate targets compare, round $r of $ROUNDS (verdicts: the median of the rounds)"
    run "ka_moat_in_c32@$r"      ka "moat inbound (mTLS -> h1), round $r"     32 moat_in -        "$H:$MI_PORT/" -c 32 "${H1[@]}"
    run "ka_haproxy_http_c32@$r" ka "haproxy mTLS, mode http, round $r"       32 haproxy -        "$H:$HA_PORT/" -c 32 "${H1[@]}"
    run "h2_moat_in@$r"          h2 "moat inbound, h2 -> h1, round $r"        $((H2_CONNS * H2_STREAMS)) moat_in - "$H:$MI_PORT/" "${H2[@]}"
    run "h2_haproxy@$r"          h2 "haproxy mTLS, h2 -> h1, round $r"        $((H2_CONNS * H2_STREAMS)) haproxy - "$H:$HA_PORT/" "${H2[@]}"
    run "fr_direct@$r"           fr "direct (plain HTTP), round $r"           32 -       -        "http://127.0.0.1:$B_PORT/" "${FR[@]}"
    run "fr_moat_in@$r"          fr "moat inbound (mTLS -> h1), round $r"     32 moat_in -        "$H:$MI_PORT/" "${FR[@]}" "${H1[@]}"
    run "fr_moat_pair@$r"        fr "moat sidecar pair (out -> in), round $r" 32 moat_in moat_out "http://127.0.0.1:$MO_PORT/" "${FR[@]}"
  done
  mv "$RUNS.new" "$RUNS"
}

# ---------------------------------------------------------------- memory: idle, 1,000 idle mTLS connections
MEM="$OUT/memory.tsv"
memory() { # every proxy fresh (nothing served before but one request), then IDLE_CONNS idle mTLS connections
  printf 'target\tidle_rss_mb\tconns_wanted\tconns_open\trss_with_conns_mb\thwm_mb\tper_conn_kb\n' > "$MEM"
  local line name port pname
  RUST_LOG=warn start moat_idle "$MOAT" proxy --config "$ROOT/conf/moat-idle.toml"
  start haproxy_idle haproxy -db -f "$ROOT/conf/haproxy-idle.cfg"
  start nginx_idle nginx -c "$ROOT/conf/nginx-idle.conf" -p "$ROOT/run/"
  for port in $MIDLE_PORT $HA_IDLE_PORT $NG_IDLE_PORT; do wait_port $port || return; done
  sleep 1
  MOAT_FRESH_KB=$(rss_kb "${PID[moat_idle]}")   # before any request
  echo "moat fresh_rss_kb=$MOAT_FRESH_KB (before any request)" > "$ROOT/raw/moat_idle_fresh.txt"
  for line in "moat inbound|$MIDLE_PORT|moat_idle" "haproxy mode http|$HA_IDLE_PORT|haproxy_idle" "nginx|$NG_IDLE_PORT|nginx_idle"; do
    IFS='|' read -r name port pname <<<"$line"
    idle_conns "$name" "$port" "$pname"
    stop "$pname"
  done
}
idle_conns() { # name port pid-name
  local name=$1 port=$2 pids r0 hold=6
  pids=$(tree_pids "${PID[$3]}")
  # One request first (warms the pool to the backend): "idle" is a proxy that has served once.
  curl -s -o /dev/null "${CURL_TLS[@]}" https://127.0.0.1:$port/; sleep 0.5
  # shellcheck disable=SC2086
  r0=$(rss_kb $pids)
  log "opening $IDLE_CONNS idle mTLS connections to $name (:$port)"
  taskset -c "$CLI_CPU" timeout 120 python3 "$HERE/idle_conns.py" --port "$port" --conns "$IDLE_CONNS" \
      --cert "$ROOT/pki/loadgen.crt" --key "$ROOT/pki/loadgen.key" --hold "$hold" \
      --ready-file "$ROOT/run/idle.ready" >"$ROOT/raw/idle_$port.txt" 2>&1 &
  local cpid=$! i
  PID[idle_client]=$cpid
  for i in $(seq 600); do [ -s "$ROOT/run/idle.ready" ] && break; kill -0 $cpid 2>/dev/null || break; sleep 0.1; done
  sleep 1
  local open rss hwm
  open=$(ss -tnH state established "( sport = :$port )" | wc -l)
  # shellcheck disable=SC2086
  rss=$(rss_kb $pids); hwm=$(hwm_kb $pids)
  wait $cpid; unset "PID[idle_client]"; rm -f "$ROOT/run/idle.ready"
  awk -v n="$name" -v r0="$r0" -v want="$IDLE_CONNS" -v open="$open" -v rss="$rss" -v hwm="$hwm" 'BEGIN{
    printf "%s\t%.1f\t%d\t%d\t%.1f\t%.1f\t%.1f\n", n, r0/1024, want, open, rss/1024, hwm/1024, open ? (rss-r0)/open : 0 }' >> "$MEM"
  log "$name: $open conns open, RSS $((r0 / 1024)) -> $((rss / 1024)) MiB ($(tail -1 "$ROOT/raw/idle_$port.txt"))"
}

# ---------------------------------------------------------------- main
idle_check() {
  local a b c d e f g h
  read -r a b < <(core_busy "$SRV_CPU"); read -r c d < <(core_busy "$CLI_CPU"); sleep 2
  read -r e f < <(core_busy "$SRV_CPU"); read -r g h < <(core_busy "$CLI_CPU")
  BG_SRV=$(( (e - a) * 100 / (f - b > 0 ? f - b : 1) )); BG_CLI=$(( (g - c) * 100 / (h - d > 0 ? h - d : 1) ))
  log "background load before start: cpu$SRV_CPU ${BG_SRV}%, cpu$CLI_CPU ${BG_CLI}%"
}

install_deps
make_pki
write_configs
start_all
VERSIONS="moat $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)$(git -C "$REPO" diff --quiet HEAD -- proxy src ca 2>/dev/null || echo " (+uncommitted changes in proxy/src/ca)"), $(haproxy -v | head -1 | awk '{print "haproxy",$3}'), $(nginx -v 2>&1 | awk '{print $3}'), $(stunnel4 -version 2>&1 | awk '/^stunnel/{print "stunnel",$2; exit}'), $(openssl version | awk '{print "openssl",$2}'), $($OHA --version | head -1)"
log "versions: $VERSIONS"
sanity
[ "${SANITY_ONLY:-0}" = 1 ] && { log "SANITY_ONLY=1: stopping here"; exit 0; }
idle_check
T_START=$SECONDS
measure
if want ws_direct || want ws_moat_pair; then
  log "G) WebSocket echo, direct and through a sidecar pair, ${DUR}s each (benches/load/ws_echo.sh)"
  MOAT=$MOAT DUR=$DUR OUT=$OUT SRV_CPU=$SRV_CPU CLI_CPU=$CLI_CPU bash "$HERE/ws_echo.sh" \
    || log "the WebSocket rows failed (see above)"
fi
memory
cleanup
python3 "$HERE/report.py" --runs "$RUNS" --memory "$MEM" --sanity "$SANITY" --websocket "$OUT/websocket.tsv" --out "$OUT" \
  --meta "dur=$DUR" "fr_dur=$FR_DUR" "rate=$RATE" "rounds=$ROUNDS" "h2=${H2_CONNS}x${H2_STREAMS}" "srv_cpu=$SRV_CPU" "cli_cpu=$CLI_CPU" \
         "versions=$VERSIONS" "background_before=cpu$SRV_CPU ${BG_SRV}% cpu$CLI_CPU ${BG_CLI}%" \
         "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)" "kernel=$(uname -r)" "cpu=$(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)" \
         "measure_seconds=$((SECONDS - T_START))" "quiet_wait_seconds=$QUIET_SPENT" \
         "moat_fresh_rss_mib_before_any_request=$(awk -v k="${MOAT_FRESH_KB:-0}" 'BEGIN{printf "%.1f", k/1024}')" \
         "moat_binary=$MOAT_SRC ($([ "$PGO" = 1 ] && echo "profile-guided, scripts/pgo-build.sh" || echo "dist profile, no PGO")) built $MOAT_BUILT (sha256 $(sha256sum "$MOAT" | cut -c1-12), copied at start)"
log "done in $((SECONDS)) s: $OUT/summary.md, $OUT/results.json"
