#!/usr/bin/env python3
"""Bulk transfers for benches/load/run.sh (phase "bulk", issue 22): both ends of a 1 GiB download and
a 1 GiB upload, with nothing buffered (a fixed 1 MiB buffer each side, no file on disk).

  bulk.py server PORT
      HTTP/1.1 on 127.0.0.1:PORT. `GET /bytes/N` answers N zero bytes (Content-Length N);
      `PUT` or `POST` with a Content-Length body reads and discards it and answers its size.
      One thread per connection, keep-alive.
  bulk.py client HOST PORT get|put BYTES [--tls CERT KEY]
      One request over one connection; prints a JSON line: bytes, seconds, MB/s (10^6 bytes/s),
      status, the client's own CPU seconds. With --tls it speaks TLS 1.3 with that client certificate
      (the server's certificate is not verified: moat's carry a SPIFFE URI SAN only, no name to check).
"""
import json
import os
import socket
import socketserver
import ssl
import sys
import time

BUF = 1 << 20


class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        s = self.request
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rf = s.makefile("rb", buffering=BUF)
        zeros = memoryview(bytes(BUF))
        sink = bytearray(BUF)
        while True:
            line = rf.readline(8192)
            if not line:
                return
            method, target = line.split()[:2]
            length, chunked = 0, False
            while True:
                h = rf.readline(8192)
                if h in (b"\r\n", b"\n", b""):
                    break
                k, _, v = h.partition(b":")
                k = k.strip().lower()
                if k == b"content-length":
                    length = int(v)
                elif k == b"transfer-encoding" and b"chunked" in v.lower():
                    chunked = True
            if method == b"GET" and target.startswith(b"/bytes/"):
                n = int(target[len(b"/bytes/"):])
                s.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                          b"Content-Length: %d\r\n\r\n" % n)
                while n:
                    k = min(n, BUF)
                    s.sendall(zeros[:k])
                    n -= k
                continue
            got = 0
            if chunked:  # a proxy may re-frame an upload; read it all the same
                while True:
                    size = int(rf.readline(1024).split(b";")[0], 16)
                    if size == 0:
                        while rf.readline(8192) not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        break
                    while size:
                        k = rf.readinto(memoryview(sink)[:min(size, BUF)])
                        if not k:
                            return
                        size -= k
                        got += k
                    rf.readline(1024)
            else:
                left = length
                while left:
                    k = rf.readinto(memoryview(sink)[:min(left, BUF)])
                    if not k:
                        return
                    left -= k
                    got += k
            body = b"%d\n" % got
            s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128


def client(host, port, op, n, tls):
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(*tls)
        ctx.set_alpn_protocols(["http/1.1"])
        sock = ctx.wrap_socket(sock)
    cpu0, t0 = time.process_time(), time.monotonic()
    buf = bytearray(BUF)
    if op == "get":
        sock.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: bulk\r\n\r\n" % n)
    else:
        sock.sendall(b"PUT /upload HTTP/1.1\r\nHost: bulk\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Length: %d\r\n\r\n" % n)
        zeros, left = memoryview(bytes(BUF)), n
        while left:
            k = min(left, BUF)
            sock.sendall(zeros[:k])
            left -= k
    # response head (and, for get, the body)
    head = b""
    while b"\r\n\r\n" not in head:
        k = sock.recv_into(buf)
        if not k:
            raise SystemExit("connection closed before the response head")
        head += bytes(buf[:k])
    head, _, rest = head.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    got, left = len(rest), length - len(rest)
    view = memoryview(buf)
    while left > 0:
        k = sock.recv_into(view[:min(left, BUF)])
        if not k:
            break
        got += k
        left -= k
    secs = time.monotonic() - t0
    cpu = time.process_time() - cpu0
    moved = got if op == "get" else n
    ok = status == 200 and (op != "get" or got == n)
    print(json.dumps(dict(op=op, bytes=moved, seconds=round(secs, 4), mb_s=round(moved / secs / 1e6, 1),
                          status=status, ok=ok, client_cpu_s=round(cpu, 3))))
    sock.close()
    return 0 if ok else 1


def main():
    a = sys.argv[1:]
    if a[:1] == ["server"]:
        with Server(("127.0.0.1", int(a[1])), Handler) as srv:
            srv.serve_forever()
    elif a[:1] == ["client"] and len(a) >= 5:
        tls = (a[a.index("--tls") + 1], a[a.index("--tls") + 2]) if "--tls" in a else None
        return client(a[1], int(a[2]), a[3], int(a[4]), tls)
    else:
        sys.stderr.write(__doc__)
        return 64


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
