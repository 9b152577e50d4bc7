#!/usr/bin/env python3
"""benches/load/textrss.py — which pages of a running process's own binary are resident, in what page-cache
folio sizes, and (optionally) whose code they hold. Needs root (PFNs in /proc/PID/pagemap, /proc/kpageflags).

    python3 benches/load/textrss.py PID                 # per mapping of the executable: size, resident, folios
    python3 benches/load/textrss.py PID --crates 25     # + resident text bytes by crate (from the symbol table)
    python3 benches/load/textrss.py PID --json          # one JSON object (for scripts)

A page is "resident" when the process's page table maps it (pagemap bit 63), which is what VmRSS/RssFile count;
the folio it belongs to is read from kpageflags (COMPOUND_HEAD/TAIL), so a resident page in an order-4 folio means
the kernel mapped it as part of a 64 KiB block, whether or not the CPU ever touched it. The file's page cache as a
whole (mapped or not) is what `fincore FILE` shows. Crate attribution splits each resident text page among the
symbols (`nm -n -C`) that overlap it, each symbol taken to run to the next one's start; a name's crate is its first
path segment (`<X as Y>` counts for X), and a name with no path is C or assembly (aws-lc, libc's crt code).
"""
import argparse
import bisect
import collections
import json
import os
import re
import struct
import subprocess
import sys

PAGE = os.sysconf("SC_PAGE_SIZE")
HEAD, TAIL = 1 << 15, 1 << 16


def maps_of(pid, exe):
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) < 6 or os.path.realpath(parts[5].strip()) != exe:
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi, parts[1], int(parts[2], 16)))
    return out


def pfns(pid, lo, hi):
    """PFN of each page in [lo, hi), or None where not present."""
    n = (hi - lo) // PAGE
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(lo // PAGE * 8)
        raw = f.read(n * 8)
    res = []
    for (e,) in struct.iter_unpack("<Q", raw):
        res.append(e & ((1 << 55) - 1) if e >> 63 & 1 else None)
    return res


class Flags:
    def __init__(self):
        self.f = open("/proc/kpageflags", "rb")
        self.cache = {}

    def __call__(self, pfn):
        v = self.cache.get(pfn)
        if v is None:
            self.f.seek(pfn * 8)
            v = struct.unpack("<Q", self.f.read(8))[0]
            self.cache[pfn] = v
        return v

    def folio(self, pfn):
        """(head pfn, number of pages) of the folio holding pfn."""
        head = pfn
        while self(head) & TAIL:
            head -= 1
        n = 1
        if self(head) & HEAD:
            while self(head + n) & TAIL:
                n += 1
        return head, n


def crate_of(name):
    s = name.lstrip("<&*( ")
    for pre in ("dyn ", "mut ", "const "):
        while s.startswith(pre):
            s = s[len(pre):].lstrip("<&*( ")
    m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", s)
    if not m:
        return "(other)"
    c = m.group(0)
    return c if "::" in s[: m.end() + 2] else "(C/asm: " + ("__rust" if c.startswith("__rust") else "other") + ")"


def symbols(exe):
    out = subprocess.run(["nm", "-n", "-C", "--defined-only", exe], capture_output=True, text=True).stdout
    addrs, names = [], []
    for line in out.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in "tTwW":
            addrs.append(int(parts[0], 16))
            names.append(parts[2])
    return addrs, names


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pid", type=int)
    ap.add_argument("--crates", type=int, default=0, metavar="N", help="top N crates by resident text")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    exe = os.path.realpath(f"/proc/{a.pid}/exe")
    flags = Flags()
    rows, resident_text = [], []
    base = None
    for lo, hi, perm, off in maps_of(a.pid, exe):
        if base is None:
            base = lo - off
        res = 0
        orders = collections.Counter()
        for i, p in enumerate(pfns(a.pid, lo, hi)):
            if p is None:
                continue
            res += 1
            _, n = flags.folio(p)
            orders[n * PAGE // 1024] += 1
            if "x" in perm:
                resident_text.append(lo + i * PAGE - base)
        rows.append({"perm": perm, "offset": off, "kib": (hi - lo) // 1024, "resident_kib": res * PAGE // 1024,
                     "resident_pages_by_folio_kib": dict(sorted(orders.items()))})
    out = {"pid": a.pid, "exe": exe, "mappings": rows}
    if a.crates:
        addrs, names = symbols(exe)
        by = collections.Counter()
        for pg in resident_text:
            # Each symbol is taken to run to the next one's start (nm -n has no sizes for every symbol).
            i = max(bisect.bisect_right(addrs, pg) - 1, 0)
            if addrs[i] > pg:
                by["(gap)"] += addrs[i] - pg
            while i < len(addrs) and addrs[i] < pg + PAGE:
                lo = max(addrs[i], pg)
                hi = min(addrs[i + 1] if i + 1 < len(addrs) else pg + PAGE, pg + PAGE)
                if hi > lo:
                    by[crate_of(names[i])] += hi - lo
                i += 1
        out["resident_text_kib_by_crate"] = {k: round(v / 1024) for k, v in by.most_common(a.crates)}
    if a.json:
        json.dump(out, sys.stdout)
        print()
        return
    print(f"{exe} (pid {a.pid})")
    for r in out["mappings"]:
        fol = " ".join(f"{k}K:{v * PAGE // 1024}" for k, v in r["resident_pages_by_folio_kib"].items())
        print(f"  {r['perm']} off {r['offset']:#9x} {r['kib']:7d} KiB mapped {r['resident_kib']:7d} KiB resident"
              f"  [resident KiB by folio size: {fol}]")
    for k, v in out.get("resident_text_kib_by_crate", {}).items():
        print(f"    {v:6d} KiB  {k}")


if __name__ == "__main__":
    main()
