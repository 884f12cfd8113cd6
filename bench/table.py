"""The printed table: render(result) turns one run's JSON (as run.py writes it) into text."""

from __future__ import annotations

from typing import Any

from report import COUNTING, PEERS, SHOWN_TRACERS, TRACERS


def fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _configs(c: dict[str, Any], order: list[str], skipped: dict[str, str]) -> list[str]:
    out = ["== per configuration: max-rate churn, medians over rounds (worst: the worst round) ==",
           "  ratio = conn/s vs none in the same round; cpu = the consumer process (serve, tool, reader), its "
           "threads and children;",
           "  ev = events it took from the ring (serve: /stats events; floor, bare: records; peers: lines); "
           "bpf = in-kernel time of its programs"]
    hdr = (f"{'config':<18} {'conn/s':>7} {'ratio':>5} {'cpu us/conn':>11} {'cpu us/ev':>9} {'ev/conn':>7} "
           f"{'complete':>8} {'worst':>6} {'lost_k':>7} {'dropped':>7} {'bpf us/conn':>11}")
    out += [hdr, "-" * len(hdr)]
    for cfg in order:
        d = c.get(cfg)
        if not d:
            why = [ln for ln in skipped.get(cfg, "not run").splitlines() if ln.strip()]
            out.append(f"{cfg:<18} skipped: {why[0][:100]}" + (f" ... {why[-1].strip()[:100]}" if len(why) > 1 else ""))
            continue
        out.append(f"{cfg:<18} {fmt(d['rate'], 0):>7} {fmt(d.get('overhead_ratio')):>5} "
                   f"{fmt(d.get('cpu_us_per_conn'), 1):>11} {fmt(d.get('cpu_us_per_event'), 2):>9} "
                   f"{fmt(d.get('events_per_conn'), 2):>7} {fmt(d.get('completeness'), 4):>8} "
                   f"{fmt(d.get('completeness_min'), 3):>6} {fmt(d.get('lost_kernel_max')):>7} "
                   f"{fmt(d.get('dropped_subscribers_max')):>7} {fmt(d.get('bpf', {}).get('us_per_conn'), 2):>11}")
    return out


def _phases(c: dict[str, Any]) -> list[str]:
    out = ["", "== conn-tracer by churn phase (one serve process per round; medians, worst where noted) ==",
           "  complete = closes the subscriber got / sockets closed (worst: worst round); tracer = close events "
           "that reached serve (upper bound)",
           "  lost_k = /stats lost_kernel; dropped = dropped_subscribers; cpu = serve only"]
    hdr = (f"  {'config':<18} {'phase':<5} {'limit/s':>7} {'got/s':>6} {'complete':>8} {'worst':>6} {'tracer':>6} "
           f"{'lost_k':>7} {'dropped':>7} {'p50 ms':>7} {'p99 ms':>7} {'p99 max':>7} "
           f"{'us/conn':>7} {'us/ev':>6} {'ev/conn':>7}")
    out.append(hdr)
    for cfg in SHOWN_TRACERS:
        for name, p in c.get(cfg, {}).get("phases", {}).items():
            out.append(f"  {cfg:<18} {name:<5} {fmt(p['rate_limit'] or None, 0):>7} {fmt(p['rate'], 0):>6} "
                       f"{fmt(p['completeness'], 4):>8} {fmt(p['completeness_min'], 3):>6} "
                       f"{fmt(p['tracer_close_ratio'], 3):>6} {fmt(p['lost_kernel_max']):>7} "
                       f"{fmt(p['dropped_subscribers_max']):>7} {fmt(p['latency_p50_ms'], 1):>7} "
                       f"{fmt(p['latency_p99_ms'], 1):>7} {fmt(p['latency_p99_ms_worst'], 1):>7} "
                       f"{fmt(p['cpu_us_per_conn'], 1):>7} {fmt(p['cpu_us_per_event'], 2):>6} "
                       f"{fmt(p['events_per_conn'], 2):>7}")
    for cfg in SHOWN_TRACERS:
        ct = c.get(cfg)
        if not ct:
            continue
        out.append(f"  {cfg} (/ws?{ct.get('ws_query')}): spawn -> /healthz 200 {fmt(ct.get('spawn_to_healthz_ms'), 0)}"
                   f" ms, spawn -> first event {fmt(ct.get('spawn_to_first_event_ms'), 0)} ms (connect -> event "
                   f"{fmt(ct.get('probe_to_first_event_ms'), 2)} ms); RSS idle {fmt(ct.get('rss_mb_idle'), 1)} MB, "
                   f"after a round {fmt(ct.get('rss_mb_after_round'), 1)} MB; seq regressions "
                   f"{ct.get('seq_regressions_total')}; serve exit codes {ct.get('serve_exit_rc')}")
    return out


