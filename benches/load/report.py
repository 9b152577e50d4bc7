#!/usr/bin/env python3
"""Turns the harness's TSVs (runs, bulk, memtime, memory, websocket) into results.json and summary.md,
with a table per target of issue 22 and its verdict: met, not met (by how much), or not shown and why
(rows not run, or the load generator's core saturated so the figure may be the client's limit).

A row run in several rounds (labels `row@1` ... `row@N`, interleaved) counts with the median of its
rounds, and the spread (min-max) is shown; round 0 (`row@0`, WARMUP_ROUND=1) is a warm-up on fresh
proxies: it is reported on its own, to explain first-round slowness, and kept out of the medians.
A moat row's label ends in `+BUILD` (`ka_moat_pair_c32+pgo`); the first build of `builds` is the one
the targets judge, every other must be within 10 % of each target.
"""
import argparse
import csv
import json
import os
from statistics import median


def num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def tsv(path):
    return list(csv.DictReader(open(path), delimiter="\t")) if path and os.path.exists(path) else []


def fmt(v, unit=""):
    if v is None:
        return "-"
    if unit == "x":
        return "%.2f×" % v
    if unit in ("MiB", "KiB"):
        return "%.1f %s" % (v, unit)
    if abs(v) >= 100:
        return "%.0f" % v + (" " + unit if unit else "")
    return "%.3f" % v + (" " + unit if unit else "")


