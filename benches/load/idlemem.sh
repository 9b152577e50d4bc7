#!/usr/bin/env bash
# benches/load/idlemem.sh — memory per idle mTLS connection on a moat inbound, build against build,
# with the RSS split (RssAnon: heap, buffers; RssFile: the binary's pages) and, optionally, a heap
# profile. The load harness's method (run.sh phase `idle`): a fresh inbound (one worker thread,
# header_read_timeout 300 s), one request, then N mTLS connections from idle_conns.py, each after one
# HTTP/1.1 keep-alive request, held idle; (RSS with them - RSS before) / N.
#
#   bash benches/load/idlemem.sh NAME=BIN ...             # N = 1000, one round
#   N=300 ROUNDS=3 bash benches/load/idlemem.sh old=/tmp/moat-old new=target/release/moat
#   MASSIF=1 N=300 bash benches/load/idlemem.sh new=target/release/moat   # also valgrind massif (slow)
#
# Output (stdout, TSV): build round n open vmrss0_kb vmrss_kb anon0_kb anon_kb per_conn_kb anon_per_conn_kb
# MASSIF=1 leaves a heap snapshot taken while the connections are held in $MASSIF_DIR/massif.snap.NAME
# (default /tmp; `ms_print` reads it; the RSS columns then measure valgrind, not moat).
set -euo pipefail

N=${N:-1000}; ROUNDS=${ROUNDS:-1}; MASSIF=${MASSIF:-0}; MASSIF_DIR=${MASSIF_DIR:-/tmp}
HOLD=${HOLD:-4}; [ "$MASSIF" = 1 ] && HOLD=${HOLD_MASSIF:-30}   # seconds the client holds the connections
[ $# -ge 1 ] || { sed -n 7,9p "$0" >&2; exit 64; }
for t in nginx curl python3; do command -v $t >/dev/null || { echo "idlemem.sh: needs $t" >&2; exit 1; }; done
HERE=$(cd "$(dirname "$0")" && pwd)
W=$(mktemp -d); PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; [ -n "${KEEPW:-}" ] || rm -rf "$W"' EXIT

B_PORT=${B_PORT:-29180}; IN_PORT=${IN_PORT:-29543}; OUT_PORT=0
FIRST=${1#*=}
. "$HERE/pair_lib.sh"
pair_pki "$FIRST" server client
pair_backend 4096; PIDS+=("$BACKEND_PID")
pair_configs 1 "" 'app_protocol = "http1"'
printf '[limits]\nheader_read_timeout = "300s"\nmax_connections = 20000\n' >"$W/limits.toml"
# [limits] must come before [[inbound]]: put it after [admin].
awk -v l="$(cat "$W/limits.toml")" '/^\[\[inbound\]\]/{print l} 1' "$W/in.toml" >"$W/idle.toml"

ulimit -n "$(ulimit -Hn)"
printf 'build\tround\tn\topen\tvmrss0_kb\tvmrss_kb\tanon0_kb\tanon_kb\tper_conn_kb\tanon_per_conn_kb\n'
for round in $(seq "$ROUNDS"); do
  for spec in "$@"; do
    name=${spec%%=*}; bin=${spec#*=}
    if [ "$MASSIF" = 1 ]; then
      RUST_LOG=warn valgrind --tool=massif --massif-out-file="$MASSIF_DIR/massif.out.$name" --depth=40 \
        --threshold=0.5 "$bin" proxy --config "$W/idle.toml" >"$W/in.log" 2>&1 & pin=$!
    else
      RUST_LOG=warn "$bin" proxy --config "$W/idle.toml" >"$W/in.log" 2>&1 & pin=$!
    fi
    PIDS+=($pin)
    pair_first_request
    sleep 0.5
    read -r v0 a0 _ < <(pair_mem $pin)
    python3 "$HERE/idle_conns.py" --port $IN_PORT --conns "$N" --timeout 380 --cert "$W/client.crt" \
      --key "$W/client.key" --hold "$HOLD" --ready-file "$W/ready" >"$W/client.txt" 2>&1 & c=$!
    for _ in $(seq 3600); do [ -s "$W/ready" ] && break; kill -0 $c 2>/dev/null || break; sleep 0.1; done
    sleep 1
    open=$(ss -tnH state established "( sport = :$IN_PORT )" | wc -l)
    [ "$MASSIF" = 1 ] && vgdb --pid=$pin detailed_snapshot "$MASSIF_DIR/massif.snap.$name" >/dev/null
    read -r v a _ < <(pair_mem $pin)
    wait $c || true; rm -f "$W/ready"
    echo "$name round $round: $(tail -1 "$W/client.txt")" >&2
    awk -v b="$name" -v r="$round" -v n="$N" -v o="$open" -v v0="$v0" -v v="$v" -v a0="$a0" -v a="$a" 'BEGIN{
      printf "%s\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t%.1f\t%.1f\n", b, r, n, o, v0, v, a0, a, o ? (v-v0)/o : 0, o ? (a-a0)/o : 0 }'
    kill -TERM $pin; wait $pin 2>/dev/null || true
  done
done
