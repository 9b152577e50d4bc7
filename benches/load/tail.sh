#!/usr/bin/env bash
# benches/load/tail.sh — where the slowest 1 % of a fixed-rate run fall in time: spread evenly (a cost
# every request can pay), periodic (a tick in the proxy), or in bursts at random instants that hit
# direct traffic too (the machine stalling). Sidecar pairs at RATE req/s, latency-corrected, as the
# harness's fixed-rate rows; reuses the PKI and configs benches/load/run.sh leaves in $ROOT (run it
# once first) and pins like it: proxies + backend on cpu0, oha on cpu1.
#
#   bash benches/load/tail.sh direct haproxy target/pgo/moat haproxy target/pgo/moat   # alternating runs
#   RATE=2000 DUR=8 bash benches/load/tail.sh ...
#
# TARGET: `direct` (oha -> nginx), `haproxy` (the harness's HAProxy pair) or a moat binary (a moat
# pair: outbound -> mTLS -> inbound -> nginx). One line per run: percentiles over the steady state (the
# first second dropped), then the slowest 1 % grouped into bursts (requests that started within 5 ms
# of each other) and the largest bursts as size@second.
set -uo pipefail

ROOT=${ROOT:-${TMPDIR:-/tmp}/moat-load}
OHA=${OHA:-$ROOT/cargo-root/bin/oha}
DUR=${DUR:-8}; RATE=${RATE:-2000}
[ -f "$ROOT/conf/moat-in.toml" ] && [ -x "$OHA" ] || { echo "run benches/load/run.sh once first ($ROOT)" >&2; exit 1; }
[ $# -ge 1 ] || { sed -n 8,9p "$0" >&2; exit 64; }
TMP=$(mktemp -d); PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; rm -rf "$TMP"' EXIT
wait_port() { local i; for i in $(seq 100); do ss -ltnH "sport = :$1" | grep -q . && return; sleep 0.1; done; }
if ! ss -ltnH 'sport = :18080' | grep -q .; then
  taskset -c 0 nginx -c "$ROOT/conf/nginx-backend.conf" >/dev/null 2>&1 & PIDS+=($!)
  wait_port 18080
fi
# the moat pair's outbound: to the harness's inbound config (moat-in.toml, :18443), pinned to its identity
cat >"$TMP/out.toml" <<CONF
[runtime]
worker_threads = 1
[identity]
cert = "$ROOT/pki/client.crt"
key = "$ROOT/pki/client.key"
bundle = "$ROOT/pki/bundle.pem"
[admin]
listen = "127.0.0.1:0"
[[outbound]]
name = "out"
listen = "127.0.0.1:15901"
upstream = "127.0.0.1:18443"
peer = "spiffe://example.org/server"
protocol = "http"
CONF

for t in "$@"; do
  procs=()
  case $t in
    direct) URL=http://127.0.0.1:18080/ ;;
    haproxy)
      taskset -c 0 haproxy -db -f "$ROOT/conf/haproxy.cfg" >/dev/null 2>&1 & procs+=($!)
      taskset -c 0 haproxy -db -f "$ROOT/conf/haproxy-out.cfg" >/dev/null 2>&1 & procs+=($!)
      wait_port 19443; wait_port 19447; URL=http://127.0.0.1:19447/ ;;
    *)
      RUST_LOG=warn taskset -c 0 "$t" proxy --config "$ROOT/conf/moat-in.toml" >/dev/null 2>&1 & procs+=($!)
      RUST_LOG=warn taskset -c 0 "$t" proxy --config "$TMP/out.toml" >/dev/null 2>&1 & procs+=($!)
      wait_port 18443; wait_port 15901; URL=http://127.0.0.1:15901/ ;;
  esac
  PIDS+=("${procs[@]}")
  curl -s -o /dev/null "$URL"
  rm -f "$TMP/run.db"
  taskset -c 1 "$OHA" -z "${DUR}s" --no-tui --worker-threads 1 -c 32 -q "$RATE" --latency-correction \
    --http-version 1.1 --db-url "$TMP/run.db" "$URL" >/dev/null 2>&1
  for p in "${procs[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  python3 - "$t" "$TMP/run.db" <<'PY'
import os, sqlite3, sys
name, db = os.path.basename(sys.argv[1]), sys.argv[2]
con = sqlite3.connect(db)
t0 = con.execute("select min(start) from oha").fetchone()[0]
if t0 is None:
    sys.exit(f"{name}: no requests recorded")
rows = [(s - t0, e - c) for s, e, c in con.execute(
    "select start, end, coalesce(start_latency_correction, start) from oha where status = 200 and start >= ?",
    (t0 + 1,))]
lat = sorted(r[1] for r in rows)
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000  # noqa: E731
slow = sorted(r[0] for r in rows if r[1] >= lat[int(.99 * len(lat))])
bursts, cur = [], [slow[0]]
for x in slow[1:]:
    if x - cur[-1] < 0.005:
        cur.append(x)
    else:
        bursts.append(cur)
        cur = [x]
bursts.append(cur)
big = sorted(bursts, key=len, reverse=True)[:6]
print(f"{name:10s} n={len(lat)} p50={q(.5):.3f} p90={q(.9):.3f} p99={q(.99):.3f} p99.9={q(.999):.3f} "
      f"max={lat[-1] * 1000:.2f} ms; slowest 1 %: {len(slow)} in {len(bursts)} bursts, largest "
      + ", ".join(f"{len(b)}@{b[0]:.2f}s" for b in big))
PY
done
