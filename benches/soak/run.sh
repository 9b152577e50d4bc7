#!/usr/bin/env bash
# benches/soak/run.sh — a bounded soak of the two-sidecar path on loopback,
# with short certificate lifetimes and policy rewrites, so several renewals
# and reloads happen under steady traffic.
#
#   bash benches/soak/run.sh                   # 5 minutes at 100 req/s
#   MINUTES=2 RATE=50 bash benches/soak/run.sh
#
#   load.py ─plain─> A (outbound) ─mTLS─> B (inbound + policy) ─plain─> python http.server
#   both sidecars get their certificates from `moat ca serve` with ttl=$TTL
#   (renewal at about half of it), and B's policy file is replaced by an
#   editor-style write-rename every $POLICY_EVERY seconds.
#
# Asserts nothing itself; writes $OUT (default benches/soak/results.md):
# requests, failures (and their statuses), renewals, policy reloads, and RSS
# and open file descriptors of both sidecars, first minute vs last minute.
# Debug binary by default (MOAT=target/release/moat for release).
# Every process started here is stopped by PID on exit.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
MOAT=${MOAT:-$REPO/target/debug/moat}
MINUTES=${MINUTES:-5}
SECONDS_TOTAL=${SECONDS_TOTAL:-$((MINUTES * 60))}   # override for a smoke run
RATE=${RATE:-100}
TTL=${TTL:-20s}
POLICY_EVERY=${POLICY_EVERY:-15}
OUT=${OUT:-$HERE/results.md}
W=$(mktemp -d /tmp/moat-soak.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT

[ -x "$MOAT" ] || { echo "build first: cargo build (or set MOAT=)"; exit 1; }

# Waits for a JSON "listening" line for listener $2 in log $1; prints the address.
addr_of() {
  for _ in $(seq 1 200); do
    a=$(grep -h '"message":"listening"' "$1" 2>/dev/null | grep "\"listener\":\"$2\"" | head -1 \
        | sed -E 's/.*"addr":"([^"]+)".*/\1/')
    [ -n "$a" ] && { echo "$a"; return 0; }
    sleep 0.1
  done
  echo "no listener $2 in $1" >&2; cat "$1" >&2; exit 1
}

"$MOAT" ca init --dir "$W/ca" --trust-domain example.org >/dev/null
RUST_LOG=info "$MOAT" ca serve --dir "$W/ca" --listen 127.0.0.1:0 --admin 127.0.0.1:0 2>"$W/ca.log" &
PIDS+=($!)
CA=$(addr_of "$W/ca.log" ca)
"$MOAT" ca bundle --dir "$W/ca" >"$W/bundle.pem"
# Tokens are single use; the sidecars renew over mTLS with their current certificate.
"$MOAT" ca token --dir "$W/ca" --id spiffe://example.org/ns/soak/sa/a --ttl 1h >"$W/a.token"
"$MOAT" ca token --dir "$W/ca" --id spiffe://example.org/ns/soak/sa/b --ttl 1h >"$W/b.token"

mkdir -p "$W/www"; head -c 512 /dev/urandom | base64 >"$W/www/data.txt"
python3 -u -m http.server 0 --bind 127.0.0.1 --directory "$W/www" >"$W/svc.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do SVC_PORT=$(sed -nE 's/.* port ([0-9]+) .*/\1/p' "$W/svc.log" | head -1); [ -n "$SVC_PORT" ] && break; sleep 0.1; done

policy() { # $1: a comment that changes the file's hash, not its meaning
  cat <<P
# generation $1
[[route]]
name = "data"
path = "/data.txt"
methods = ["GET"]
peers = ["spiffe://example.org/ns/soak/sa/a"]
P
}
policy 0 >"$W/policy.toml"

identity() { printf '[identity]\nca_url = "https://%s"\nbundle = "%s"\ntoken_file = "%s"\nttl = "%s"\nretry_base = "200ms"\nretry_max = "2s"\n' "$CA" "$W/bundle.pem" "$W/$1.token" "$TTL"; }
{ identity b; printf '[admin]\nlisten = "127.0.0.1:0"\n\n[[inbound]]\nname = "in"\nlisten = "127.0.0.1:0"\nforward = "127.0.0.1:%s"\npolicy = "%s"\n' "$SVC_PORT" "$W/policy.toml"; } >"$W/b.toml"
RUST_LOG=info "$MOAT" proxy --config "$W/b.toml" 2>"$W/b.log" &
B_PID=$!; PIDS+=($B_PID)
B_IN=$(addr_of "$W/b.log" in)
{ identity a; printf '[admin]\nlisten = "127.0.0.1:0"\n\n[[outbound]]\nname = "out"\nlisten = "127.0.0.1:0"\nupstream = "%s"\npeer = "spiffe://example.org/ns/soak/sa/b"\n' "$B_IN"; } >"$W/a.toml"
RUST_LOG=info "$MOAT" proxy --config "$W/a.toml" 2>"$W/a.log" &
A_PID=$!; PIDS+=($A_PID)
A_OUT=$(addr_of "$W/a.log" out)
for _ in $(seq 1 100); do curl -sf "http://$A_OUT/data.txt" -o /dev/null && break; sleep 0.2; done

# Samples: every 10 s, RSS (kB) and open fds of both sidecars.
(
  while true; do
    t=$(date +%s)
    for who in a b; do
      pid=$([ $who = a ] && echo $A_PID || echo $B_PID)
      rss=$(awk '/VmRSS/ {print $2}' /proc/$pid/status 2>/dev/null)
      fds=$(ls /proc/$pid/fd 2>/dev/null | wc -l)
      echo "$t $who $rss $fds"
    done >>"$W/samples.txt"
    sleep 10
  done
) &
PIDS+=($!)

# Policy rewrites (write a temp file, rename over the watched one).
(
  g=1
  while true; do
    sleep "$POLICY_EVERY"
    policy $g >"$W/.policy.toml.tmp" && mv "$W/.policy.toml.tmp" "$W/policy.toml"
    g=$((g + 1))
  done
) &
PIDS+=($!)

START=$(date +%s)
python3 "$HERE/load.py" "$A_OUT" "$RATE" "$SECONDS_TOTAL" >"$W/load.json"
END=$(date +%s)

renewals_a=$(grep -c '"certificate issued"\|"certificate renewed"' "$W/a.log")
renewals_b=$(grep -c '"certificate issued"\|"certificate renewed"' "$W/b.log")
reloads=$(grep -c '"policy reloaded"' "$W/b.log")
python3 - "$W/load.json" "$W/samples.txt" "$START" "$END" "$renewals_a" "$renewals_b" "$reloads" "$OUT" "$SECONDS_TOTAL" "$RATE" "$TTL" "$POLICY_EVERY" "$MOAT" <<'PY'
import json, sys
load = json.load(open(sys.argv[1]))
start, end = int(sys.argv[3]), int(sys.argv[4])
ra, rb, reloads = sys.argv[5], sys.argv[6], sys.argv[7]
out, secs, rate, ttl, pe, moat = sys.argv[8:14]
rows = [l.split() for l in open(sys.argv[2]) if len(l.split()) == 4]
def window(who, lo, hi):
    s = [(int(r[2]), int(r[3])) for r in rows if r[1] == who and lo <= int(r[0]) < hi]
    if not s: return "n/a", "n/a"
    return f"{min(x for x,_ in s)}–{max(x for x,_ in s)}", f"{min(y for _,y in s)}–{max(y for _,y in s)}"
lines = [
  "# moat soak results", "",
  f"Command: `SECONDS_TOTAL={secs} RATE={rate} TTL={ttl} POLICY_EVERY={pe} bash benches/soak/run.sh` (binary: `{moat}`)", "",
  f"- duration: {end - start} s at a target of {rate} req/s (keep-alive, 4 client connections)",
  f"- requests: {load['total']}; ok (200): {load['ok']}; failed: {load['failed']}",
  f"- failures by status (0 = connection error): {json.dumps(load['by_status'])}",
  f"- failures by minute: {json.dumps(load['failed_by_minute'])}",
  f"- certificates issued/renewed: sidecar A {ra}, sidecar B {rb} (ttl {ttl})",
  f"- policy reloads applied on B: {reloads} (a write-rename every {pe} s)",
  "", "| sidecar | RSS kB, first minute | RSS kB, last minute | open fds, first minute | open fds, last minute |",
  "|---|---|---|---|---|",
]
for who in ("a", "b"):
    r1, f1 = window(who, start, start + 60)
    r2, f2 = window(who, end - 60, end + 1)
    lines.append(f"| {who.upper()} | {r1} | {r2} | {f1} | {f2} |")
lines.append("")
open(out, "w").write("\n".join(lines))
print("\n".join(lines))
PY
echo "work dir (logs): $W"
