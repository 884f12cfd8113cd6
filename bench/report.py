"""From rounds to figures: medians, targets, and the printed table."""

from __future__ import annotations

import statistics
from typing import Any

from configs import _expected_closes
from harness import CONFIGS, STATE_CHANGES_PER_CONN, Profile
from session import TracerSession

# ---------------------------------------------------------------- report


def med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarise(rounds: list[dict[str, Any]], iperf: list[dict[str, Any]], rss: dict[str, Any] | None,
              prof: Profile) -> dict[str, Any]:
    by: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIGS}
    for r in rounds:
        if "skipped" not in r and "error" not in r:
            by[r["config"]].append(r)
    none_rate = {r["round"]: r["churn"]["rate"] for r in by["none"]}
    s: dict[str, Any] = {"configs": {}}
    for cfg, rs in by.items():
        if not rs:
            continue
        d: dict[str, Any] = {"runs": len(rs), "rate": med([r["churn"]["rate"] for r in rs])}
        d["overhead_ratio"] = med([r["churn"]["rate"] / none_rate[r["round"]] for r in rs if r["round"] in none_rate])
        if cfg != "none":
            d["cpu_us_per_conn"] = med([1e6 * r["cpu_s"] / max(1, r["churn"]["connections"]) for r in rs])
        if cfg == "conn-tracer":
            phases: dict[str, Any] = {}
            for name in ("low", "rate", "max"):
                ps = [r["phases"][name] for r in rs if name in r.get("phases", {})]
                if not ps:
                    continue
                lat = [p["subscriber"].get("latency_ms", {}) for p in ps]
                phases[name] = {
                    "rate_limit": ps[0]["churn"]["rate_limit"], "rate": med([p["churn"]["rate"] for p in ps]),
                    "completeness": med([p["completeness"] for p in ps]),
                    "completeness_min": min(p["completeness"] for p in ps),
                    "tracer_close_ratio": med([p["tracer_close_ratio"] for p in ps]),
                    "lost_kernel_max": max(p["lost_kernel"] for p in ps),
                    "backlog_dropped_max": max(p.get("backlog_dropped", 0) for p in ps),
                    "backlog_peak": max(p.get("backlog_peak", 0) for p in ps),
                    "dropped_subscribers_max": max(p["dropped_subscribers"] for p in ps),
                    "latency_p50_ms": med([x.get("p50") for x in lat]),
                    "latency_p99_ms": med([x.get("p99") for x in lat]),
                    "latency_p99_ms_worst": max((x["p99"] for x in lat if x.get("p99") is not None), default=None),
                    "cpu_us_per_event": med([1e6 * p["cpu_s"] / p["events_delivered"] for p in ps
                                             if p["events_delivered"]]),
                    "events_per_conn": med([p["events_delivered"] / max(1, p["churn"]["connections"]) for p in ps]),
                }
            mx = phases.get("max", {})
            d.update(phases=phases, completeness=mx.get("completeness"), completeness_min=min(
                         (p["completeness_min"] for p in phases.values()), default=None),
                     lost_kernel_max=max((p["lost_kernel_max"] for p in phases.values()), default=None),
                     backlog_dropped_max=max((p["backlog_dropped_max"] for p in phases.values()), default=None),
                     dropped_subscribers_max=max((p["dropped_subscribers_max"] for p in phases.values()),
                                                 default=None),
                     seq_regressions_total=sum(r.get("subscriber", {}).get("seq_regressions", 0) for r in rs),
                     events_per_conn=mx.get("events_per_conn"), cpu_us_per_event=mx.get("cpu_us_per_event"),
                     spawn_to_healthz_ms=med([r["startup"].get("spawn_to_healthz_ms") for r in rs]),
                     spawn_to_first_event_ms=med([r["startup"].get("spawn_to_first_event_ms") for r in rs]),
                     probe_to_first_event_ms=med([r["startup"].get("probe_to_first_event_ms") for r in rs]),
                     rss_mb_idle=med([r.get("rss_kb_idle", {}).get("VmRSS", 0) / 1024 for r in rs]),
                     rss_mb_after_round=med([r.get("rss_kb", {}).get("VmRSS", 0) / 1024 for r in rs]),
                     serve_exit_rc=[r.get("serve_exit", {}).get("rc") for r in rs])
        if cfg in ("tcplife", "tcpstates"):
            expected_lines = 2 if cfg == "tcplife" else STATE_CHANGES_PER_CONN
            d.update(completeness=med([r["closes"] / _expected_closes(r["churn"]) for r in rs]),
                     lines_ratio=med([r["lines"] / max(1, expected_lines * r["churn"]["connections"]) for r in rs]),
                     lost_samples_max=max(r["lost_samples"] for r in rs),
                     events_per_conn=med([r["lines"] / max(1, r["churn"]["connections"]) for r in rs]),
                     cpu_us_per_event=med([1e6 * r["cpu_s"] / max(1, r["lines"]) for r in rs]),
                     lost_warning=next((r["lost_warnings"][0] for r in rs if r["lost_warnings"]), None))
        if cfg == "bare":
            d.update(cpu_us_per_event=med([1e6 * r["cpu_s"] / max(1, r.get("events", 0)) for r in rs]),
                     events_per_conn=med([r.get("events", 0) / max(1, r["churn"]["connections"]) for r in rs]),
                     lost_kernel_max=max(r.get("lost_kernel", 0) for r in rs))
        s["configs"][cfg] = d
    ct, bare = s["configs"].get("conn-tracer", {}), s["configs"].get("bare", {})
    if ct.get("cpu_us_per_event") and bare.get("cpu_us_per_event"):
        s["pipeline_cost_ratio"] = ct["cpu_us_per_event"] / bare["cpu_us_per_event"]
    bps: dict[str, list[float]] = {}
    for r in iperf:
        if "bps" in r:
            bps.setdefault(r["config"], []).append(r["bps"])
    if bps.get("none"):
        s["iperf_gbps"] = {k: med(v) / 1e9 for k, v in bps.items()}  # type: ignore[operator]
        if bps.get("conn-tracer"):
            s["iperf_ratio"] = med(bps["conn-tracer"]) / med(bps["none"])  # type: ignore[operator]
    if rss and "rss_kb_after" in rss:
        s["rss_after_n"] = {"connections": rss["churn"]["connections"], "target": rss["target_connections"],
                            "rss_mb": rss["rss_kb_after"].get("VmRSS", 0) / 1024,
                            "hwm_mb": rss["rss_kb_after"].get("VmHWM", 0) / 1024,
                            "anon_mb": rss["rss_kb_after"].get("RssAnon", 0) / 1024,
                            "file_mb": rss["rss_kb_after"].get("RssFile", 0) / 1024,
                            "rss_mb_before": rss.get("rss_kb_before", {}).get("VmRSS", 0) / 1024,
                            "anon_mb_before": rss.get("rss_kb_before", {}).get("RssAnon", 0) / 1024,
                            "rate": rss["churn"]["rate"],
                            "completeness": rss.get("completeness"),
                            "lost_kernel": rss.get("stats", {}).get("lost_kernel"),
                            "backlog_dropped": rss.get("stats", {}).get("backlog_dropped"),
                            "dropped_subscribers": rss.get("stats", {}).get("dropped_subscribers")}
    return s


