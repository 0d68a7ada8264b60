#!/usr/bin/env python3
"""Writes docs/benchmarks.md (and a PNG plot beside it) from a run of scripts/bench.

    report.py OUT_DIR DOC        OUT_DIR holds results.json, meta.json, perf-*.txt, suite.log

matplotlib is optional: without it the report has no plot.
"""
import json
import math
import os
import sys

out, doc = sys.argv[1], sys.argv[2]
res = json.load(open(os.path.join(out, "results.json")))
meta = json.load(open(os.path.join(out, "meta.json")))
rows, detail = res["rows"], res["detail"]
# in the order of the sections (the suite measures them in another order)
rows = sorted(rows, key=lambda r: r["section"].split(".")[0])
here = os.path.dirname(os.path.abspath(__file__))
png_name = os.path.splitext(os.path.basename(doc))[0] + ".png"
png = os.path.join(os.path.dirname(doc) or ".", png_name)


def num(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    a = abs(v)
    return f"{v:.0f}" if a >= 1000 else f"{v:.1f}" if a >= 10 else f"{v:.2f}"


def plot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print(f"report: no plot ({e})")
        return False
    names = {"api": "API", "podman_run": "(a) podman\nrun -d", "systemd_run": "(b) systemd-run\n+ podman run",
             "podman_rest": "(c) podman\nREST"}
    order = ["api", "podman_run", "systemd_run", "podman_rest"]
    fig, ax = plt.subplots(2, 2, figsize=(12, 8.5))
    for i, what in enumerate(["start", "stop"]):
        d = detail.get(f"{what}_latency_ms", {})
        keys = [k for k in order if k in d]
        a = ax[0][i]
        if keys:
            a.boxplot([d[k]["samples"] for k in keys], showfliers=True)
            a.set_xticks(range(1, len(keys) + 1), [names[k] for k in keys])
        a.set_title(f"{what} latency (N={d[keys[0]]['summary']['n'] if keys else 0} each)")
        a.set_ylabel("ms")
        a.grid(axis="y", alpha=0.3)
    thr = {x["key"]: x["load"] for x in detail.get("throughput", [])}
    a = ax[1][0]
    groups = [("status", ["api_status", "nginx_status", "podman_inspect"]),
              ("list", ["api_list", "nginx_list", "podman_list"])]
    labels = ["API", "nginx (static)", "podman REST"]
    width = 0.27
    for j, lab in enumerate(labels):
        xs, ys = [], []
        for g, (gname, keys) in enumerate(groups):
            if keys[j] in thr:
                xs.append(g + (j - 1) * width)
                ys.append(thr[keys[j]]["rps"])
        a.bar(xs, ys, width, label=lab)
    a.set_xticks(range(len(groups)), ["GET status", "GET /projects"])
    if any(x.get("rps", 0) > 0 for x in thr.values()):
        a.set_yscale("log")
    a.set_ylabel("requests/s (log)")
    conns = next(iter(thr.values()))["connections"] if thr else 0
    a.set_title(f"API throughput, {conns} connections")
    a.legend(fontsize=8)
    a.grid(axis="y", alpha=0.3)
    b = detail.get("burst_ms", {})
    a = ax[1][1]
    bars = [("API start", b.get("api_all")), ("podman run -d", b.get("podman_run_all")),
            ("API stop", b.get("api_stop_all")), ("podman stop+rm", b.get("podman_stop_all"))]
    bars = [(n, sorted(v)[len(v) // 2] / 1000) for n, v in bars if v]
    a.bar([n for n, _ in bars], [v for _, v in bars], color=["C0", "C1", "C0", "C1"][: len(bars)])
    a.set_ylabel("s (median)")
    n_burst = len(b.get("api_each", [])) // max(1, len(b.get("api_all", []) or [1]))
    a.set_title(f"burst: {n_burst} at once, until all running / gone")
    a.grid(axis="y", alpha=0.3)
    fig.suptitle(f"cocalc-project-host benchmarks, {meta['date']} (load avg {meta['load_before']})")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    return True


def ratio(r):
    x = r["ratio"]
    return "" if x is None else (f"{x:.4f}×" if x < 0.1 else f"{x:.2f}×")


def with_unit(v, r):
    return f"{num(v)} {r['unit']}" if r["unit"] else num(v)


def measure(r):
    # rows whose measure starts with spaces detail the row above them
    m = r["measure"].replace("|", "\\|")
    return ("&nbsp;&nbsp;" if m.startswith("  ") else "") + m.strip()


# The results table: one entry per column (header, alignment, cell of a row of results.json).
COLUMNS = [
    ("measure", "left", measure),
    ("value", "right", lambda r: with_unit(r["value"], r)),
    ("baseline", "left", lambda r: r["baseline"]),
    ("baseline value", "right", lambda r: "" if r["baseline_value"] is None else with_unit(r["baseline_value"], r)),
    ("ratio", "right", ratio),
    ("target", "left", lambda r: r["target"]),
    ("verdict", "left", lambda r: {"met": "met", "MISSED": "**missed**"}.get(r["verdict"], "")),
]


has_plot = plot()
m = detail.get("machine", {})
L = []
w = L.append
w("# Benchmarks")
w("")
w(f"_Written by `scripts/bench` on {meta['date']} from commit `{meta['commit']}`"
  f"{' (BENCH_QUICK: small sizes)' if meta.get('quick') == '1' else ''}; the suite took "
  f"{num(detail.get('suite_secs', float('nan')) / 60)} min. Rerun it with `sudo scripts/bench`._")
w("")
w("Every figure is next to a baseline measured **in the same run, on the same machine**, and the ratio")
w("between them carries the signal; absolute times depend on the machine and its load. "
  f"Load average when the run started: **{meta['load_before']}**, when it ended: **{meta['load_after']}** "
  f"(on {meta['cpus']} CPUs).")
w("")
w("## Machine")
w("")
w("| | |")
w("|---|---|")
w(f"| host | {meta['host_os']}, kernel {meta['host_kernel']}, {meta['cpus']} × {meta['cpu_model']}, {meta['mem']} |")
w("| testbed | systemd-nspawn machine booted from Debian bookworm (tests/testbed/testbed.sh), cgroups v1 hybrid |")
for k in ["systemd", "podman", "oci_runtime", "conmon", "cgroups", "package", "nginx"]:
    if m.get(k):
        w(f"| {k} | {m[k]} |")
w("")
w("## Results")
w("")
if has_plot:
    w(f"![start/stop latency, throughput, burst]({png_name})")
    w("")
w("| " + " | ".join(c[0] for c in COLUMNS) + " |")
w("|" + "|".join("---:" if c[1] == "right" else "---" for c in COLUMNS) + "|")
cur = None
for r in rows:
    if r["section"] != cur:
        cur = r["section"]
        w(f"| **{cur}** |" + " |" * (len(COLUMNS) - 1))
    w("| " + " | ".join(c[2](r) for c in COLUMNS) + " |")
w("")
missed = [r for r in rows if r["verdict"] == "MISSED"]
met = [r for r in rows if r["verdict"] == "met"]
w(f"**Targets: {len(met)} met, {len(missed)} missed in this run.**")
for r in missed:
    w(f"- missed: {r['measure'].strip()} — {num(r['value'])} {r['unit']} vs {r['baseline'] or 'target'} "
      f"{num(r['baseline_value']) if r['baseline_value'] is not None else ''} (target {r['target']})")
errs = {k: v for k, v in detail.items() if k.startswith("error")}
for k, v in errs.items():
    w(f"- **{k}**: {v}")
w("")
notes = os.path.join(here, "notes.md")
if os.path.exists(notes):
    w(open(notes).read().rstrip())
    w("")
profiles = sorted(f for f in os.listdir(out) if f.startswith("perf-") and f.endswith(".txt"))
w("## Profiles")
w("")
if meta.get("perf") != "1":
    w("perf could not record on this machine: no profile.")
elif not profiles:
    w("perf worked but no profile was taken (the throughput phase did not run).")
for f in profiles:
    label = f[len("perf-"):-len(".txt")]
    what = {
        "api_status": "the daemon, for 5 s while `GET /projects/:id/status` was under load (64 connections)",
        "api_list": "the daemon, for 5 s while `GET /projects` was under load (64 connections)",
        "api_start_stop": "systemd (PID 1) and the daemon together, for 8 s of back-to-back API start/stop "
                          "cycles of one project",
        "proxy_get": "the daemon, nginx's worker (the project's server) and the load generator, for 6 s while "
                     "the 1 KiB GET through the proxy was under load",
        "proxy_download": "the daemon and nginx's worker, for 4 s around the big download through the proxy",
    }.get(label, label)
    w(f"`perf record -e cpu-clock -F 1999 -p …`: {what}; flat profile, share of the samples "
      f"(`perf report --no-children`, by {'process, ' if label in ('api_start_stop', 'proxy_get', 'proxy_download') else ''}library and symbol):")
    w("")
    w("```")
    w(open(os.path.join(out, f)).read().rstrip() or "(empty)")
    w("```")
    w("")
method = os.path.join(here, "method.md")
if os.path.exists(method):
    w(open(method).read().rstrip())
    w("")
open(doc, "w").write("\n".join(L))
print(f"report: wrote {doc}" + (f" and {png}" if has_plot else ""))
