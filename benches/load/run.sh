#!/usr/bin/env bash
# benches/load/run.sh — moat side by side with direct traffic, HAProxy, NGINX and stunnel, one hop and as a
# sidecar pair (issues 7, 3 and 22). Loopback only, bounded, one command:
#
#   bash benches/load/run.sh                 # everything (~23 min on a quiet 2-core box, after the builds)
#   MOAT_BUILDS="pgo release" ...            # the builds measured side by side (default): pgo = the profile-
#                                            # guided one that ships (scripts/pgo-build.sh -> target/pgo/moat),
#                                            # release = plain `cargo build --release`; also dist, or NAME=PATH
#   BUILD=0 ...                              # use the binaries as they are (default: build each first, niced)
#   PHASES='rounds rows' ...                 # a subset of the phases, in this order:
#       rounds  the rows the #22 targets compare, ROUNDS (5) interleaved rounds per build, after an extra
#               discarded warm-up round 0 on fresh proxies (WARMUP_ROUND=1) that is recorded to explain
#               first-round slowness (requests per second, second by second; the proxies' page faults)
#       rows    everything else once: keep-alive at c1/c32/c256 (moat, HAProxy and NGINX one hop and as pairs,
#               stunnel, moat tcp mode), fixed RATE req/s, HTTP/2, a new TLS connection per request
#       bulk    1 GiB download and upload (BULK_BYTES) direct, through one hop and through a pair: moat (each
#               build), HAProxy, stunnel; MB/s, CPU s per GB, peak RSS growth per sidecar (fresh proxies)
#       memtime RSS of fresh pairs idle, at the peak of a 256-connection run, 1/10/30/60 s after it (AFTER_S)
#       idle    RSS per idle mTLS connection at IDLE_CONNS (1000 10000) connections: moat, HAProxy, NGINX
#       client  the independent check of #22: oha -z 6s -c 32 --worker-threads 1 --http-version 1.1, no
#               --db-url, HAProxy vs moat one hop and pair, CC_ROUNDS alternating rounds
#       ws      WebSocket echo, direct and through a pair of its own (benches/load/ws_echo.sh)
#       transparent  (TRANSPARENT=1 adds it) the transparent-interception pair row: needs root, a binary with
#               `moat redirect`, and benches/load/transparent.sh; skipped with the reason otherwise
#   DUR=2 FR_DUR=3 CC_DUR=2 CC_ROUNDS=1 ROUNDS=1 WARMUP_ROUND=0 BULK_BYTES=$((64<<20)) IDLE_CONNS=200 AFTER_S=5 \
#     OUT=/tmp/smoke bash benches/load/run.sh   # a smoke run of every phase (~5 min), the committed results untouched
#   ONLY='ka_moat_pair_c32 ka_haproxy_pair_c32' bash benches/load/run.sh   # a subset of the oha rows, by label
#                                                                          # (a moat row's label+build also works)
#   Time of the full run on a quiet box: rounds ~11 min (6 rounds x 16 rows with two builds), rows ~4.5, client
#   ~1.5, bulk ~1, memtime + idle ~3.5 (10,000 TLS connections from python take ~30 s per proxy), ws: ~23 min.
#
#   oha (client cert) ─TLS1.3 mTLS─> [moat inbound | haproxy | nginx | stunnel4] ──plain──> nginx backend
#   oha ─plain─> [moat outbound | haproxy | nginx] ─mTLS─> [moat inbound | haproxy | nginx] ─plain─> backend (pairs)
#   oha ─plain─────────────────────────────────────────────────────────────────────────> nginx backend (direct)
#   bulk.py client ─> (the same shapes, stunnel too) ─> bulk.py server (1 GiB, nothing buffered, nothing on disk)
#
# * One PKI for every target: certificates come from `moat ca` (ECDSA P-256, SPIFFE URI SAN only).
#   Because those certificates carry no DNS/IP name, oha runs with --insecure against every TLS target
#   (same client-side cost for all); it still presents its client certificate, which every server verifies.
#   The HAProxy and NGINX pairs' outbound side presents the `client` certificate; HAProxy's verifies the
#   inbound's chain, NGINX's cannot (it checks a name too, and there is none; see write_configs).
# * Pinning: backend + proxies on SRV_CPU ("the pod's core"), oha and the other clients on CLI_CPU.
# * The client is checked, not trusted: every run records oha's own CPU and the client core's; a run where
#   either passes CLIENT_SAT (90 %) is flagged client_sat=yes, and a verdict resting on such a run reads
#   "not shown". OHA_DB=1 (default) keeps oha's per-request SQLite log for steady-state percentiles (oha
#   writes it after the run, outside the measured window); the `client` phase runs without it.
# * The server is checked too: a req/s ratio is a capacity verdict only when every compared row kept the server core
#   busy (SRV_BUSY_MIN, 90 %); a row that left it idle measured latency at that concurrency, and reads "not shown".
# * Shared box: before each run, wait (<= QUIET_WAIT s) for quiet; record other_pct (CPU on the two cores not
#   charged to proxy/backend/oha); retry a run (<= RETRIES) when other_pct > OTHER_MAX. Hard cap MAX_SECONDS.
# * The harness raises its open-file limit (ulimit -n) to the hard limit for 10,000 idle connections.
# * Every process started here is stopped by PID on exit (trap); nothing else is touched.
# * Results in $OUT (default benches/results): summary.md (a table per #22 target with its verdict),
#   results.json, runs.tsv, bulk.tsv, memtime.tsv, memory.tsv, websocket.tsv.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
ROOT=${ROOT:-${TMPDIR:-/tmp}/moat-load}
OUT=${OUT:-$REPO/benches/results}
if [ -n "${MOAT:-}" ]; then MOAT_BUILDS=${MOAT_BUILDS:-moat=$MOAT}; fi   # MOAT=path: that binary alone
[ "${PGO:-}" = 0 ] && MOAT_BUILDS=${MOAT_BUILDS:-dist}   # the earlier switch: PGO=0, the plain `dist` build alone
MOAT_BUILDS=${MOAT_BUILDS:-pgo release}
PHASES=${PHASES:-rounds rows bulk memtime idle client ws}
[ "${TRANSPARENT:-0}" = 1 ] && [[ " $PHASES " != *" transparent "* ]] && PHASES+=" transparent"
DUR=${DUR:-4}                  # seconds per oha run
FR_DUR=${FR_DUR:-8}            # seconds per fixed-rate run: its p99 rests on the slowest 1 % of RATE x (FR_DUR - WARM)
CC_DUR=${CC_DUR:-6}            # seconds per run of the client check (as in the issue's independent run)
CC_ROUNDS=${CC_ROUNDS:-2}
RATE=${RATE:-2000}             # req/s for the fixed-rate (latency) runs
H2_CONNS=${H2_CONNS:-16}; H2_STREAMS=${H2_STREAMS:-16} # HTTP/2 rows: enough streams in flight that HAProxy saturates its core
                               # too (at 4x8 it stayed ~83 % busy, latency-bound, and the ratio compared latency)
SRV_BUSY_MIN=${SRV_BUSY_MIN:-90} # a req/s-ratio verdict needs every compared row's server core at least this % busy
IDLE_CONNS=${IDLE_CONNS:-1000 10000}
BULK_BYTES=${BULK_BYTES:-1073741824}
AFTER_S=${AFTER_S:-60}         # memtime: the last RSS reading, seconds after the 256-connection run ends
MT_CONNS=${MT_CONNS:-256}
SRV_CPU=${SRV_CPU:-0}; CLI_CPU=${CLI_CPU:-1}
OHA_VERSION=${OHA_VERSION:-1.16.0}
OHA_DB=${OHA_DB:-1}
CLIENT_SAT=${CLIENT_SAT:-90}
MAX_SECONDS=${MAX_SECONDS:-1800} # cap for the oha rows (rounds + rows + client)
QUIET_PCT=${QUIET_PCT:-15}     # wait until whole-box CPU use is <= this % ...
QUIET_WAIT=${QUIET_WAIT:-15}   # ... for at most this many seconds per run ...
QUIET_BUDGET=${QUIET_BUDGET:-60} # ... and at most this many seconds over the whole run (then: measure, flag)
OTHER_MAX=${OTHER_MAX:-15}     # retry a run if more than this % of a core went to processes not ours
RETRIES=${RETRIES:-1}
ROUNDS=${ROUNDS:-5}            # the rows the #22 targets compare run this many times, interleaved
                               # (the box's speed drifts between minutes); each verdict takes the median
WARMUP_ROUND=${WARMUP_ROUND:-1} # 1: an extra round 0 first, on fresh proxies, recorded but not in the medians
WARM=${WARM:-1}                # seconds excluded from the steady-state percentiles
ONLY=${ONLY:-}                 # space-separated labels to run (default: all)
BUILD=${BUILD:-1}              # 0: use the binaries as they are
# SANITY_ONLY=1: start everything, check it answers (curl), stop.

