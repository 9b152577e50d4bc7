#!/usr/bin/env bash
# benches/load/ab.sh — A/B two (or more) moat binaries on the inbound alone, the way the figures in
# benches/results/analysis.md were taken. Reuses the PKI and configs that benches/load/run.sh leaves
# in $ROOT (run it once first); pins proxy + backend to cpu0 and oha to cpu1 like the harness.
#
#   bash benches/load/ab.sh cpu MODE REPS BIN...   # MODE: ka (h1 c32) | c1 | h2 (16x16) | fr (RATE, 2,000 req/s)
#   bash benches/load/ab.sh mem BIN...             # RSS idle and with 1,000 idle mTLS connections
#   bash benches/load/ab.sh stat MODE BIN          # syscalls and context switches per request (perf stat)
#   bash benches/load/ab.sh tail TARGET...         # where a fixed-rate run's slowest 1 % fall in time, pairs
#                                                  # TARGET: direct | haproxy | a moat binary (see tail_ below)
#
# BIN may be the word `haproxy` (the harness's HAProxy config) in `cpu` and `stat`. The binaries run
# alternately, REPS rounds; each line is one run: req/s, µs of proxy CPU per request (utime+stime
# from /proc/PID/stat), steady-state p50/p99 (the first second dropped), peak RSS.
set -uo pipefail

ROOT=${ROOT:-${TMPDIR:-/tmp}/moat-load}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OHA=${OHA:-$ROOT/cargo-root/bin/oha}
DUR=${DUR:-4}
RATE=${RATE:-2000}; TAIL_DUR=${TAIL_DUR:-8}   # tail: the fixed rate and each run's length
# On exit, interrupted or not: the proxies still running (PID: `start`'s; PROCS: `tail`'s) and a backend
# this script started.
PROCS=()
TMP=$(mktemp -d)
trap 'kill ${PID:-} "${PROCS[@]}" ${BACKEND:-} 2>/dev/null; rm -rf "$TMP"' EXIT
TLS=(--insecure --cert "$ROOT/pki/loadgen.crt" --key "$ROOT/pki/loadgen.key")
CURL_TLS=(-sk --cert "$ROOT/pki/loadgen.crt" --key "$ROOT/pki/loadgen.key" -o /dev/null)

[ -f "$ROOT/conf/moat-in.toml" ] && [ -x "$OHA" ] || { echo "run benches/load/run.sh once first ($ROOT)" >&2; exit 1; }
wait_port() { local i; for i in $(seq 100); do ss -ltnH "sport = :$1" | grep -q . && return; sleep 0.1; done; }
if ! ss -ltnH 'sport = :18080' | grep -q .; then
  taskset -c 0 nginx -c "$ROOT/conf/nginx-backend.conf" >/dev/null 2>&1 & BACKEND=$!
  wait_port 18080
fi

start() { # BIN CONFIG -> PID, PORT
  if [ "$1" = haproxy ]; then
    PORT=19443; taskset -c 0 haproxy -db -f "$ROOT/conf/haproxy.cfg" >"$TMP/proxy.log" 2>&1 & PID=$!
  else
    PORT=$3; RUST_LOG=warn taskset -c 0 "$1" proxy --config "$ROOT/conf/$2" >"$TMP/proxy.log" 2>&1 & PID=$!
  fi
  wait_port "$PORT"
  curl "${CURL_TLS[@]}" "https://127.0.0.1:$PORT/"
}

stop() { kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null; PID=; }

load_args() {
  case $1 in
    ka) ARGS=(-c 32 --http-version 1.1) ;;
    c1) ARGS=(-c 1 --http-version 1.1) ;;
    h2) ARGS=(--http2 -c 16 -p 16) ;;
    fr) ARGS=(-c 32 -q "$RATE" --latency-correction --http-version 1.1) ;;
    *) echo "unknown mode $1" >&2; exit 1 ;;
  esac
}

# user and system ticks of a process, "U S"
ticks_us() { awk '{print $14, $15}' "/proc/$1/stat"; }
# busy and total ticks of each core, "b0 t0 b1 t1"
cores() { awk '$1=="cpu0"||$1=="cpu1"{idle=$5+$6; tot=0; for(i=2;i<=9;i++) tot+=$i; printf "%d %d ", tot-idle, tot}' /proc/stat; }
# the backend's: its master's and workers' together
backend_ticks() { local p m u=0 s=0 a b; m=$(pgrep -f nginx-backend.conf | head -1); for p in $m $(ps -o pid= --ppid "$m"); do read -r a b < <(ticks_us "$p"); u=$((u+a)); s=$((s+b)); done; echo "$u $s"; }

