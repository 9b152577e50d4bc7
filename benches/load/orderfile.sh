#!/usr/bin/env bash
# benches/load/orderfile.sh — a linker symbol-ordering file that puts the code a sidecar runs to start and serve its
# first requests next to each other, so that its idle RSS is that code and not the 64 KiB blocks around every
# function it touched (issue 22: on a release build, 1.8 MiB of functions executed, on 4.5 MiB of pages, mapped as
# 12 MiB of 64 KiB fault-around blocks and folios; ordered, 3 MiB of text resident). Runs BIN under callgrind
# (--dump-instr) as an inbound and an outbound of a pair (pair_lib.sh): start, one HTTP/1.1 request through the pair,
# one HTTP/2 request straight to the inbound, 2 s idle, stop; every function of BIN that executed an instruction in
# either process is written out (mangled), those both ran first, each group by instructions executed.
#
#   bash benches/load/orderfile.sh target/release/moat >/tmp/moat.order
#   cargo rustc --release --bin moat -- -C link-arg=-Wl,--symbol-ordering-file=/tmp/moat.order \
#       -C link-arg=-Wl,--no-warn-symbol-ordering                    # rust-lld (rustc's default linker here)
#
# Symbol names carry a hash of the crate, so the file fits the build it was made from (same source, same flags);
# symbols the linker no longer finds are skipped. Needs valgrind, nginx, curl (with HTTP/2), python3.
#
#   bash benches/load/orderfile.sh --check target/release/moat [scripts/moat.order]
#
# --check: how many of the order file's names BIN has (nm). The linker skips missing names silently, and a file
# that lost the hot ones costs idle memory (13.8 instead of 8.2 MiB in run 22): remake it when this falls under
# ~95 % (a new toolchain or a changed Cargo.lock renames every symbol of the crates it touches).
set -euo pipefail

if [ "${1:-}" = --check ]; then
  [ $# -ge 2 ] || { sed -n 17p "$0" >&2; exit 64; }
  ORDER=${3:-$(cd "$(dirname "$0")/../.." && pwd)/scripts/moat.order}
  nm --defined-only "$2" | awk 'NR == FNR { have[$3] = 1; next } NF { n++; if ($1 in have) f++; else miss[++m] = $1 }
    END { printf "%d of %d names in %s found in the binary (%.1f %%)\n", f, n, FILENAME, n ? 100 * f / n : 0
          for (i = 1; i <= m && i <= 5; i++) print "  missing: " miss[i]
          exit (n && f / n < 0.95) ? 1 : 0 }' - "$ORDER"
  exit
fi
[ $# -eq 1 ] || { sed -n 10,12p "$0" >&2; exit 64; }
BIN=$(realpath "$1")
for t in valgrind nginx curl python3; do command -v $t >/dev/null || { echo "orderfile.sh: needs $t" >&2; exit 1; }; done
HERE=$(cd "$(dirname "$0")" && pwd)
W=$(mktemp -d /tmp/orderfile.XXXXXX); PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; [ -n "${KEEPW:-}" ] || rm -rf "$W"' EXIT

B_PORT=${B_PORT:-29480}; IN_PORT=${IN_PORT:-29843}; OUT_PORT=${OUT_PORT:-29844}
. "$HERE/pair_lib.sh"
pair_pki "$BIN" server client
pair_backend 64; PIDS+=("$BACKEND_PID")
pair_configs 1 "" 'app_protocol = "http1"'

cg() { RUST_LOG=warn exec valgrind --tool=callgrind --dump-instr=yes --demangle=no --compress-pos=no \
  --compress-strings=no --callgrind-out-file="$W/cg.$1" "$BIN" proxy --config "$W/$1.toml" >"$W/$1.log" 2>&1; }
cg in & pin=$!; PIDS+=($pin); wait_port $IN_PORT
cg out & pout=$!; PIDS+=($pout); wait_port $OUT_PORT
curl -sf -o /dev/null "http://127.0.0.1:$OUT_PORT/"
curl -sfk --http2 --cert "$W/client.crt" --key "$W/client.key" -o /dev/null "https://127.0.0.1:$IN_PORT/"
sleep 2
# Where valgrind loaded BIN (a PIE): callgrind gives addresses relative to the object for code in its `.text`, but
# absolute ones, under `ob=???`, for code in other text sections (a profile-guided build's .text.hot, .text.unlikely).
# Only addresses inside BIN's executable mapping are taken from those.
base=$(awk -v b="$BIN" '$6 == b && $3 == "00000000" { split($1, r, "-"); print r[1]; exit }' /proc/$pin/maps)
text=$(awk -v b="$BIN" '$6 == b && $2 ~ /x/ { print $1; exit }' /proc/$pin/maps)
kill -TERM $pin $pout; wait $pin $pout || true

python3 - "$BIN" "${base:-0}" "${text:-0-0}" "$W/cg.in" "$W/cg.out" <<'EOF'
import bisect, collections, subprocess, sys
exe, base, runs = sys.argv[1], int(sys.argv[2], 16), sys.argv[4:]
lo, hi = (int(x, 16) for x in sys.argv[3].split("-"))
addrs, names = [], []
for line in subprocess.run(["nm", "-n", "--defined-only", exe], capture_output=True, text=True).stdout.splitlines():
    p = line.split(" ", 2)
    if len(p) == 3 and p[1] in "tTwW":
        addrs.append(int(p[0], 16))
        names.append(p[2])
cost, seen = collections.Counter(), collections.Counter()
for run in runs:
    ours, unknown, call, here = False, False, False, set()
    for line in open(run):
        if line.startswith("ob="):
            ours = line.rstrip().endswith(exe)
            unknown = line.rstrip() == "ob=???"
        elif line.startswith("calls="):
            call = True  # the next line is the call site, with the callee's inclusive cost
        elif (ours or unknown) and line.startswith("0x"):
            f = line.split()  # address, line, instructions
            a = int(f[0], 16)
            if unknown and not lo <= a < hi:
                call = False
                continue
            a -= base if unknown else 0
            i = bisect.bisect_right(addrs, a) - 1
            if i >= 0:
                cost[names[i]] += 1 if call else int(f[-1])
                here.add(names[i])
            call = False
    seen.update(here)
if not cost:
    sys.exit("orderfile.sh: no instructions of " + exe + " in the callgrind output")
for name in sorted(cost, key=lambda n: (-seen[n], -cost[n])):
    print(name)
EOF
