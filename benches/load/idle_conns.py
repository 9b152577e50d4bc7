#!/usr/bin/env python3
"""Opens N idle mTLS connections to 127.0.0.1:PORT, each after one HTTP/1.1 keep-alive request,
holds them, then closes them. Bounded: at most --timeout seconds in all.

Used by benches/load/run.sh to read a proxy's RSS with 1,000 and 10,000 idle peers. The server certificate is
not verified (moat certificates carry a SPIFFE URI SAN only, no name to check); the client
certificate is presented, and the server verifies it.
"""
import argparse
import asyncio
import ssl
import sys
import time


async def one(port, ctx, sem, conns, errors):
    async with sem:
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), 10)
            w.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await w.drain()
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            n = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    n = int(line.split(b":")[1])
            if n:
                await asyncio.wait_for(r.readexactly(n), 10)
            if not head.startswith(b"HTTP/1.1 200"):
                errors.append(head.split(b"\r\n")[0].decode(errors="replace"))
            conns.append((r, w))
        except Exception as e:  # noqa: BLE001 — counted and reported
            errors.append(type(e).__name__ + ": " + str(e)[:80])


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--hold", type=float, default=5.0)
    ap.add_argument("--parallel", type=int, default=32)
    ap.add_argument("--ready-file")
    ap.add_argument("--timeout", type=float, default=110, help="seconds for the whole run")
    a = ap.parse_args()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(a.cert, a.key)
    ctx.set_alpn_protocols(["http/1.1"])
    sem = asyncio.Semaphore(a.parallel)
    conns, errors = [], []
    t0 = time.monotonic()
    await asyncio.gather(*(one(a.port, ctx, sem, conns, errors) for _ in range(a.conns)))
    t_open = time.monotonic() - t0
    if a.ready_file:
        with open(a.ready_file, "w") as f:
            f.write("%d\n" % len(conns))
    await asyncio.sleep(a.hold)
    # still open? a closed connection reads EOF at once
    alive = 0
    for r, _ in conns:
        try:
            await asyncio.wait_for(r.read(1), 0.001)
        except asyncio.TimeoutError:
            alive += 1
        except Exception:  # noqa: BLE001
            pass
    for _, w in conns:
        w.close()
    print("opened %d/%d in %.2fs, %d still open after %.0fs hold, errors=%d %s"
          % (len(conns), a.conns, t_open, alive, a.hold, len(errors), sorted(set(errors))[:3]))


async def bounded():
    await asyncio.wait_for(main(), float(sys.argv[sys.argv.index("--timeout") + 1]) if "--timeout" in sys.argv else 110)


if __name__ == "__main__":
    try:
        asyncio.run(bounded())
    except asyncio.TimeoutError:
        print("timed out", file=sys.stderr)
        sys.exit(1)
