"""The configurations: how each one is started, measured during the churn, and stopped.

Every configuration runs once per round and returns a dict for that round; report.py turns the
rounds into figures. The max-rate churn of every traced configuration is also the window in which
its programs' in-kernel cost is measured (kernel.measure: bpf_stats on for that window only).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kernel
from harness import (
    BENCH,
    LOGS,
    VENV_PY,
    Churn,
    Proc,
    Profile,
    Skip,
    bpf_attached,
    cpu_s,
    expected_closes,
    free_port,
    memory_kb,
    probe_connection,
    raise_,
    wait_for,
    wait_idle,
)
from report import BASELINE  # --baseline REV: the same serve + batch subscriber from another commit's tree
from session import TracerSession

# The two subscribers the issue asks to keep up: every event in batches of up to 256 per message,
# and the API's default one-event-per-message mode, filtered to closes.
TRACER_QUERIES = {"conn-tracer/batch": "batch=256", "conn-tracer/close": "type=close"}


@dataclass
class Context:
    """What every configuration's run gets besides its round number."""

    churn: Churn
    prof: Profile
    bpf_stats: bool = True
    baseline_tree: Path | None = None


def _events_total(stats: dict[str, Any]) -> int:
    ev = stats.get("events")
    return sum(int(v) for v in ev.values()) if isinstance(ev, dict) else 0


def _stat_delta(st0: dict[str, Any], st1: dict[str, Any], key: str) -> int:
    return int(st1.get(key, 0)) - int(st0.get(key, 0))


def run_conn_tracer(ctx: Context, rnd: int, cfg: str) -> dict[str, Any]:
    """`serve` + one subscriber (TRACER_QUERIES[cfg]) through three churn phases.

    Each phase has its own port so the subscriber can tell them apart: a low rate (the unloaded
    pipeline), the moderate rate of the latency target, then max rate (overhead, CPU and BPF
    figures). Low first, so no backlog of a harder phase leaks into it.
    """
    prof = ctx.prof
    phases = (("low", prof.low_rate, prof.low_s), ("rate", prof.latency_rate, prof.latency_s),
              ("max", 0.0, prof.churn_s))
    ports = {name: free_port() for name, _, _ in phases}
    if cfg == BASELINE:
        if ctx.baseline_tree is None:
            raise Skip("no --baseline given")
        env = {**os.environ, "PYTHONPATH": str(ctx.baseline_tree)}
        # -P: the baseline tree on PYTHONPATH must win over the current directory (this tree).
        sess = TracerSession(list(ports.values()), f"r{rnd}-baseline", "batch=256",
                             [str(VENV_PY), "-P", "-m", "app.cli"], env)
    else:
        sess = TracerSession(list(ports.values()), f"r{rnd}-{cfg}", TRACER_QUERIES[cfg])
    res: dict[str, Any] = {"ws_query": sess.ws_query, "phases": {}}
    try:
        sess.start()
        assert sess.serve is not None and sess.sub is not None
        pid = sess.serve.pid
        res["rss_kb_idle"] = memory_kb(pid)
        for name, rate, secs in phases:
            st0, c0 = sess.stats(), cpu_s(pid)
            with kernel.measure(pid, ctx.bpf_stats and name == "max") as bpf:
                ch = ctx.churn.run(ports[name], secs, rate=rate)
            drain_s = sess.drain(ports[name], expected_closes(ch))
            st1, c1 = sess.stats(), cpu_s(pid)
            res["phases"][name] = {
                "port": ports[name], "churn": ch, "cpu_s": c1 - c0, "drain_s": drain_s,
                "events_delivered": _events_total(st1) - _events_total(st0),
                "lost_kernel": _stat_delta(st0, st1, "lost_kernel"),
                # close events that reached user space, whatever the subscriber then got; other
                # TCP traffic on the host is in here too, so it is an upper bound.
                "tracer_closes": _stat_delta(st0.get("events", {}), st1.get("events", {}), "close"),
                "dropped_subscribers": _stat_delta(st0, st1, "dropped_subscribers")}
            if name == "max":
                res["phases"][name]["bpf"] = kernel.per_connection(bpf, ch["connections"])
        mx = res["phases"]["max"]
        res.update(churn=mx["churn"], cpu_s=mx["cpu_s"], events_delivered=mx["events_delivered"], bpf=mx["bpf"],
                   stats_end=sess.stats(), rss_kb=memory_kb(pid))
    finally:
        res.update(sess.stop())
    ports_seen = res.get("subscriber", {}).get("ports", {})
    for ph in res["phases"].values():
        got = ports_seen.get(str(ph["port"]), {})
        ph["subscriber"] = got
        ph["completeness"] = (got.get("close_client", 0) + got.get("close_server", 0)) / max(
            1, expected_closes(ph["churn"]))
        ph["tracer_close_ratio"] = ph["tracer_closes"] / max(1, expected_closes(ph["churn"]))
    res.get("subscriber", {}).pop("ports", None)  # now split per phase
    probe_first = ports_seen.get(str(sess.probe_port), {}).get("first_recv_ns", 0)
    res["startup"] = dict(sess.startup)
    if probe_first:
        res["startup"]["spawn_to_first_event_ms"] = (probe_first - sess.startup["spawn_ns"]) / 1e6
        res["startup"]["probe_to_first_event_ms"] = (probe_first - sess.startup["probe_ns"]) / 1e6
    return res


