"""The export phase (issue 12): one agent without and with export to NATS JetStream, side by side.

Each round runs three modes back to back, in an order rotated per round:
- `plain`: `serve` + one subscriber on the agent's `/ws?batch=256`;
- `export`: the same `serve` and subscriber, started with `--nats URL --host-name benchA`, plus a
  fresh `nats-server -js` (its own store, removed afterwards), a `conn-tracer fleet` reading the
  stream, and one subscriber on the fleet view's `/ws?batch=256`;
- `to-nats` (shown, not held to a target): as `export` without the fleet view and its subscriber.
The agent's own subscriber stays in every mode, so the agent's work differs only by the exporter;
nats-server, the fleet view and its subscriber are extra processes sharing the two cores with the
churn, which is part of what export costs on one machine (in a real fleet the view runs elsewhere:
`to-nats` shows how much of the difference is the view's).

Each mode gets a 10,000/s churn (prof.latency_s) and then a max-rate churn (prof.churn_s), each on
its own port. report.py turns the rounds into figures (summarise_export) and targets.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import tempfile
import time
import urllib.error
from pathlib import Path
from typing import Any

from configs import Context
from harness import (
    BUILD,
    CONN_TRACER,
    Proc,
    Skip,
    busy_fraction,
    cpu_s,
    cpu_times,
    expected_closes,
    free_port,
    healthz_ok,
    http_json,
    raise_,
    wait_for,
)
from session import SubscriberProc, TracerSession

NATS_SERVER = "nats-server"
HOST_NAME = "benchA"
QUERY = "batch=256"
# `to-nats` (shown, not a target): the agent exporting to nats-server with no fleet view reading, so
# the fleet view's share of this machine's two cores can be told from the agent's and NATS's.
MODES = ("plain", "export", "to-nats")
EXPORT_KEYS = ("published", "acknowledged", "dropped", "buffered", "resent", "reconnects", "messages")
EXPORT_DRAIN_S = 60.0   # bound on waiting for JetStream to acknowledge what the agent published


def nats_ready(port: int) -> bool:
    """nats-server greets every client with INFO once it accepts connections."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(4) == b"INFO"
    except OSError:
        return False


def _stats(base: str) -> dict[str, Any]:
    try:
        return dict(http_json(base + "/stats"))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return {"error": repr(exc)}


def _export_block(st: dict[str, Any]) -> dict[str, Any]:
    e = st.get("export") or {}
    return {k: int(e.get(k, 0)) for k in EXPORT_KEYS}


def _delta(a: dict[str, Any], b: dict[str, Any], key: str) -> int:
    return int(b.get(key, 0)) - int(a.get(key, 0))


def exported_all(st: dict[str, Any]) -> bool:
    """Everything published so far is acknowledged by JetStream (or counted as dropped), nothing waits."""
    e = st.get("export") or {}
    return bool(e) and e["buffered"] == 0 and e["acknowledged"] + e["dropped"] >= e["published"]


def fleet_host_seq(base: str) -> int:
    """The agent's seq of the latest event the fleet view has applied (its newest event's host_seq)."""
    seq = int(_stats(base).get("seq") or 0)
    if seq <= 0:
        return 0
    with contextlib.suppress(urllib.error.URLError, OSError, ValueError, KeyError, IndexError):
        return int(http_json(f"{base}/events?after={seq - 1}&limit=1")[0]["host_seq"])
    return 0


def drain_fleet(sub: SubscriberProc, base: str, port: int, expected: int, agent_seq: int,
                timeout_s: float = 120.0, stuck_s: float = 10.0, stall_s: float = 1.5) -> tuple[float, bool]:
    """Wait until the fleet subscriber has every close for port; else until the fleet view has applied
    the agent's events up to agent_seq (all acknowledged by then) and the subscriber's count stopped
    moving for stall_s. Not the fleet view's own seq going still: the agent exports every TCP event
    of the host, so someone's background connections keep it moving. Gives up when the fleet view
    applies nothing new for stuck_s. Returns (seconds waited, whether it reached agent_seq)."""
    t0 = time.monotonic()
    last_n, n_change = -1, t0
    last_seq, seq_change = -1, t0
    reached = False
    while time.monotonic() - t0 < timeout_s:
        n = sub.closes(port)
        if n >= expected:
            reached = True
            break
        now = time.monotonic()
        if n != last_n:
            last_n, n_change = n, now
        if not reached:
            hs = fleet_host_seq(base)
            reached = hs >= agent_seq
            if hs != last_seq:
                last_seq, seq_change = hs, now
            elif now - seq_change > stuck_s:
                break
        if reached and now - n_change > stall_s:
            break
        time.sleep(0.1)
    time.sleep(0.3)  # one more progress line, so the counts read next are final
    return time.monotonic() - t0, reached


