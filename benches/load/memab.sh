#!/usr/bin/env bash
# benches/load/memab.sh — resident memory of moat builds side by side: idle, at the peak of a
# 256-connection keep-alive run through a sidecar pair, and 1, 10 and 60 s after it (issue 22's
# "memory that comes back"), with the RSS split into RssAnon (heap, stacks, buffers) and RssFile
# (the binary's and libraries' touched pages).
#
#   bash benches/load/memab.sh NAME=BIN[@ENV=VAL+ENV=VAL] ...
#   bash benches/load/memab.sh glibc=/tmp/moat-glibc mi=/tmp/moat-mi mi0=/tmp/moat-mi@MIMALLOC_PURGE_DELAY=0+MIMALLOC_ALLOW_THP=0
#   WORKERS=2 CONNS=256 DUR=4 AFTER="1 10 60" ROUNDS=2 bash benches/load/memab.sh ...
#
# Why not run.sh's memtime phase: it needs oha (a cargo install) and reads VmRSS only; this needs
# wrk (Debian) and records the anonymous/file split that says where memory goes.
# Each build, each round: a fresh pair (outbound -> mTLS -> inbound -> nginx), `[runtime] worker_threads
# = WORKERS` (1, as the load harness, by default), one request through it, then 1 s idle, then
# `wrk -c CONNS -d DUR` against the outbound (plain HTTP/1.1: the outbound opens as many mTLS
# connections to the inbound), RSS sampled every 0.1 s for the peak, then after AFTER seconds.
# Builds run one after the other within a round, rounds interleave.
# Output (stdout, TSV): build round side phase vmrss_kb rssanon_kb rssfile_kb
set -euo pipefail

CONNS=${CONNS:-256}; DUR=${DUR:-4}; AFTER=${AFTER:-1 10 60}; ROUNDS=${ROUNDS:-1}; WORKERS=${WORKERS:-1}
[ $# -ge 1 ] || { sed -n 7,9p "$0" >&2; exit 64; }
for t in wrk nginx curl; do command -v $t >/dev/null || { echo "memab.sh: needs $t" >&2; exit 1; }; done
W=$(mktemp -d); PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; [ -n "${KEEPW:-}" ] || rm -rf "$W"' EXIT

B_PORT=29080; IN_PORT=29443; OUT_PORT=29001
FIRST=${1#*=}; FIRST=${FIRST%%@*}
. "$(dirname "$0")/pair_lib.sh"
pair_pki "$FIRST" server client
pair_backend 4096; PIDS+=("$BACKEND_PID")
pair_configs "$WORKERS" "" 'app_protocol = "http1"'

ulimit -n "$(ulimit -Hn)"
printf 'build\tround\tside\tphase\tvmrss_kb\trssanon_kb\trssfile_kb\n'
for round in $(seq "$ROUNDS"); do
  for spec in "$@"; do
    name=${spec%%=*}; rest=${spec#*=}; bin=${rest%%@*}; envs=()
    [[ $rest == *@* ]] && IFS=+ read -ra envs <<<"${rest#*@}"
    env "${envs[@]}" RUST_LOG=warn "$bin" proxy --config "$W/in.toml" >"$W/in.log" 2>&1 & pin=$!; PIDS+=($pin)
    wait_port $IN_PORT
    env "${envs[@]}" RUST_LOG=warn "$bin" proxy --config "$W/out.toml" >"$W/out.log" 2>&1 & pout=$!; PIDS+=($pout)
    wait_port $OUT_PORT
    curl -sS --fail -o /dev/null "http://127.0.0.1:$OUT_PORT/"
    sleep 1
    row() { printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$round" "$1" "$2" "$3" | tr ' ' '\t'; }
    row in idle "$(pair_mem $pin)"; row out idle "$(pair_mem $pout)"
    ( while :; do echo "$(pair_mem $pin) $(pair_mem $pout)"; sleep 0.1; done ) >"$W/samples" & s=$!
    wrk -t1 -c "$CONNS" -d "${DUR}s" "http://127.0.0.1:$OUT_PORT/" >"$W/wrk.txt" 2>&1 || true
    kill $s; wait $s 2>/dev/null || true
    grep -q "Requests/sec" "$W/wrk.txt" || { echo "memab.sh: $name: wrk failed: $(tail -3 "$W/wrk.txt")" >&2; }
    echo "$name round $round: $(grep -E 'requests in|Non-2xx|Socket errors' "$W/wrk.txt" | tr -s ' ' | tr '\n' ';')" >&2
    # the peak: the sample with the largest VmRSS, per side
    row in peak "$(sort -k1,1n "$W/samples" | tail -1 | cut -d' ' -f1-3)"
    row out peak "$(sort -k4,4n "$W/samples" | tail -1 | cut -d' ' -f4-6)"
    t=0
    for a in $AFTER; do
      sleep $((a - t)); t=$a
      row in "after_${a}s" "$(pair_mem $pin)"; row out "after_${a}s" "$(pair_mem $pout)"
    done
    kill -TERM $pout $pin; wait $pout $pin 2>/dev/null || true
  done
done
