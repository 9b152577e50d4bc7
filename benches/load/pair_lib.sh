# benches/load/pair_lib.sh — what the small benches (callgrind.sh, memab.sh, idlemem.sh, textmem.sh,
# faults.sh, orderfile.sh) share, sourced by them: a PKI from `moat ca`, an nginx backend, the
# configurations of a sidecar pair (outbound -> mTLS -> inbound -> nginx), the first request, and RSS
# read from /proc. Every function writes under $W; the ports are $B_PORT (nginx), $IN_PORT, $OUT_PORT.

# pair_pki BIN ID...: a CA in $W/ca, $W/ID.crt and $W/ID.key for each spiffe://example.org/ID, and
# $W/bundle.pem.
pair_pki() {
  local bin=$1 id; shift
  "$bin" ca init --dir "$W/ca" --trust-domain example.org >/dev/null 2>&1
  for id in "$@"; do
    "$bin" ca issue --dir "$W/ca" --id "spiffe://example.org/$id" --ttl 24h \
      --cert-out "$W/$id.crt" --key-out "$W/$id.key" >/dev/null 2>&1
  done
  "$bin" ca bundle --dir "$W/ca" >"$W/bundle.pem" 2>/dev/null
}

# wait_port PORT: until something listens on 127.0.0.1:PORT (at most 60 s).
wait_port() {
  for _ in $(seq 600); do ss -ltnH "sport = :$1" | grep -q . && return 0; sleep 0.1; done
  echo "port $1 never opened" >&2; return 1
}

# pair_backend CONNS: nginx on $B_PORT answering 200 to everything, for up to CONNS connections, started
# in the background; its PID in $BACKEND_PID, and returns once it listens.
pair_backend() {
  mkdir -p "$W/run"
  cat >"$W/nginx.conf" <<CONF
daemon off; master_process off; pid $W/run/nginx.pid; error_log $W/run/nginx.err warn;
worker_rlimit_nofile $1; events { worker_connections $1; }
http { access_log off; keepalive_requests 1000000; client_body_temp_path $W/run/b; proxy_temp_path $W/run/p;
  fastcgi_temp_path $W/run/f; uwsgi_temp_path $W/run/u; scgi_temp_path $W/run/s;
  server { listen 127.0.0.1:$B_PORT; default_type text/plain; location / { return 200 "hello from backend\n"; } } }
CONF
  nginx -c "$W/nginx.conf" -p "$W/run/" & BACKEND_PID=$!
  wait_port "$B_PORT"
}

# pair_configs WORKERS IDENTITY_EXTRA INBOUND_EXTRA: $W/in.toml (identity `server`, forwarding to nginx)
# and $W/out.toml (identity `client`, to the inbound, pinned to `server`), each with WORKERS worker
# threads; IDENTITY_EXTRA goes into both [identity] tables, INBOUND_EXTRA into the [[inbound]] one.
pair_configs() {
  cat >"$W/in.toml" <<CONF
[runtime]
worker_threads = $1
[identity]
cert = "$W/server.crt"
key = "$W/server.key"
bundle = "$W/bundle.pem"
$2
[admin]
listen = "127.0.0.1:0"
[[inbound]]
name = "in"
listen = "127.0.0.1:$IN_PORT"
forward = "127.0.0.1:$B_PORT"
protocol = "http"
$3
CONF
  cat >"$W/out.toml" <<CONF
[runtime]
worker_threads = $1
[identity]
cert = "$W/client.crt"
key = "$W/client.key"
bundle = "$W/bundle.pem"
$2
[admin]
listen = "127.0.0.1:0"
[[outbound]]
name = "out"
listen = "127.0.0.1:$OUT_PORT"
upstream = "127.0.0.1:$IN_PORT"
peer = "spiffe://example.org/server"
protocol = "http"
CONF
}

# pair_first_request: once the inbound listens on $IN_PORT, one HTTP/1.1 request to it over mTLS as
# `client`. "Idle" in the memory benches is a proxy that has served once, as in the load harness.
pair_first_request() {
  wait_port "$IN_PORT" || return 1
  curl -sk --cert "$W/client.crt" --key "$W/client.key" -o /dev/null "https://127.0.0.1:$IN_PORT/"
}

# pair_mem PID: "VmRSS RssAnon RssFile" of PID in kB (RssAnon: heap, stacks, buffers; RssFile: the
# binary's and libraries' resident pages); "0 0 0" once the process is gone.
pair_mem() {
  awk '/^VmRSS/{v=$2} /^RssAnon/{a=$2} /^RssFile/{f=$2} END{print v+0, a+0, f+0}' "/proc/$1/status" 2>/dev/null \
    || echo "0 0 0"
}