cpu() {
  local mode=$1 reps=$2 bin rep t0 t1 b0 b1 c0 c1; shift 2
  load_args "$mode"
  for rep in $(seq "$reps"); do
    for bin in "$@"; do
      start "$bin" moat-in.toml 18443
      t0=$(ticks_us "$PID"); b0=$(backend_ticks); c0=$(cores)
      taskset -c 1 "$OHA" -z "${DUR}s" --no-tui --worker-threads 1 --output-format json \
        --db-url "$TMP/oha.db" "${TLS[@]}" "${ARGS[@]}" "https://127.0.0.1:$PORT/" >"$TMP/oha.json" 2>/dev/null
      t1=$(ticks_us "$PID"); b1=$(backend_ticks); c1=$(cores)
      local hwm; hwm=$(awk '/VmHWM/{print $2}' "/proc/$PID/status")
      stop
      python3 - "$bin" "$mode" "$t0" "$t1" "$hwm" "$TMP" "$b0" "$b1" "$c0" "$c1" <<'PY'
import json, os, sqlite3, sys
b, mode, t0, t1, hwm, tmp, b0, b1, c0, c1 = sys.argv[1:]
c0, c1 = list(map(int, c0.split())), list(map(int, c1.split()))
busy = [100 * (c1[i] - c0[i]) / max(c1[i + 1] - c0[i + 1], 1) for i in (0, 2)]
d = json.load(open(f"{tmp}/oha.json"))
n = sum(d["statusCodeDistribution"].values())
tick = os.sysconf("SC_CLK_TCK")
(u0, s0), (u1, s1) = (map(int, t.split()) for t in (t0, t1))
(bu0, bs0), (bu1, bs1) = (map(int, t.split()) for t in (b0, b1))
us = lambda ticks: ticks / tick * 1e6 / max(n, 1)   # µs per request
db = sqlite3.connect(f"{tmp}/oha.db")
start = db.execute("select min(start) from oha").fetchone()[0]
lat = sorted(r[0] for r in db.execute("select duration from oha where start >= ?", (start + 1.0,)))
lat = lat or sorted(r[0] for r in db.execute("select duration from oha"))  # DUR <= 1: nothing after the first second
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000
print(f"{os.path.basename(b):16s} {mode} rps={d['summary']['requestsPerSec']:8.0f} "
      f"cpu_us/req={us(u1 - u0 + s1 - s0):6.2f} (usr {us(u1 - u0):5.2f} sys {us(s1 - s0):5.2f}) "
      f"backend_us/req={us(bu1 - bu0 + bs1 - bs0):5.2f} p50={q(.5):.3f} p99={q(.99):.3f} ms busy={busy[0]:.0f}%/{busy[1]:.0f}% hwm={int(hwm) / 1024:.1f} MiB")
PY
      rm -f "$TMP/oha.db"
    done
  done
}

mem() {
  local bin fresh r0 rss open c i
  for bin in "$@"; do
    start "$bin" moat-idle.toml 18447
    sleep 0.5
    r0=$(awk '/VmRSS/{print $2}' "/proc/$PID/status")
    rm -f "$TMP/ready"
    taskset -c 1 timeout 120 python3 "$HERE/idle_conns.py" --port "$PORT" --conns 1000 \
      --cert "$ROOT/pki/loadgen.crt" --key "$ROOT/pki/loadgen.key" --hold 4 --ready-file "$TMP/ready" >"$TMP/idle.txt" 2>&1 & c=$!
    for i in $(seq 600); do [ -s "$TMP/ready" ] && break; sleep 0.1; done
    sleep 1
    open=$(ss -tnH state established "( sport = :$PORT )" | wc -l)
    rss=$(awk '/VmRSS/{print $2}' "/proc/$PID/status")
    wait "$c"; stop
    awk -v b="$(basename "$bin")" -v r0="$r0" -v rss="$rss" -v open="$open" 'BEGIN {
      printf "%-16s idle=%.1f MiB with_conns=%.1f MiB open=%d per_conn=%.1f KiB\n", b, r0/1024, rss/1024, open, open ? (rss-r0)/open : 0 }'
  done
}

