"""In-kernel BPF cost of one process's programs, from the kernel's own run-time statistics.

With `kernel.bpf_stats_enabled=1` the kernel accounts, per program, how often it ran (`run_cnt`)
and for how long (`run_time_ns`), and shows both in the fdinfo of every fd that holds the
program. We find a consumer's programs by its fds (`anon_inode:bpf-prog`), so no program name is
assumed: whatever the process has loaded is measured, and `bpftool` only supplies the names.

Accounting costs two clock reads per run, so it is on only while measure() runs, and the sysctl
goes back to the value it had, whatever happens (exceptions, Ctrl-C, SIGTERM turned into one).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
COUNTERS = ("run_time_ns", "run_cnt", "recursion_misses")


def stats_available() -> str | None:
    """None if the run-time statistics can be switched on here, else why not."""
    if not STATS_SYSCTL.exists():
        return f"{STATS_SYSCTL} missing (kernel older than 5.1?)"
    if not os.access(STATS_SYSCTL, os.W_OK):
        return f"{STATS_SYSCTL} is not writable (run as root)"
    return None


@contextlib.contextmanager
def stats_enabled() -> Iterator[dict[str, Any]]:
    """Turns bpf_stats on for the block and restores the previous value in a finally.

    Yields a dict that says, after the block, whether the statistics stayed on throughout
    (`interrupted`: someone else switched them off meanwhile, so the figures are short).
    """
    before = STATS_SYSCTL.read_text().strip()
    state: dict[str, Any] = {"sysctl_before": before, "interrupted": False}
    try:
        if before != "1":
            STATS_SYSCTL.write_text("1")
        yield state
        state["interrupted"] = STATS_SYSCTL.read_text().strip() != "1"
    finally:
        if before != "1":
            STATS_SYSCTL.write_text(before)


def _fdinfo(pid: int, fd: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        key, _, value = line.partition(":")
        value = value.strip()
        if value.isdigit():
            out[key.strip()] = int(value)
    return out


def snapshot(pid: int) -> dict[int, dict[str, int]]:
    """Counters of every BPF program pid holds an fd to, by program id."""
    progs: dict[int, dict[str, int]] = {}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return progs
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-prog":
                continue
            info = _fdinfo(pid, fd)
        except OSError:
            continue  # closed meanwhile
        if "prog_id" in info:  # several fds may hold one program: counted once
            progs[info["prog_id"]] = {k: info.get(k, 0) for k in COUNTERS}
    return progs


def prog_name(prog_id: int) -> str:
    """The program's name as bpftool shows it (bcc's function name, maybe truncated)."""
    try:
        out = subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog_id)], capture_output=True,
                             text=True, timeout=10)
        return str(json.loads(out.stdout).get("name") or f"id{prog_id}")
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return f"id{prog_id}"


@contextlib.contextmanager
def measure(pid: int, enabled: bool = True) -> Iterator[dict[str, Any]]:
    """Counts what pid's programs do in the block, with the statistics on only for the block.

    Yields a dict filled on exit with `programs` (per program: id, name, runs, run_time_ns,
    recursion_misses deltas) and the sysctl state; per_connection() turns it into figures. With
    enabled=False (or statistics unavailable) it yields {"skipped": why} and measures nothing.
    """
    out: dict[str, Any] = {}
    why = "disabled (--no-bpf-stats)" if not enabled else stats_available()
    if why:
        out["skipped"] = why
        yield out
        return
    with stats_enabled() as state:
        before = snapshot(pid)
        yield out
        after = snapshot(pid)
    progs = []
    for prog_id, a in sorted(after.items()):
        b = before.get(prog_id, dict.fromkeys(COUNTERS, 0))
        progs.append({"id": prog_id, "name": prog_name(prog_id),
                      **{k: a[k] - b[k] for k in COUNTERS}})
    out.update(state, programs=progs)


def per_connection(m: dict[str, Any], connections: int) -> dict[str, Any]:
    """Adds runs per connection, ns per run and µs per connection, per program and in total."""
    if "programs" not in m:
        return m
    conns = max(1, connections)
    for p in m["programs"]:
        p.update(runs_per_conn=p["run_cnt"] / conns, us_per_conn=p["run_time_ns"] / conns / 1000,
                 ns_per_run=p["run_time_ns"] / p["run_cnt"] if p["run_cnt"] else None)
    m.update(connections=connections,
             runs_per_conn=sum(p["run_cnt"] for p in m["programs"]) / conns,
             us_per_conn=sum(p["run_time_ns"] for p in m["programs"]) / conns / 1000)
    return m