def _kernel(c: dict[str, Any], order: list[str]) -> list[str]:
    if not any(c.get(cfg, {}).get("bpf") for cfg in order):
        return []
    out = ["", "== in-kernel BPF time during the max-rate churn (bpf_stats on for that window only; medians "
           "over rounds) ==",
           "  programs found through the consumer's own fds; runs/conn and us/conn per churn connection "
           "(other TCP traffic on the host included)"]
    hdr = f"  {'config':<18} {'program':<40} {'runs/conn':>9} {'ns/run':>7} {'us/conn':>8} {'rec.miss':>8}"
    out.append(hdr)
    for cfg in order:
        b = c.get(cfg, {}).get("bpf")
        if not b:
            continue
        if "skipped" in b:
            out.append(f"  {cfg:<18} not measured: {b['skipped']}")
            continue
        if not b["programs"]:
            out.append(f"  {cfg:<18} no BPF program fds found in the process")
            continue
        for i, p in enumerate(b["programs"]):
            out.append(f"  {cfg if i == 0 else '':<18} {p['name'][:40]:<40} {fmt(p['runs_per_conn'], 2):>9} "
                       f"{fmt(p['ns_per_run'], 0):>7} {fmt(p['us_per_conn'], 3):>8} {fmt(p['recursion_misses']):>8}")
        note = "  (bpf_stats were switched off by someone else meanwhile: too low)" if b.get("interrupted") else ""
        out.append(f"  {'':<18} {'total':<40} {fmt(b['runs_per_conn'], 2):>9} {'':>7} "
                   f"{fmt(b['us_per_conn'], 3):>8}{note}")
    return out


def _others(s: dict[str, Any]) -> list[str]:
    c = s["configs"]
    out = [""]
    for peer in PEERS:
        if peer in c:
            out.append(f"  {peer}: lines/expected {fmt(c[peer].get('lines_ratio'), 4)}; "
                       f"warning: {c[peer].get('lost_warning') or 'none'}")
    for cfg in COUNTING:
        if cfg in c and c[cfg].get("cpu_us_per_event") is not None:
            per_cb = c[cfg].get("records_per_wakeup")
            out.append(f"  {cfg}: {fmt(c[cfg].get('cpu_us_per_event'), 2)} us CPU per record, "
                       f"{fmt(c[cfg].get('events_per_conn'), 2)} records per connection"
                       + (f", {per_cb:.1f} records per callback (per wake-up)" if per_cb else ""))
    for cfg, ratio in s.get("pipeline_vs_floor", {}).items():
        out.append(f"  pipeline cost {cfg}: {ratio:.2f}x the floor per event "
                   f"({fmt(c[cfg].get('cpu_us_per_event'), 2)} vs {fmt(c['floor'].get('cpu_us_per_event'), 2)} us)")
    if "iperf_gbps" in s:
        out.append(f"  iperf3 Gbit/s: {', '.join(f'{k} {v:.2f}' for k, v in s['iperf_gbps'].items())}; "
                   f"ratio {fmt(s.get('iperf_ratio'), 4)}")
    if "rss_after_n" in s:
        r = s["rss_after_n"]
        out.append(f"  RSS of serve ({r['config']}) after {r['connections']:,} of {r['target']:,} connections "
                   f"({r['rate']:,.0f}/s): {r['rss_mb']:.1f} MB (anon {r['anon_mb']:.1f}, file {r['file_mb']:.1f}, "
                   f"peak {r['hwm_mb']:.1f}); before {r['rss_mb_before']:.1f} MB (anon {r['anon_mb_before']:.1f}); "
                   f"completeness {fmt(r['completeness'], 4)}, lost_kernel {r['lost_kernel']}, "
                   f"dropped_subscribers {r['dropped_subscribers']}")
    return out if len(out) > 1 else []


