"""Phases outside the rounds: iperf3 bulk throughput, RSS after N connections, py-spy profile."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from configs import TRACER_QUERIES, Context
from harness import ROOT, Proc, Profile, Skip, cpu_s, expected_closes, free_port, listening, memory_kb, wait_for
from session import TracerSession


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


def run_iperf(prof: Profile, tracer: str | None) -> list[dict[str, Any]]:
    """iperf3 with nothing attached and with `tracer` (a conn-tracer config), alternated."""
    rows: list[dict[str, Any]] = []
    for rnd in range(prof.iperf_rounds):
        order = ["none", tracer] if rnd % 2 == 0 else [tracer, "none"]
        for cfg in order:
            if cfg == "none":
                rows.append({"round": rnd, "config": cfg, "bps": iperf_once(prof.iperf_s)})
                continue
            if cfg is None:
                continue
            sess = TracerSession([], f"iperf{rnd}-{cfg}", TRACER_QUERIES[cfg])
            try:
                sess.start()
                rows.append({"round": rnd, "config": cfg, "bps": iperf_once(prof.iperf_s)})
            except Skip as exc:
                rows.append({"round": rnd, "config": cfg, "skipped": str(exc)})
            finally:
                sess.stop()
    return rows


def run_rss(ctx: Context, tracer: str) -> dict[str, Any]:
    """serve + subscriber while churn makes prof.rss_count connections; RSS before and after."""
    prof = ctx.prof
    port = free_port()
    sess = TracerSession([port], f"rss-{tracer}", TRACER_QUERIES[tracer])
    res: dict[str, Any] = {"config": tracer, "target_connections": prof.rss_count, "time_limit_s": prof.rss_time_s}
    try:
        sess.start()
        assert sess.serve is not None
        pid = sess.serve.pid
        res["rss_kb_before"] = memory_kb(pid)
        c0 = cpu_s(pid)
        ch = ctx.churn.run(port, prof.rss_time_s, count=prof.rss_count)
        res["drain_s"] = sess.drain(port, expected_closes(ch), timeout_s=60)
        res.update(churn=ch, cpu_s=cpu_s(pid) - c0, rss_kb_after=memory_kb(pid), stats=sess.stats())
        time.sleep(2)  # does memory come back down once idle?
        res["rss_kb_after_idle_2s"] = memory_kb(pid)
    finally:
        res.update(sess.stop())
    sub = res.get("subscriber", {})
    st = sub.get("ports", {}).get(str(port), {})
    if "churn" in res:
        got = st.get("close_client", 0) + st.get("close_server", 0)
        res["completeness"] = got / max(1, expected_closes(res["churn"]))
    res.pop("subscriber", None)
    res["subscriber_port"] = st
    return res


def run_profile(ctx: Context, tracer: str, seconds: float, raw: Path) -> dict[str, Any]:
    """py-spy on serve during a max-rate churn: where the tracer's time goes; stacks to `raw`."""
    pyspy = ROOT / ".venv" / "bin" / "py-spy"
    if not pyspy.exists():
        raise Skip("py-spy not installed: .venv/bin/pip install py-spy")
    port = free_port()
    sess = TracerSession([port], f"profile-{tracer}", TRACER_QUERIES[tracer])
    raw.parent.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"config": tracer}
    try:
        sess.start()
        assert sess.serve is not None
        # Active samples only (no --idle): percentages are of the time serve spends on CPU.
        spy = Proc("py-spy", [str(pyspy), "record", "--pid", str(sess.serve.pid), "--format", "raw",
                              "--output", str(raw), "--duration", str(int(seconds) + 2), "--rate", "100",
                              "--threads"])
        try:
            time.sleep(1)
            res["churn"] = ctx.churn.run(port, seconds)
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

