#!/usr/bin/env bash
# benches/load/callgrind.sh — instructions per request of moat binaries, counted by valgrind's callgrind.
#
#   bash benches/load/callgrind.sh BIN...            # every row for each binary
#   ROWS="in_h1 pair_h2" bash benches/load/callgrind.sh BIN...
#   KEEP=/tmp/cg ROWS=in_h1 bash benches/load/callgrind.sh A B   # keep the files: callgrind_annotate A B
#   WORKERS=2 ROWS=in_h2 bash benches/load/callgrind.sh A B     # the multi-thread runtime (default: 1 worker)
#   DENYLIST=10000 ROWS="in_h1 pair_h1" bash benches/load/callgrind.sh BIN  # every sidecar enforces a deny-list
#   B_PORT=38080 IN_PORT=38443 OUT_PORT=38001 bash benches/load/callgrind.sh BIN  # other ports (defaults 28080, 28443, 28001)
#
# Why: the load harness (run.sh, ab.sh) measures CPU time, which on a shared 2-core box moves by more
# than the 2 % a data-path change is allowed. Callgrind counts instructions, the same count for the
# same binary and input whatever else the machine runs, so an A/B of two builds is exact (instructions
# are not cycles: cache misses and branch mispredictions are not in the figure; run.sh/ab.sh on a quiet
# machine still decide throughput and latency).
#
# Each row starts the proxy under callgrind (one worker thread, RUST_LOG=warn as in the harness), sends
# N1 and then, in a second run, N2 requests with curl over ONE kept-alive connection, and reports
# (I(N2) - I(N1)) / (N2 - N1): start-up, the handshake and shutdown cancel out.
#   in_h1, in_h2    curl (client cert, TLS) -> moat inbound -> nginx (HTTP/1.1)
#   pair_h1         curl (plain HTTP/1.1)    -> moat outbound -mTLS-> moat inbound -> nginx; both counted
#   pair_h2         h2load (h2c, one stream at a time) -> the same pair
#   in_h1_c32, in_h2_16x16   oha (client cert, TLS; 32 connections / 16 connections x 16 streams) -> moat inbound
#                   -> nginx: requests that overlap, as under the load harness. What one request at a time never
#                   shows: buffers still shared with a request being forwarded when the next read comes. Run with
#                   N1=2000 N2=12000; needs oha ($OHA, default: the one benches/load/run.sh installs).
# DENYLIST=N gives each sidecar an `[identity] deny_list` file of N revocations (half serials, half
# identities, none of them a certificate the rows use; as in the criterion row full/moat_denylist_10k):
# the per-request cost of enforcing a list (issue 20). The row is then named ROW+denyN. Needs a binary
# that knows `deny_list` (after 2026-12-06).
# Output: one TSV line per binary and row on stdout: bin, row, instructions/request (inbound, outbound).
set -euo pipefail

N1=${N1:-100}; N2=${N2:-1100}
DENYLIST=${DENYLIST:-0}
ROWS=${ROWS:-in_h1 in_h2 pair_h1 pair_h2}
W=$(mktemp -d); trap 'jobs -p | xargs -r kill 2>/dev/null; rm -rf "$W"' EXIT
[ $# -ge 1 ] || { sed -n 2,4p "$0" >&2; exit 64; }
for t in valgrind nginx curl h2load; do command -v $t >/dev/null || { echo "callgrind.sh: needs $t" >&2; exit 1; }; done
OHA=${OHA:-${TMPDIR:-/tmp}/moat-load/cargo-root/bin/oha}
if [[ " $ROWS " == *" in_h1_c32 "* || " $ROWS " == *" in_h2_16x16 "* ]] && [ ! -x "$OHA" ]; then
  echo "callgrind.sh: the concurrent rows need oha at $OHA (benches/load/run.sh installs it)" >&2; exit 1
fi

# PORTS="B IN OUT" moves the three ports (nginx, inbound, outbound), for two runs side by side; so do
# B_PORT, IN_PORT and OUT_PORT one by one.
read -r B_PORT IN_PORT OUT_PORT <<<"${PORTS:-${B_PORT:-28080} ${IN_PORT:-28443} ${OUT_PORT:-28001}}"
FIRST=$1
. "$(dirname "$0")/pair_lib.sh"
pair_pki "$FIRST" server client loadgen
DENY_KEY=""
if [ "$DENYLIST" -gt 0 ]; then
  # The JSON of `moat ca revoke --list --json`, made here: a CA refuses serials it never issued.
  awk -v n="$DENYLIST" -v until="$(($(date +%s) + 86400))" 'BEGIN {
    printf "{\"version\":1,\"entries\":[";
    for (i = 0; i < n; i++) {
      if (i) printf ",";
      serial = (i % 2 == 0) ? sprintf("\"serial\":\"5eed%028x\",", i) : "";
      printf "{%s\"spiffe_id\":\"spiffe://example.org/ns/revoked/sa/w%d\",\"reason\":\"bench\",\"expires\":%d}", serial, i, until;
    }
    print "]}" }' >"$W/deny.json"
  DENY_KEY="deny_list = \"$W/deny.json\""
fi

pair_backend 1024; NGINX=$BACKEND_PID