def _export(x: dict[str, Any] | None) -> list[str]:
    if not x:
        return []
    if "skipped" in x:
        return ["", f"export phase skipped: {x['skipped']}"]
    rn, q = x["rounds"], x.get("ws_query")
    out = ["", "== export to NATS JetStream (issue 12): one agent without and with export, back to back "
               f"({' + '.join(f'{v} {k}' for k, v in rn.items())} runs); medians, worst where noted ==",
           f"  plain = serve + a subscriber on its /ws?{q}; export = the same serve with --nats --host-name "
           f"{x.get('host_name')} and its subscriber,",
           f"  plus nats-server -js, conn-tracer fleet and a subscriber on the fleet view's /ws?{q}; to-nats = export "
           "without the fleet view and its subscriber (info)",
           "  ratio = conn/s vs plain in the same round; us/conn = CPU per churn connection of serve, the fleet view, "
           "nats-server; drops = serve's export.dropped (worst)",
           "  acked = all it published acknowledged after each phase; ev/msg = events per NATS message; "
           "agent p99, complete = at serve's own subscriber",
           "  (read a ratio with completeness: an agent that drops events also spends less CPU on them); "
           "busy = all CPUs busy during the churn (1.00: saturated, every process waits for a core)",
           "  gen = the load generator (with the kernel's TCP work in its syscalls), subs = the bench's subscribers: "
           "us/conn, like serve, fleet, nats"]
    hdr = (f"  {'phase':<5} {'mode':<7} {'limit/s':>7} {'conn/s':>7} {'ratio':>6} {'serve':>6} {'fleet':>6} "
           f"{'nats':>6} {'drops':>6} {'lost_k':>6} {'acked':>5} {'ev/msg':>6} {'agent p99':>9} {'complete':>8} "
           f"{'busy':>5} {'gen':>5} {'subs':>5}")
    out.append(hdr)
    for ph, d in x.get("phases", {}).items():
        for mode in ("plain", "export", "to-nats"):
            e = d.get(mode)
            if not e:
                continue
            acked = ("yes" if e["export_drained_all"] else "NO") if "export_drained_all" in e else "-"
            out.append(f"  {ph:<5} {mode:<7} {fmt(e.get('rate_limit') or None, 0):>7} {fmt(e.get('rate'), 0):>7} "
                       f"{fmt(e.get('rate_ratio', d.get('rate_ratio') if mode == 'export' else None), 3):>6} "
                       f"{fmt(e.get('cpu_us_per_conn'), 1):>6} "
                       f"{fmt(e.get('fleet_cpu_us_per_conn'), 1):>6} {fmt(e.get('nats_cpu_us_per_conn'), 1):>6} "
                       f"{fmt(e.get('drops_max')):>6} {fmt(e.get('lost_kernel_max')):>6} {acked:>5} "
                       f"{fmt(e.get('events_per_message'), 0):>6} {fmt(e.get('agent_p99_ms'), 1):>9} "
                       f"{fmt(e.get('agent_completeness'), 4):>8} {fmt(e.get('machine_busy'), 2):>5} "
                       f"{fmt(e.get('generator_cpu_us_per_conn'), 1):>5} "
                       f"{fmt(e.get('subscribers_cpu_us_per_conn'), 1):>5}")
    out.append("  fleet subscriber (export): complete = closes it got / sockets closed; caught up = the fleet view "
               "applied all the agent had acknowledged (longest wait)")
    hdr = (f"  {'phase':<5} {'complete':>8} {'worst':>6} {'caught up':>9} {'p50 ms':>7} {'p99 ms':>7} "
           f"{'p99 max':>7} {'max ms':>7} {'lost_export':>11}")
    out.append(hdr)
    for ph, d in x.get("phases", {}).items():
        e = d.get("export", {})
        if "fleet_completeness" not in e:
            continue
        caught = (f"{'yes' if e['fleet_drained_all'] else 'NO'} {e['fleet_drain_s_max']:.0f}s"
                  if "fleet_drained_all" in e else "-")
        out.append(f"  {ph:<5} {fmt(e['fleet_completeness'], 4):>8} {fmt(e['fleet_completeness_min'], 3):>6} "
                   f"{caught:>9} {fmt(e.get('fleet_p50_ms'), 1):>7} {fmt(e.get('fleet_p99_ms'), 1):>7} "
                   f"{fmt(e.get('fleet_p99_ms_worst'), 1):>7} {fmt(e.get('fleet_max_ms_worst'), 1):>7} "
                   f"{fmt(e.get('fleet_lost_export_max')):>11}")
    out.append(f"  fleet latency from: {', '.join(x.get('latency_source', [])) or '-'} (ts_ns = the agent's kernel "
               f"CLOCK_MONOTONIC, same machine); fleet seq regressions {x.get('fleet_seq_regressions')}")
    out += [f"  {why}" for why in x.get("problems", [])]
    return out