def _measure_churn(ctx: Context, pid: int, port: int) -> dict[str, Any]:
    """One max-rate churn against a consumer process: its CPU, BPF time, drain and memory."""
    c0 = cpu_s(pid)
    with kernel.measure(pid, ctx.bpf_stats) as bpf:
        ch = ctx.churn.run(port, ctx.prof.churn_s)
    # 3 s is plenty for a perf/ring buffer of a few MiB; past that the consumer is only following
    # other TCP traffic on the host, which would be charged to it as drain CPU.
    drain_s = wait_idle(pid, 3)
    return {"bpf": kernel.per_connection(bpf, ch["connections"]), "drain_s": drain_s, "churn": ch,
            "cpu_s": cpu_s(pid) - c0, "rss_kb": memory_kb(pid)}


def run_peer(ctx: Context, rnd: int, tool: str) -> dict[str, Any]:
    """A bcc tool (tcplife-bpfcc, tcpstates-bpfcc) with its stdout to a file, as an operator runs it."""
    exe = f"/usr/sbin/{tool}-bpfcc"
    if not Path(exe).exists():
        raise Skip(f"{exe} missing: apt-get install -y bpfcc-tools")
    port = free_port()
    out_file = LOGS / f"r{rnd}-{tool}.out"
    # stdout to a file, as an operator would run it; Python block-buffers it, which is its cheapest mode.
    p = Proc(f"r{rnd}-{tool}", [exe], stdout_file=out_file)
    res: dict[str, Any] = {}
    try:
        t = time.monotonic()
        wait_for(lambda: (p.alive() or raise_(Skip(f"{tool} exited: {p.log_tail()}"))) and bpf_attached(p.pid),
                 60, f"{tool} to attach")
        wait_idle(p.pid, 5)
        res["startup_s"] = time.monotonic() - t
        res.update(_measure_churn(ctx, p.pid, port))
    finally:
        res["exit_rc"] = stop_bcc_tool(p)
    res.update(parse_peer(tool, out_file, p.log, port))
    out_file.unlink(missing_ok=True)  # can be hundreds of MB
    return res


def stop_bcc_tool(p: Proc) -> int | None:
    """SIGINT, which the tools turn into a clean exit that flushes their buffered stdout.

    The signal is only acted on once perf_buffer_poll() returns, i.e. after the next event, so
    one loopback connection per half second wakes the tool; SIGKILL (losing the buffered tail of
    the output) only if it still has not exited after 10 s.
    """
    with contextlib.suppress(ProcessLookupError):
        p.popen.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 10
    while p.alive() and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            probe_connection(free_port())
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.popen.wait(0.5)
    return p.stop(signal.SIGKILL, 5) if p.alive() else p.stop()


