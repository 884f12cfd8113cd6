"""conn-tracer benchmark suite: overhead, completeness, CPU, pipeline cost, latency, start-up, memory.

Every figure is measured side by side in one run: each round runs every configuration once, in an
order rotated per round, so slow drift of a noisy machine spreads over all of them. Reported
values are medians over rounds; ratios are taken within a round first (configuration vs. the
"none" run of the same round) and then the median of those is reported.

Usage (root): .venv/bin/python bench/run.py [--quick] [--profile] [--rounds N] ...
Results: a table on stdout, JSON in bench/results/<timestamp>.json and bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BUILD = BENCH / "build"
LOGS = BUILD / "logs"
RESULTS = BENCH / "results"
VENV_PY = ROOT / ".venv" / "bin" / "python"
CONN_TRACER = ROOT / ".venv" / "bin" / "conn-tracer"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Each churn connection makes 10 TCP state changes (5 per socket; measured with tcpstates and the
# bare consumer: CLOSE->SYN_SENT->ESTABLISHED->FIN_WAIT1->FIN_WAIT2->CLOSE on the client,
# LISTEN->SYN_RECV->ESTABLISHED->CLOSE_WAIT->LAST_ACK->CLOSE on the server).
STATE_CHANGES_PER_CONN = 10

CONFIGS = ("none", "conn-tracer", "tcplife", "tcpstates", "bare")


@dataclass
class Profile:
    rounds: int
    churn_s: float
    latency_s: float
    latency_rate: float
    low_s: float
    low_rate: float
    iperf_rounds: int
    iperf_s: int
    rss_count: int  # 0 = skip the memory-after-N-connections test
    rss_time_s: float
    clients: int = 4
    servers: int = 2


QUICK = Profile(rounds=2, churn_s=3, latency_s=3, latency_rate=10_000, low_s=2, low_rate=1000,
                iperf_rounds=1, iperf_s=3, rss_count=0, rss_time_s=0)
FULL = Profile(rounds=5, churn_s=10, latency_s=6, latency_rate=10_000, low_s=4, low_rate=1000,
               iperf_rounds=3, iperf_s=5, rss_count=1_000_000, rss_time_s=240)


class Skip(Exception):
    """A configuration cannot run here; the reason goes into the report."""


# ---------------------------------------------------------------- processes and /proc


class Proc:
    """A child process we own: started in its own session, always stopped in a finally."""

    live: list[Proc] = []

    def __init__(self, name: str, argv: list[str], log: Path | None = None, stdout_pipe: bool = False,
                 stdout_file: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.name = name
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log = log or LOGS / f"{name}.log"
        self._err = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        self._out_file = open(stdout_file, "w") if stdout_file else None  # noqa: SIM115
        out: Any = subprocess.PIPE if stdout_pipe else (self._out_file or self._err)
        self.spawn_ns = time.monotonic_ns()
        self.popen = subprocess.Popen(argv, stdout=out, stderr=self._err, stdin=subprocess.DEVNULL,
                                      start_new_session=True, env=env, text=True)
        Proc.live.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int | None:
        """Signal, wait, then SIGKILL the process (only this one) if it does not exit."""
        rc: int | None = self.popen.poll()
        if rc is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)
            try:
                rc = self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
                rc = None
        for f in (self._err, self._out_file):
            if f:
                f.close()
        if self in Proc.live:
            Proc.live.remove(self)
        return rc

    def log_tail(self, n: int = 8) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""


def stop_all() -> None:
    for p in list(Proc.live):
        p.stop(signal.SIGKILL, 5)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2:].split()


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            f = _stat_fields(int(d))
            if f:
                children.setdefault(int(f[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def cpu_s(pid: int) -> float:
    """user+sys seconds of pid, its threads, its live descendants and its reaped children."""
    total = 0
    f = _stat_fields(pid)
    if f is None:
        return 0.0
    total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])  # utime stime cutime cstime
    for c in descendants(pid):
        cf = _stat_fields(c)
        if cf:
            total += int(cf[11]) + int(cf[12])
    return total / CLK_TCK


def memory_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    """True once something listens on port (read from /proc, so no connection is made)."""
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def wait_for(cond: Callable[[], bool], timeout_s: float, what: str, step_s: float = 0.02) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            raise Skip(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(step_s)
    return time.monotonic() - t0


def wait_idle(pid: int, timeout_s: float = 10.0, quiet_cpu_s: float = 0.04, step_s: float = 0.25) -> float:
    """Wait until pid's CPU use stays below quiet_cpu_s per step twice in a row (it has drained).

    The bound is loose (16% of a core) and the wait short because other people's TCP traffic on a
    shared machine keeps every tracer a little busy; a drained tool is far below that.
    """
    t0 = time.monotonic()
    last, quiet = cpu_s(pid), 0
    while time.monotonic() - t0 < timeout_s and quiet < 2:
        time.sleep(step_s)
        now = cpu_s(pid)
        quiet = quiet + 1 if now - last < quiet_cpu_s else 0
        last = now
    return time.monotonic() - t0


def bpf_attached(pid: int) -> bool:
    """A bcc tool has loaded a program and opened perf events once both fd kinds show up."""
    kinds = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                kinds.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return "anon_inode:bpf-prog" in kinds and "anon_inode:[perf_event]" in kinds


# ---------------------------------------------------------------- load generators


def build_churn() -> Path:
    BUILD.mkdir(parents=True, exist_ok=True)
    exe = BUILD / "churn"
    src = BENCH / "churn.c"
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["cc", "-O2", "-Wall", "-pthread", "-o", str(exe), str(src)], check=True)
    return exe


class Churn:
    def __init__(self, exe: Path, prof: Profile) -> None:
        self.exe = exe
        self.prof = prof

    def run(self, port: int, duration_s: float, rate: float = 0, count: int = 0) -> dict[str, Any]:
        argv = [str(self.exe), "--port", str(port), "--duration", str(duration_s), "--clients",
                str(self.prof.clients), "--servers", str(self.prof.servers), "--rate", str(rate),
                "--count", str(count)]
        # churn caps itself at duration_s (+2 s server drain); the timeout is a second bound.
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 30, check=True)
        return dict(json.loads(out.stdout))


def probe_connection(port: int) -> int:
    """One connection to a fresh listener on port; returns when it was started (monotonic ns)."""
    with socket.socket() as ls:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", port))
        ls.listen(1)
        t = time.monotonic_ns()
        with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
            s, _ = ls.accept()
            with s:
                c.sendall(b"probe")
                s.recv(16)
    return t


# ---------------------------------------------------------------- consumers


def http_json(url: str, timeout_s: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return json.loads(r.read())


def healthz_ok(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/healthz", timeout=1) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


class SubscriberProc:
    """bench/subscriber.py in its own process; its stdout lines are read by a thread."""

    def __init__(self, url: str, ports: list[int], name: str) -> None:
        self.proc = Proc(name, [str(VENV_PY), str(BENCH / "subscriber.py"), "--url", url,
                                "--ports", ",".join(map(str, ports))], stdout_pipe=True)
        self.ready: dict[str, Any] | None = None
        self.progress: dict[str, Any] = {}
        self.summary: dict[str, Any] | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.popen.stdout is not None
        for line in self.proc.popen.stdout:
            with contextlib.suppress(ValueError):
                msg = json.loads(line)
                if "ready" in msg:
                    self.ready = msg["ready"]
                elif "progress" in msg:
                    self.progress = msg["progress"]
                elif "summary" in msg:
                    self.summary = msg["summary"]

    def closes(self, port: int) -> int:
        return int(self.progress.get("closes", {}).get(str(port), 0))

    def stop(self) -> dict[str, Any]:
        self.proc.stop(signal.SIGTERM, 20)
        self._thread.join(5)
        return self.summary or {"error": "no summary: " + self.proc.log_tail()}


class TracerSession:
    """`conn-tracer serve` plus one WebSocket subscriber, with start-up timings."""

    ws_query = ""  # e.g. "type=close": set from --ws-query for every session

    def __init__(self, ports: list[int], name: str) -> None:
        self.http_port = free_port()
        self.base = f"http://127.0.0.1:{self.http_port}"
        self.probe_port = free_port()
        self.ports = ports
        self.name = name
        self.serve: Proc | None = None
        self.sub: SubscriberProc | None = None
        self.startup: dict[str, Any] = {}

    def start(self) -> None:
        if not CONN_TRACER.exists():
            raise Skip(f"{CONN_TRACER} not installed")
        # The subscriber starts first and retries, so its own start-up is not in the figure.
        query = f"?{self.ws_query}" if self.ws_query else ""
        self.sub = SubscriberProc(f"ws://127.0.0.1:{self.http_port}/ws{query}", self.ports + [self.probe_port],
                                  f"{self.name}-subscriber")
        time.sleep(0.5)
        self.serve = Proc(f"{self.name}-serve", [str(CONN_TRACER), "serve", "--host", "127.0.0.1",
                                                 "--port", str(self.http_port)])
        spawn = self.serve.spawn_ns
        serve = self.serve

        def up() -> bool:
            if not serve.alive():
                raise Skip(f"serve exited with {serve.popen.returncode}: {serve.log_tail()}")
            return healthz_ok(self.base)

        try:
            wait_for(up, 60, "GET /healthz 200")
        except Skip as exc:
            raise Skip(f"{exc}\n{serve.log_tail()}") from None
        healthz_ns = time.monotonic_ns()
        sub = self.sub
        wait_for(lambda: sub.ready is not None, 20, "WebSocket subscriber connected")
        probe_ns = probe_connection(self.probe_port)
        self.startup = {"spawn_to_healthz_ms": (healthz_ns - spawn) / 1e6,
                        "spawn_to_subscribed_ms": ((sub.ready or {}).get("connected_ns", 0) - spawn) / 1e6,
                        "probe_ns": probe_ns, "spawn_ns": spawn}

    def stats(self) -> dict[str, Any]:
        try:
            return dict(http_json(self.base + "/stats"))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return {"error": repr(exc)}

    @contextlib.contextmanager
    def poll_stats(self, every_s: float = 0.5) -> Any:
        """Samples /stats in a thread while the block runs; yields the list of samples."""
        samples: list[dict[str, Any]] = []
        done = threading.Event()

        def loop() -> None:
            while not done.wait(every_s):
                samples.append(self.stats())

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        try:
            yield samples
        finally:
            done.set()
            t.join(10)

    def drain(self, port: int, expected_closes: int, timeout_s: float = 30.0) -> float:
        """Wait until the subscriber has every close for port, or nothing moves for 1.5 s."""
        assert self.sub is not None and self.serve is not None
        t0 = time.monotonic()
        last, last_change = -1, time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            n = self.sub.closes(port)
            if n >= expected_closes:
                break
            if n != last:
                last, last_change = n, time.monotonic()
            elif time.monotonic() - last_change > 1.5:
                break
            time.sleep(0.1)
        time.sleep(0.3)  # one more progress line, so the counts below are final
        return time.monotonic() - t0

    def stop(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.sub:
            out["subscriber"] = self.sub.stop()
        if self.serve:
            t = time.monotonic()
            rc = self.serve.stop(signal.SIGTERM, 15)
            out["serve_exit"] = {"rc": rc, "seconds": round(time.monotonic() - t, 3)}
        return out


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
        wait_for(lambda: (p.alive() or _raise(Skip(f"{tool} exited: {p.log_tail()}"))) and bpf_attached(p.pid),
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


def _raise(exc: Exception) -> bool:
    raise exc


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
        wait_for(lambda: (p.alive() or _raise(Skip(f"bare consumer exited: {p.log_tail()}"))) and "ready\n" in lines,
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


# ---------------------------------------------------------------- other phases


def iperf_once(seconds: int) -> float:
    port = free_port()
    srv = Proc("iperf3-server", ["iperf3", "-s", "-1", "-p", str(port)])
    try:
        wait_for(lambda: listening(port), 10, "iperf3 server")
        out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"],
                             capture_output=True, text=True, timeout=seconds + 30)
        data = json.loads(out.stdout)
        if "error" in data:
            raise RuntimeError(data["error"])
        return float(data["end"]["sum_received"]["bits_per_second"])
    finally:
        srv.stop(signal.SIGTERM, 5)


def run_iperf(prof: Profile, tracer_ok: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for rnd in range(prof.iperf_rounds):
        order = ["none", "conn-tracer"] if rnd % 2 == 0 else ["conn-tracer", "none"]
        for cfg in order:
            if cfg == "none":
                rows.append({"round": rnd, "config": cfg, "bps": iperf_once(prof.iperf_s)})
                continue
            if not tracer_ok:
                continue
            sess = TracerSession([], f"iperf{rnd}-conn-tracer")
            try:
                sess.start()
                rows.append({"round": rnd, "config": cfg, "bps": iperf_once(prof.iperf_s)})
            except Skip as exc:
                rows.append({"round": rnd, "config": cfg, "skipped": str(exc)})
            finally:
                sess.stop()
    return rows


def run_rss(churn: Churn, prof: Profile) -> dict[str, Any]:
    port = free_port()
    sess = TracerSession([port], "rss-conn-tracer")
    res: dict[str, Any] = {"target_connections": prof.rss_count, "time_limit_s": prof.rss_time_s}
    try:
        sess.start()
        assert sess.serve is not None
        pid = sess.serve.pid
        res["rss_kb_before"] = memory_kb(pid)
        c0 = cpu_s(pid)
        ch = churn.run(port, prof.rss_time_s, count=prof.rss_count)
        res["drain_s"] = sess.drain(port, _expected_closes(ch), timeout_s=60)
        res.update(churn=ch, cpu_s=cpu_s(pid) - c0, rss_kb_after=memory_kb(pid), stats=sess.stats())
        time.sleep(2)  # does memory come back down once idle?
        res["rss_kb_after_idle_2s"] = memory_kb(pid)
    finally:
        res.update(sess.stop())
    sub = res.get("subscriber", {})
    st = sub.get("ports", {}).get(str(port), {})
    if "churn" in res:
        got = st.get("close_client", 0) + st.get("close_server", 0)
        res["completeness"] = got / max(1, _expected_closes(res["churn"]))
    res.pop("subscriber", None)
    res["subscriber_port"] = st
    return res


def run_profile(churn: Churn, prof: Profile, seconds: float) -> dict[str, Any]:
    """py-spy on serve during a max-rate churn: where the tracer's time goes."""
    pyspy = ROOT / ".venv" / "bin" / "py-spy"
    if not pyspy.exists():
        raise Skip("py-spy not installed: .venv/bin/pip install py-spy")
    port = free_port()
    sess = TracerSession([port], "profile-conn-tracer")
    raw = RESULTS / "profile-collapsed.txt"
    res: dict[str, Any] = {}
    try:
        sess.start()
        assert sess.serve is not None
        # Active samples only (no --idle): percentages are of the time serve spends on CPU.
        spy = Proc("py-spy", [str(pyspy), "record", "--pid", str(sess.serve.pid), "--format", "raw",
                              "--output", str(raw), "--duration", str(int(seconds) + 2), "--rate", "100",
                              "--threads"])
        try:
            time.sleep(1)
            res["churn"] = churn.run(port, seconds)
            spy.popen.wait(seconds + 30)
        finally:
            spy.stop(signal.SIGINT, 10)
    finally:
        sess.stop()
    if raw.exists():
        res.update(summarise_collapsed(raw))
        res["collapsed_stacks"] = str(raw.relative_to(ROOT))
    return res


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^:()]*)(?::\d+)?\)$")


