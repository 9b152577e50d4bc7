#!/usr/bin/env python3
"""One oha run -> one TSV row for benches/load/run.sh (see the header printed there).

argv: oha-json label group target conc oha-rc clk_tck has-proxy snap0 snap1 oha-sqlite warm-seconds extra-file
      client-sat-pct

A snapshot is "epoch in_ticks out_ticks backend_ticks srv_busy srv_total cli_busy cli_total rss_kb hwm_kb oha_ticks
proxy_minflt proxy_sys_ticks" (ticks: utime + stime; proxy_sys_ticks: stime alone, in + out), taken at the start of the run and 0.3 s before its end (oha's own sqlite write is kept out).

Besides the figures, a row says whether the client was the bottleneck (client_sat: oha's own CPU or its core
above client-sat-pct), the proxies' minor page faults during the run (memory they touched for the first time:
lazy initialisation, buffers growing) and the requests completed in each second of the run (rps_per_s), which
show whether a slow run was slow throughout or only at its start.
"""
import json
import os
import sqlite3
import sys

(f, label, group, target, conc, rc, clk, has_proxy, snap0, snap1, db, warm, extra, sat) = sys.argv[1:15]
sat = float(sat)
clk = float(clk)
has_proxy = has_proxy == "1"
try:
    a = [float(x) for x in snap0.split()]
    b = [float(x) for x in snap1.split()]
    assert len(a) == 13 and len(b) == 13
except Exception:
    a = b = None

rps, ok, bad, p99all = 0.0, 0, -1, None
try:
    d = json.load(open(f))
    s = d["summary"]
    codes = d.get("statusCodeDistribution", {}) or {}
    # oha cuts in-flight requests at the deadline; those are not failures
    errs = {k: v for k, v in (d.get("errorDistribution", {}) or {}).items() if "deadline" not in k.lower()}
    ok = codes.get("200", 0)
    bad = sum(v for k, v in codes.items() if k != "200") + sum(errs.values())
    rps = ok / s["total"] if s["total"] else 0.0
    p99all = d["latencyPercentiles"].get("p99")
    if errs:
        with open(f + ".errors", "w") as e:
            json.dump(errs, e)
except Exception:
    pass

# steady-state percentiles from oha's per-request log, without the first `warm` seconds
ss = [None, None, None]
per_s = "-"
try:
    if not os.path.exists(db):
        raise FileNotFoundError(db)
    con = sqlite3.connect(db)
    t_first = con.execute("select min(start) from oha").fetchone()[0]
    per_s = "/".join(
        str(n) for _, n in con.execute(
            "select cast((end - ?) as int) as s, count(*) from oha where status = 200 group by s order by s",
            (t_first,)))
    lat = sorted(
        r[0]
        for r in con.execute(
            "select end - coalesce(start_latency_correction, start) from oha where status = 200 and start >= ?",
            (t_first + float(warm),),
        )
    )
    if lat:
        ss = [lat[min(len(lat) - 1, int(p * len(lat)))] for p in (0.50, 0.99, 0.999)]
    con.close()
    os.remove(db)
except Exception:
    pass


def ms(x):
    return "%.3f" % (x * 1000) if x is not None else "NA"


cols = {}
if a and b:
    wall = b[0] - a[0]
    sec = lambda i: (b[i] - a[i]) / clk  # noqa: E731
    in_s, out_s, be_s, oha_s = sec(1), sec(2), sec(3), sec(10)
    srv = (b[4] - a[4]) / max(1, b[5] - a[5]) * 100
    cli = (b[6] - a[6]) / max(1, b[7] - a[7]) * 100
    # CPU burnt on the two cores by anything that is not proxy/backend/oha (other tenants, loopback softirq)
    other = ((b[4] - a[4]) + (b[6] - a[6])) / clk - in_s - out_s - be_s - oha_s
    reqs = rps * wall  # requests served during the CPU window
    per10k = lambda x: "%.3f" % (x / reqs * 10000) if reqs and has_proxy else "-"  # noqa: E731
    cols = dict(
        proxy_cpu_pct="%.0f" % ((in_s + out_s) / wall * 100) if has_proxy else "-",
        proxy_cpu_s_per_10k=per10k(in_s + out_s),
        in_cpu_s_per_10k=per10k(in_s) if out_s > 0 else "-",
        out_cpu_s_per_10k=per10k(out_s) if out_s > 0 else "-",
        backend_cpu_pct="%.0f" % (be_s / wall * 100),
        proxy_rss_mb="%.1f" % (b[8] / 1024) if has_proxy else "-",
        proxy_hwm_mb="%.1f" % (b[9] / 1024) if has_proxy else "-",
        srv_core_pct="%.0f" % srv,
        cli_core_pct="%.0f" % cli,
        oha_cpu_pct="%.0f" % (oha_s / wall * 100),
        other_pct="%.0f" % max(0.0, other / wall * 100),
        client_sat="yes" if max(cli, oha_s / wall * 100) > sat else "no",
        proxy_minflt="%d" % (b[11] - a[11]) if has_proxy else "-",
        # the kernel's share of the proxies' CPU (system time: syscalls, and on loopback the receiving side's TCP
        # processing too), and the backend's CPU per request: together the floor under the server core's CPU per
        # request that no user-space change in the proxy can go below (report.py, "What the kernel leaves")
        proxy_sys_s_per_10k=per10k(sec(12)),
        backend_cpu_s_per_10k="%.3f" % (be_s / reqs * 10000) if reqs else "-",
    )
names = ["proxy_cpu_pct", "proxy_cpu_s_per_10k", "in_cpu_s_per_10k", "out_cpu_s_per_10k", "backend_cpu_pct",
         "proxy_rss_mb", "proxy_hwm_mb", "srv_core_pct", "cli_core_pct", "oha_cpu_pct", "other_pct"]
ext = ""
try:
    ext = open(extra).read().strip().replace("\t", " ")
except Exception:
    pass
if rc not in ("0",):
    ext = (ext + " oha_rc=" + rc).strip()
print("\t".join([label, group, target, conc, "%.0f" % rps, ms(ss[0]), ms(ss[1]), ms(ss[2]),
                 "%.3f" % (p99all * 1000) if p99all is not None else "NA", str(ok), str(bad)]
                + [cols.get(n, "NA") for n in names] + [ext or "-"]
                + [cols.get("client_sat", "NA"), cols.get("proxy_minflt", "NA"), per_s]
                + [cols.get("proxy_sys_s_per_10k", "NA"), cols.get("backend_cpu_s_per_10k", "NA")]))