stat_() {
  local mode=$1 bin=$2 rps
  load_args "$mode"
  start "$bin" moat-in.toml 18443
  taskset -c 1 "$OHA" -z 6s --no-tui --worker-threads 1 --output-format json "${TLS[@]}" "${ARGS[@]}" \
    "https://127.0.0.1:$PORT/" >"$TMP/oha.json" 2>/dev/null & local oha=$!
  sleep 1
  perf stat -e raw_syscalls:sys_enter,context-switches,task-clock -p "$PID" -o "$TMP/stat.txt" -- sleep 4 >/dev/null 2>&1
  wait "$oha"; stop
  rps=$(python3 -c "import json; print(json.load(open('$TMP/oha.json'))['summary']['requestsPerSec'])")
  python3 - "$rps" "$TMP/stat.txt" "$(basename "$bin")" <<'PY'
import sys
rps, path, name = float(sys.argv[1]), sys.argv[2], sys.argv[3]
reqs = rps * 4
def get(event):
    for line in open(path):
        if event in line:
            return float(line.split()[0].replace(",", ""))
print(f"{name:16s} rps={rps:.0f} syscalls/req={get('raw_syscalls') / reqs:.2f} "
      f"cs/req={get('context-switches') / reqs:.3f} cpu_us/req={get('task-clock') * 1000 / reqs:.2f}")
PY
}

# Where the slowest 1 % of a fixed-rate run (RATE req/s, latency-corrected, as the harness's fixed-rate
# rows) fall in time: spread evenly (a cost every request can pay), periodic (a tick in the proxy), or
# in bursts at random instants that hit direct traffic too (the machine stalling). TARGET: `direct`
# (oha -> nginx), `haproxy` (the harness's HAProxy pair) or a moat binary (a moat pair: outbound ->
# mTLS -> inbound -> nginx). One line per run: percentiles over the steady state (the first second
# dropped), then the slowest 1 % grouped into bursts (requests that started within 5 ms of each other)
# and the largest bursts as size@second.
tail_() {
  local t url
  [ -f "$ROOT/conf/moat-out.toml" ] || { echo "run benches/load/run.sh once more (no $ROOT/conf/moat-out.toml)" >&2; exit 1; }
  for t in "$@"; do
    PROCS=()
    case $t in
      direct) url=http://127.0.0.1:18080/ ;;
      haproxy)
        taskset -c 0 haproxy -db -f "$ROOT/conf/haproxy.cfg" >/dev/null 2>&1 & PROCS+=($!)
        taskset -c 0 haproxy -db -f "$ROOT/conf/haproxy-out.cfg" >/dev/null 2>&1 & PROCS+=($!)
        wait_port 19443; wait_port 19447; url=http://127.0.0.1:19447/ ;;
      *)
        RUST_LOG=warn taskset -c 0 "$t" proxy --config "$ROOT/conf/moat-in.toml" >/dev/null 2>&1 & PROCS+=($!)
        RUST_LOG=warn taskset -c 0 "$t" proxy --config "$ROOT/conf/moat-out.toml" >/dev/null 2>&1 & PROCS+=($!)
        wait_port 18443; wait_port 15001; url=http://127.0.0.1:15001/ ;;
    esac
    curl -s -o /dev/null "$url"
    rm -f "$TMP/run.db"
    taskset -c 1 "$OHA" -z "${TAIL_DUR}s" --no-tui --worker-threads 1 -c 32 -q "$RATE" --latency-correction \
      --http-version 1.1 --db-url "$TMP/run.db" "$url" >/dev/null 2>&1
    # (`direct` started nothing; a bare `wait` would wait for the backend too)
    if ((${#PROCS[@]})); then kill "${PROCS[@]}" 2>/dev/null; wait "${PROCS[@]}" 2>/dev/null; PROCS=(); fi
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
}

case ${1:-} in
  cpu) shift; cpu "$@" ;;
  mem) shift; mem "$@" ;;
  stat) shift; stat_ "$@" ;;
  tail) shift; tail_ "$@" ;;
  *) sed -n '2,14p' "$0"; exit 1 ;;
esac
