#!/usr/bin/env bash
# scripts/pgo-build.sh — build the moat that ships: the `dist` profile with
# profile-guided optimization (PGO).
#
#   bash scripts/pgo-build.sh        # -> target/pgo/moat (and target/pgo/moat.profdata)
#
# 1. an instrumented `dist` build (target/pgo-gen) that counts which branches
#    and calls the running code takes;
# 2. `pgo-train` (tools/pgo_train.rs, built normally) runs it as a CA and an
#    inbound and an outbound sidecar bootstrapped from it, and sends them a
#    sidecar's everyday work: HTTP/1.1 and HTTP/2 over mutual TLS with and
#    without a route policy (allowed, denied, malformed and JWT-guarded
#    requests), new connections, a paced trickle, the sidecar pair, TCP mode,
#    large uploads; it fails if any of it did not answer as expected;
# 3. llvm-profdata merges what the processes wrote when they stopped;
# 4. the `dist` build again (target/pgo-use), compiled with that profile and
#    linked with the code a sidecar runs placed together (build.rs).
#
# Needs: cargo, and llvm-profdata from rustup's llvm-tools component (added
# here if missing). Takes about two `dist` builds plus ~15 s of training.
# RUSTFLAGS from the environment (the Dockerfile's crt-static) apply to both
# moat builds. An explicit --target keeps RUSTFLAGS off build scripts and
# proc macros, so only moat's own code is instrumented and optimized.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${PGO_OUT:-$REPO/target/pgo}
SCALE=${PGO_SCALE:-10}
BASE_RUSTFLAGS=${RUSTFLAGS:-}
HOST=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA=$(rustc --print sysroot)/lib/rustlib/$HOST/bin/llvm-profdata
log() { printf '[pgo %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
cd "$REPO"

if [ ! -x "$PROFDATA" ]; then
  log "rustup component add llvm-tools (for llvm-profdata)"
  rustup component add llvm-tools >&2
  [ -x "$PROFDATA" ] || { log "no llvm-profdata at $PROFDATA"; exit 1; }
fi

rm -rf "$OUT/profiles" "$OUT/train"
mkdir -p "$OUT/profiles"

log "1/4 instrumented build (target/pgo-gen)"
RUSTFLAGS="$BASE_RUSTFLAGS -Cprofile-generate=$OUT/profiles" CARGO_TARGET_DIR="$REPO/target/pgo-gen" \
  cargo build --profile dist --locked --bin moat --target "$HOST"

log "2/4 training: pgo-train drives the instrumented sidecars"
env -u RUSTFLAGS cargo build --release --locked --bin pgo-train
"$REPO/target/release/pgo-train" --moat "$REPO/target/pgo-gen/$HOST/dist/moat" \
  --dir "$OUT/train" --scale "$SCALE"

log "3/4 merge $(ls "$OUT/profiles" | wc -l) profiles"
"$PROFDATA" merge -o "$OUT/moat.profdata" "$OUT/profiles"

# The code layout (build.rs): scripts/moat-pgo.order and scripts/moat.order
# list the functions a sidecar runs to start and serve its first requests
# (benches/load/orderfile.sh), by their names in a profile-guided and in a
# plain release build. A name ends in a hash of its crate's build, which
# flags change: each is matched here, hash aside, to this build's names (the
# instrumented binary's, which the optimized one shares; a generic function's
# every instance). Then the rest of what training ran.
"$(dirname "$PROFDATA")/llvm-nm" --defined-only "$REPO/target/pgo-gen/$HOST/dist/moat" \
  | awk '{ print $NF }' >"$OUT/names"
"$PROFDATA" show --all-functions --covered "$OUT/moat.profdata" | sed 's/^.*;//' >"$OUT/covered"
awk 'function key(s) { sub(/17h[0-9a-f]{16}E$/, "", s); return s }
     FILENAME == ARGV[1] { names[key($0)] = names[key($0)] $0 "\n"; next }
     { k = key($0); if (k in names) printf "%s", names[k]; else print }' \
  "$OUT/names" "$REPO/scripts/moat-pgo.order" "$REPO/scripts/moat.order" | cat - "$OUT/covered" | awk 'NF && !seen[$0]++' >"$OUT/moat.order"
rm -f "$OUT/names" "$OUT/covered"

log "4/4 optimized build (target/pgo-use), $(wc -l <"$OUT/moat.order") functions ordered"
RUSTFLAGS="$BASE_RUSTFLAGS -Cprofile-use=$OUT/moat.profdata" CARGO_TARGET_DIR="$REPO/target/pgo-use" \
  MOAT_SYMBOL_ORDER="$OUT/moat.order" cargo build --profile dist --locked --bin moat --target "$HOST"

cp "$REPO/target/pgo-use/$HOST/dist/moat" "$OUT/moat"
rm -rf "$OUT/train"
log "built $OUT/moat ($("$OUT/moat" --version))"
