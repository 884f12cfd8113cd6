"""`conn-tracer trace --json` as a subprocess whose events tests can wait for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

VENV_BIN = Path(sys.executable).parent
Event = dict[str, Any]


class TraceStream:
    """Runs `conn-tracer trace --json ARGS`, collecting events in a background thread."""

    def __init__(self, *args: str) -> None:
        self.events: list[Event] = []
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "conn-tracer"), "trace", "--json", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ),
        )
        assert self.proc.stderr is not None
        # The CLI says "tracing (...)" on stderr once every program is attached.
        first = self.proc.stderr.readline()
        if not first.startswith("tracing"):
            rest = self.proc.stderr.read() if self.proc.poll() is not None else ""
            self.stop()
            raise RuntimeError(f"trace did not start: {first}{rest}")
        self.banner = first
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            ev = json.loads(line)
            with self._cond:
                self.events.append(ev)
                self._cond.notify_all()

    def wait_for(self, done: Callable[[list[Event]], bool], timeout: float = 10) -> list[Event]:
        """Blocks until done(events) holds (re-checked on every new event); bounded."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not done(self.events):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("expected events did not arrive")
                self._cond.wait(left)
            return list(self.events)

    def stop(self, sig: int | None = None) -> int:
        if self.proc.poll() is None:
            if sig is None:
                self.proc.terminate()
            else:
                self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=20)
        if self._reader is not None:
            self._reader.join(timeout=10)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        return rc


def between(events: list[Event], local_port: int, remote_port: int) -> list[Event]:
    """The events of the socket with this local and remote port."""
    return [e for e in events if e["src_port"] == local_port and e["dst_port"] == remote_port]
