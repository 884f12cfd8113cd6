"""`conn-tracer serve` plus one WebSocket subscriber (bench/subscriber.py), each in its own process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from harness import (
    BENCH,
    CONN_TRACER,
    VENV_PY,
    Proc,
    Skip,
    cpu_s,
    free_port,
    healthz_ok,
    http_json,
    probe_connection,
    wait_for,
)


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

    def cpu_s(self) -> float:
        return cpu_s(self.proc.popen.pid)

    def stop(self) -> dict[str, Any]:
        self.proc.stop(signal.SIGTERM, 20)
        self._thread.join(5)
        return self.summary or {"error": "no summary: " + self.proc.log_tail()}


class TracerSession:
    """`conn-tracer serve` plus one WebSocket subscriber, with start-up timings."""

    def __init__(self, ports: list[int], name: str, ws_query: str, serve_cmd: list[str] | None = None,
                 env: dict[str, str] | None = None, serve_args: list[str] | None = None) -> None:
        self.ws_query = ws_query  # "batch=256", "type=close", "" (per-message, everything)
        # How to run conn-tracer: this tree's console script, or (--baseline) another tree's app.cli.
        self.serve_cmd = serve_cmd or [str(CONN_TRACER)]
        self.serve_args = serve_args or []  # after `serve --host --port`, e.g. the export phase's --nats
        # No pinned maps left behind by a benchmark (serve pins by default, to survive restarts).
        self.env = {**(env if env is not None else os.environ), "CONN_TRACER_PIN": "0"}
        self.http_port = free_port()
        self.base = f"http://127.0.0.1:{self.http_port}"
        self.probe_port = free_port()
        self.ports = ports
        self.name = name
        self.serve: Proc | None = None
        self.sub: SubscriberProc | None = None
        self.startup: dict[str, Any] = {}

    def start(self) -> None:
        if self.serve_cmd == [str(CONN_TRACER)] and not CONN_TRACER.exists():
            raise Skip(f"{CONN_TRACER} not installed")
        # The subscriber starts first and retries, so its own start-up is not in the figure.
        query = f"?{self.ws_query}" if self.ws_query else ""
        self.sub = SubscriberProc(f"ws://127.0.0.1:{self.http_port}/ws{query}", self.ports + [self.probe_port],
                                  f"{self.name}-subscriber")
        time.sleep(0.5)
        self.serve = Proc(f"{self.name}-serve", [*self.serve_cmd, "serve", "--host", "127.0.0.1",
                                                 "--port", str(self.http_port), *self.serve_args],
                          env=self.env)
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

