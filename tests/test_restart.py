"""Restart continuity: pinned socket map and id counter survive kill -9; cleanup removes them."""

from __future__ import annotations

import secrets
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from app.bpf.pins import PIN_ROOT
from tests.test_serve import CONN_TRACER, Service, start_service, wait_for

pytestmark = pytest.mark.bpf


def listed(svc: Service, ports: set[int]) -> dict[tuple[int, int], dict[str, Any]]:
    conns = svc.json("/connections", state="open", limit=100000)
    return {(c["src_port"], c["dst_port"]): c for c in conns if c["src_port"] in ports or c["dst_port"] in ports}


def exactly(found: dict[tuple[int, int], dict[str, Any]], n: int) -> dict[tuple[int, int], dict[str, Any]] | None:
    return found if len(found) == n else None


def test_kill_9_and_restart_keeps_ids_roles_owners_and_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    instance = f"test-{secrets.token_hex(3)}"
    monkeypatch.setenv("CONN_TRACER_PIN", "1")
    svc = start_service(tmp_path / "one.log", "--instance", instance)
    pairs: list[tuple[socket.socket, socket.socket]] = []
    listeners = []
    try:
        for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            srv = socket.socket(family)
            srv.bind((addr, 0))
            srv.listen(4)
            listeners.append(srv)
            for _ in range(2):
                c = socket.create_connection((addr, srv.getsockname()[1]))
                s, _ = srv.accept()
                c.sendall(b"a" * 100)
                assert s.recv(100) == b"a" * 100
                pairs.append((c, s))
        ports = {c.getsockname()[1] for c, _ in pairs}
        want = 2 * len(pairs)
        before = wait_for(lambda: exactly(listed(svc, ports), want), 10, "both ends of every connection listed")
        svc.proc.kill()
        svc.proc.wait(10)
        svc.http.close()
        assert any((PIN_ROOT / instance).iterdir()), "the socket map stays pinned"

        svc = start_service(tmp_path / "two.log", "--instance", instance)
        after = listed(svc, ports)
        assert {k: (c["id"], c["role"], c["pid"], c["started_at"]) for k, c in after.items()} == \
               {k: (c["id"], c["role"], c["pid"], c["started_at"]) for k, c in before.items()}
        # Kernel events for them flow at once: bytes sent now show within a coalescing interval or two.
        c, s = pairs[0]
        c.sendall(b"b" * 5000)
        assert s.recv(5000, socket.MSG_WAITALL) == b"b" * 5000
        key = (c.getsockname()[1], c.getpeername()[1])
        wait_for(lambda: listed(svc, ports)[key]["bytes_sent"] == 5100, 1.0, "bytes sent after the restart")
        # A new connection gets an id the first run never gave.
        srv = listeners[0]
        n = socket.create_connection(srv.getsockname()[:2])
        ns, _ = srv.accept()
        nkey = (n.getsockname()[1], srv.getsockname()[1])
        new = wait_for(lambda: listed(svc, {nkey[0]}).get(nkey), 5, "new connection listed")
        assert new["id"] not in {x["id"] for x in before.values()}
        assert int(new["id"][1:]) > max(int(x["id"][1:]) for x in before.values())
        pairs.append((n, ns))
        for c, s in pairs:
            c.close()
            s.close()
        closed = wait_for(lambda: exactly({(x["src_port"], x["dst_port"]): x
                                           for x in svc.json("/connections", state="closed", limit=100000)
                                           if (x["src_port"] in ports or x["dst_port"] in ports)
                                           and x["close_reason"] == "normal"}, want), 10, "close events with reasons")
        assert closed[key]["bytes_sent"] == 5100 and closed[key]["id"] == before[key]["id"]
        assert svc.stop() == 0
    finally:
        for srv in listeners:
            srv.close()
        for c, s in pairs:
            c.close()
            s.close()
        svc.stop()
        out = subprocess.run([str(CONN_TRACER), "cleanup", "--instance", instance], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert not (PIN_ROOT / instance).exists()
