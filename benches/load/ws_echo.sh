#!/usr/bin/env bash
# benches/load/ws_echo.sh — WebSocket echo through the moat sidecar pair against the same echo server
# directly (issue 16): messages/s, p50/p99 of one round trip (64-byte messages, one in flight), and the
# sidecars' CPU per 10,000 messages. run.sh calls it as phase G; it also runs on its own, needing only
# a moat binary and python3 with `websockets` (tests/ws_peer.py is both ends):
#
#   bash benches/load/ws_echo.sh                        # 4 s per row, target/release/moat
#   DUR=2 MOAT=target/debug/moat bash benches/load/ws_echo.sh    # a smoke run
#
#   ws_peer.py bench ─plain─> ws_peer.py server                                   (direct)
#   ws_peer.py bench ─plain─> moat outbound ─mTLS─> moat inbound ─plain─> server  (the sidecar pair)
#
# Results: $OUT/websocket.tsv (default OUT=benches/results). Every process started here is stopped by PID.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
MOAT=${MOAT:-$REPO/target/release/moat}
OUT=${OUT:-$REPO/benches/results}
DUR=${DUR:-4}
SRV_CPU=${SRV_CPU:-0}; CLI_CPU=${CLI_CPU:-1}
WS_PORT=${WS_PORT:-18090}        # the echo server
WS_IN_PORT=${WS_IN_PORT:-18448}  # moat inbound -> WS_PORT
WS_OUT_PORT=${WS_OUT_PORT:-15003} # moat outbound -> WS_IN_PORT
PEER="$REPO/tests/ws_peer.py"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/moat-ws.XXXXXX")
CLK=$(getconf CLK_TCK)
log() { printf '[moat-ws %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

[ -x "$MOAT" ] || { log "no moat binary at $MOAT"; exit 1; }
python3 -c 'import websockets.asyncio.client' 2>/dev/null \
  || { log "python3 websockets is missing (python3 -m pip install websockets==17.4)"; exit 1; }
PIDS=()
cleanup() { local p; for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; wait "$p" 2>/dev/null; done; rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
start() { taskset -c "$SRV_CPU" "$@" >>"$WORK/procs.log" 2>&1 & PIDS+=($!); }
wait_port() { local i; for i in $(seq 100); do ss -ltnH "sport = :$1" | grep -q . && return 0; sleep 0.1; done; log "port $1 not listening"; exit 1; }
cpu_ticks() { local t=0 p v; for p in "$@"; do v=$(awk '{print $14+$15}' /proc/$p/stat 2>/dev/null); t=$((t + ${v:-0})); done; echo $t; }

"$MOAT" ca init --dir "$WORK/ca" --trust-domain example.org >/dev/null 2>&1 || { log "ca init failed"; exit 1; }
"$MOAT" ca bundle --dir "$WORK/ca" > "$WORK/bundle.pem"
for id in server client; do
  "$MOAT" ca issue --dir "$WORK/ca" --id "spiffe://example.org/$id" --ttl 2h \
    --cert-out "$WORK/$id.crt" --key-out "$WORK/$id.key" >/dev/null 2>&1 || { log "issue $id failed"; exit 1; }
done
for side in in out; do
  id=$([ $side = in ] && echo server || echo client)
  cat > "$WORK/moat-$side.toml" <<CONF
[runtime]
worker_threads = 1
[identity]
cert = "$WORK/$id.crt"
key = "$WORK/$id.key"
bundle = "$WORK/bundle.pem"
[admin]
listen = "127.0.0.1:0"
CONF
done
cat >> "$WORK/moat-in.toml" <<CONF
[[inbound]]
name = "ws"
listen = "127.0.0.1:$WS_IN_PORT"
forward = "127.0.0.1:$WS_PORT"
CONF
cat >> "$WORK/moat-out.toml" <<CONF
[[outbound]]
name = "ws"
listen = "127.0.0.1:$WS_OUT_PORT"
upstream = "127.0.0.1:$WS_IN_PORT"
peer = "spiffe://example.org/server"
CONF

start python3 "$PEER" server "$WS_PORT" --quiet
RUST_LOG=warn start "$MOAT" proxy --config "$WORK/moat-in.toml"; IN_PID=${PIDS[-1]}
RUST_LOG=warn start "$MOAT" proxy --config "$WORK/moat-out.toml"; OUT_PID=${PIDS[-1]}
for p in $WS_PORT $WS_IN_PORT $WS_OUT_PORT; do wait_port "$p"; done

mkdir -p "$OUT"
TSV="$OUT/websocket.tsv"
printf 'label\ttarget\tseconds\tmessages\tmsgs_per_s\tp50_ms\tp99_ms\tin_cpu_s_per_10k\tout_cpu_s_per_10k\n' > "$TSV"
row() { # label target url
  local label=$1 target=$2 url=$3 in0 out0 in1 out1 json
  in0=$(cpu_ticks "$IN_PID"); out0=$(cpu_ticks "$OUT_PID")
  json=$(taskset -c "$CLI_CPU" timeout $((DUR + 30)) python3 "$PEER" bench "$url" "$DUR") \
    || { log "$label: the bench client failed"; return 1; }
  in1=$(cpu_ticks "$IN_PID"); out1=$(cpu_ticks "$OUT_PID")
  python3 - "$label" "$target" "$DUR" "$json" "$CLK" $((in1 - in0)) $((out1 - out0)) >> "$TSV" <<'PY'
import json, sys
label, target, dur, raw, clk, din, dout = sys.argv[1:8]
r = json.loads(raw)
per10k = lambda ticks: "%.3f" % (int(ticks) / int(clk) / r["messages"] * 10000) if r["messages"] else "-"
direct = label.endswith("direct")
print("\t".join([label, target, dur, str(r["messages"]), "%.0f" % r["messages_per_s"], "%.3f" % r["p50_ms"],
                 "%.3f" % r["p99_ms"], "-" if direct else per10k(din), "-" if direct else per10k(dout)]))
PY
  log "$label: $(tail -1 "$TSV" | cut -f4-)"
}
row ws_direct    "direct (plain WebSocket)"              "ws://127.0.0.1:$WS_PORT/echo"
row ws_moat_pair "moat sidecar pair (out -> mTLS -> in)" "ws://127.0.0.1:$WS_OUT_PORT/echo"
log "done: $TSV"
