#!/usr/bin/env python3
"""WebSocket ends for moat's tests, with the `websockets` library.

    ws_peer.py server [PORT]     echo server on 127.0.0.1:PORT (0); prints its port,
                                 then `conn PATH` for each connection
    ws_peer.py check URL [TLS]   text, binary, a 70 KB message and a ping
                                 through URL; prints one JSON line
                                 ({"refused": STATUS} if the handshake is)
    ws_peer.py hold URL [TLS]    connects and echoes each stdin line through
                                 the socket (prints `open`, then each echo);
                                 prints `closed <code>` when the far side
                                 closes, or `eof` after closing on stdin EOF
    ws_peer.py bench URL SECONDS echo round trips (64-byte messages, one at
                                 a time) for SECONDS; prints JSON (messages/s,
                                 latency percentiles)
    --quiet                      (server) no `conn` lines

TLS is `--cert C --key K --ca BUNDLE`: a client certificate, and the chain
checked against BUNDLE (no host name: moat's certificates name a SPIFFE ID).
"""

import asyncio
import json
import ssl
import sys
import time

import websockets
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve


# The bench's server: no line per connection.
QUIET = False


def tls_context(args):
    if "--cert" not in args:
        return None
    opt = lambda name: args[args.index(name) + 1]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(opt("--ca"))
    ctx.load_cert_chain(opt("--cert"), opt("--key"))
    return ctx


async def echo(ws):
    if not QUIET:
        print(f"conn {ws.request.path}", flush=True)
    try:
        async for message in ws:
            await ws.send(message)
    except websockets.ConnectionClosed:
        pass  # cut off (the sidecar's grace ran out): nothing to report


async def server(port):
    async with serve(echo, "127.0.0.1", port, max_size=None) as srv:
        port = srv.sockets[0].getsockname()[1]
        print(port, flush=True)
        await asyncio.Future()


def connect_to(url, args):
    return connect(url, ssl=tls_context(args), max_size=None, open_timeout=10)


async def check(url, args):
    result = {}
    try:
        ws = await connect_to(url, args)
    except websockets.InvalidStatus as e:
        print(json.dumps({"refused": e.response.status_code}), flush=True)
        return
    async with ws:
        await ws.send("hello")
        result["text"] = await ws.recv()
        await ws.send(b"\x00\x01\xfe\xff")
        result["binary"] = list(await ws.recv())
        big = bytes(i % 251 for i in range(70_000))
        await ws.send(big)
        back = await ws.recv()
        result["big_len"] = len(back)
        result["big_same"] = back == big
        pong = await ws.ping(b"are you there")
        await asyncio.wait_for(pong, 10)
        result["pong"] = True
    print(json.dumps(result), flush=True)


async def hold(url, args):
    loop = asyncio.get_running_loop()
    async with connect_to(url, args) as ws:
        print("open", flush=True)
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
        )
        closed = asyncio.ensure_future(ws.wait_closed())
        while True:
            line = asyncio.ensure_future(reader.readline())
            done, _ = await asyncio.wait(
                {line, closed}, return_when=asyncio.FIRST_COMPLETED
            )
            if closed in done:
                print(f"closed {ws.close_code}", flush=True)
                return
            text = line.result()
            if not text:
                await ws.close()
                print("eof", flush=True)
                return
            try:
                await ws.send(text.decode().strip())
                print(await ws.recv(), flush=True)
            except websockets.ConnectionClosed as e:
                print(f"closed {e.rcvd.code if e.rcvd else 1006}", flush=True)
                return


async def bench(url, seconds, args):
    latencies = []
    async with connect_to(url, args) as ws:
        payload = b"x" * 64
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            start = time.perf_counter()
            await ws.send(payload)
            await ws.recv()
            latencies.append(time.perf_counter() - start)
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    print(
        json.dumps(
            {
                "messages": len(latencies),
                "messages_per_s": len(latencies) / seconds,
                "p50_ms": pick(0.50) * 1000,
                "p99_ms": pick(0.99) * 1000,
            }
        ),
        flush=True,
    )


def main():
    global QUIET
    cmd, args = sys.argv[1], sys.argv[2:]
    QUIET = "--quiet" in args
    args = [a for a in args if a != "--quiet"]
    if cmd == "server":
        asyncio.run(server(int(args[0]) if args else 0))
    elif cmd == "check":
        asyncio.run(check(args[0], args[1:]))
    elif cmd == "hold":
        asyncio.run(hold(args[0], args[1:]))
    elif cmd == "bench":
        asyncio.run(bench(args[0], float(args[1]), args[2:]))
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