B_PORT=18080                   # nginx backend, plain HTTP/1.1
B_H2C_PORT=18081               # nginx backend, h2c (prior knowledge) for the direct HTTP/2 baseline
BK_PORT=18095                  # bulk.py backend
MIDLE_PORT=18447               # moat inbound in its own process, for idle RSS and idle connections
NG_PORT=18543                  # nginx mTLS, resumption on (tickets + shared cache); the nginx pair's inbound
NG_FULL_PORT=18544             # nginx mTLS, resumption off
NGO_PORT=18545                 # nginx pair, outbound side: plain HTTP/1.1 -> mTLS -> NG_PORT
NGO_H2_PORT=18546              # nginx pair, outbound side: h2c (prior knowledge) -> mTLS HTTP/1.1 -> NG_PORT
HA_PORT=19443                  # haproxy mTLS, mode http, tickets on; the haproxy pair's inbound
HA_TCP_PORT=19444              # haproxy mTLS, mode tcp
ST_PORT=19445                  # stunnel4 mTLS, tcp
HA_FULL_PORT=19446             # haproxy mTLS, mode http, no tickets / no cache
HAO_PORT=19447                 # haproxy pair, outbound side (own process): HTTP/1.1 -> mTLS (ALPN http/1.1) -> HA_PORT
HAO_H2_PORT=19448              # haproxy pair, outbound side: h2c -> mTLS (ALPN h2) -> HA_PORT
HA_IDLE_PORT=19450             # fresh haproxy (mode http, mTLS) for the idle-connection phase
NG_IDLE_PORT=18550             # fresh nginx (mTLS) for the idle-connection phase
# bulk and memtime: fresh proxies of their own
HAB_IN=19460; HAB_OUT=19461; STB_IN=19462; STB_OUT=19463; HAM_IN=19470; HAM_OUT=19471
# moat, per build (index i): inbound http/tcp, outbound http/tcp; bulk in/out; memtime in/out
BOFFS=(0 2000 2500 3000)
declare -A MI MIT MO MOT MBI MBO MMI MMO BIN
BNAMES=()
for spec in $MOAT_BUILDS; do
  b=${spec%%=*}; i=${#BNAMES[@]}
  ((i < ${#BOFFS[@]})) || { echo "at most ${#BOFFS[@]} builds in MOAT_BUILDS" >&2; exit 64; }
  [[ $b =~ ^[a-z0-9_-]+$ ]] || { echo "MOAT_BUILDS: '$b' is not a build name (pgo, release, dist or NAME=PATH)" >&2; exit 64; }
  case $spec in
    *=*) BIN[$b]=${spec#*=} ;;
    pgo) BIN[$b]=$REPO/target/pgo/moat ;;
    release) BIN[$b]=$REPO/target/release/moat ;;
    dist) BIN[$b]=$REPO/target/dist/moat ;;
    *) echo "MOAT_BUILDS: unknown build '$spec' (pgo, release, dist or NAME=PATH)" >&2; exit 64 ;;
  esac
  o=${BOFFS[$i]}
  MI[$b]=$((18443 + o)); MIT[$b]=$((18446 + o)); MO[$b]=$((15001 + o)); MOT[$b]=$((15002 + o))
  MBI[$b]=$((18480 + i)); MBO[$b]=$((15020 + i)); MMI[$b]=$((18490 + i)); MMO[$b]=$((15030 + i))
  BNAMES+=("$b")
done
B0=${BNAMES[0]}                # the build the targets are judged on; the others must be within 10 % of each
ALL_PORTS="$B_PORT $B_H2C_PORT $NG_PORT $NG_FULL_PORT $NGO_PORT $NGO_H2_PORT $HA_PORT $HA_TCP_PORT $ST_PORT $HA_FULL_PORT $HAO_PORT $HAO_H2_PORT"
for b in "${BNAMES[@]}"; do ALL_PORTS+=" ${MI[$b]} ${MIT[$b]} ${MO[$b]} ${MOT[$b]}"; done

mkdir -p "$ROOT"/{pki,conf,logs,run,raw} "$OUT"
cd "$ROOT" || exit 1
log() { printf '[moat-load %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
has_phase() { [[ " $PHASES " == *" $1 "* ]]; }
CLK=$(getconf CLK_TCK)
T_START=$SECONDS
# 10,000 idle connections need more than the usual 1,024 descriptors, in the proxies and in the client.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)

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
  if has_phase ws; then
    python3 -c 'import websockets.asyncio.client' 2>/dev/null || python3 -m pip install -q websockets==17.4 \
      >"$ROOT/logs/pip.log" 2>&1 || { log "pip install websockets failed, see $ROOT/logs/pip.log"; exit 1; }
  fi
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
  local spec
  declare -gA BUILT SRC
  for b in "${BNAMES[@]}"; do
    spec=" $MOAT_BUILDS "
    if [ "$BUILD" = 1 ] && [[ $spec != *" $b="* ]]; then
      case $b in
        pgo) log "scripts/pgo-build.sh: instrumented build, training, optimized build (niced; ~10 min the first time)"
             (cd "$REPO" && nice -n 19 bash scripts/pgo-build.sh >"$ROOT/logs/moat-build-$b.log" 2>&1) ;;
        release) log "cargo build --release --bin moat (niced)"
             (cd "$REPO" && nice -n 19 cargo build --release --bin moat >"$ROOT/logs/moat-build-$b.log" 2>&1) ;;
        dist) log "cargo build --profile dist --bin moat (niced)"
             (cd "$REPO" && nice -n 19 cargo build --profile dist --bin moat >"$ROOT/logs/moat-build-$b.log" 2>&1) ;;
      esac || { log "moat $b build failed, see $ROOT/logs/moat-build-$b.log"; exit 1; }
    fi
    [ -x "${BIN[$b]}" ] || { log "no moat binary for build '$b' at ${BIN[$b]} (BUILD=1 builds it)"; exit 1; }
    # Every moat process of this run starts from one snapshot of each binary: a rebuild of target/ during
    # the run (the checkout may be shared) must not change what the later phases measure.
    BUILT[$b]=$(date -u -r "${BIN[$b]}" +%Y-%m-%dT%H:%M:%SZ)
    SRC[$b]=${BIN[$b]}
    cp "${BIN[$b]}" "$ROOT/moat.$b.bin" && BIN[$b]="$ROOT/moat.$b.bin"
  done
  MOAT0=${BIN[$B0]}
  log "oha: $($OHA --version 2>/dev/null | head -1); moat builds: $MOAT_BUILDS ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null))"
}

# ---------------------------------------------------------------- PKI (moat's own CA, for every target)
make_pki() {
  local P=$ROOT/pki id
  rm -rf "$P"; mkdir -p "$P"
  "$MOAT0" ca init --dir "$P/ca" --trust-domain example.org >/dev/null 2>&1 || { log "ca init failed"; exit 1; }
  "$MOAT0" ca init --dir "$P/rogue-ca" --trust-domain example.org >/dev/null 2>&1 || { log "rogue ca init failed"; exit 1; }
  for id in server client loadgen peerproxy; do
    "$MOAT0" ca issue --dir "$P/ca" --id "spiffe://example.org/$id" --ttl 24h \
      --cert-out "$P/$id.crt" --key-out "$P/$id.key" >/dev/null 2>&1 || { log "issue $id failed"; exit 1; }
  done
  "$MOAT0" ca issue --dir "$P/rogue-ca" --id spiffe://example.org/loadgen --ttl 24h \
    --cert-out "$P/rogue.crt" --key-out "$P/rogue.key" >/dev/null 2>&1
  "$MOAT0" ca bundle --dir "$P/ca" > "$P/bundle.pem" 2>/dev/null
  cat "$P/peerproxy.crt" "$P/peerproxy.key" > "$P/peerproxy.pem"
  cat "$P/client.crt" "$P/client.key" > "$P/client.pem"
  openssl verify -CAfile "$P/bundle.pem" "$P/server.crt" "$P/loadgen.crt" "$P/peerproxy.crt" "$P/client.crt" >/dev/null \
    || { log "PKI verify failed"; exit 1; }
}