def run_export(ctx: Context) -> dict[str, Any]:
    """prof.export_rounds rounds of plain and export, alternated; the rounds for report.summarise_export."""
    if shutil.which(NATS_SERVER) is None:
        raise Skip(f"{NATS_SERVER} not on PATH: apt-get install -y nats-server")
    if not CONN_TRACER.exists():
        raise Skip(f"{CONN_TRACER} not installed")
    rounds: list[dict[str, Any]] = []
    for rnd in range(ctx.prof.export_rounds):
        k = rnd % len(MODES)
        for mode in MODES[k:] + MODES[:k]:  # the order rotated per round, as the configurations
            t = time.monotonic()
            try:
                r = run_mode(ctx, rnd, mode)
            except Skip as exc:
                # What kept one mode from starting would keep the next rounds from it too.
                rounds.append({"round": rnd, "mode": mode, "skipped": str(exc)})
                print(f"  export round {rnd} {mode}: skipped: {exc}", flush=True)
                return {"rounds": rounds, "host_name": HOST_NAME, "ws_query": QUERY, "stopped": str(exc)}
            except (OSError, RuntimeError, ValueError, KeyError) as exc:
                rounds.append({"round": rnd, "mode": mode, "error": repr(exc)})
                print(f"  export round {rnd} {mode}: error: {exc!r}", flush=True)
                continue
            r.update(round=rnd, mode=mode, wall_s=round(time.monotonic() - t, 1))
            rounds.append(r)
            rates = "  ".join(f"{n} {p['churn']['rate']:,.0f}/s" for n, p in r["phases"].items())
            print(f"  export round {rnd} {mode:<6} {rates}  {r['wall_s']:.1f} s", flush=True)
    return {"rounds": rounds, "host_name": HOST_NAME, "ws_query": QUERY}


