"""The configurations: how each is started, measured during one max-rate churn, and stopped."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

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
    free_port,
    memory_kb,
    probe_connection,
    raise_,
    wait_for,
    wait_idle,
)
from session import TracerSession


def _events_total(stats: dict[str, Any]) -> int:
    ev = stats.get("events")
    return sum(int(v) for v in ev.values()) if isinstance(ev, dict) else 0


def _expected_closes(ch: dict[str, Any]) -> int:
    # Two sockets close per connection: the client's (counted by churn as completed) and the one
    # the server accepted (churn's server_closed). Failed connects are excluded on both sides.
    return int(ch["connections"]) + int(ch["server_closed"])


def run_conn_tracer(churn: Churn, prof: Profile, rnd: int) -> dict[str, Any]:
    # Three churn phases in one serve process, each on its own port so the subscriber can tell
    # them apart: a low rate (the unloaded pipeline), the moderate rate of the latency target, then
    # max rate (the overhead figure). Low first, so no backlog of a harder phase leaks into it.
    phases = (("low", prof.low_rate, prof.low_s), ("rate", prof.latency_rate, prof.latency_s),
              ("max", 0.0, prof.churn_s))
    ports = {name: free_port() for name, _, _ in phases}
    sess = TracerSession(list(ports.values()), f"r{rnd}-conn-tracer")
    res: dict[str, Any] = {"phases": {}}
    try:
        sess.start()
        assert sess.serve is not None and sess.sub is not None
        pid = sess.serve.pid
        res["rss_kb_idle"] = memory_kb(pid)
        for name, rate, secs in phases:
            st0, c0 = sess.stats(), cpu_s(pid)
            with sess.poll_stats() as samples:
                ch = churn.run(ports[name], secs, rate=rate)
                drain_s = sess.drain(ports[name], _expected_closes(ch))
            st1, c1 = sess.stats(), cpu_s(pid)
            res["phases"][name] = {
                "port": ports[name], "churn": ch, "cpu_s": c1 - c0, "drain_s": drain_s,
                "events_delivered": _events_total(st1) - _events_total(st0),
                "lost_kernel": st1.get("lost_kernel", 0) - st0.get("lost_kernel", 0),
                # records read from the ring but shed because processing fell behind (user space)
                "backlog_dropped": st1.get("backlog_dropped", 0) - st0.get("backlog_dropped", 0),
                "backlog_peak": max((x.get("backlog_records", 0) for x in samples), default=0),
                # close events that reached user space, whatever the subscriber then got; other
                # TCP traffic on the host is in here too, so it is an upper bound.
                "tracer_closes": st1.get("events", {}).get("close", 0) - st0.get("events", {}).get("close", 0),
                "dropped_subscribers": st1.get("dropped_subscribers", 0) - st0.get("dropped_subscribers", 0)}
        mx = res["phases"]["max"]
        res.update(churn=mx["churn"], cpu_s=mx["cpu_s"], events_delivered=mx["events_delivered"],
                   stats_end=sess.stats(), rss_kb=memory_kb(pid))
    finally:
        res.update(sess.stop())
    ports_seen = res.get("subscriber", {}).get("ports", {})
    for ph in res["phases"].values():
        got = ports_seen.get(str(ph["port"]), {})
        ph["subscriber"] = got
        ph["completeness"] = (got.get("close_client", 0) + got.get("close_server", 0)) / max(
            1, _expected_closes(ph["churn"]))
        ph["tracer_close_ratio"] = ph["tracer_closes"] / max(1, _expected_closes(ph["churn"]))
    res.get("subscriber", {}).pop("ports", None)  # now split per phase
    probe_first = ports_seen.get(str(sess.probe_port), {}).get("first_recv_ns", 0)
    res["startup"] = dict(sess.startup)
    if probe_first:
        res["startup"]["spawn_to_first_event_ms"] = (probe_first - sess.startup["spawn_ns"]) / 1e6
        res["startup"]["probe_to_first_event_ms"] = (probe_first - sess.startup["probe_ns"]) / 1e6
    return res


def run_peer(tool: str, churn: Churn, prof: Profile, rnd: int) -> dict[str, Any]:
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
        c0 = cpu_s(p.pid)
        ch = churn.run(port, prof.churn_s)
        # 3 s is plenty for a perf/ring buffer of a few MiB; past that the tool is only following
        # other TCP traffic on the host, which would be charged to it as drain CPU.
        res["drain_s"] = wait_idle(p.pid, 3)
        res.update(churn=ch, cpu_s=cpu_s(p.pid) - c0, rss_kb=memory_kb(p.pid))
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


def run_bare(churn: Churn, prof: Profile, rnd: int) -> dict[str, Any]:
    p = Proc(f"r{rnd}-bare", [str(VENV_PY), str(BENCH / "bare_consumer.py")], stdout_pipe=True)
    res: dict[str, Any] = {}
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(p.popen.stdout.readline, "")),  # type: ignore[union-attr]
                              daemon=True)
    reader.start()
    try:
        wait_for(lambda: (p.alive() or raise_(Skip(f"bare consumer exited: {p.log_tail()}"))) and "ready\n" in lines,
                 60, "bare consumer to attach")
        port = free_port()
        c0 = cpu_s(p.pid)
        ch = churn.run(port, prof.churn_s)
        # 3 s is plenty for a perf/ring buffer of a few MiB; past that the tool is only following
        # other TCP traffic on the host, which would be charged to it as drain CPU.
        res["drain_s"] = wait_idle(p.pid, 3)
        res.update(churn=ch, cpu_s=cpu_s(p.pid) - c0)
    finally:
        p.stop(signal.SIGINT, 15)
        reader.join(5)
    for line in lines:
        with contextlib.suppress(ValueError):
            d = json.loads(line)
            if isinstance(d, dict):
                res["events"] = int(d["events"])
                res["lost_kernel"] = int(d["lost_kernel"])
    return res


def run_none(churn: Churn, prof: Profile, rnd: int) -> dict[str, Any]:
    return {"churn": churn.run(free_port(), prof.churn_s)}

