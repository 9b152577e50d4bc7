#!/usr/bin/env bash
# benches/load/textmem.sh — idle RSS of a moat inbound split into heap and the binary's own pages, with the page
# cache cold and then warm, build against build. Each build is copied to a private file (so no other process has it
# mapped), its page cache dropped for that file only (posix_fadvise DONTNEED; nothing else is evicted), then
# started twice: "cold" (its own faults read the file in) and "warm" (the file is cached as the first start left it,
# as on a node where many sidecars run one image). Each start: an inbound (one worker thread), one mTLS request,
# IDLE seconds, then /proc/PID/status and benches/load/textrss.py (resident pages of the binary by mapping and by
# page-cache folio size). Needs root (kpageflags), nginx, curl, python3.
#
#   bash benches/load/textmem.sh NAME=BIN ...                  # one round
#   ROUNDS=3 CRATES=15 bash benches/load/textmem.sh rel=target/release/moat dist=target/dist/moat
#   ENV="MALLOC_ARENA_MAX=1" bash benches/load/textmem.sh ...  # extra environment for the inbound
#
# Output (stdout, TSV): build round cache vmrss_kb anon_kb file_kb bin_text_kb bin_ro_kb cached_file_kb
# (cached_file_kb: how much of the binary the page cache held after the start, from fincore), then, on stderr,
# textrss.py's report of each start.
set -euo pipefail

ROUNDS=${ROUNDS:-1}; IDLE=${IDLE:-2}; CRATES=${CRATES:-0}; ENV=${ENV:-}
[ $# -ge 1 ] || { sed -n 10,12p "$0" >&2; exit 64; }
for t in nginx curl python3 fincore; do command -v $t >/dev/null || { echo "textmem.sh: needs $t" >&2; exit 1; }; done
HERE=$(cd "$(dirname "$0")" && pwd)
W=$(mktemp -d /tmp/textmem.XXXXXX); PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$W"' EXIT

B_PORT=${B_PORT:-29280}; IN_PORT=${IN_PORT:-29643}; OUT_PORT=0
FIRST=${1#*=}
. "$HERE/pair_lib.sh"
pair_pki "$FIRST" server client
pair_backend 64; PIDS+=("$BACKEND_PID")
pair_configs 1 "" 'app_protocol = "http1"'

drop() { python3 -c 'import os,sys; fd=os.open(sys.argv[1],os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd,0,0,os.POSIX_FADV_DONTNEED)' "$1"; }
cached_kb() { fincore -bn -o RES "$1" | awk '{print int($1/1024)}'; }
printf 'build\tround\tcache\tvmrss_kb\tanon_kb\tfile_kb\tbin_text_kb\tbin_ro_kb\tcached_file_kb\n'
for round in $(seq "$ROUNDS"); do
  for spec in "$@"; do
    name=${spec%%=*}; bin=$W/moat.$name
    cp "${spec#*=}" "$bin"; drop "$bin"
    for cache in cold warm; do
      env RUST_LOG=warn $ENV "$bin" proxy --config "$W/in.toml" >"$W/in.log" 2>&1 & pin=$!
      PIDS+=($pin)
      pair_first_request
      sleep "$IDLE"
      read -r v a f < <(pair_mem $pin)
      python3 "$HERE/textrss.py" --json "$pin" >"$W/t.json"
      read -r tx ro < <(python3 -c 'import json,sys; m=json.load(open(sys.argv[1]))["mappings"]
print(sum(r["resident_kib"] for r in m if "x" in r["perm"]), sum(r["resident_kib"] for r in m if r["perm"].startswith("r--")))' "$W/t.json")
      { echo "== $name round $round $cache"; python3 "$HERE/textrss.py" --crates "$CRATES" "$pin"; } >&2
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$round" "$cache" "$v" "$a" "$f" "$tx" "$ro" "$(cached_kb "$bin")"
      kill -TERM $pin; wait $pin 2>/dev/null || true
    done
    rm -f "$bin"
  done
done
