#!/usr/bin/env python3
"""Turns the harness's runs.tsv and memory.tsv into results.json and summary.md, with a verdict for
each target of issue 7 (ratios within this one run). A row run in several rounds (labels `row`,
`row@2`, `row@3`, interleaved) counts with the median of its rounds, and the detail lists them."""
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", required=True)
    ap.add_argument("--memory", required=True)
    ap.add_argument("--sanity")
    ap.add_argument("--websocket", help="benches/load/ws_echo.sh's websocket.tsv")
    ap.add_argument("--out", required=True)
    ap.add_argument("--meta", nargs="*", default=[])
    a = ap.parse_args()
    runs = list(csv.DictReader(open(a.runs), delimiter="\t")) if os.path.exists(a.runs) else []
    mem = list(csv.DictReader(open(a.memory), delimiter="\t")) if os.path.exists(a.memory) else []
    ws = (list(csv.DictReader(open(a.websocket), delimiter="\t"))
          if a.websocket and os.path.exists(a.websocket) else [])
    meta = dict(m.split("=", 1) for m in a.meta)
    rounds = {}
    for r in runs:
        rounds.setdefault(r["label"].split("@")[0], []).append(r)

    def each(label, field):
        return [v for v in (num(r[field]) for r in rounds.get(label, [])) if v is not None]

    def g(label, field):
        vals = each(label, field)
        return median(vals) if vals else None

    def rs(label, field):
        """The rounds' values of a field, as `a / b / c`."""
        return " / ".join("%g" % v for v in each(label, field)) or "-"

    def m(target, field):
        for r in mem:
            if r["target"].startswith(target):
                return num(r[field])
        return None

    targets = []

    def t(name, value, limit, kind, unit, detail, labels=()):
        # kind "min": value must be >= limit; "max": value must be <= limit
        if value is None or limit is None:
            verdict = "not measured"
        elif (kind == "min" and value >= limit) or (kind == "max" and value <= limit):
            verdict = "met"
        else:
            miss = (limit - value) / limit * 100 if kind == "min" else (value - limit) / limit * 100
            verdict = "missed by %.0f%%" % miss
        others = [o for lbl in labels for o in each(lbl, "other_pct")]
        noise = max(others, default=None)
        targets.append(dict(target=name, value=value, limit=limit, kind=kind, unit=unit, detail=detail,
                            verdict=verdict, max_other_pct=noise))

    ha, mi = g("ka_haproxy_http_c32", "rps"), g("ka_moat_in_c32", "rps")
    t("inbound h1 keep-alive c32: req/s >= 1.1x haproxy", mi, ha * 1.1 if ha else None, "min", "req/s",
      "moat %s vs haproxy %s req/s" % (rs("ka_moat_in_c32", "rps"), rs("ka_haproxy_http_c32", "rps")),
      ("ka_moat_in_c32", "ka_haproxy_http_c32"))
    t("inbound h1 keep-alive c32: p99 <= haproxy", g("ka_moat_in_c32", "p99_ms"), g("ka_haproxy_http_c32", "p99_ms"),
      "max", "ms", "steady-state p99: moat %s vs haproxy %s ms"
      % (rs("ka_moat_in_c32", "p99_ms"), rs("ka_haproxy_http_c32", "p99_ms")), ("ka_moat_in_c32", "ka_haproxy_http_c32"))
    h2h, h2m = g("h2_haproxy", "rps"), g("h2_moat_in", "rps")
    t("h2 4x8: req/s >= 1.1x haproxy", h2m, h2h * 1.1 if h2h else None, "min", "req/s",
      "moat %s vs haproxy %s req/s" % (rs("h2_moat_in", "rps"), rs("h2_haproxy", "rps")), ("h2_moat_in", "h2_haproxy"))
    d50, d99 = g("fr_direct", "p50_ms"), g("fr_direct", "p99_ms")
    for lbl, name, l50, l99 in (("fr_moat_in", "one moat hop", 0.1, 0.25), ("fr_moat_pair", "sidecar pair", 0.25, 0.6)):
        v50, v99 = g(lbl, "p50_ms"), g(lbl, "p99_ms")
        t("%d req/s: %s adds <= %.2f ms p50" % (int(num(meta.get("rate", 2000)) or 2000), name, l50),
          v50 - d50 if None not in (v50, d50) else None, l50, "max", "ms",
          "%s p50 %s vs direct %s" % (lbl, rs(lbl, "p50_ms"), rs("fr_direct", "p50_ms")), (lbl, "fr_direct"))
        t("%d req/s: %s adds <= %.2f ms p99" % (int(num(meta.get("rate", 2000)) or 2000), name, l99),
          v99 - d99 if None not in (v99, d99) else None, l99, "max", "ms",
          "%s p99 %s vs direct %s" % (lbl, rs(lbl, "p99_ms"), rs("fr_direct", "p99_ms")), (lbl, "fr_direct"))
    # vCPU per 1,000 req/s == CPU seconds per 1,000 requests == (CPU s per 10k) / 10
    for lbl, field, name in (("fr_moat_in", "proxy_cpu_s_per_10k", "inbound alone"),
                             ("fr_moat_pair", "in_cpu_s_per_10k", "pair: inbound"),
                             ("fr_moat_pair", "out_cpu_s_per_10k", "pair: outbound")):
        v = g(lbl, field)
        t("fixed rate: CPU <= 0.05 vCPU per 1,000 req/s (%s)" % name, v / 10 if v is not None else None, 0.05,
          "max", "vCPU/krps", "%s %s = %s CPU s per 10k req" % (lbl, field, rs(lbl, field)), (lbl,))
    t("RSS idle <= 15 MiB", m("moat", "idle_rss_mb"), 15, "max", "MiB", "fresh moat inbound after one request")
    t("RSS with 1,000 open mTLS connections <= 40 MiB", m("moat", "rss_with_conns_mb"), 40, "max", "MiB",
      "connections open when read: %s" % m("moat", "conns_open"))
    hf, mf = g("hs_haproxy_full", "rps"), g("hs_moat_in", "rps")
    t("full mTLS handshakes >= 1.5x haproxy", mf, hf * 1.5 if hf else None, "min", "handshakes/s",
      "moat %s vs haproxy %s (new connection per request)" % (mf, hf),
      ("hs_moat_in", "hs_haproxy_full"))

    # Supplementary (not the target): handshakes per second of proxy CPU, which a loaded load generator
    # or a noisy neighbour distorts less than the closed-loop rate above.
    hc, mc = g("hs_haproxy_full", "proxy_cpu_s_per_10k"), g("hs_moat_in", "proxy_cpu_s_per_10k")
    t("(supplementary) full handshakes per proxy CPU-second >= 1.5x haproxy",
      10000 / mc if mc else None, 1.5 * 10000 / hc if hc else None, "min", "hs/CPU-s",
      "CPU s per 10k handshakes: moat %s, haproxy %s" % (mc, hc), ("hs_moat_in", "hs_haproxy_full"))
    res = dict(meta=meta, runs=runs, memory=mem, websocket=ws, targets=targets)
    json.dump(res, open(os.path.join(a.out, "results.json"), "w"), indent=1)

    L = []
    L.append("# moat load bench: side by side (issue 7) and sidecar pair (issue 3)\n")
    L.append("Produced by `bash benches/load/run.sh` on %s. %s\n" % (meta.get("date", "?"), meta.get("versions", "")))
    L.append("Machine: %s, kernel %s. Backend (nginx) and proxies pinned to cpu%s; oha pinned to cpu%s. "
             "%s s per run (first 1 s dropped from p50/p99/p99.9). Fixed-rate runs: %s req/s for %s s, latency-corrected. "
             "HTTP/2: %s connections x streams. Background load just before measuring: %s. Measurement phase: %s s.\n"
             % (meta.get("cpu", "?"), meta.get("kernel", "?"), meta.get("srv_cpu"), meta.get("cli_cpu"),
                meta.get("dur"), meta.get("rate"), meta.get("fr_dur", meta.get("dur")), meta.get("h2"), meta.get("background_before"),
                meta.get("measure_seconds")))
    L.append("moat binary: %s. A fresh moat inbound uses %s MiB before its first request.\n"
             % (meta.get("moat_binary", "?"), meta.get("moat_fresh_rss_mib_before_any_request", "?")))
    if os.path.exists(os.path.join(a.out, "analysis.md")):
        L.append("Profiles, A/B experiments and where memory goes: [analysis.md](analysis.md) (hand-written).\n")
    L.append("## Targets (issue 7)\n")
    if num(meta.get("rounds")) and num(meta.get("rounds")) > 1:
        L.append("The rows these targets compare (moat and HAProxy at c32 and HTTP/2, and the fixed-rate direct, "
                 "inbound and pair rows) ran %s times, interleaved; each figure below is the median of its rounds "
                 "(every round in the detail, and as its own row in the tables further down).\n" % meta["rounds"])
    L.append("| target | measured | limit | verdict | max other_pct of its runs | detail |\n|---|---|---|---|---|---|")
    for x in targets:
        fmt = lambda v: "-" if v is None else (  # noqa: E731
            "%.1f" % v if x["unit"] == "MiB" else "%.3f" % v if abs(v) < 10 else "%.0f" % v)
        noisy = x["max_other_pct"]
        L.append("| %s | %s %s | %s %s | **%s** | %s | %s |" % (x["target"], fmt(x["value"]), x["unit"],
                 (">=" if x["kind"] == "min" else "<="), fmt(x["limit"]), x["verdict"],
                 "-" if noisy is None else ("%.0f (noisy)" % noisy if noisy > 15 else "%.0f" % noisy), x["detail"]))
    L.append("")
    groups = [("ka", "HTTP/1.1 keep-alive, closed loop"), ("fr", "HTTP/1.1 keep-alive, fixed rate"),
              ("h2", "HTTP/2 (multiplexed), closed loop"), ("hs", "A new TLS connection per request (handshake rate)")]
    hdr = ["target", "conc", "rps", "p50_ms", "p99_ms", "p999_ms", "p99_all_ms", "ok", "bad", "proxy_cpu_pct",
           "proxy_cpu_s_per_10k", "in_cpu_s_per_10k", "out_cpu_s_per_10k", "backend_cpu_pct", "proxy_rss_mb",
           "proxy_hwm_mb", "srv_core_pct", "oha_cpu_pct", "other_pct", "extra"]
    for gk, gname in groups:
        rows = [r for r in runs if r["group"] == gk]
        rows.sort(key=lambda r: int(r["conc"]) if r["conc"].isdigit() else 0)  # stable: run order within a level
        if not rows:
            continue
        L.append("## %s\n" % gname)
        L.append("| " + " | ".join(hdr) + " |")
        L.append("|" + "---|" * len(hdr))
        for r in rows:
            L.append("| " + " | ".join(r.get(h, "") for h in hdr) + " |")
        L.append("")
    if mem:
        L.append("## Memory: idle, and with idle mTLS connections open (each after one request)\n")
        keys = list(mem[0].keys())
        L.append("| " + " | ".join(keys) + " |")
        L.append("|" + "---|" * len(keys))
        for r in mem:
            L.append("| " + " | ".join(r[k] for k in keys) + " |")
        L.append("")
    if ws:
        L.append("## WebSocket echo: one 64-byte message in flight, direct and through the sidecar pair\n")
        keys = list(ws[0].keys())
        L.append("| " + " | ".join(keys) + " |")
        L.append("|" + "---|" * len(keys))
        for r in ws:
            L.append("| " + " | ".join(r[k] for k in keys) + " |")
        L.append("")
    L.append("## Columns\n")
    L.append("- p50/p99/p999: steady state, from oha's per-request log without the first second; p99_all: oha's own "
             "p99 over the whole run (includes connection set-up). Fixed-rate latencies are corrected for "
             "coordinated omission (oha `--latency-correction`).")
    L.append("- proxy_cpu_s_per_10k: CPU seconds the proxy process(es) used per 10,000 requests served "
             "(divide by 10 for vCPU per 1,000 req/s). For the pair, in_/out_ split it between the two sidecars.")
    L.append("- proxy_rss_mb / proxy_hwm_mb: RSS at the end of the run and peak RSS (VmHWM) since the proxy "
             "started (all runs before this one included); nginx = master + worker.")
    L.append("- other_pct: CPU on the two cores not charged to proxy, backend or oha (other tenants, loopback "
             "softirq); above ~15 the run was noisy.")
    L.append("- extra (haproxy handshake runs): haproxy's own SslFrontendSessionReuse_pct mid-run.")
    if a.sanity and os.path.exists(a.sanity):
        L.append("\n## Sanity check before measuring (curl)\n\n```\n" + open(a.sanity).read().rstrip() + "\n```")
    open(os.path.join(a.out, "summary.md"), "w").write("\n".join(L) + "\n")


if __name__ == "__main__":
    main()