def parse_peer(tool: str, out_file: Path, err_file: Path, port: int) -> dict[str, Any]:
    lines = closes = 0
    sp = str(port)
    with open(out_file, errors="replace") as f:
        for line in f:
            fs = line.split()
            if tool == "tcplife":
                # PID COMM LADDR LPORT RADDR RPORT TX_KB RX_KB MS; COMM may hold spaces, so index from the end.
                if len(fs) >= 9 and (fs[-6] == sp or fs[-4] == sp):
                    lines += 1
                    closes += 1
            else:
                # SKADDR C-PID C-COMM LADDR LPORT RADDR RPORT OLDSTATE -> NEWSTATE MS
                if len(fs) >= 10 and (fs[-7] == sp or fs[-5] == sp):
                    if fs[-5] == "0":
                        continue  # the churn listeners' own CLOSE->LISTEN->CLOSE
                    lines += 1
                    if fs[-2] == "CLOSE":
                        closes += 1
    lost = 0
    warnings: list[str] = []
    with contextlib.suppress(OSError):
        for line in err_file.read_text(errors="replace").splitlines():
            m = re.search(r"[Ll]ost (\d+) samples", line)
            if m:
                lost += int(m.group(1))
                if len(warnings) < 3:
                    warnings.append(line.strip())
    return {"lines": lines, "closes": closes, "lost_samples": lost, "lost_warnings": warnings}


def run_counting(ctx: Context, rnd: int, cfg: str) -> dict[str, Any]:
    """A consumer that only counts records: `bare` (bare_consumer.py) or `floor` (floor_consumer.py); or
    `empty` (bare_consumer.py --empty), empty programs on conn-tracer's hooks that make no records at all; or
    `untracked` (floor_consumer.py --untracked), conn-tracer's programs tracking no socket.

    All print "ready" once attached and a JSON line with their counts on SIGINT.
    """
    script = BENCH / {"bare": "bare_consumer.py", "floor": "floor_consumer.py", "empty": "bare_consumer.py",
                      "untracked": "floor_consumer.py"}[cfg]
    flag = {"empty": ["--empty"], "untracked": ["--untracked"]}.get(cfg, [])
    p = Proc(f"r{rnd}-{cfg}", [str(VENV_PY), str(script), *flag], stdout_pipe=True)
    res: dict[str, Any] = {}
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(p.popen.stdout.readline, "")),  # type: ignore[union-attr]
                              daemon=True)
    reader.start()
    try:
        wait_for(lambda: (p.alive() or raise_(Skip(f"{script.name} exited: {p.log_tail()}"))) and "ready\n" in lines,
                 60, f"{script.name} to attach")
        port = free_port()
        res.update(_measure_churn(ctx, p.pid, port))
    finally:
        p.stop(signal.SIGINT, 15)
        reader.join(5)
    for line in lines:
        with contextlib.suppress(ValueError):
            d = json.loads(line)
            if isinstance(d, dict):
                res["records"] = int(d.get("records", d.get("events", 0)))  # bare says "events"
                res["callbacks"] = d.get("callbacks")
                res["lost_kernel"] = int(d["lost_kernel"])
    if "records" not in res:
        raise RuntimeError(f"{script.name} printed no counts: {p.log_tail()}")
    return res


def run_none(ctx: Context, rnd: int, cfg: str) -> dict[str, Any]:
    return {"churn": ctx.churn.run(free_port(), ctx.prof.churn_s)}


# Name -> how it runs, in the order of the table. `cfg` is passed on so one function serves several.
CONFIGS: dict[str, Callable[[Context, int, str], dict[str, Any]]] = {
    "none": run_none,
    "conn-tracer/batch": run_conn_tracer,
    "conn-tracer/close": run_conn_tracer,
    BASELINE: run_conn_tracer,
    "tcplife": run_peer,
    "tcpstates": run_peer,
    "floor": run_counting,
    "bare": run_counting,
    "empty": run_counting,
    "untracked": run_counting,
}