class Runs:
    """oha rows by label, rounds grouped, warm-up kept apart."""

    def __init__(self, rows):
        self.rows = rows
        self.rounds, self.warm = {}, {}
        for r in rows:
            base, _, rnd = r["label"].partition("@")
            (self.warm if rnd == "0" else self.rounds).setdefault(base, []).append(r)

    def each(self, label, field):
        return [v for v in (num(r.get(field)) for r in self.rounds.get(label, [])) if v is not None]

    def med(self, label, field):
        v = self.each(label, field)
        return median(v) if v else None

    def spread(self, label, field):
        v = self.each(label, field)
        if not v:
            return "-"
        if len(v) == 1:
            return "%g" % v[0]
        return "%g (%g–%g, n=%d)" % (median(v), min(v), max(v), len(v))

    def saturated(self, labels):
        out = []
        for lbl in labels:
            for r in self.rounds.get(lbl, []):
                if r.get("client_sat") == "yes":
                    out.append("%s (oha %s%%, core %s%%)" % (r["label"], r.get("oha_cpu_pct"), r.get("cli_core_pct")))
        return out

    def idle_server(self, labels, floor):
        """Rows whose server core was, by the median of their rounds, under `floor` % busy: a closed-loop row
        that leaves its server core idle measured the target's latency under that concurrency, not its
        capacity, and a req/s ratio against it says nothing about CPU per request."""
        out = []
        for lbl in labels:
            busy = self.med(lbl, "srv_core_pct")
            if busy is not None and busy < floor:
                out.append("%s (%.0f %%)" % (lbl, busy))
        return out

    def noisy(self, labels):
        return max((v for lbl in labels for v in self.each(lbl, "other_pct")), default=None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", required=True)
    ap.add_argument("--memory", required=True)
    ap.add_argument("--sanity")
    ap.add_argument("--websocket", help="benches/load/ws_echo.sh's websocket.tsv")
    ap.add_argument("--bulk")
    ap.add_argument("--memtime")
    ap.add_argument("--transparent")
    ap.add_argument("--out", required=True)
    ap.add_argument("--meta", nargs="*", default=[])
    a = ap.parse_args()
    rows, mem, ws = tsv(a.runs), tsv(a.memory), tsv(a.websocket)
    bulk, memtime = tsv(a.bulk), tsv(a.memtime)
    meta = dict(m.split("=", 1) for m in a.meta)
    builds = meta.get("builds", "pgo").split()
    b0 = builds[0]
    R = Runs(rows)
    rate = int(num(meta.get("rate")) or 2000)
    srv_busy_min = num(meta.get("srv_busy_min")) or 90
    targets = []

    def verdict(value, limit, kind, slack, why_missing, sat_always, sat_if_missed):
        if value is None or limit is None:
            return "not shown: " + why_missing
        lim = limit * (1 - slack) if kind == "min" else limit * (1 + slack)
        ok = value >= lim if kind == "min" else value <= lim
        sat = sat_always + ([] if ok else sat_if_missed)
        if sat:
            return "not shown: the client core saturated in " + "; ".join(sat[:3])
        if ok:
            return "met"
        miss = abs(lim - value) / abs(lim) * 100 if lim else 0
        return "not met (by %.0f %%)" % miss

    def target(name, kind, limit, unit, per_build, why_missing, capacity=False):
        """per_build(b) -> (value, limit or None for the fixed one, detail, labels, labels whose client saturation
        voids the verdict, labels whose client saturation voids a miss only). capacity: a throughput comparison,
        shown only when every compared row kept its server core busy (SRV_BUSY_MIN)."""
        t = dict(target=name, kind=kind, unit=unit, builds={})
        for i, b in enumerate(builds):
            value, lim, detail, labels, sat_always, sat_if_missed = per_build(b)
            lim = limit if lim is None else lim
            v = verdict(value, lim, kind, 0.0 if i == 0 else 0.10, why_missing,
                        R.saturated(sat_always), R.saturated(sat_if_missed))
            idle = R.idle_server(labels, srv_busy_min) if capacity and value is not None else []
            if idle and not v.startswith("not shown"):
                v = ("not shown: %s (%.2f×) — the server core was not saturated in %s, so the rows compared "
                     "latency at this concurrency, not capacity" % (v, value, "; ".join(idle)))
            t["builds"][b] = dict(value=value, limit=lim, detail=detail, verdict=v, max_other_pct=R.noisy(labels))
        targets.append(t)

    def ratio(num_lbl, den_lbl, field, what):
        def f(b):
            n, d = R.med(num_lbl % b, field), R.med(den_lbl, field)
            v = n / d if n is not None and d else None
            # a saturated client on the comparison's run overstates the ratio; on moat's, understates it
            return (v, None, "%s: moat %s vs %s" % (what, R.spread(num_lbl % b, field), R.spread(den_lbl, field)),
                    (num_lbl % b, den_lbl), (den_lbl,), (num_lbl % b,))
        return f

    # 1. the sidecar pair
    target("Sidecar pair, HTTP/1.1 keep-alive, 32 connections: >= 1.25x the HAProxy pair's req/s", "min", 1.25, "x",
           ratio("ka_moat_pair_c32+%s", "ka_haproxy_pair_c32", "rps", "req/s"), "rows not run (phase rounds/rows)",
           capacity=True)

    def pair_p99(b):
        lbl = "ka_moat_pair_c32+" + b
        return (R.med(lbl, "p99_ms"), R.med("ka_haproxy_pair_c32", "p99_ms"),
                "steady-state p99 ms: moat %s vs haproxy pair %s" % (R.spread(lbl, "p99_ms"), R.spread("ka_haproxy_pair_c32", "p99_ms")),
                (lbl, "ka_haproxy_pair_c32"), (lbl, "ka_haproxy_pair_c32"), ())
    target("Sidecar pair, HTTP/1.1 keep-alive, 32 connections: p99 <= the HAProxy pair's p99", "max", None, "ms",
           pair_p99, "rows not run, or no steady-state percentiles (OHA_DB=0)")

    def added(lbl_fmt, field):
        def f(b):
            lbl = lbl_fmt % b
            v, d = R.med(lbl, field), R.med("fr_direct", field)
            h = R.med("fr_haproxy_pair", field)
            ref = ("; haproxy pair %s, adds %.3f" % (R.spread("fr_haproxy_pair", field), h - d)
                   if None not in (h, d) else "")
            return (v - d if None not in (v, d) else None, None,
                    "%s %s vs direct %s%s" % (field, R.spread(lbl, field), R.spread("fr_direct", field), ref),
                    (lbl, "fr_direct"), (lbl, "fr_direct"), ())
        return f
    target("Sidecar pair at %d req/s: adds <= 0.10 ms p50 over direct" % rate, "max", 0.10, "ms",
           added("fr_moat_pair+%s", "p50_ms"), "rows not run")
    target("Sidecar pair at %d req/s: adds <= 0.25 ms p99 over direct" % rate, "max", 0.25, "ms",
           added("fr_moat_pair+%s", "p99_ms"), "rows not run")

    def vcpu(lbl_fmt, field="proxy_cpu_s_per_10k"):
        def f(b):
            lbl = lbl_fmt % b
            v = R.med(lbl, field)
            return (v / 10 if v is not None else None, None,
                    "CPU s per 10k requests %s (in %s, out %s)" % (R.spread(lbl, field), R.spread(lbl, "in_cpu_s_per_10k"),
                                                                  R.spread(lbl, "out_cpu_s_per_10k")), (lbl,), (), ())
        return f
    target("Sidecar pair at %d req/s: both sidecars together <= 0.06 vCPU per 1,000 req/s" % rate, "max", 0.06,
           "vCPU", vcpu("fr_moat_pair+%s"), "rows not run")
    # 2. one hop
    target("One hop, HTTP/1.1 keep-alive, 32 connections: >= 1.25x HAProxy req/s", "min", 1.25, "x",
           ratio("ka_moat_in_c32+%s", "ka_haproxy_http_c32", "rps", "req/s"), "rows not run", capacity=True)
    target("One hop, HTTP/2 (%s): >= 1.25x HAProxy req/s" % meta.get("h2", "4x8"), "min", 1.25, "x",
           ratio("h2_moat_in+%s", "h2_haproxy", "rps", "req/s"), "rows not run", capacity=True)
    target("One hop at %d req/s: <= 0.035 vCPU per 1,000 req/s" % rate, "max", 0.035, "vCPU",
           vcpu("fr_moat_in+%s"), "rows not run")

    # 3. bulk
    def brow(label, op):
        for r in bulk:
            if r["label"] == label and r["op"] == op and r.get("ok") == "yes":
                return r
        return None

    def bulk_ratio(op):
        def f(b):
            m, h = brow("bulk_moat_pair+" + b, op), brow("bulk_haproxy_pair", op)
            v = num(m["mb_s"]) / num(h["mb_s"]) if m and h and num(h["mb_s"]) else None
            return (v, None, "MB/s: moat pair %s vs haproxy pair %s" % (m and m["mb_s"], h and h["mb_s"]), (), (), ())
        return f
    gib = (num(meta.get("bulk_bytes")) or 2 ** 30) / 2 ** 30
    target("Bulk through the pair, %g GiB download: >= 1.2x the HAProxy pair's MB/s" % gib, "min", 1.2, "x",
           bulk_ratio("get"), "bulk phase not run or a transfer failed")
    target("Bulk through the pair, %g GiB upload: >= 1.2x the HAProxy pair's MB/s" % gib, "min", 1.2, "x",
           bulk_ratio("put"), "bulk phase not run or a transfer failed")

    def bulk_rss(b):
        rs = [r for r in bulk if r["label"] == "bulk_moat_pair+" + b]
        g = [num(r[k]) for r in rs for k in ("in_peak_growth_mb", "out_peak_growth_mb") if num(r[k]) is not None]
        return (max(g) if g else None, None, "; ".join("%s: in +%s, out +%s MiB" % (r["op"], r["in_peak_growth_mb"],
                r["out_peak_growth_mb"]) for r in rs), (), (), ())
    target("Bulk through the pair: peak RSS growth <= 8 MiB per sidecar", "max", 8, "MiB", bulk_rss,
           "bulk phase not run")

    # 4. memory
    def mrow(b, conns=None):
        for r in mem:
            if r["target"] == "moat inbound [%s]" % b and (conns is None or r["conns_wanted"] == str(conns)):
                return r
        return None

    def idle(b):
        r = mrow(b)
        return (num(r["idle_rss_mb"]) if r else None, None, "fresh moat inbound after one request", (), (), ())
    target("Memory: <= 10 MiB idle", "max", 10, "MiB", idle, "idle phase not run")
    for n in (1000, 10000):
        def per_conn(b, n=n):
            r = mrow(b, n)
            ok = r and num(r["conns_open"]) and num(r["conns_open"]) >= 0.95 * n
            return (num(r["per_conn_kb"]) if ok else None, None,
                    "%s of %s connections open, RSS %s -> %s MiB" % (r["conns_open"], n, r["idle_rss_mb"], r["rss_with_conns_mb"])
                    if r else "-", (), (), ())
        target("Memory: <= 16 KiB per idle mTLS connection (%s connections)" % format(n, ","), "max", 16, "KiB", per_conn,
               "idle phase not run at %s connections, or fewer than 95 %% of them opened" % n)

    def after(b):
        rs = [r for r in memtime if r["target"] == "moat pair [%s]" % b]
        v = [num(r["after_over_idle"]) for r in rs if num(r["after_over_idle"]) is not None]
        return (max(v) if v else None, None, "; ".join("%s: idle %s, peak %s, %s s after %s MiB" % (
            r["side"], r["idle_mb"], r["peak_mb"], meta.get("after_s", "60"), r.get("after_%ss_mb" % meta.get("after_s", "60")))
            for r in rs), (), (), ())
    target("Memory: %s s after the %s-connection burst, RSS <= 1.3x idle (each sidecar)" % (
        meta.get("after_s", "60"), meta.get("mt_conns", "256")), "max", 1.3, "x", after, "memtime phase not run")

    res = dict(meta=meta, runs=rows, memory=mem, websocket=ws, bulk=bulk, memtime=memtime, targets=targets)
    json.dump(res, open(os.path.join(a.out, "results.json"), "w"), indent=1)

    # ------------------------------------------------------------------ summary.md
    L = []
    L.append("# moat load bench: one hop and sidecar pair against HAProxy, NGINX, stunnel (issue 22)\n")
    L.append("Produced by `bash benches/load/run.sh` on %s. %s. Phases: %s.\n"
             % (meta.get("date", "?"), meta.get("versions", ""), meta.get("phases", "?")))
    L.append("Machine: %s, kernel %s. Backend and proxies pinned to cpu%s; the clients (oha, bulk.py, idle_conns.py) "
             "to cpu%s. %s s per closed-loop run, %s s per fixed-rate run (%s req/s, latency-corrected); first %s s "
             "dropped from p50/p99/p99.9. HTTP/2: %s connections x streams. Background load before measuring: %s. "
             "Measurement: %s s.\n"
             % (meta.get("cpu", "?"), meta.get("kernel", "?"), meta.get("srv_cpu"), meta.get("cli_cpu"), meta.get("dur"),
                meta.get("fr_dur"), rate, "1", meta.get("h2"), meta.get("background_before"), meta.get("measure_seconds")))
    L.append("moat builds (the first is judged; the others must be within 10 %% of each target): %s A fresh moat "
             "inbound uses %s MiB before its first request.\n"
             % (meta.get("moat_binaries", "?"), meta.get("moat_fresh_rss_mib_before_any_request", "?")))
    if os.path.exists(os.path.join(a.out, "analysis.md")):
        L.append("Profiles, A/B experiments and where memory goes: [analysis.md](analysis.md) (hand-written).\n")
    L.append("## Targets (issue 22)\n")
    L.append("The oha rows these targets compare ran in %s interleaved rounds (odd rounds in one order, even rounds "
             "in the reverse); each figure is the median, with min–max over the rounds in the detail. A verdict is "
             "\"not shown\" when its rows did not run, or when it would rest on a run whose client core saturated "
             "(oha's CPU or its core above %s %%).\n" % (meta.get("rounds"), meta.get("client_sat", "90")))
    hdr = "| target | " + " | ".join("%s: measured | %s: verdict" % (b, b) for b in builds) + " | limit | max other_pct | detail |"
    L.append(hdr)
    L.append("|" + "---|" * (4 + 2 * len(builds)))
    for t in targets:
        cells = []
        for b in builds:
            x = t["builds"][b]
            cells += [fmt(x["value"], t["unit"]), "**%s**" % x["verdict"]]
        x0 = t["builds"][b0]
        noisy = max((t["builds"][b]["max_other_pct"] for b in builds if t["builds"][b]["max_other_pct"] is not None), default=None)
        L.append("| %s | %s | %s %s | %s | %s |" % (
            t["target"], " | ".join(cells), ">=" if t["kind"] == "min" else "<=", fmt(x0["limit"], t["unit"]),
            "-" if noisy is None else ("%.0f (noisy)" % noisy if noisy > 15 else "%.0f" % noisy),
            " / ".join("%s: %s" % (b, t["builds"][b]["detail"]) for b in builds)))
    L.append("")

    # the kernel's floor under the throughput targets
    floor = []
    for title, mine, theirs in (("pair, HTTP/1.1 c32", "ka_moat_pair_c32+%s", "ka_haproxy_pair_c32"),
                                ("one hop, HTTP/1.1 c32", "ka_moat_in_c32+%s", "ka_haproxy_http_c32"),
                                ("one hop, HTTP/2 %s" % meta.get("h2", "4x8"), "h2_moat_in+%s", "h2_haproxy")):
        fields = ("proxy_cpu_s_per_10k", "proxy_sys_s_per_10k", "backend_cpu_s_per_10k", "rps")
        h_cpu, h_sys, h_be, h_rps = (R.med(theirs, f) for f in fields)
        for b in builds:
            m_cpu, m_sys, m_be, m_rps = (R.med(mine % b, f) for f in fields)
            if None in (h_cpu, h_sys, h_be, m_cpu, m_sys, m_be) or not (m_sys + m_be):
                continue
            h_srv, m_usr, h_usr = h_cpu + h_be, m_cpu - m_sys, h_cpu - h_sys
            need = h_srv / 1.25 - m_sys - m_be  # moat's user-space budget per 10k requests for 1.25x
            floor.append("| %s | %s | %.2f× | %.3f / %.3f | %.3f / %.3f | %.3f / %.3f | %.2f× | %.2f× | %s |" % (
                title, b, m_rps / h_rps if m_rps and h_rps else float("nan"), m_usr, h_usr, m_sys, h_sys, m_be, h_be,
                h_srv / (m_cpu + m_be), h_srv / (m_sys + m_be),
                "%.3f (%.0f %% of moat's now)" % (need, 100 * need / m_usr) if need > 0 and m_usr > 0 else "none"))
    if floor:
        L.append("## What the kernel leaves: the ceiling under the throughput targets\n")
        L.append("CPU seconds per 10,000 requests, medians of the rounds: the proxies' user-space and system time "
                 "(moat / HAProxy), and the backend's. The server core runs the proxies and the backend, so its CPU "
                 "per request bounds the req/s. *CPU ratio* is HAProxy's server-core CPU per request over moat's "
                 "(the req/s ratio when the core is saturated); *ceiling* the same with moat's user-space time at "
                 "zero: no change in moat's own code can take the req/s ratio past it, because system time (syscalls, "
                 "and on loopback the receiving side's TCP processing) is the kernel's. *user budget for 1.25×* is "
                 "the user-space time moat could spend and still reach 1.25×.\n")
        L.append("| comparison | build | req/s ratio | user (moat / HAProxy) | system (moat / HAProxy) | backend "
                 "(moat's run / HAProxy's) | CPU ratio | ceiling | user budget for 1.25× |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        L += floor
        L.append("")

    # builds side by side, on every row measured for more than one build
    if len(builds) > 1:
        bases = sorted({r["label"].split("@")[0].rsplit("+", 1)[0] for r in rows if "+" in r["label"]})
        lines = []
        for base in bases:
            if not all(R.each("%s+%s" % (base, b), "rps") for b in builds):
                continue
            for field in ("rps", "p99_ms", "proxy_cpu_s_per_10k"):
                vals = [R.med("%s+%s" % (base, b), field) for b in builds]
                if vals[0] is None:
                    continue
                rel = " | ".join("%.2f" % (v / vals[0]) if v is not None and vals[0] else "-" for v in vals[1:])
                lines.append("| %s | %s | %s | %s |" % (base, field, " | ".join(R.spread("%s+%s" % (base, b), field)
                                                                                   for b in builds), rel))
        if lines:
            L.append("## Builds side by side (median of the rounds)\n")
            L.append("| row | figure | " + " | ".join(builds) + " | " + " | ".join("%s/%s" % (b, b0) for b in builds[1:]) + " |")
            L.append("|" + "---|" * (2 + 2 * len(builds) - 1))
            L += lines
            L.append("")

    # the client check
    cc = [r for r in rows if r["group"] == "cc"]
    sat_rows = [r for r in rows if r.get("client_sat") == "yes"]
    L.append("## The client check (issue 22, item 6)\n")
    L.append("Every oha run records oha's own CPU (oha_cpu_pct) and its core's (cli_core_pct); %d of %d runs had "
             "the client saturated (> %s %%)%s.\n" % (len(sat_rows), len(rows), meta.get("client_sat", "90"),
                                                      ": " + ", ".join(r["label"] for r in sat_rows[:12]) +
                                                      (" ..." if len(sat_rows) > 12 else "") if sat_rows else ""))
    if cc:
        L.append("The same comparisons as the issue's independent run (`oha -z %ss -c 32 --worker-threads 1 "
                 "--http-version 1.1`, no `--db-url`, alternating), beside the harness's own rows (`--db-url` "
                 "on, %s s):\n" % (meta.get("cc_dur", "6"), meta.get("dur")))
        L.append("| comparison | build | harness: haproxy | harness: moat | harness ratio | check: haproxy | "
                 "check: moat | check ratio | oha CPU % (check, haproxy / moat) |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for what, ka_m, ka_h, cc_m, cc_h in (("one hop", "ka_moat_in_c32+%s", "ka_haproxy_http_c32", "cc_moat_in+%s", "cc_haproxy_http"),
                                             ("pair", "ka_moat_pair_c32+%s", "ka_haproxy_pair_c32", "cc_moat_pair+%s", "cc_haproxy_pair")):
            for b in builds:
                km, kh, cm, ch = R.med(ka_m % b, "rps"), R.med(ka_h, "rps"), R.med(cc_m % b, "rps"), R.med(cc_h, "rps")
                L.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s / %s |" % (
                    what, b, fmt(kh), fmt(km), fmt(km / kh, "x") if km and kh else "-", R.spread(cc_h, "rps"),
                    R.spread(cc_m % b, "rps"), fmt(cm / ch, "x") if cm and ch else "-",
                    R.spread(cc_h, "oha_cpu_pct"), R.spread(cc_m % b, "oha_cpu_pct")))
        L.append("")
    else:
        L.append("(The `client` phase did not run.)\n")

    # first round
    if R.warm or any(len(v) > 1 for v in R.rounds.values()):
        L.append("## Rounds, and the first one (issue 22, item 4)\n")
        L.append("Every round of the rows the targets compare. Round 0 (if present) ran first, on proxies that had "
                 "served only the sanity check, and is not in the medians. `rps_per_s` is the requests completed in "
                 "each second of the run (oha's log): a round slow throughout points at the box (other_pct, "
                 "srv_core_pct), one slow only at its start at warm-up; `proxy_minflt` counts the pages the proxies "
                 "touched for the first time during the run (lazy initialisation, buffers growing).\n")
        # at a glance: each of the first two rounds against the median of the scored rounds
        glance = []
        for base in R.rounds:
            rs = {r["label"].split("@")[1]: r for r in R.warm.get(base, []) + R.rounds[base] if "@" in r["label"]}
            field = "p99_ms" if base.startswith("fr_") else "rps"
            mid, flt = R.med(base, field), R.med(base, "proxy_minflt")
            if not mid or len(rs) < 2:
                continue

            def first_s(r):
                s = [num(x) for x in (r.get("rps_per_s") or "").split("/") if num(x) is not None]
                return "%.2f" % (s[0] / median(s[1:-1] or s[1:])) if len(s) > 2 and median(s[1:-1] or s[1:]) else "-"
            cells = []
            for k in ("0", "1"):
                r = rs.get(k)
                cells.append("%.2f" % (num(r[field]) / mid) if r and num(r[field]) is not None else "-")
                cells.append("%s" % r.get("proxy_minflt", "-") if r else "-")
                cells.append(first_s(r) if r else "-")
            glance.append("| %s | %s | %s | %s |" % (base, field, " | ".join(cells), "-" if flt is None else "%g" % flt))
        if glance:
            L.append("At a glance: round 0 and round 1 against the median of the scored rounds (rps, or p99 for the "
                     "fixed-rate rows), their proxies' page faults, and their first second's requests against the "
                     "run's other full seconds (< 1: a slow start).\n")
            L.append("| row | figure | round 0 / median | round 0 faults | round 0 first s | round 1 / median | "
                     "round 1 faults | round 1 first s | median faults |")
            L.append("|---|---|---|---|---|---|---|---|---|")
            L += glance
            L.append("")
        keys = ["label", "rps", "p50_ms", "p99_ms", "proxy_cpu_s_per_10k", "proxy_minflt", "srv_core_pct",
                "oha_cpu_pct", "other_pct", "client_sat", "rps_per_s"]
        L.append("| " + " | ".join(keys) + " |")
        L.append("|" + "---|" * len(keys))
        for base in R.rounds:
            rs = R.warm.get(base, []) + R.rounds[base]
            if len(rs) < 2 or not any("@" in r["label"] for r in rs):
                continue
            rs.sort(key=lambda r: int(r["label"].split("@")[1]) if "@" in r["label"] else 0)
            for r in rs:
                L.append("| " + " | ".join(r.get(k, "") for k in keys) + " |")
        L.append("")

    groups = [("ka", "HTTP/1.1 keep-alive, closed loop"), ("fr", "HTTP/1.1 keep-alive, fixed rate"),
              ("h2", "HTTP/2 (multiplexed), closed loop"), ("hs", "A new TLS connection per request (handshake rate)"),
              ("cc", "Client check: oha without its SQLite log")]
    hdr = ["label", "target", "conc", "rps", "p50_ms", "p99_ms", "p999_ms", "p99_all_ms", "ok", "bad", "proxy_cpu_pct",
           "proxy_cpu_s_per_10k", "in_cpu_s_per_10k", "out_cpu_s_per_10k", "backend_cpu_pct", "proxy_rss_mb",
           "proxy_hwm_mb", "srv_core_pct", "cli_core_pct", "oha_cpu_pct", "client_sat", "other_pct", "extra"]
    for gk, gname in groups:
        rs = [r for r in rows if r["group"] == gk]
        rs.sort(key=lambda r: int(r["conc"]) if r["conc"].isdigit() else 0)  # stable: run order within a level
        if not rs:
            continue
        L.append("## %s\n" % gname)
        L.append("| " + " | ".join(hdr) + " |")
        L.append("|" + "---|" * len(hdr))
        for r in rs:
            L.append("| " + " | ".join(r.get(h, "") for h in hdr) + " |")
        L.append("")

    def table(title, rs, note=""):
        if not rs:
            return
        L.append("## %s\n" % title)
        if note:
            L.append(note + "\n")
        keys = list(rs[0].keys())
        L.append("| " + " | ".join(keys) + " |")
        L.append("|" + "---|" * len(keys))
        for r in rs:
            L.append("| " + " | ".join(r.get(k) or "" for k in keys) + " |")
        L.append("")
    table("Bulk: %g GiB download (get) and upload (put), nothing buffered" % gib, bulk,
          "Fresh proxies per target; MB/s is 10^6 bytes/s at the client; cpu_s_per_gb sums the proxies (in + out); "
          "peak growth is VmHWM after the transfer minus RSS after one small request.")
    table("Memory over time: fresh pairs idle, at the peak of a %s-connection run, and after it" % meta.get("mt_conns", "256"),
          memtime, "peak: the highest RSS sampled every 0.2 s during the run; after_over_idle: the last reading / idle.")
    table("Memory: idle, and with idle mTLS connections open (each after one request)", mem)
    table("WebSocket echo: one 64-byte message in flight, direct and through the sidecar pair", ws)
    if a.transparent and os.path.exists(a.transparent):
        L.append("## Transparent pair\n\n%s\n" % open(a.transparent).read().strip())
        tt = tsv(os.path.join(a.out, "transparent.tsv"))
        table("Transparent pair rows", tt)
    L.append("## Columns\n")
    L.append("- p50/p99/p999: steady state, from oha's per-request log without the first second; p99_all: oha's own "
             "p99 over the whole run (includes connection set-up). Fixed-rate latencies are corrected for "
             "coordinated omission (oha `--latency-correction`). The client-check rows have no per-request log.")
    L.append("- proxy_cpu_s_per_10k: CPU seconds the proxy process(es) used per 10,000 requests served "
             "(divide by 10 for vCPU per 1,000 req/s). For a pair, in_/out_ split it between the two sides.")
    L.append("- proxy_rss_mb / proxy_hwm_mb: RSS at the end of the run and peak RSS (VmHWM) since the proxy "
             "started (all runs before this one included); nginx = master + worker.")
    L.append("- cli_core_pct / oha_cpu_pct / client_sat: the client core's use, oha's own CPU, and whether either "
             "passed the saturation threshold (then the row may show the client's limit, not the proxy's).")
    L.append("- other_pct: CPU on the two cores not charged to proxy, backend or oha (other tenants, loopback "
             "softirq); above ~15 the run was noisy.")
    L.append("- proxy_sys_s_per_10k: the system-time part of proxy_cpu_s_per_10k; backend_cpu_s_per_10k: the "
             "backend's CPU (nginx master + workers) per 10,000 requests of the run.")
    L.append("- extra (haproxy handshake runs): haproxy's own SslFrontendSessionReuse_pct mid-run.")
    if a.sanity and os.path.exists(a.sanity):
        L.append("\n## Sanity check before measuring (curl)\n\n```\n" + open(a.sanity).read().rstrip() + "\n```")
    open(os.path.join(a.out, "summary.md"), "w").write("\n".join(L) + "\n")


if __name__ == "__main__":
    main()
