"""What every configuration is built from: child processes, /proc readings, waits, the churn generator."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BUILD = BENCH / "build"
LOGS = BUILD / "logs"
RESULTS = BENCH / "results"  # the committed reference run only
RUNS = BENCH / "runs"  # every run; ignored by git
VENV_PY = ROOT / ".venv" / "bin" / "python"
CONN_TRACER = ROOT / ".venv" / "bin" / "conn-tracer"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Each churn connection makes 10 TCP state changes (5 per socket; measured with tcpstates and the
# bare consumer: CLOSE->SYN_SENT->ESTABLISHED->FIN_WAIT1->FIN_WAIT2->CLOSE on the client,
# LISTEN->SYN_RECV->ESTABLISHED->CLOSE_WAIT->LAST_ACK->CLOSE on the server).
STATE_CHANGES_PER_CONN = 10


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
    export_rounds: int = 3  # the export phase: plain/export pairs, alternated


QUICK = Profile(rounds=2, churn_s=3, latency_s=3, latency_rate=10_000, low_s=2, low_rate=1000,
                iperf_rounds=1, iperf_s=3, rss_count=0, rss_time_s=240, export_rounds=1)
FULL = Profile(rounds=5, churn_s=10, latency_s=6, latency_rate=10_000, low_s=4, low_rate=1000,
               iperf_rounds=7, iperf_s=5, rss_count=1_000_000, rss_time_s=240)


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
        self.log = log or LOGS / f"{name.replace('/', '-')}.log"
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


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat: busy_fraction() of two readings says how loaded the
    machine was in between (idle and iowait are not busy)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(f) - f[3] - f[4], sum(f)


def busy_fraction(a: tuple[int, int], b: tuple[int, int]) -> float:
    return (b[0] - a[0]) / max(1, b[1] - a[1])


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
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 30, check=True)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        # The only child reaped meanwhile: the generator's CPU, with the kernel's TCP work done in its syscalls.
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        return {**json.loads(out.stdout), "cpu_s": cpu}


def expected_closes(ch: dict[str, Any]) -> int:
    """Sockets a churn run closed: two per connection, the client's (counted by churn as
    completed) and the one the server accepted (churn's server_closed); failed connects excluded."""
    return int(ch["connections"]) + int(ch["server_closed"])


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

def raise_(exc: Exception) -> bool:
    raise exc

