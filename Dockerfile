# syntax=docker/dockerfile:1
#
# moat: one static binary in an empty image. No shell, no package manager,
# no libc to patch; it runs as UID/GID 65532 and is meant to run with a
# read-only root filesystem (every example in config/ sets one).
#
#   DOCKER_BUILDKIT=1 docker build -t moat:0.1.0 .
#   docker run --rm --read-only moat:0.1.0 --version
#
# Nothing secret is needed to build, and nothing secret goes into a layer:
# keys, tokens and bundles are mounted at run time (Kubernetes volumes, systemd
# credentials). The cargo caches are BuildKit cache mounts, not layers.

ARG RUST_IMAGE=rust:1.95-bookworm

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# glibc, linked statically (crt-static): aws-lc and SQLite are C and build
# with the image's gcc. Profile-guided: scripts/pgo-build.sh builds moat
# instrumented, runs it as an inbound and an outbound sidecar under a
# training load (loopback only, ~20 s), and builds it again with that
# profile — 10-15 % less CPU per request on the load bench (README,
# Benchmarks). Its explicit --target keeps RUSTFLAGS away from build scripts
# and proc macros, which must stay dynamic.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    rustup component add llvm-tools \
 && RUSTFLAGS="-C target-feature=+crt-static" bash scripts/pgo-build.sh \
 && cp target/pgo/moat /moat \
 && strip /moat \
 && { ldd /moat 2>&1 | grep -Eq 'not a dynamic executable|statically linked' \
      || { echo "moat is not static:"; ldd /moat; exit 1; }; } \
 && /moat --version

# Checked outside Docker (no daemon there): this static binary, alone in an
# empty root with /etc/hosts, /etc/resolv.conf and /dev/{null,random,urandom}
# as container runtimes provide them, ran `moat ca init`, `moat ca serve` and a
# `moat proxy` that resolved the CA by name and got its certificate, as UID
# 65532. A static binary's randomness comes from /dev/urandom (the getrandom
# crate cannot find glibc's getrandom() by dlsym), so /dev must be the runtime's.
FROM scratch
COPY --from=build --chown=0:0 --chmod=0555 /moat /moat
# Numeric, so runAsNonRoot can be verified without an /etc/passwd.
USER 65532:65532
ENTRYPOINT ["/moat"]
CMD ["--help"]