def targets(s: dict[str, Any], prof: Profile) -> list[dict[str, Any]]:
    c = s["configs"]
    ct, life = c.get("conn-tracer", {}), c.get("tcplife", {})
    rows: list[dict[str, Any]] = []

    def add(name: str, value: Any, target: str, ok: bool | None) -> None:
        rows.append({"target": name, "value": value, "want": target, "pass": ok})

    ov, lov = ct.get("overhead_ratio"), life.get("overhead_ratio")
    add("overhead (rate ratio)", ov, ">= 0.85 and > tcplife" + (f" ({lov:.3f})" if lov else " (not run)"),
        None if ov is None else ov >= 0.85 and ov > (lov or 0))
    cm = ct.get("completeness_min")
    add("completeness (closes, worst run)", cm, ">= 0.999", None if cm is None else cm >= 0.999)
    lk = ct.get("lost_kernel_max")
    add("kernel-lost events (worst run)", lk, "== 0", None if lk is None else lk == 0)
    pr = s.get("pipeline_cost_ratio")
    add("pipeline cost vs bare", pr, "<= 3x", None if pr is None else pr <= 3)
    ph = ct.get("phases", {}).get("rate", {})
    p99 = ph.get("latency_p99_ms")
    label = f"latency p99 @ {int(prof.latency_rate)}/s (ms)"
    if ph and ph["rate"] < 0.95 * prof.latency_rate:
        label += f" [got {ph['rate']:.0f}/s]"  # the machine could not offer the target rate
    add(label, p99, "<= 20", None if p99 is None else p99 <= 20)
    rss = s.get("rss_after_n")
    add(f"RSS after {rss['connections'] if rss else 'N'} conns (MB)", rss and rss["rss_mb"], "<= 200",
        None if not rss else rss["rss_mb"] <= 200)
    ir = s.get("iperf_ratio")
    add("bulk throughput ratio", ir, ">= 0.97", None if ir is None else ir >= 0.97)
    return rows


def fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def print_table(s: dict[str, Any], tg: list[dict[str, Any]], skipped: dict[str, str]) -> None:
    c = s["configs"]
    print(f"\n== per configuration (medians over rounds; subscriber /ws?{TracerSession.ws_query}) ==")
    hdr = f"{'config':<12} {'conn/s':>9} {'ratio':>6} {'cpu us/conn':>11} {'cpu us/ev':>9} {'ev/conn':>7} " \
          f"{'complete':>8} {'lost':>8}"
    print(hdr)
    print("-" * len(hdr))
    for cfg in CONFIGS:
        d = c.get(cfg)
        if not d:
            why = [ln for ln in skipped.get(cfg, "not run").splitlines() if ln.strip()]
            print(f"{cfg:<12} skipped: {why[0][:100]}" + (f" ... {why[-1].strip()[:100]}" if len(why) > 1 else ""))
            continue
        lost = d.get("lost_kernel_max", d.get("lost_samples_max"))
        print(f"{cfg:<12} {fmt(d['rate'], 0):>9} {fmt(d.get('overhead_ratio')):>6} "
              f"{fmt(d.get('cpu_us_per_conn'), 1):>11} {fmt(d.get('cpu_us_per_event'), 2):>9} "
              f"{fmt(d.get('events_per_conn'), 2):>7} {fmt(d.get('completeness'), 4):>8} {fmt(lost, 0):>8}")
    ct = c.get("conn-tracer")
    if ct:
        print("\n== conn-tracer by churn phase (one serve process per round; medians, worst where noted) ==")
        print("  complete = closes the subscriber got / sockets closed; tracer = close events that reached "
              "serve (upper bound)")
        print("  lost_k = /stats lost_kernel; shed = backlog_dropped (user-space backlog full), backlog = peak "
              "backlog_records; dropped = dropped_subscribers")
        h = (f"  {'phase':<5} {'limit/s':>7} {'got/s':>6} {'complete':>8} {'worst':>6} {'tracer':>6} {'lost_k':>7} "
             f"{'shed':>7} {'backlog':>7} {'dropped':>7} {'p50 ms':>7} {'p99 ms':>7} {'p99 max':>7} {'us/ev':>5} "
             f"{'ev/conn':>7}")
        print(h)
        for name, p in ct.get("phases", {}).items():
            print(f"  {name:<5} {fmt(p['rate_limit'] or None, 0):>7} {fmt(p['rate'], 0):>6} "
                  f"{fmt(p['completeness'], 4):>8} {fmt(p['completeness_min'], 3):>6} "
                  f"{fmt(p['tracer_close_ratio'], 3):>6} {fmt(p['lost_kernel_max']):>7} "
                  f"{fmt(p['backlog_dropped_max']):>7} {fmt(p['backlog_peak']):>7} "
                  f"{fmt(p['dropped_subscribers_max']):>7} {fmt(p['latency_p50_ms'], 1):>7} "
                  f"{fmt(p['latency_p99_ms'], 1):>7} {fmt(p['latency_p99_ms_worst'], 1):>7} "
                  f"{fmt(p['cpu_us_per_event'], 1):>5} {fmt(p['events_per_conn'], 2):>7}")
        print(f"  start-up: spawn -> /healthz 200 {fmt(ct.get('spawn_to_healthz_ms'), 0)} ms, spawn -> first event "
              f"{fmt(ct.get('spawn_to_first_event_ms'), 0)} ms (connect -> event received "
              f"{fmt(ct.get('probe_to_first_event_ms'), 2)} ms)")
        print(f"  RSS idle {fmt(ct.get('rss_mb_idle'), 1)} MB, "
              f"after a round {fmt(ct.get('rss_mb_after_round'), 1)} MB; "
              f"seq regressions {ct.get('seq_regressions_total')}; serve exit codes {ct.get('serve_exit_rc')}")
    for peer in ("tcplife", "tcpstates"):
        if peer in c:
            print(f"  {peer} lines/expected {fmt(c[peer].get('lines_ratio'), 4)}; "
                  f"warning: {c[peer].get('lost_warning') or 'none'}")
    if "pipeline_cost_ratio" in s:
        print(f"  pipeline cost: {fmt(s['pipeline_cost_ratio'], 2)}x bare "
              f"({fmt(ct and ct.get('cpu_us_per_event'), 2)} vs {fmt(c['bare'].get('cpu_us_per_event'), 2)} us/event)")
    if "iperf_gbps" in s:
        print(f"  iperf3 Gbit/s: {', '.join(f'{k} {v:.2f}' for k, v in s['iperf_gbps'].items())}; "
              f"ratio {fmt(s.get('iperf_ratio'), 4)}")
    if "rss_after_n" in s:
        r = s["rss_after_n"]
        print(f"  RSS after {r['connections']:,} of {r['target']:,} connections ({r['rate']:,.0f}/s): "
              f"{r['rss_mb']:.1f} MB (anon {r['anon_mb']:.1f}, file {r['file_mb']:.1f}, peak {r['hwm_mb']:.1f}); "
              f"before {r['rss_mb_before']:.1f} MB (anon {r['anon_mb_before']:.1f}); "
              f"completeness {fmt(r['completeness'], 4)}, lost_kernel {r['lost_kernel']}, "
              f"shed {r['backlog_dropped']}, dropped_subscribers {r['dropped_subscribers']}")
    print("\n== targets ==")
    for t in tg:
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[t["pass"]]
        print(f"  [{mark}] {t['target']:<36} {fmt(t['value']):>10}   want {t['want']}")