# The HTTP/1.1-to-the-app setting: `app_protocol` today, `forward_http` before it existed.
app_key() { if grep -aq app_protocol_mismatch "$1"; then echo 'app_protocol = "http1"'; else echo 'forward_http = "http1"'; fi; }

conf() { pair_configs "${WORKERS:-1}" "$DENY_KEY" "$(app_key "$1")"; } # BIN -> writes in.toml, out.toml

# A run's instructions, less aws-lc's random-byte generator (inclusive): it seeds from CPU-jitter entropy,
# whose loop runs until it has measured enough timing noise, ~430 million instructions at start-up that
# differed by ~2 million between two runs of the same binary, ±2,000 instructions per request at N2-N1 = 1,000
# (in_h1 moved 39,156 / 43,803 / 40,853 on one binary before this). Both runs call it for the same things
# (start-up, their handshakes), so what it costs beyond the jitter cancels anyway.
total() {
  local all rand
  all=$(awk '/^(summary|totals):/ {print $2; exit}' "$1")
  rand=$(callgrind_annotate --inclusive=yes "$1" 2>/dev/null | awk '/rand_bytes_impl/ {gsub(",", "", $1); print $1; exit}')
  echo $((all - ${rand:-0}))
}

run_once() { # BIN ROW N -> "IN OUT" instructions
  local bin=$1 row=$2 n=$3 pin pout=""
  RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$W/in.cg" "$bin" proxy --config "$W/in.toml" \
    >"$W/in.log" 2>&1 & pin=$!
  wait_port $IN_PORT
  if [[ $row == pair_* ]]; then
    RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$W/out.cg" "$bin" proxy --config "$W/out.toml" \
      >"$W/out.log" 2>&1 & pout=$!
    wait_port $OUT_PORT
  fi
  local tls=(-k --cert "$W/loadgen.crt" --key "$W/loadgen.key") ok=1
  case $row in
    in_h1) curl -sS --fail "${tls[@]}" --http1.1 "https://127.0.0.1:$IN_PORT/[1-$n]" >/dev/null ;;
    in_h2) curl -sS --fail "${tls[@]}" --http2 "https://127.0.0.1:$IN_PORT/[1-$n]" >/dev/null ;;
    pair_h1) curl -sS --fail --http1.1 "http://127.0.0.1:$OUT_PORT/[1-$n]" >/dev/null ;;
    # h2load, not curl: curl 7.88 fails the second request on a reused
    # prior-knowledge connection (to any h2c server, nginx's too).
    # (The clients write to a file, then grep reads it: `client | grep -q` under pipefail fails when grep
    # exits at its match before the client has written the rest, "Broken pipe", one run in a few.)
    pair_h2) h2load -n "$n" -c 1 -m 1 "http://127.0.0.1:$OUT_PORT/" >"$W/client.out" && grep -q "$n succeeded" "$W/client.out" ;;
    in_h1_c32 | in_h2_16x16)
      local load=(-c 32 --http-version 1.1); [ "$row" = in_h2_16x16 ] && load=(--http2 -c 16 -p 16)
      "$OHA" -n "$n" --no-tui --output-format json --insecure --cert "$W/loadgen.crt" --key "$W/loadgen.key" \
        "${load[@]}" "https://127.0.0.1:$IN_PORT/" >"$W/client.out" && grep -q '"successRate": *1.0' "$W/client.out" ;;
  esac 2>"$W/curl.err" || ok=0
  [ -n "$pout" ] && { kill -TERM $pout; wait $pout || true; }
  kill -TERM $pin; wait $pin || true
  local i o=0
  if [ -n "${KEEP:-}" ]; then # KEEP=DIR keeps the callgrind files, for callgrind_annotate
    mkdir -p "$KEEP"; local tag; tag=$(basename "$bin")-$row-$n
    cp "$W/in.cg" "$KEEP/$tag-in.cg"; [ -n "$pout" ] && cp "$W/out.cg" "$KEEP/$tag-out.cg"
  fi
  i=$(total "$W/in.cg")
  [ -n "$pout" ] && o=$(total "$W/out.cg")
  if [ $ok = 1 ]; then echo "$i $o"; else echo "$bin $row: curl failed: $(sort -u "$W/curl.err" | head -3)" >&2; echo "- -"; fi
}

printf 'bin\trow\tinbound_instr_per_req\toutbound_instr_per_req\n'
label() { if [ "$DENYLIST" -gt 0 ]; then echo "$1+deny$DENYLIST"; else echo "$1"; fi; }
for bin in "$@"; do
  conf "$bin"
  for row in $ROWS; do
    read -r i1 o1 < <(run_once "$bin" "$row" "$N1")
    read -r i2 o2 < <(run_once "$bin" "$row" "$N2")
    if [ "$i1" = - ] || [ "$i2" = - ]; then printf '%s\t%s\tfailed\tfailed\n' "$bin" "$(label "$row")"; continue; fi
    printf '%s\t%s\t%d\t%d\n' "$bin" "$(label "$row")" $(((i2 - i1) / (N2 - N1))) $(((o2 - o1) / (N2 - N1)))
  done
done
kill $NGINX 2>/dev/null || true
