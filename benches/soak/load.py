"""Steady-rate HTTP/1.1 keep-alive load for benches/soak/run.sh.

load.py HOST:PORT RATE SECONDS -> JSON on stdout: totals, failures by
status and by minute. Four client threads share the rate; a failed
connection is counted and reopened.
"""
import http.client, json, sys, threading, time

addr, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
host, port = addr.rsplit(":", 1)
THREADS = 4
lock = threading.Lock()
stats = {"total": 0, "ok": 0, "failed": 0, "by_status": {}, "failed_by_minute": {}}
t0 = time.monotonic()

def record(status):
    with lock:
        stats["total"] += 1
        if status == 200:
            stats["ok"] += 1
        else:
            stats["failed"] += 1
            stats["by_status"][str(status)] = stats["by_status"].get(str(status), 0) + 1
            m = str(int((time.monotonic() - t0) // 60))
            stats["failed_by_minute"][m] = stats["failed_by_minute"].get(m, 0) + 1

def worker(i):
    interval = THREADS / rate
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    nxt = t0 + i * interval / THREADS
    while True:
        now = time.monotonic()
        if now - t0 >= seconds:
            return
        if nxt > now:
            time.sleep(nxt - now)
        nxt += interval
        try:
            conn.request("GET", "/data.txt")
            r = conn.getresponse()
            r.read()
            record(r.status)
        except Exception:
            record(0)
            conn.close()
            conn = http.client.HTTPConnection(host, int(port), timeout=10)

threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
for t in threads: t.start()
for t in threads: t.join()
json.dump(stats, sys.stdout)
