#!/usr/bin/env bash
# benches/load/faults.sh — minor page faults a moat sidecar pair takes per burst of load, with idle gaps
# longer than the malloc_trim tick (10 s, src/cli/memory.rs) between bursts; with NOTRIM=1 the same with
# malloc_trim made a no-op (an LD_PRELOAD shim built here), to tell the trim's share.
#
#   bash benches/load/faults.sh BIN               # 4 bursts of wrk -c32 -d3s, 22 s apart
#   NOTRIM=1 bash benches/load/faults.sh BIN
#   BURSTS=6 GAP=22 CONNS=32 PORTS="31080 31443 31001" bash benches/load/faults.sh BIN
#
# Why (issue 22, "why the first round of a run is often the slowest"): run 19 counted 300–670 minor faults
# per moat process in every round of the harness, HAProxy 0–40. Output: one line per burst with each
# sidecar's faults during it and RssAnon (KiB) right after it and after the gap.
set -euo pipefail
BIN=$1; BURSTS=${BURSTS:-4}; GAP=${GAP:-22}; CONNS=${CONNS:-32}
for t in wrk nginx curl gcc; do command -v $t >/dev/null || { echo "faults.sh: needs $t" >&2; exit 1; }; done
W=$(mktemp -d); PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$W"' EXIT
read -r B_PORT IN_PORT OUT_PORT <<<"${PORTS:-31080 31443 31001}"
. "$(dirname "$0")/pair_lib.sh"
pair_pki "$BIN" server client
pair_backend 1024; PIDS+=("$BACKEND_PID")
pair_configs 1 "" 'app_protocol = "http1"'
PRE=()
if [ "${NOTRIM:-0}" = 1 ]; then
  printf '#include <stddef.h>\nint malloc_trim(size_t pad) { (void)pad; return 0; }\n' >"$W/notrim.c"
  gcc -shared -fPIC -O2 -o "$W/notrim.so" "$W/notrim.c"
  PRE=(LD_PRELOAD="$W/notrim.so")
fi
env "${PRE[@]}" RUST_LOG=warn "$BIN" proxy --config "$W/in.toml" >"$W/in.log" 2>&1 & pin=$!; PIDS+=($pin)
wait_port "$IN_PORT"
env "${PRE[@]}" RUST_LOG=warn "$BIN" proxy --config "$W/out.toml" >"$W/out.log" 2>&1 & pout=$!; PIDS+=($pout)
wait_port "$OUT_PORT"
curl -sS --fail -o /dev/null "http://127.0.0.1:$OUT_PORT/"
flt() { awk '{print $10}' "/proc/$1/stat"; }
anon() { awk '/^RssAnon/{print $2}' "/proc/$1/status"; }
for r in $(seq "$BURSTS"); do
  a=$(flt $pin); b=$(flt $pout)
  rps=$(wrk -t1 -c "$CONNS" -d3s "http://127.0.0.1:$OUT_PORT/" 2>&1 | awk '/Requests\/sec/{print $2}')
  fi=$(($(flt $pin) - a)); fo=$(($(flt $pout) - b)); ai=$(anon $pin); ao=$(anon $pout)
  sleep "$GAP"
  printf 'burst %d: %s req/s; faults in %d out %d; RssAnon after it in %s out %s, after %ss idle in %s out %s\n' \
    "$r" "$rps" "$fi" "$fo" "$ai" "$ao" "$GAP" "$(anon $pin)" "$(anon $pout)"
done