def run_mode(ctx: Context, rnd: int, mode: str) -> dict[str, Any]:
    """One agent (plain or exporting) through a 10,000/s and a max-rate churn."""
    prof = ctx.prof
    phases = (("rate", prof.latency_rate, prof.latency_s), ("max", 0.0, prof.churn_s))
    ports = {name: free_port() for name, _, _ in phases}
    name = f"x{rnd}-{mode}"
    nats: Proc | None = None
    fleet: Proc | None = None
    fleet_sub: SubscriberProc | None = None
    fleet_base = ""
    store: Path | None = None
    serve_args: list[str] = []
    res: dict[str, Any] = {"phases": {}, "loadavg_before": os.getloadavg()}  # others' load shows here
    sess: TracerSession | None = None
    try:
        if mode != "plain":
            BUILD.mkdir(parents=True, exist_ok=True)
            store = Path(tempfile.mkdtemp(prefix="nats-", dir=BUILD))
            nport = free_port()
            url = f"nats://127.0.0.1:{nport}"
            nats = Proc(f"{name}-nats", [NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(nport), "-sd", str(store)])
            n = nats
            wait_for(lambda: (n.alive() or raise_(Skip(f"nats-server exited: {n.log_tail()}"))) and nats_ready(nport),
                     20, "nats-server accepting connections")
            serve_args = ["--nats", url, "--host-name", HOST_NAME]
        if mode == "export":
            fport = free_port()
            fleet_base = f"http://127.0.0.1:{fport}"
            # The fleet view first, and its subscriber connected, so it sees the agent's first event.
            fleet = Proc(f"{name}-fleet", [str(CONN_TRACER), "fleet", "--nats", url, "--host", "127.0.0.1",
                                           "--port", str(fport), "--durable", "bench"])
            f, fb = fleet, fleet_base
            wait_for(lambda: (f.alive() or raise_(Skip(f"fleet exited: {f.log_tail()}"))) and healthz_ok(fb),
                     60, "fleet view /healthz 200")
            fleet_sub = SubscriberProc(f"ws://127.0.0.1:{fport}/ws?{QUERY}", list(ports.values()),
                                       f"{name}-fleet-subscriber")
            fs = fleet_sub
            wait_for(lambda: fs.ready is not None, 20, "fleet WebSocket subscriber connected")
        sess = TracerSession(list(ports.values()), name, QUERY, serve_args=serve_args)
        agent = sess
        sess.start()
        assert sess.serve is not None
        pid = sess.serve.pid
        for ph, rate, secs in phases:
            st0, c0 = sess.stats(), cpu_s(pid)
            f0 = _stats(fleet_base) if fleet else {}
            fc0 = cpu_s(fleet.pid) if fleet else 0.0
            nc0 = cpu_s(nats.pid) if nats else 0.0
            subs = [s for s in (sess.sub, fleet_sub) if s is not None]
            sc0 = sum(s.cpu_s() for s in subs)
            m0 = cpu_times()
            ch = ctx.churn.run(ports[ph], secs, rate=rate)
            busy = busy_fraction(m0, cpu_times())
            # The subscribers' share of the machine in the churn window (the agent's and the fleet view's).
            subs_cpu = sum(s.cpu_s() for s in subs) - sc0
            exp = expected_closes(ch)
            out: dict[str, Any] = {"port": ports[ph], "churn": ch, "expected_closes": exp, "machine_busy": busy,
                                   "subscribers_cpu_s": subs_cpu,
                                   "drain_s": sess.drain(ports[ph], exp)}
            if nats is not None:
                # The agent's share of the work ends when JetStream has acknowledged what it published.
                t = time.monotonic()
                drained = False
                with contextlib.suppress(Skip):
                    wait_for(lambda: exported_all(agent.stats()), EXPORT_DRAIN_S, "export acknowledged", 0.1)
                    drained = True
                out["export_drain_s"] = time.monotonic() - t
                out["export_drained"] = drained
            st1, c1 = sess.stats(), cpu_s(pid)
            out.update(cpu_s=c1 - c0, lost_kernel=_delta(st0, st1, "lost_kernel"),
                       lost_export=_delta(st0, st1, "lost_export"),
                       dropped_subscribers=_delta(st0, st1, "dropped_subscribers"))
            if nats is not None:
                e0, e1 = _export_block(st0), _export_block(st1)
                out["export_before"], out["export_after"] = e0, e1
                out["export"] = {k: e1[k] - e0[k] for k in EXPORT_KEYS if k != "buffered"}
                out["export"]["buffered_after"] = e1["buffered"]
            if fleet is not None and fleet_sub is not None:
                out["fleet_drain_s"], out["fleet_drained"] = drain_fleet(fleet_sub, fleet_base, ports[ph], exp,
                                                                         int(st1.get("seq") or 0))
                f1 = _stats(fleet_base)
                out.update(fleet_cpu_s=cpu_s(fleet.pid) - fc0,
                           fleet_lost_export=_delta(f0, f1, "lost_export"),
                           fleet_dropped_subscribers=_delta(f0, f1, "dropped_subscribers"),
                           fleet_events=sum(f1.get("events", {}).values()) - sum(f0.get("events", {}).values()))
            if nats is not None:  # after the fleet view's drain: nats-server works for it too
                out["nats_cpu_s"] = cpu_s(nats.pid) - nc0
            res["phases"][ph] = out
        res["stats_end"] = sess.stats()
        if fleet:
            res["fleet_stats_end"] = _stats(fleet_base)
    finally:
        if fleet_sub is not None:
            res["fleet_subscriber"] = fleet_sub.stop()
        if sess is not None:
            res.update(sess.stop())
        if fleet is not None:
            res["fleet_exit_rc"] = fleet.stop(signal.SIGTERM, 15)
        if nats is not None:
            res["nats_exit_rc"] = nats.stop(signal.SIGTERM, 15)
        if store is not None:
            shutil.rmtree(store, ignore_errors=True)
    for key, sub_key in (("subscriber", "agent"), ("fleet_subscriber", "fleet")):
        seen = res.get(key, {}).get("ports", {})
        for ph in res["phases"].values():
            got = seen.get(str(ph["port"]), {})
            ph[sub_key] = {"completeness": (got.get("close_client", 0) + got.get("close_server", 0))
                           / max(1, ph["expected_closes"]), "latency_ms": got.get("latency_ms", {}),
                           "events": got.get("events", 0)}
        res.get(key, {}).pop("ports", None)  # now split per phase
    return res