def _component(file: str) -> str:
    """Groups frames by the stage of the pipeline (or library) they belong to."""
    if file.startswith("app/"):
        return file
    for key, name in (("pydantic", "pydantic"), ("websockets/", "websockets"), ("uvicorn/", "uvicorn"),
                      ("starlette/", "starlette"), ("fastapi/", "fastapi"), ("asyncio/", "asyncio"),
                      ("selectors", "asyncio"), ("bcc/", "bcc"), ("ctypes/", "ctypes"), ("json/", "json")):
        if key in file:
            return name
    return "other"


def summarise_collapsed(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive time per function (line numbers folded) and self time per component."""
    self_t: dict[str, int] = {}
    total_t: dict[str, int] = {}
    comp_t: dict[str, int] = {}
    threads: dict[str, int] = {}
    n = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, cnt = line.rpartition(" ")
        if not cnt.isdigit():
            continue
        c = int(cnt)
        thread = stack.split(";", 1)[0].split(": ", 1)[-1]
        threads[thread] = threads.get(thread, 0) + c
        # The pipeline and the API run on the event loop in MainThread; py-spy also reports
        # anyio's worker threads parked in Condition.wait as active, which is noise here.
        if thread != "MainThread":
            continue
        n += c
        names: list[str] = []
        comp = "other"
        for raw in stack.split(";")[1:]:  # [0] is the thread
            m = _FRAME.match(raw)
            names.append(f"{m['func']} ({m['file']})" if m else raw)
            comp = _component(m["file"]) if m else "other"
        if not names:
            continue
        self_t[names[-1]] = self_t.get(names[-1], 0) + c
        comp_t[comp] = comp_t.get(comp, 0) + c
        for f in set(names):
            total_t[f] = total_t.get(f, 0) + c

    def rank(d: dict[str, int], k: int = top) -> list[tuple[str, float]]:
        return [(key, round(100 * v / max(1, n), 1)) for key, v in sorted(d.items(), key=lambda kv: -kv[1])[:k]]

    return {"samples": n, "samples_by_thread": threads, "self_pct": rank(self_t), "inclusive_pct": rank(total_t, 25),
            "self_by_component_pct": rank(comp_t, 20)}


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


# ---------------------------------------------------------------- main


def preflight() -> dict[str, str]:
    """Why a configuration cannot run, by name; checked once so rounds do not retry hopeless ones."""
    skip: dict[str, str] = {}
    if os.geteuid() != 0:
        raise SystemExit("run as root: every configuration but 'none' attaches BPF programs")
    try:
        out = subprocess.run([str(CONN_TRACER), "--help"], capture_output=True, text=True, timeout=30)
        if "serve" not in out.stdout:
            skip["conn-tracer"] = "`conn-tracer --help` lists no serve command"
    except (OSError, subprocess.TimeoutExpired) as exc:
        skip["conn-tracer"] = f"conn-tracer not runnable: {exc}"
    for tool in ("tcplife", "tcpstates"):
        if not Path(f"/usr/sbin/{tool}-bpfcc").exists():
            skip[tool] = f"/usr/sbin/{tool}-bpfcc missing: apt-get install -y bpfcc-tools"
    if subprocess.run([str(VENV_PY), "-c", "import bcc"], capture_output=True).returncode != 0:
        skip["bare"] = "`import bcc` fails in the venv (needs --system-site-packages and python3-bpfcc)"
    return skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 short rounds, no 1M-connection memory test (< 3 min)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--churn-seconds", type=float)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="subset of " + ",".join(CONFIGS))
    ap.add_argument("--ws-query", default="batch=256",
                    help="query string for the subscriber (default 'batch=256': unfiltered, up to 256 events per "
                         "message, as a high-volume consumer would; '' for one event per message)")
    ap.add_argument("--skip-iperf", action="store_true")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--rss-count", type=int)
    ap.add_argument("--profile", type=float, metavar="SECONDS",
                    help="py-spy on serve during a churn of this many seconds (default: 10 full, 0 quick)")
    args = ap.parse_args()

    prof = QUICK if args.quick else FULL
    if args.rounds:
        prof.rounds = args.rounds
    if args.churn_seconds:
        prof.churn_s = args.churn_seconds
    if args.rss_count is not None:
        prof.rss_count = args.rss_count
    if args.skip_rss:
        prof.rss_count = 0
    if args.profile is None:
        args.profile = 0 if args.quick else 10
    TracerSession.ws_query = args.ws_query
    configs = [c for c in args.configs.split(",") if c]
    bad = set(configs) - set(CONFIGS)
    if bad:
        ap.error(f"unknown configs: {sorted(bad)}")

    started = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))
    skipped = preflight()
    for cfg, why in skipped.items():
        print(f"skip {cfg}: {why}", flush=True)
    churn = Churn(build_churn(), prof)
    runners: dict[str, Callable[[Churn, Profile, int], dict[str, Any]]] = {
        "none": run_none, "conn-tracer": run_conn_tracer, "bare": run_bare,
        "tcplife": lambda ch, p, r: run_peer("tcplife", ch, p, r),
        "tcpstates": lambda ch, p, r: run_peer("tcpstates", ch, p, r),
    }
    rounds: list[dict[str, Any]] = []
    iperf: list[dict[str, Any]] = []
    rss: dict[str, Any] | None = None
    profile: dict[str, Any] | None = None
    if "conn-tracer" not in configs:
        skipped.setdefault("conn-tracer", "not selected (--configs)")
    try:
        for rnd in range(prof.rounds):
            k = rnd % len(configs)
            for cfg in configs[k:] + configs[:k]:  # rotate the order each round
                if cfg in skipped:
                    continue
                t = time.monotonic()
                try:
                    r = runners[cfg](churn, prof, rnd)
                except Skip as exc:
                    # A configuration that cannot start will not start next round either.
                    skipped[cfg] = str(exc)
                    print(f"round {rnd} {cfg}: skipped: {exc}", flush=True)
                    continue
                except (subprocess.SubprocessError, RuntimeError, OSError, ValueError, KeyError) as exc:
                    rounds.append({"round": rnd, "config": cfg, "error": repr(exc)})
                    print(f"round {rnd} {cfg}: error: {exc!r}", flush=True)
                    continue
                r.update(round=rnd, config=cfg, wall_s=round(time.monotonic() - t, 1))
                rounds.append(r)
                print(f"round {rnd} {cfg:<12} {r['churn']['rate']:>9.0f} conn/s  {r['wall_s']:>5.1f} s", flush=True)
        if not args.skip_iperf:
            print("iperf3 ...", flush=True)
            iperf = run_iperf(prof, "conn-tracer" not in skipped)
        if prof.rss_count and "conn-tracer" not in skipped:
            print(f"memory after {prof.rss_count:,} connections (<= {prof.rss_time_s:.0f} s) ...", flush=True)
            try:
                rss = run_rss(churn, prof)
            except Skip as exc:
                rss = {"skipped": str(exc)}
        if args.profile and "conn-tracer" not in skipped:
            print("py-spy profile ...", flush=True)
            try:
                profile = run_profile(churn, prof, args.profile)
            except Skip as exc:
                profile = {"skipped": str(exc)}
    finally:
        stop_all()

    s = summarise(rounds, iperf, rss, prof)
    tg = targets(s, prof)
    print_table(s, tg, skipped)
    if profile and "self_pct" in profile:
        print(f"\n== py-spy: serve's MainThread during max-rate churn ({profile['samples']} samples at 100 Hz) ==")
        print("  self time by component: " + ", ".join(f"{k} {v}%" for k, v in profile["self_by_component_pct"][:10]))
        print("  top self time:")
        for name, pct in profile["self_pct"][:10]:
            print(f"    {pct:5.1f}%  {name[:100]}")
        print("  top inclusive time:")
        for name, pct in profile["inclusive_pct"][:18]:
            print(f"    {pct:5.1f}%  {name[:100]}")
    result = {
        "meta": {"ws_query": TracerSession.ws_query,
                 "timestamp": stamp, "kernel": platform.release(), "cpus": os.cpu_count(), "quick": args.quick,
                 "profile": asdict(prof), "argv": sys.argv[1:], "wall_s": round(time.time() - started, 1),
                 "git": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                       capture_output=True, text=True).stdout.strip(),
                 "closes_counted": "close events for the churn port: role=client with dst_port=P plus "
                                   "role=server with src_port=P; expected = client connections completed + "
                                   "server sockets closed (2 per connection)"},
        "skipped": skipped, "summary": s, "targets": tg, "rounds": rounds, "iperf": iperf, "rss": rss,
        "profile": profile,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1, default=str)
    (RESULTS / f"{stamp}.json").write_text(text)
    (RESULTS / "latest.json").write_text(text)
    print(f"\nwrote bench/results/{stamp}.json ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    stop_all()
    sys.exit(130)