# ---------------------------------------------------------------- configs
# moat: one worker thread (the comparison is one core each), files identity, logs at warn (quiet under load).
# The inbound forwards HTTP/1.1 to the backend whatever the client spoke (app_protocol = "http1", the
# default, written out), as haproxy and nginx do here: the nginx backend on B_PORT speaks HTTP/1.1 only.
moat_in_conf() { # file http-port tcp-port|- forward-port [limits toml lines]
  local K=$ROOT/pki
  printf '[runtime]\nworker_threads = 1\n[identity]\ncert = "%s"\nkey = "%s"\nbundle = "%s"\n[admin]\nlisten = "127.0.0.1:0"\n' \
    "$K/server.crt" "$K/server.key" "$K/bundle.pem" > "$1"
  [ -n "${5:-}" ] && printf '[limits]\n%b\n' "$5" >> "$1"
  printf '[[inbound]]\nname = "in"\nlisten = "127.0.0.1:%s"\nforward = "127.0.0.1:%s"\nprotocol = "http"\napp_protocol = "http1"\n' \
    "$2" "$4" >> "$1"
  [ "$3" != - ] && printf '[[inbound]]\nname = "in_tcp"\nlisten = "127.0.0.1:%s"\nforward = "127.0.0.1:%s"\nprotocol = "tcp"\n' \
    "$3" "$4" >> "$1"
  return 0
}
moat_out_conf() { # file http-port tcp-port|- upstream-http-port upstream-tcp-port|- [limits toml lines]
  local K=$ROOT/pki
  printf '[runtime]\nworker_threads = 1\n[identity]\ncert = "%s"\nkey = "%s"\nbundle = "%s"\n[admin]\nlisten = "127.0.0.1:0"\n' \
    "$K/client.crt" "$K/client.key" "$K/bundle.pem" > "$1"
  [ -n "${6:-}" ] && printf '[limits]\n%b\n' "$6" >> "$1"
  printf '[[outbound]]\nname = "out"\nlisten = "127.0.0.1:%s"\nupstream = "127.0.0.1:%s"\npeer = "spiffe://example.org/server"\nprotocol = "http"\n' \
    "$2" "$4" >> "$1"
  [ "$3" != - ] && printf '[[outbound]]\nname = "out_tcp"\nlisten = "127.0.0.1:%s"\nupstream = "127.0.0.1:%s"\npeer = "spiffe://example.org/server"\nprotocol = "tcp"\n' \
    "$3" "$5" >> "$1"
  return 0
}
# HAProxy's outbound side of a pair: one frontend per client protocol, so that HTTP/1.1 stays HTTP/1.1
# between the two proxies and h2c becomes h2, as moat's outbound does (it follows the client's version).
haproxy_out_conf() { # file name h1-port h2-port peer-port
  local K=$ROOT/pki
  cat > "$1" <<EOF
global
  nbthread 1
  maxconn 8192
  pidfile $ROOT/run/$2.pid
defaults
  mode http
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  timeout http-keep-alive 60s
  option http-keep-alive
  http-reuse always
frontend out_h1
  bind 127.0.0.1:$3
  default_backend peer_h1
frontend out_h2
  bind 127.0.0.1:$4 proto h2
  default_backend peer_h2
backend peer_h1
  server in 127.0.0.1:$5 ssl crt $K/client.pem ca-file $K/bundle.pem verify required alpn http/1.1
backend peer_h2
  server in 127.0.0.1:$5 ssl crt $K/client.pem ca-file $K/bundle.pem verify required alpn h2
EOF
}
haproxy_in_conf() { # file name port backend-port: one mTLS frontend, mode http, as the main one
  local K=$ROOT/pki
  # HAProxy reserves two descriptors per connection: its maxconn is what the open-file limit allows, up to
  # 10,500 (with a hard limit of 20,000, 9,990: the rest of 10,000 idle connections wait in the backlog).
  local maxconn=$(( (NOFILE - 20) / 2 )); ((maxconn > 10500)) && maxconn=10500
  cat > "$1" <<EOF
global
  nbthread 1
  maxconn $maxconn
  tune.ssl.cachesize 0
  pidfile $ROOT/run/$2.pid
defaults
  mode http
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  timeout http-keep-alive 300s
  option http-keep-alive
  http-reuse always
frontend mtls_http
  bind 127.0.0.1:$3 ssl crt $K/peerproxy.pem ca-file $K/bundle.pem verify required alpn h2,http/1.1
  http-request set-header X-Client-Cert-Subject %{+Q}[ssl_c_s_dn]
  default_backend app
backend app
  server s1 127.0.0.1:$4
EOF
}

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
  stunnel_conf() { # file name accept connect server|client
    { echo "foreground = yes"; echo "pid = $P/run/$2.pid"; echo "output = $P/logs/$2.log"; echo "debug = 3"
      echo "[$2]"; echo "accept = 127.0.0.1:$3"; echo "connect = 127.0.0.1:$4"; echo "CAfile = $K/bundle.pem"
      echo "verifyChain = yes"
      if [ "$5" = client ]; then echo "client = yes"; echo "cert = $K/client.crt"; echo "key = $K/client.key"
      else echo "cert = $K/peerproxy.crt"; echo "key = $K/peerproxy.key"; echo "requireCert = yes"; fi; } > "$1"
  }
  # The NGINX pair's outbound side: plain HTTP/1.1 (and h2c on its own port) -> HTTP/1.1 over mTLS to the
  # nginx mTLS server (NG_PORT), pooled. XXX: it does not verify the inbound's certificate: nginx checks a
  # verified certificate's name too, and moat's certificates carry none (SPIFFE URI SAN only). With pooled
  # keep-alive connections that is a per-connection cost, not a per-request one.
  cat > $C/nginx-out.conf <<EOF
