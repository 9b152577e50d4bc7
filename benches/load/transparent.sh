#!/usr/bin/env bash
# benches/load/transparent.sh — the transparent sidecar pair next to the explicit one (issue 18): the same
# two moat processes, the same backend and the same load generator, between two network namespaces.
# run.sh calls it as its `transparent` phase (TRANSPARENT=1 or PHASES=transparent); it also runs on its own,
# as root, needing a moat binary with `moat redirect`, oha, nginx, iproute2 and setpriv (util-linux):
#
#   bash benches/load/transparent.sh                              # DUR=4 s per row, target/release/moat
#   DUR=2 MOAT=target/debug/moat OUT=/tmp/tp bash benches/load/transparent.sh   # a smoke run
#
#   client ns                                                      server ns
#   oha ─plain─> 127.0.0.1:15101 [[outbound]] ─mTLS─────────────> :15443 [[inbound]] ─> nginx 127.0.0.1:8080
#   oha ─plain─> 10.200.0.2:8080 ─nft─> :15001 [[destination]] ─mTLS─> :8080 ─nft─> :15006 ─> the same
#
#   (explicit pair: the first line; transparent pair: the second). Both sidecars run as UID 65532 with
#   [runtime] worker_threads = 1, pinned with the backend to SRV_CPU; oha (one worker thread) to CLI_CPU.
#   Each mode runs keep-alive at c32 (throughput) and a fixed RATE (2000 req/s, c32, latency corrected),
#   alternating modes. proxy_cpu_s_per_10k: CPU seconds of both sidecars per 10,000 requests answered 200.
#
# Results: $OUT/transparent.tsv (default OUT=benches/results), a header line then one row per run. Every
# process started here is stopped by PID, and the namespaces (with their rules) are deleted, on exit.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
MOAT=${MOAT:-$REPO/target/release/moat}
OUT=${OUT:-$REPO/benches/results}
ROOT=${ROOT:-${TMPDIR:-/tmp}/moat-load}
DUR=${DUR:-4}
RATE=${RATE:-2000}
CONC=${CONC:-32}
ROUNDS=${ROUNDS:-1}            # explicit and transparent alternate, this many times
SRV_CPU=${SRV_CPU:-0}; CLI_CPU=${CLI_CPU:-1}
OHA=${OHA:-}
[ -n "$OHA" ] || { [ -x "$ROOT/cargo-root/bin/oha" ] && OHA=$ROOT/cargo-root/bin/oha; } || OHA=$(command -v oha || true)
NS=moat-bench-$$
SERVER_IP=10.200.0.2
PEER_ID=spiffe://example.org/server
CLK=$(getconf CLK_TCK)
log() { printf '[moat-transparent %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

[ "$(id -u)" = 0 ] || { log "needs root (network namespaces, nftables rules)"; exit 1; }
[ -x "$MOAT" ] || { log "no moat binary at $MOAT"; exit 1; }
"$MOAT" redirect --help >/dev/null 2>&1 || { log "$MOAT has no \`moat redirect\`"; exit 1; }
[ -n "$OHA" ] && [ -x "$OHA" ] || { log "no oha (run.sh builds one into \$ROOT/cargo-root; or OHA=path)"; exit 1; }
for t in ip nginx setpriv taskset python3; do
  command -v "$t" >/dev/null 2>&1 || { log "$t is missing"; exit 1; }
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/moat-transparent.XXXXXX")
PIDS=()
cleanup() {
  local p n
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
  for n in client server hub; do ip netns del "$NS-$n" 2>/dev/null; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
in_ns() { local n=$1; shift; ip netns exec "$NS-$n" "$@"; }
# start NS NAME CMD...: in the namespace, pinned to the server core; its PID (the command's own) in PIDS
# (`ip netns exec` and taskset exec the command: the PID is the process itself, for its CPU time)
start() { local n=$1 name=$2; shift 2; ip netns exec "$NS-$n" taskset -c "$SRV_CPU" "$@" >"$WORK/$name.log" 2>&1 & PIDS+=($!); }
wait_port() { # ns port
  local i; for i in $(seq 100); do in_ns "$1" ss -ltnH "sport = :$2" | grep -q . && return 0; sleep 0.1; done
  log "port $2 not listening in $NS-$1"; exit 1
}
cpu_ticks() { local t=0 p v; for p in "$@"; do v=$(awk '{print $14+$15}' /proc/$p/stat 2>/dev/null); t=$((t + ${v:-0})); done; echo $t; }

# ---------------------------------------------------------------- namespaces: client 10.200.0.1, server .2
ip netns add "$NS-hub" && ip -n "$NS-hub" link add br0 type bridge && ip -n "$NS-hub" link set br0 up || exit 1
i=1
for n in client server; do
  ip netns add "$NS-$n" || exit 1
  ip link add eth0 netns "$NS-$n" type veth peer name "v-$n" netns "$NS-hub" || exit 1
  ip -n "$NS-hub" link set "v-$n" master br0 up
  ip -n "$NS-$n" addr add "10.200.0.$i/24" dev eth0
  ip -n "$NS-$n" link set eth0 up
  ip -n "$NS-$n" link set lo up
  i=$((i + 1))
done

# ---------------------------------------------------------------- PKI and configs
chmod 755 "$WORK"
"$MOAT" ca init --dir "$WORK/ca" --trust-domain example.org >/dev/null 2>&1 || { log "ca init failed"; exit 1; }
"$MOAT" ca bundle --dir "$WORK/ca" > "$WORK/bundle.pem"
for id in server client; do
  "$MOAT" ca issue --dir "$WORK/ca" --id "spiffe://example.org/$id" --ttl 2h \
    --cert-out "$WORK/$id.crt" --key-out "$WORK/$id.key" >/dev/null 2>&1 || { log "issue $id failed"; exit 1; }
  chown 65532:65532 "$WORK/$id.key"
done
identity() { printf '[runtime]\nworker_threads = 1\n[identity]\ncert = "%s"\nkey = "%s"\nbundle = "%s"\n[admin]\nlisten = "127.0.0.1:9901"\n' \
  "$WORK/$1.crt" "$WORK/$1.key" "$WORK/bundle.pem"; }
{ identity server; cat <<CONF
# The explicit pair's target and, through the rules, the transparent pair's: one listener, one policy.
[[inbound]]
name = "in"
listen = "0.0.0.0:15443"
forward = "127.0.0.1:8080"
protocol = "http"
app_protocol = "http1"

[redirect]
inbound_ports = [8080]
outbound = false
CONF
} > "$WORK/server.toml"
{ identity client; cat <<CONF
[[outbound]]
name = "out"
listen = "127.0.0.1:15101"
upstream = "$SERVER_IP:15443"
peer = "$PEER_ID"
protocol = "http"

[redirect]
inbound_ports = []
unmatched = "deny"

[[destination]]
name = "server"
ip = "$SERVER_IP"
port = 8080
peer = "$PEER_ID"
protocol = "http1"
CONF
} > "$WORK/client.toml"
cat > "$WORK/nginx.conf" <<CONF
daemon off; master_process off; worker_processes 1; pid $WORK/nginx.pid; error_log $WORK/nginx.err warn;
events { worker_connections 8192; }
http {
  access_log off; keepalive_requests 1000000; keepalive_timeout 60s;
  client_body_temp_path $WORK/nb; proxy_temp_path $WORK/np; fastcgi_temp_path $WORK/nf;
  uwsgi_temp_path $WORK/nu; scgi_temp_path $WORK/ns;
  server { listen 0.0.0.0:8080 backlog=4096; default_type text/plain;
    location / { return 200 "hello from backend\n"; }
    location = /peer { return 200 "\$http_x_moat_peer_id\n"; } }
}
CONF

# ---------------------------------------------------------------- start: rules first, as an init step would
for n in server client; do
  in_ns "$n" "$MOAT" redirect --config "$WORK/$n.toml" >"$WORK/redirect-$n.log" 2>&1 \
    || { log "moat redirect in $n failed: $(cat "$WORK/redirect-$n.log")"; exit 1; }
done
start server backend nginx -c "$WORK/nginx.conf"
export RUST_LOG=warn
start server moat_in setpriv --reuid=65532 --regid=65532 --clear-groups "$MOAT" proxy --config "$WORK/server.toml"
SRV_PID=${PIDS[-1]}
start client moat_out setpriv --reuid=65532 --regid=65532 --clear-groups "$MOAT" proxy --config "$WORK/client.toml"
CLI_PID=${PIDS[-1]}
wait_port server 8080; wait_port server 15443; wait_port server 15006
wait_port client 15101; wait_port client 15001

# Both paths must answer, and the server must see the client's verified ID.
for url in http://127.0.0.1:15101/peer "http://$SERVER_IP:8080/peer"; do
  got=$(in_ns client curl -s --max-time 5 "$url")
  [ "$got" = "spiffe://example.org/client" ] || { log "sanity: $url answered '$got'"; exit 1; }
done
log "sanity: both pairs answer with the client's verified ID"

# ---------------------------------------------------------------- runs
mkdir -p "$OUT"
TSV=$OUT/transparent.tsv
printf 'label\tmode\tload\tconc\trps\tp50_ms\tp99_ms\tproxy_cpu_s_per_10k\tok\tbad\n' > "$TSV"
run() { # mode load url
  local mode=$1 load=$2 url=$3 label="$1_$2_c$CONC" extra=() t0 t1
  [ "$load" = fr ] && extra=(-q "$RATE" --latency-correction)
  log "run $label ($url, ${DUR}s)"
  t0=$(cpu_ticks "$SRV_PID" "$CLI_PID")
  in_ns client taskset -c "$CLI_CPU" timeout $((DUR + 60)) "$OHA" -z "${DUR}s" --no-tui --worker-threads 1 \
    --output-format json -o "$WORK/$label.json" -c "$CONC" "${extra[@]}" "$url" 2>"$WORK/$label.err"
  t1=$(cpu_ticks "$SRV_PID" "$CLI_PID")
  python3 - "$WORK/$label.json" "$label" "$mode" "$load" "$CONC" "$((t1 - t0))" "$CLK" >> "$TSV" <<'PY'
import json, sys
f, label, mode, load, conc, ticks, clk = sys.argv[1:]
try:
    d = json.load(open(f))
    codes = d.get("statusCodeDistribution") or {}
    errs = {k: v for k, v in (d.get("errorDistribution") or {}).items() if "deadline" not in k.lower()}
    ok = codes.get("200", 0)
    bad = sum(v for k, v in codes.items() if k != "200") + sum(errs.values())
    total = d["summary"]["total"]
    lp = d["latencyPercentiles"]
    rps = ok / total if total else 0.0
    cpu = int(ticks) / int(clk) / ok * 10000 if ok else 0.0
    print("\t".join([label, mode, load, conc, "%.0f" % rps, "%.3f" % (lp["p50"] * 1000),
                     "%.3f" % (lp["p99"] * 1000), "%.3f" % cpu, str(ok), str(bad)]))
except Exception as e:
    print("\t".join([label, mode, load, conc, "", "", "", "", "0", "failed: %s" % e]))
PY
}
for r in $(seq "$ROUNDS"); do
  for load in ka fr; do
    run explicit "$load" http://127.0.0.1:15101/
    run transparent "$load" "http://$SERVER_IP:8080/"
  done
done
log "wrote $TSV"
column -t -s $'\t' "$TSV" >&2