def _max2(a: Any, b: Any) -> Any:
    return max((v for v in (a, b) if v is not None), default=None)


def _targets(tg: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    section = None
    for t in tg:
        if t.get("section", "issue 8") != section:  # runs before issue 12 have no section: all issue 8
            section = t.get("section", "issue 8")
            out += ["", f"== targets ({section}) =="]
        mark = {True: "PASS", False: "FAIL"}.get(t["pass"], "n/a " if t["value"] is None else "info")
        out.append(f"  [{mark}] {t['target']:<50} {fmt(t['value']):>10}   want {t['want']}")
    return out


def _profile(p: dict[str, Any] | None) -> list[str]:
    if not p or "self_pct" not in p:
        return [f"\npy-spy profile skipped: {p['skipped']}"] if p and "skipped" in p else []
    out = ["", f"== py-spy: serve's MainThread during max-rate churn, {p.get('config')} ({p['samples']} samples "
           f"at 100 Hz) ==",
           "  self time by component: " + ", ".join(f"{k} {v}%" for k, v in p["self_by_component_pct"][:10]),
           "  top self time:"]
    out += [f"    {pct:5.1f}%  {name[:100]}" for name, pct in p["self_pct"][:10]]
    out.append("  top inclusive time:")
    out += [f"    {pct:5.1f}%  {name[:100]}" for name, pct in p["inclusive_pct"][:18]]
    return out


def render(result: dict[str, Any]) -> str:
    m, s = result["meta"], result["summary"]
    order = m.get("configs") or list(s["configs"])
    prof = m.get("profile", {})
    head = (f"conn-tracer bench {m.get('timestamp')}: git {m.get('git')}, kernel {m.get('kernel')}, "
            f"{m.get('cpus')} CPUs, {'quick' if m.get('quick') else 'full'} ({prof.get('rounds')} rounds, "
            f"{prof.get('churn_s')} s max-rate churn), argv {' '.join(m.get('argv', [])) or '-'}")
    lines = [head] + (["", *_configs(s["configs"], order, result.get("skipped", {}))] if order else [])
    if any(cfg in s["configs"] for cfg in TRACERS):
        lines += _phases(s["configs"])
    lines += (_kernel(s["configs"], order) + _others(s) + _export(s.get("export")) + _targets(result["targets"])
              + _profile(result.get("profile")))
    return "\n".join(lines) + "\n"