daemon off; master_process on; worker_processes 1; pid $P/run/nginx-out.pid;
error_log $P/logs/nginx-out.err warn;
events { worker_connections 8192; }
http {
  access_log off; keepalive_requests 1000000; keepalive_timeout 60s; http2_max_requests 1000000;
  client_body_temp_path $P/run/no-body; proxy_temp_path $P/run/no-proxy; fastcgi_temp_path $P/run/no-fcgi;
  uwsgi_temp_path $P/run/no-uwsgi; scgi_temp_path $P/run/no-scgi;
  upstream peer { server 127.0.0.1:$NG_PORT; keepalive 64; keepalive_requests 1000000; }
  proxy_ssl_certificate $K/client.crt; proxy_ssl_certificate_key $K/client.key;
  proxy_ssl_protocols TLSv1.3; proxy_ssl_session_reuse on; proxy_ssl_verify off;
  server { listen 127.0.0.1:$NGO_PORT backlog=4096;
    location / { proxy_pass https://peer; proxy_http_version 1.1; proxy_set_header Connection ""; } }
  server { listen 127.0.0.1:$NGO_H2_PORT http2 backlog=4096;
    location / { proxy_pass https://peer; proxy_http_version 1.1; proxy_set_header Connection ""; } }
}
EOF
  stunnel_conf $C/stunnel.conf stunnel $ST_PORT $B_PORT server
  haproxy_out_conf $C/haproxy-out.cfg haproxy-out $HAO_PORT $HAO_H2_PORT $HA_PORT
  local b
  for b in "${BNAMES[@]}"; do
    moat_in_conf  $C/moat-in.$b.toml  ${MI[$b]} ${MIT[$b]} $B_PORT
    moat_out_conf $C/moat-out.$b.toml ${MO[$b]} ${MOT[$b]} ${MI[$b]} ${MIT[$b]}
    # bulk: nothing in moat's path buffers a body; a 1 GiB upload on a slow minute may take longer than the
    # default 60 s for the response to start
    moat_in_conf  $C/bulk-in.$b.toml  ${MBI[$b]} - $BK_PORT 'request_timeout = "300s"'
    moat_out_conf $C/bulk-out.$b.toml ${MBO[$b]} - ${MBI[$b]} - 'request_timeout = "300s"'
    moat_in_conf  $C/mt-in.$b.toml    ${MMI[$b]} - $B_PORT
    moat_out_conf $C/mt-out.$b.toml   ${MMO[$b]} - ${MMI[$b]} -
  done
  # ab.sh's moat-in.toml and moat-out.toml: the first build's inbound and outbound (to that inbound)
  cp $C/moat-in.$B0.toml $C/moat-in.toml
  cp $C/moat-out.$B0.toml $C/moat-out.toml
  # Its own process, so idle RSS is a fresh proxy's. header_read_timeout is raised so that 10,000 idle
  # keep-alive connections stay open while they are opened and counted (the default closes them after 10 s),
  # and max_connections above the default 10,000.
  moat_in_conf $C/moat-idle.toml $MIDLE_PORT - $B_PORT 'header_read_timeout = "300s"\nmax_connections = 20000'
  # Fresh haproxy and nginx for the idle-connection phase: one mTLS frontend each, as above, nothing served before.
  haproxy_in_conf $C/haproxy-idle.cfg haproxy-idle $HA_IDLE_PORT $B_PORT
  sed -e "s|nginx-mtls|nginx-idle|g" -e "s|/nm-|/ni-|g" -e "s|127.0.0.1:$NG_PORT |127.0.0.1:$NG_IDLE_PORT |" \
      -e "s|shared:S:10m|shared:SI:10m|" -e "s|worker_connections 8192|worker_connections 20000|" \
      -e "s|worker_rlimit_nofile 8192|worker_rlimit_nofile $NOFILE|" -e "s|keepalive_timeout 60s|keepalive_timeout 300s|" \
      $C/nginx-mtls.conf | grep -v "listen 127.0.0.1:$NG_FULL_PORT" \
    | awk '/ssl_session_cache off/{skip=2} skip>0{skip--; next} 1' > $C/nginx-idle.conf
  # bulk: HAProxy and stunnel pairs in front of bulk.py
  haproxy_in_conf  $C/hab-in.cfg  hab-in  $HAB_IN $BK_PORT
  haproxy_out_conf $C/hab-out.cfg hab-out $HAB_OUT 19464 $HAB_IN
  stunnel_conf $C/stb-in.conf  stb-in  $STB_IN  $BK_PORT server
  stunnel_conf $C/stb-out.conf stb-out $STB_OUT $STB_IN  client
  # memtime: a HAProxy pair of its own
  haproxy_in_conf  $C/ham-in.cfg  ham-in  $HAM_IN $B_PORT
  haproxy_out_conf $C/ham-out.cfg ham-out $HAM_OUT 19472 $HAM_IN
  local f
  for f in haproxy haproxy-out haproxy-idle hab-in hab-out ham-in ham-out; do
    haproxy -c -q -f $C/$f.cfg || { log "$f.cfg invalid"; exit 1; }
  done
  for f in nginx-backend nginx-mtls nginx-out nginx-idle; do
    nginx -t -q -c $C/$f.conf -p "$ROOT/run/" 2>"$ROOT/logs/nginx-t.log" || { log "$f.conf invalid: $(cat "$ROOT/logs/nginx-t.log")"; exit 1; }
  done
}

# ---------------------------------------------------------------- process management
declare -A PID=()
start() { # name cmd... (pinned to the server core)
  local n=$1; shift
  taskset -c "$SRV_CPU" "$@" >"$ROOT/logs/$n.out" 2>&1 &
  PID[$n]=$!
}
stop() { # name...
  local n p i
  for n in "$@"; do
    p=${PID[$n]:-}
    [ -n "$p" ] || continue
    kill -TERM "$p" 2>/dev/null
    for i in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$p" 2>/dev/null && { log "SIGKILL $n ($p)"; kill -KILL "$p" 2>/dev/null; }
    wait "$p" 2>/dev/null
    unset "PID[$n]"
  done
}
cleanup() { local n; for n in "${!PID[@]}"; do stop "$n"; done; }
trap cleanup EXIT
trap 'exit 130' INT TERM
tree_pids() { local p; for p in "$@"; do echo -n "$p $(ps -o pid= --ppid "$p" 2>/dev/null | tr '\n' ' ')"; done; }
# stat_sum AWK_EXPR PID...: AWK_EXPR over the fields of /proc/PID/stat, summed over the PIDs (gone ones count 0)
stat_sum() { local expr=$1 t=0 p v; shift; for p in "$@"; do v=$(awk "{print $expr}" /proc/$p/stat 2>/dev/null); t=$((t + ${v:-0})); done; echo $t; }
cpu_ticks() { stat_sum '$14+$15' "$@"; }   # utime + stime
sys_ticks() { stat_sum '$15' "$@"; }       # stime
minflt() { stat_sum '$10' "$@"; }          # minor page faults
rss_kb() { local t=0 p v; for p in "$@"; do v=$(awk '/^VmRSS/{print $2}' /proc/$p/status 2>/dev/null); t=$((t + ${v:-0})); done; echo $t; }
hwm_kb() { local t=0 p v; for p in "$@"; do v=$(awk '/^VmHWM/{print $2}' /proc/$p/status 2>/dev/null); t=$((t + ${v:-0})); done; echo $t; }
core_busy() { awk -v c="cpu$1" '$1==c{idle=$5+$6; tot=0; for(i=2;i<=9;i++) tot+=$i; print tot-idle, tot}' /proc/stat; }
wait_port() { local i; for i in $(seq 100); do ss -ltnH "sport = :$1" | grep -q . && return 0; sleep 0.1; done; log "port $1 not listening"; return 1; }
mib() { awk -v k="$1" 'BEGIN{printf "%.1f", k/1024}'; }
start_moat() { # name config
  RUST_LOG=warn start "$1" "${BIN[${1#*.}]}" proxy --config "$ROOT/conf/$2"
}

start_all() {
  local p b
  for p in $ALL_PORTS $MIDLE_PORT $HA_IDLE_PORT $NG_IDLE_PORT $BK_PORT $HAB_IN $HAB_OUT $STB_IN $STB_OUT $HAM_IN $HAM_OUT; do
    ss -ltnH "sport = :$p" | grep -q . && { log "port $p already in use — is another run going on?"; exit 1; }
  done
  start backend   nginx -c "$ROOT/conf/nginx-backend.conf" -p "$ROOT/run/"
  start nginx     nginx -c "$ROOT/conf/nginx-mtls.conf"    -p "$ROOT/run/"
  start nginx_out nginx -c "$ROOT/conf/nginx-out.conf"     -p "$ROOT/run/"
  start haproxy     haproxy -db -f "$ROOT/conf/haproxy.cfg"
  start haproxy_out haproxy -db -f "$ROOT/conf/haproxy-out.cfg"
  start stunnel stunnel4 "$ROOT/conf/stunnel.conf"
  for b in "${BNAMES[@]}"; do
    start_moat "moat_in.$b" "moat-in.$b.toml"
    start_moat "moat_out.$b" "moat-out.$b.toml"
  done
  for p in $ALL_PORTS; do wait_port "$p" || exit 1; done
  if ss -ltnH | awk '{print $4}' | grep -E ":($(echo $ALL_PORTS | tr ' ' '|'))$" | grep -vq '^127\.0\.0\.1:'; then
    log "a bench listener is not on 127.0.0.1 — aborting"; exit 1; fi
}

# ---------------------------------------------------------------- sanity
CURL_TLS=(-k --cert "$ROOT/pki/loadgen.crt" --key "$ROOT/pki/loadgen.key")
SANITY="$ROOT/raw/sanity.txt"
code() { curl -s -o /dev/null -w '%{http_code}/h%{http_version}' "$@"; }
sanity() {
  local port good none rogue fail=0 b line
  {
    printf '%-44s %-16s %-12s %-12s\n' "endpoint" "client cert" "no cert" "rogue-CA cert"
    printf '%-44s %-16s\n' "direct :$B_PORT" "$(code http://127.0.0.1:$B_PORT/)"
    for b in "${BNAMES[@]}"; do
      printf '%-44s %-16s\n' "moat pair [$b], via outbound :${MO[$b]}" "$(code http://127.0.0.1:${MO[$b]}/)"
      printf '%-44s %-16s\n' "moat pair [$b] h2c, via outbound :${MO[$b]}" "$(code --http2-prior-knowledge http://127.0.0.1:${MO[$b]}/)"
      printf '%-44s %-16s\n' "moat pair [$b] tcp, via outbound :${MOT[$b]}" "$(code http://127.0.0.1:${MOT[$b]}/)"
    done
    printf '%-44s %-16s\n' "haproxy pair, via outbound :$HAO_PORT" "$(code http://127.0.0.1:$HAO_PORT/)"
    printf '%-44s %-16s\n' "haproxy pair h2c, via outbound :$HAO_H2_PORT" "$(code --http2-prior-knowledge http://127.0.0.1:$HAO_H2_PORT/)"
    printf '%-44s %-16s\n' "nginx pair, via outbound :$NGO_PORT" "$(code http://127.0.0.1:$NGO_PORT/)"
    printf '%-44s %-16s\n' "nginx pair h2c, via outbound :$NGO_H2_PORT" "$(code --http2-prior-knowledge http://127.0.0.1:$NGO_H2_PORT/)"
    for port in $(for b in "${BNAMES[@]}"; do echo "${MI[$b]} ${MIT[$b]}"; done) $HA_PORT $HA_FULL_PORT $HA_TCP_PORT $NG_PORT $NG_FULL_PORT $ST_PORT; do
      good=$(code "${CURL_TLS[@]}" https://127.0.0.1:$port/)
      none=$(curl -s -o /dev/null -w '%{http_code}' -k https://127.0.0.1:$port/; echo " rc=$?")
      rogue=$(curl -s -o /dev/null -w '%{http_code}' -k --cert "$ROOT/pki/rogue.crt" --key "$ROOT/pki/rogue.key" \
              https://127.0.0.1:$port/; echo " rc=$?")
      printf '%-44s %-16s %-12s %-12s\n' "https :$port" "$good" "$none" "$rogue"
      [[ $good == 200/* ]] || fail=1
    done
    echo "(000 rc=55/56 = refused in the TLS handshake or right after; nginx answers 400 inside TLS instead)"
    echo "x-moat-peer-id the backend saw: via the pair '$(curl -s http://127.0.0.1:${MO[$B0]}/peer)'," \
         "via the inbound '$(curl -s "${CURL_TLS[@]}" https://127.0.0.1:${MI[$B0]}/peer)'"
  } | tee "$SANITY" >&2
  while read -r line; do
    [[ $line == *" via outbound "* ]] && [[ $line != *" 200/"* ]] && fail=1
  done < "$SANITY"
  ((fail == 0)) || { log "sanity check failed (see above)"; exit 1; }
}

# ---------------------------------------------------------------- oha rows
RUNS="$OUT/runs.tsv"
COLS='label\tgroup\ttarget\tconc\trps\tp50_ms\tp99_ms\tp999_ms\tp99_all_ms\tok\tbad\tproxy_cpu_pct\tproxy_cpu_s_per_10k\tin_cpu_s_per_10k\tout_cpu_s_per_10k\tbackend_cpu_pct\tproxy_rss_mb\tproxy_hwm_mb\tsrv_core_pct\tcli_core_pct\toha_cpu_pct\tother_pct\textra\tclient_sat\tproxy_minflt\trps_per_s\tproxy_sys_s_per_10k\tbackend_cpu_s_per_10k'
declare -A DONE=()

snapshot() { # "a b" proxy pid groups (in-side, out-side), backend pids, oha pid
  local pin=$1 pout=$2 bp=$3 op=$4 sb st cb ct
  read -r sb st < <(core_busy "$SRV_CPU"); read -r cb ct < <(core_busy "$CLI_CPU")
  # shellcheck disable=SC2086
  echo "$(date +%s.%N) $(cpu_ticks $pin) $(cpu_ticks $pout) $(cpu_ticks $bp) $sb $st $cb $ct $(rss_kb $pin $pout) $(hwm_kb $pin $pout) $(cpu_ticks $(tree_pids $op)) $(minflt $pin $pout) $(sys_ticks $pin $pout)"
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
# A row's rounds (label@N) and builds (label+build) go with it: ONLY='ka_moat_in_c32' runs every build's.
want() { local l=${1%@*}; [ -z "$ONLY" ] || [[ " $ONLY " == *" $l "* ]] || [[ " $ONLY " == *" ${l%+*} "* ]]; }
run() { # label group target conc pin-names pout-names url [oha args...]; retries noisy runs
  local label=$1 try other
  want "$label" || return 0
  # a row the rounds phase measured is not measured again by the rows phase
  [[ $label != *@* ]] && [ -n "${DONE[$label]:-}" ] && return 0
  for try in $(seq 0 "$RETRIES"); do
    if (( SECONDS - T_START > MAX_SECONDS )); then log "time cap (${MAX_SECONDS}s) hit, skipping $label"; return; fi
    run_once "$@"
    other=$(tail -1 "$RUNS.new" | awk -F'\t' '{print $22}')
    if [ "$try" -eq "$RETRIES" ] || [ "${other:-999}" -le "$OTHER_MAX" ] 2>/dev/null; then break; fi
    log "$label: other_pct=${other}% (someone else used the CPU) — retry $((try + 1))/$RETRIES"
    sed -i '$d' "$RUNS.new"
  done
  DONE[${label%@*}]=1
}
run_once() {
  local label=$1 group=$2 target=$3 conc=$4 pin_names=$5 pout_names=$6 url=$7; shift 7
  local pin="" pout="" n bpids tls=() db=() snap0 snapper extra_pid="" rc
  for n in ${pin_names//,/ }; do [ "$n" != - ] && pin+=" $(tree_pids "${PID[$n]}")"; done
  for n in ${pout_names//,/ }; do [ "$n" != - ] && pout+=" $(tree_pids "${PID[$n]}")"; done
  bpids=$(tree_pids "${PID[backend]}")
  [[ $url == https* ]] && tls=(--insecure --cert "$ROOT/pki/loadgen.crt" --key "$ROOT/pki/loadgen.key")
  local dur=$DUR; [ "$group" = fr ] && dur=$FR_DUR; [ "$group" = cc ] && dur=$CC_DUR
  # the client check runs oha as the issue's independent run did: no per-request SQLite log
  [ "$OHA_DB" = 1 ] && [ "$group" != cc ] && db=(--db-url "$ROOT/run/$label.db")
  rm -f "$ROOT/run/$label.db" "$ROOT/run/$label.snap1" "$ROOT/raw/$label.extra"
  quiet_gate
  log "run $label ($target, $*)"
  taskset -c "$CLI_CPU" timeout $((dur + 60)) "$OHA" -z "${dur}s" --no-tui --worker-threads 1 --output-format json \
      -o "$ROOT/raw/$label.json" "${db[@]}" "${tls[@]}" "$@" "$url" 2>"$ROOT/logs/$label.err" &
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
      "$ROOT/run/$label.db" "$WARM" "$ROOT/raw/$label.extra" "$CLIENT_SAT" >> "$RUNS.new"
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

H="https://127.0.0.1"; L="http://127.0.0.1"; H1=(--http-version 1.1)
FR=(-c 32 -q "$RATE" --latency-correction)
H2=(--http2 -c "$H2_CONNS" -p "$H2_STREAMS")
H2C=$((H2_CONNS * H2_STREAMS))

sweep() { # concurrency: one hop and pairs, HTTP/1.1 keep-alive, closed loop
  local c=$1 b
  log "HTTP/1.1 keep-alive, closed loop, -c $c, ${DUR}s each"
  run ka_direct_c$c       ka "direct (plain HTTP)"              $c -       -        "$L:$B_PORT/"  -c $c
  for b in "${BNAMES[@]}"; do
    run ka_moat_in_c$c+$b   ka "moat inbound (mTLS -> h1) [$b]" $c moat_in.$b -          "$H:${MI[$b]}/" -c $c "${H1[@]}"
    run ka_moat_pair_c$c+$b ka "moat pair (out -> in) [$b]"     $c moat_in.$b moat_out.$b "$L:${MO[$b]}/" -c $c
    [ "$c" = 32 ] || break   # c1 and c256: the first build only
  done
  run ka_haproxy_http_c$c ka "haproxy mTLS, mode http"          $c haproxy -           "$H:$HA_PORT/"  -c $c "${H1[@]}"
  run ka_haproxy_pair_c$c ka "haproxy pair (out -> in)"         $c haproxy haproxy_out "$L:$HAO_PORT/" -c $c
  run ka_nginx_http_c$c   ka "nginx mTLS, proxy_pass"           $c nginx   -           "$H:$NG_PORT/"  -c $c "${H1[@]}"
  run ka_nginx_pair_c$c   ka "nginx pair (out -> in)"           $c nginx   nginx_out   "$L:$NGO_PORT/" -c $c
  run ka_moat_tcp_c$c+$B0 ka "moat inbound, tcp mode [$B0]"     $c moat_in.$B0 -       "$H:${MIT[$B0]}/" -c $c "${H1[@]}"
  run ka_stunnel_tcp_c$c  ka "stunnel4 mTLS (tcp)"              $c stunnel -           "$H:$ST_PORT/"  -c $c "${H1[@]}"
}

# The rows the #22 targets compare, as "label|group|target|conc|pin|pout|url|oha args" (| inside none).
round_rows() {
  local b
  echo "ka_haproxy_pair_c32|ka|haproxy pair (out -> in)|32|haproxy|haproxy_out|$L:$HAO_PORT/|-c 32"
  for b in "${BNAMES[@]}"; do echo "ka_moat_pair_c32+$b|ka|moat pair (out -> in) [$b]|32|moat_in.$b|moat_out.$b|$L:${MO[$b]}/|-c 32"; done
  echo "ka_haproxy_http_c32|ka|haproxy mTLS, mode http|32|haproxy|-|$H:$HA_PORT/|-c 32 --http-version 1.1"
  for b in "${BNAMES[@]}"; do echo "ka_moat_in_c32+$b|ka|moat inbound (mTLS -> h1) [$b]|32|moat_in.$b|-|$H:${MI[$b]}/|-c 32 --http-version 1.1"; done
  echo "h2_haproxy|h2|haproxy mTLS, h2 -> h1|$H2C|haproxy|-|$H:$HA_PORT/|${H2[*]}"
  for b in "${BNAMES[@]}"; do echo "h2_moat_in+$b|h2|moat inbound, h2 -> h1 [$b]|$H2C|moat_in.$b|-|$H:${MI[$b]}/|${H2[*]}"; done
  echo "fr_direct|fr|direct (plain HTTP)|32|-|-|$L:$B_PORT/|${FR[*]}"
  # The HAProxy pair at the same rate: what a pair of mature proxies adds to p50/p99 on this machine,
  # beside the fixed targets (issue 22 asks for the nearest target the machine can show).
  echo "fr_haproxy_pair|fr|haproxy pair (out -> in)|32|haproxy|haproxy_out|$L:$HAO_PORT/|${FR[*]}"
  for b in "${BNAMES[@]}"; do
    echo "fr_moat_pair+$b|fr|moat pair (out -> in) [$b]|32|moat_in.$b|moat_out.$b|$L:${MO[$b]}/|${FR[*]}"
    echo "fr_moat_in+$b|fr|moat inbound (mTLS -> h1) [$b]|32|moat_in.$b|-|$H:${MI[$b]}/|${FR[*]} --http-version 1.1"
  done
}
phase_rounds() {
  local r first=1 rows=() line label group target conc pin pout url args i
  [ "$WARMUP_ROUND" = 1 ] && first=0
  mapfile -t rows < <(round_rows)
  for r in $(seq "$first" "$ROUNDS"); do
    log "rounds: round $r of $ROUNDS$([ "$r" = 0 ] && echo " (warm-up on fresh proxies: recorded, not in the medians)")"
    # round 0 and odd rounds run the list forwards, even rounds backwards: no row always follows the same one
    for i in $(if ((r % 2 || r == 0)); then seq 0 $((${#rows[@]} - 1)); else seq $((${#rows[@]} - 1)) -1 0; fi); do
      IFS='|' read -r label group target conc pin pout url args <<<"${rows[$i]}"
      # shellcheck disable=SC2086
      run "$label@$r" "$group" "$target$([ "$r" = 0 ] && echo ", warm-up round 0" || echo ", round $r")" "$conc" "$pin" "$pout" "$url" $args
    done
  done
}

phase_rows() {
  local b
  sweep 32
  log "HTTP/1.1 keep-alive, fixed ${RATE} req/s (latency-corrected), -c 32, ${FR_DUR}s each"
  run fr_direct           fr "direct (plain HTTP)"           32 -       -           "$L:$B_PORT/"  "${FR[@]}"
  for b in "${BNAMES[@]}"; do
    run fr_moat_in+$b     fr "moat inbound (mTLS -> h1) [$b]" 32 moat_in.$b -         "$H:${MI[$b]}/" "${FR[@]}" "${H1[@]}"
    run fr_moat_pair+$b   fr "moat pair (out -> in) [$b]"    32 moat_in.$b moat_out.$b "$L:${MO[$b]}/" "${FR[@]}"
  done
  run fr_haproxy_http     fr "haproxy mTLS, mode http"       32 haproxy -           "$H:$HA_PORT/"  "${FR[@]}" "${H1[@]}"
  run fr_haproxy_pair     fr "haproxy pair (out -> in)"      32 haproxy haproxy_out "$L:$HAO_PORT/" "${FR[@]}"
  run fr_nginx_http       fr "nginx mTLS, proxy_pass"        32 nginx   -           "$H:$NG_PORT/"  "${FR[@]}" "${H1[@]}"
  run fr_nginx_pair       fr "nginx pair (out -> in)"        32 nginx   nginx_out   "$L:$NGO_PORT/" "${FR[@]}"
  run fr_moat_tcp+$B0     fr "moat inbound, tcp mode [$B0]"  32 moat_in.$B0 -       "$H:${MIT[$B0]}/" "${FR[@]}" "${H1[@]}"
  run fr_stunnel_tcp      fr "stunnel4 mTLS (tcp)"           32 stunnel -           "$H:$ST_PORT/"  "${FR[@]}" "${H1[@]}"

  log "HTTP/2, ${H2_CONNS} conns x ${H2_STREAMS} streams (proxies forward HTTP/1.1 to the backend)"
  run h2_direct        h2 "direct (h2c to nginx)"                   $H2C -       -           "$L:$B_H2C_PORT/" "${H2[@]}"
  for b in "${BNAMES[@]}"; do
    run h2_moat_in+$b   h2 "moat inbound, h2 -> h1 [$b]"            $H2C moat_in.$b -          "$H:${MI[$b]}/" "${H2[@]}"
    run h2_moat_pair+$b h2 "moat pair, h2c -> out -h2-> in -> h1 [$b]" $H2C moat_in.$b moat_out.$b "$L:${MO[$b]}/" "${H2[@]}"
  done
  run h2_haproxy       h2 "haproxy mTLS, h2 -> h1"                  $H2C haproxy -           "$H:$HA_PORT/"     "${H2[@]}"
  run h2_haproxy_pair  h2 "haproxy pair, h2c -> out -h2-> in -> h1" $H2C haproxy haproxy_out "$L:$HAO_H2_PORT/" "${H2[@]}"
  run h2_nginx         h2 "nginx mTLS, h2 -> h1"                    $H2C nginx   -           "$H:$NG_PORT/"     "${H2[@]}"
  run h2_nginx_pair    h2 "nginx pair, h2c -> out -h1-> in -> h1"   $H2C nginx   nginx_out   "$L:$NGO_H2_PORT/" "${H2[@]}"

  log "a new TLS connection per request (--disable-keepalive), -c 32"
  local HS=(-c 32 --disable-keepalive "${H1[@]}")
  run hs_moat_in+$B0    hs "moat inbound (no resumption by design) [$B0]" 32 moat_in.$B0 - "$H:${MI[$B0]}/"  "${HS[@]}"
  run hs_haproxy_full   hs "haproxy, full handshakes (no tickets/cache)" 32 haproxy -       "$H:$HA_FULL_PORT/" "${HS[@]}"
  run hs_haproxy_resume hs "haproxy, tickets on (oha resumes)"           32 haproxy -       "$H:$HA_PORT/"      "${HS[@]}"
  run hs_nginx_full     hs "nginx, full handshakes"                      32 nginx   -       "$H:$NG_FULL_PORT/" "${HS[@]}"
  run hs_nginx_resume   hs "nginx, tickets + cache (oha resumes)"        32 nginx   -       "$H:$NG_PORT/"      "${HS[@]}"
  run hs_moat_tcp+$B0   hs "moat inbound tcp mode (no resumption) [$B0]" 32 moat_in.$B0 - "$H:${MIT[$B0]}/" "${HS[@]}"
  run hs_stunnel        hs "stunnel4 (resumption on)"                    32 stunnel -       "$H:$ST_PORT/"      "${HS[@]}"
  sweep 1
  sweep 256
  log "tcp mode through the pair, haproxy mode tcp, -c 32"
  run ka_moat_pair_tcp_c32+$B0 ka "moat pair, tcp mode [$B0]" 32 moat_in.$B0 moat_out.$B0 "$L:${MOT[$B0]}/" -c 32
  run ka_haproxy_tcp_c32       ka "haproxy mTLS, mode tcp"    32 haproxy -                "$H:$HA_TCP_PORT/" -c 32 "${H1[@]}"
}

# The independent run of #22: oha exactly as it was run by hand (no SQLite log), HAProxy and moat alternating.
phase_client() {
  local r b CC=(-c 32 --http-version 1.1)
  for r in $(seq 1 "$CC_ROUNDS"); do
    log "client check, round $r of $CC_ROUNDS: oha -z ${CC_DUR}s -c 32 --worker-threads 1 --http-version 1.1, no --db-url"
    run cc_haproxy_http@$r cc "haproxy mTLS, mode http (client check)" 32 haproxy - "$H:$HA_PORT/" "${CC[@]}"
    for b in "${BNAMES[@]}"; do
      run cc_moat_in+$b@$r cc "moat inbound [$b] (client check)" 32 moat_in.$b - "$H:${MI[$b]}/" "${CC[@]}"
    done
    run cc_haproxy_pair@$r cc "haproxy pair (client check)" 32 haproxy haproxy_out "$L:$HAO_PORT/" "${CC[@]}"
    for b in "${BNAMES[@]}"; do
      run cc_moat_pair+$b@$r cc "moat pair [$b] (client check)" 32 moat_in.$b moat_out.$b "$L:${MO[$b]}/" "${CC[@]}"
    done
  done
}

# ---------------------------------------------------------------- bulk: 1 GiB down and up, nothing buffered
BULK="$OUT/bulk.tsv"
phase_bulk() {
  printf 'label\ttarget\tbuild\top\tbytes\tseconds\tmb_s\tcpu_s_per_gb\tin_cpu_s_per_gb\tout_cpu_s_per_gb\tin_rss_before_mb\tin_peak_growth_mb\tout_rss_before_mb\tout_peak_growth_mb\tclient_cpu_pct\tok\n' > "$BULK"
  start bulk_backend python3 "$HERE/bulk.py" server "$BK_PORT"
  wait_port "$BK_PORT" || return
  local b
  bulk_target bulk_direct "direct (plain)" - - - - "$BK_PORT" plain
  for b in "${BNAMES[@]}"; do
    bulk_target "bulk_moat_in+$b"   "moat inbound [$b]"   "$b" "moat_in.$b|bulk-in.$b.toml" - "${MBI[$b]}" "${MBI[$b]}" tls
    bulk_target "bulk_moat_pair+$b" "moat pair [$b]"      "$b" "moat_in.$b|bulk-in.$b.toml" "moat_out.$b|bulk-out.$b.toml" "${MBI[$b]} ${MBO[$b]}" "${MBO[$b]}" plain
  done
  bulk_target bulk_haproxy_in   "haproxy mTLS, mode http" - "hab_in|hab-in.cfg" - "$HAB_IN" "$HAB_IN" tls
  bulk_target bulk_haproxy_pair "haproxy pair"             - "hab_in|hab-in.cfg" "hab_out|hab-out.cfg" "$HAB_IN $HAB_OUT" "$HAB_OUT" plain
  bulk_target bulk_stunnel_in   "stunnel4 (tcp)"           - "stb_in|stb-in.conf" - "$STB_IN" "$STB_IN" tls
  bulk_target bulk_stunnel_pair "stunnel4 pair (tcp)"      - "stb_in|stb-in.conf" "stb_out|stb-out.conf" "$STB_IN $STB_OUT" "$STB_OUT" plain
  stop bulk_backend
}
bulk_start() { # "name|config" -> a fresh proxy of the kind its config says
  local n=${1%%|*} f=${1#*|}
  case $f in
    *.toml) start_moat "$n" "$f" ;;
    *.cfg) start "$n" haproxy -db -f "$ROOT/conf/$f" ;;
    *.conf) start "$n" stunnel4 "$ROOT/conf/$f" ;;
  esac
}
bulk_target() { # label target build in-spec|- out-spec|- "ports to wait for"|- client-port plain|tls
  local label=$1 target=$2 build=$3 ins=$4 outs=$5 ports=$6 cport=$7 mode=$8 p op
  local inn=- outn=- tls=()
  [ "$ins" != - ] && { bulk_start "$ins"; inn=${ins%%|*}; }
  [ "$outs" != - ] && { bulk_start "$outs"; outn=${outs%%|*}; }
  for p in $ports; do [ "$p" != - ] && { wait_port "$p" || { stop $inn $outn; return; }; }; done
  [ "$mode" = tls ] && tls=(--tls "$ROOT/pki/loadgen.crt" "$ROOT/pki/loadgen.key")
  # one small request first: "before" is a proxy that has served once (its pools and TLS state exist)
  taskset -c "$CLI_CPU" python3 "$HERE/bulk.py" client 127.0.0.1 "$cport" get 65536 "${tls[@]}" >/dev/null 2>&1
  sleep 0.3
  local pin="" pout="" r_in=0 r_out=0
  [ "$inn" != - ] && pin=$(tree_pids "${PID[$inn]}") && r_in=$(rss_kb $pin)
  [ "$outn" != - ] && pout=$(tree_pids "${PID[$outn]}") && r_out=$(rss_kb $pout)
  for op in get put; do
    quiet_gate
    log "bulk $label: $op $((BULK_BYTES >> 20)) MiB"
    local i0 o0 i1 o1 json
    i0=$(cpu_ticks $pin); o0=$(cpu_ticks $pout)
    json=$(taskset -c "$CLI_CPU" timeout 600 python3 "$HERE/bulk.py" client 127.0.0.1 "$cport" "$op" "$BULK_BYTES" "${tls[@]}" 2>"$ROOT/logs/$label.$op.err") \
      || log "bulk $label $op failed: $(tail -1 "$ROOT/logs/$label.$op.err")"
    [ -n "$json" ] || json='{}'
    i1=$(cpu_ticks $pin); o1=$(cpu_ticks $pout)
    python3 - "$label" "$target" "$build" "$op" "$json" "$CLK" $((i1 - i0)) $((o1 - o0)) "$r_in" "$(hwm_kb $pin)" \
        "$r_out" "$(hwm_kb $pout)" "$inn" "$outn" >> "$BULK" <<'PY'
import json, sys
label, target, build, op, raw, clk, din, dout, r_in, h_in, r_out, h_out, inn, outn = sys.argv[1:15]
r = json.loads(raw or "{}")
gb = r.get("bytes", 0) / 1e9
cs = lambda t: int(t) / float(clk)  # noqa: E731
per = lambda t: "%.3f" % (cs(t) / gb) if gb else "NA"  # noqa: E731
has_in, has_out = inn != "-", outn != "-"
print("\t".join([label, target, build, op, str(r.get("bytes", 0)), str(r.get("seconds", "NA")), str(r.get("mb_s", "NA")),
                 per(int(din) + int(dout)) if has_in else "-", per(din) if has_in else "-", per(dout) if has_out else "-",
                 "%.1f" % (int(r_in) / 1024) if has_in else "-", "%.1f" % ((int(h_in) - int(r_in)) / 1024) if has_in else "-",
                 "%.1f" % (int(r_out) / 1024) if has_out else "-", "%.1f" % ((int(h_out) - int(r_out)) / 1024) if has_out else "-",
                 "%.0f" % (100 * r["client_cpu_s"] / r["seconds"]) if r.get("seconds") else "NA",
                 "yes" if r.get("ok") else "no"]))
PY
    log "bulk $label $op: $(tail -1 "$BULK" | cut -f6-8,12,14 | tr '\t' ' ')"
  done
  stop $inn $outn
}

# ---------------------------------------------------------------- memory over time: idle, 256-conn peak, after
MEMTIME="$OUT/memtime.tsv"
MT_PAIRS=()
memtime_start() { # fresh pairs: load each in turn; the readings after the load run in the background
  # readings at 1, 10 and 30 s (those below AFTER_S) and at AFTER_S
  MT_TIMES=$(printf '%s\n' 1 10 30 "$AFTER_S" | awk -v a="$AFTER_S" '$1 <= a' | sort -nu | tr '\n' ' ')
  printf 'target\tside\tidle_mb\tpeak_mb\thwm_mb\t%s\tafter_over_idle\n' \
    "$(for s in $MT_TIMES; do printf 'after_%ss_mb\t' "$s"; done | sed 's/\t$//')" > "$MEMTIME"
  local b spec
  MT_PAIRS=()
  for b in "${BNAMES[@]}"; do
    start_moat "mt_in.$b" "mt-in.$b.toml"; start_moat "mt_out.$b" "mt-out.$b.toml"
    MT_PAIRS+=("moat pair [$b]|mt_in.$b|mt_out.$b|${MMI[$b]}|${MMO[$b]}")
  done
  start mt_hain haproxy -db -f "$ROOT/conf/ham-in.cfg"; start mt_haout haproxy -db -f "$ROOT/conf/ham-out.cfg"
  MT_PAIRS+=("haproxy pair|mt_hain|mt_haout|$HAM_IN|$HAM_OUT")
  for spec in "${MT_PAIRS[@]}"; do memtime_one "$spec"; done
}
memtime_one() {
  local target inn outn pi po pin pout i0 o0 s t
  IFS='|' read -r target inn outn pi po <<<"$1"
  wait_port "$pi" && wait_port "$po" || return
  curl -s -o /dev/null "http://127.0.0.1:$po/"; sleep 1
  pin=$(tree_pids "${PID[$inn]}"); pout=$(tree_pids "${PID[$outn]}")
  i0=$(rss_kb $pin); o0=$(rss_kb $pout)
  local f="$ROOT/run/mt.$inn"
  log "memtime $target: idle in $(mib "$i0") / out $(mib "$o0") MiB; $MT_CONNS connections for ${DUR}s"
  # RSS every 0.2 s while the load runs: the peak
  ( while :; do echo "$(rss_kb $pin) $(rss_kb $pout)"; sleep 0.2; done ) > "$f.samples" & s=$!
  taskset -c "$CLI_CPU" timeout $((DUR + 60)) "$OHA" -z "${DUR}s" --no-tui --worker-threads 1 --output-format json \
    -o "$ROOT/raw/mt.$inn.json" -c "$MT_CONNS" "http://127.0.0.1:$po/" 2>"$ROOT/logs/mt.$inn.err"
  kill "$s" 2>/dev/null; wait "$s" 2>/dev/null
  echo "$target|$i0|$o0|$(awk 'a<$1{a=$1} b<$2{b=$2} END{print a+0, b+0}' "$f.samples")|$(hwm_kb $pin) $(hwm_kb $pout)" > "$f.head"
  # then after 1, 10, 30 and AFTER_S seconds, while the next phases run (RSS does not depend on their CPU)
  ( t=0; for s in $MT_TIMES; do
      sleep $((s - t)); t=$s; echo "$s $(rss_kb $pin) $(rss_kb $pout)"
    done > "$f.after" ) &
  PID["mt_after.$inn"]=$!
}
memtime_finish() {
  local spec target inn outn n
  for n in "${!PID[@]}"; do [[ $n == mt_after.* ]] && { wait "${PID[$n]}"; unset "PID[$n]"; }; done
  for spec in "${MT_PAIRS[@]}"; do
    IFS='|' read -r target inn outn _ _ <<<"$spec"
    [ -s "$ROOT/run/mt.$inn.head" ] || continue
    python3 - "$ROOT/run/mt.$inn.head" "$ROOT/run/mt.$inn.after" "$(echo $MT_TIMES | wc -w)" >> "$MEMTIME" <<'PY'
import sys
target, i0, o0, peaks, hwms = open(sys.argv[1]).read().strip().split("|")
after = [l.split() for l in open(sys.argv[2]) if l.strip()]
mb = lambda k: "%.1f" % (int(k) / 1024)  # noqa: E731
for side, idle, peak, hwm, col in (("in", i0, peaks.split()[0], hwms.split()[0], 1),
                                   ("out", o0, peaks.split()[1], hwms.split()[1], 2)):
    a = [mb(x[col]) for x in after] + ["NA"] * (int(sys.argv[3]) - len(after))
    last = int(after[-1][col]) if after else None
    print("\t".join([target, side, mb(idle), mb(peak), mb(hwm)] + a
                    + ["%.2f" % (last / int(idle)) if last and int(idle) else "NA"]))
PY
  done
  for spec in "${MT_PAIRS[@]}"; do IFS='|' read -r _ inn outn _ _ <<<"$spec"; stop "$inn" "$outn"; done
}

# ---------------------------------------------------------------- memory: idle, and per idle mTLS connection
MEM="$OUT/memory.tsv"
phase_idle() { # every proxy fresh (nothing served before but one request), then N idle mTLS connections
  printf 'target\tidle_rss_mb\tconns_wanted\tconns_open\trss_with_conns_mb\thwm_mb\tper_conn_kb\n' > "$MEM"
  local b n
  for n in $IDLE_CONNS; do
    for b in "${BNAMES[@]}"; do
      start_moat "moat_idle.$b" moat-idle.toml
      if wait_port $MIDLE_PORT; then
        sleep 1
        [ -z "${MOAT_FRESH_KB:-}" ] && MOAT_FRESH_KB=$(rss_kb "${PID[moat_idle.$B0]}") \
          && echo "moat fresh_rss_kb=$MOAT_FRESH_KB (before any request)" > "$ROOT/raw/moat_idle_fresh.txt"
        idle_conns "moat inbound [$b]" $MIDLE_PORT "moat_idle.$b" "$n"
      fi
      stop "moat_idle.$b"
    done
    start haproxy_idle haproxy -db -f "$ROOT/conf/haproxy-idle.cfg"
    wait_port $HA_IDLE_PORT && sleep 1 && idle_conns "haproxy mode http" $HA_IDLE_PORT haproxy_idle "$n"
    stop haproxy_idle
    start nginx_idle nginx -c "$ROOT/conf/nginx-idle.conf" -p "$ROOT/run/"
    wait_port $NG_IDLE_PORT && sleep 1 && idle_conns "nginx" $NG_IDLE_PORT nginx_idle "$n"
    stop nginx_idle
  done
}
idle_conns() { # name port pid-name connections
  local name=$1 port=$2 n=$4 pids r0 hold=4
  pids=$(tree_pids "${PID[$3]}")
  # One request first (warms the pool to the backend): "idle" is a proxy that has served once.
  curl -s -o /dev/null "${CURL_TLS[@]}" https://127.0.0.1:$port/; sleep 0.5
  # shellcheck disable=SC2086
  r0=$(rss_kb $pids)
  log "opening $n idle mTLS connections to $name (:$port)"
  taskset -c "$CLI_CPU" timeout 400 python3 "$HERE/idle_conns.py" --port "$port" --conns "$n" --timeout 380 \
      --cert "$ROOT/pki/loadgen.crt" --key "$ROOT/pki/loadgen.key" --hold "$hold" \
      --ready-file "$ROOT/run/idle.ready" >"$ROOT/raw/idle_${port}_$n.txt" 2>&1 &
  local cpid=$! i
  PID[idle_client]=$cpid
  for i in $(seq 3600); do [ -s "$ROOT/run/idle.ready" ] && break; kill -0 $cpid 2>/dev/null || break; sleep 0.1; done
  sleep 1
  local open rss hwm
  open=$(ss -tnH state established "( sport = :$port )" | wc -l)
  # shellcheck disable=SC2086
  rss=$(rss_kb $pids); hwm=$(hwm_kb $pids)
  wait $cpid; unset "PID[idle_client]"; rm -f "$ROOT/run/idle.ready"
  awk -v n="$name" -v r0="$r0" -v want="$n" -v open="$open" -v rss="$rss" -v hwm="$hwm" 'BEGIN{
    printf "%s\t%.1f\t%d\t%d\t%.1f\t%.1f\t%.1f\n", n, r0/1024, want, open, rss/1024, hwm/1024, open ? (rss-r0)/open : 0 }' >> "$MEM"
  log "$name: $open conns open, RSS $((r0 / 1024)) -> $((rss / 1024)) MiB ($(tail -1 "$ROOT/raw/idle_${port}_$n.txt"))"
}

# ---------------------------------------------------------------- transparent pair (hook)
phase_transparent() {
  local why=""
  if [ "$(id -u)" != 0 ]; then why="needs root (a network namespace and nftables redirect rules)"
  elif ! "$MOAT0" redirect --help >/dev/null 2>&1; then why="the $B0 binary has no \`moat redirect\`"
  elif [ ! -f "$HERE/transparent.sh" ]; then why="benches/load/transparent.sh (the transparent pair row) is not there yet"
  fi
  if [ -n "$why" ]; then
    log "transparent: SKIPPED — $why"; echo "skipped: $why" > "$OUT/transparent.txt"; return 0
  fi
  # The contract: transparent.sh measures its rows with the same moat binary, oha and PKI, and writes
  # $OUT/transparent.tsv (a header line, then one row per measurement); the report shows it as a table.
  log "transparent: benches/load/transparent.sh"
  MOAT="$MOAT0" OHA="$OHA" ROOT="$ROOT" OUT="$OUT" DUR="$DUR" SRV_CPU="$SRV_CPU" CLI_CPU="$CLI_CPU" \
    bash "$HERE/transparent.sh" && echo "ran: see transparent.tsv" > "$OUT/transparent.txt" \
    || { log "transparent.sh failed"; echo "failed: see the harness log" > "$OUT/transparent.txt"; }
}

# ---------------------------------------------------------------- main
idle_check() {
  local a b c d e f g h
  read -r a b < <(core_busy "$SRV_CPU"); read -r c d < <(core_busy "$CLI_CPU"); sleep 2
  read -r e f < <(core_busy "$SRV_CPU"); read -r g h < <(core_busy "$CLI_CPU")
  BG_SRV=$(( (e - a) * 100 / (f - b > 0 ? f - b : 1) )); BG_CLI=$(( (g - c) * 100 / (h - d > 0 ? h - d : 1) ))
  log "background load before start: cpu$SRV_CPU ${BG_SRV}%, cpu$CLI_CPU ${BG_CLI}%"
}

for ph in $PHASES; do
  case $ph in rounds|rows|bulk|memtime|idle|client|ws|transparent) ;;
    *) echo "PHASES: unknown phase '$ph' (rounds rows bulk memtime idle client ws transparent)" >&2; exit 64 ;;
  esac
done
install_deps
make_pki
write_configs
start_all
VERSIONS="moat $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)$(git -C "$REPO" diff --quiet HEAD -- proxy src ca 2>/dev/null || echo " (+uncommitted changes in proxy/src/ca)"), $(haproxy -v | head -1 | awk '{print "haproxy",$3}'), $(nginx -v 2>&1 | awk '{print $3}'), $(stunnel4 -version 2>&1 | awk '/^stunnel/{print "stunnel",$2; exit}'), $(openssl version | awk '{print "openssl",$2}'), $($OHA --version | head -1)"
log "versions: $VERSIONS; phases: $PHASES; open-file limit $NOFILE"
sanity
[ "${SANITY_ONLY:-0}" = 1 ] && { log "SANITY_ONLY=1: stopping here"; exit 0; }
idle_check
T_START=$SECONDS
T_ALL=$SECONDS
printf "$COLS\n" > "$RUNS.new"
has_phase rounds && phase_rounds
has_phase rows && phase_rows
has_phase client && phase_client
mv "$RUNS.new" "$RUNS"
# the oha rows' proxies are done: the rest starts fresh ones (bulk, memtime, idle)
for n in "${!PID[@]}"; do [ "$n" != backend ] && stop "$n"; done
has_phase bulk && phase_bulk
has_phase memtime && memtime_start
has_phase idle && phase_idle
if has_phase ws; then
  log "WebSocket echo, direct and through a sidecar pair, ${DUR}s each (benches/load/ws_echo.sh)"
  MOAT=$MOAT0 DUR=$DUR OUT=$OUT SRV_CPU=$SRV_CPU CLI_CPU=$CLI_CPU bash "$HERE/ws_echo.sh" \
    || log "the WebSocket rows failed (see above)"
fi
has_phase transparent && phase_transparent
has_phase memtime && memtime_finish
cleanup
BUILDS_META=""
for b in "${BNAMES[@]}"; do
  BUILDS_META+="$b: ${SRC[$b]} built ${BUILT[$b]} (sha256 $(sha256sum "${BIN[$b]}" | cut -c1-12), copied at start); "
done
python3 "$HERE/report.py" --runs "$RUNS" --memory "$MEM" --sanity "$SANITY" --websocket "$OUT/websocket.tsv" \
  --bulk "$BULK" --memtime "$MEMTIME" --transparent "$OUT/transparent.txt" --out "$OUT" \
  --meta "dur=$DUR" "fr_dur=$FR_DUR" "cc_dur=$CC_DUR" "rate=$RATE" "rounds=$ROUNDS" "warmup_round=$WARMUP_ROUND" \
         "h2=${H2_CONNS}x${H2_STREAMS}" "srv_cpu=$SRV_CPU" "cli_cpu=$CLI_CPU" "client_sat=$CLIENT_SAT" "srv_busy_min=$SRV_BUSY_MIN" "oha_db=$OHA_DB" \
         "builds=${BNAMES[*]}" "phases=$PHASES" "bulk_bytes=$BULK_BYTES" "after_s=$AFTER_S" "mt_conns=$MT_CONNS" \
         "versions=$VERSIONS" "background_before=cpu$SRV_CPU ${BG_SRV}% cpu$CLI_CPU ${BG_CLI}%" \
         "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)" "kernel=$(uname -r)" "cpu=$(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)" \
         "measure_seconds=$((SECONDS - T_ALL))" "quiet_wait_seconds=$QUIET_SPENT" \
         "moat_fresh_rss_mib_before_any_request=$(awk -v k="${MOAT_FRESH_KB:-0}" 'BEGIN{printf "%.1f", k/1024}')" \
         "moat_binaries=$BUILDS_META"
log "done in $((SECONDS)) s: $OUT/summary.md, $OUT/results.json"
