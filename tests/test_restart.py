"""Restart continuity: pinned socket map and id counter survive kill -9; cleanup removes them."""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.bpf.pins import PIN_ROOT, lock_path
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
    assert not lock_path(instance).exists()   # nothing of the instance left, not even its lock file


HOLD = r"""
import socket, sys
srv = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
srv.bind((sys.argv[1], 0)); srv.listen(1)
c = socket.create_connection(srv.getsockname()[:2])
s, _ = srv.accept()
print(c.getsockname()[1], srv.getsockname()[1], flush=True)
for line in sys.stdin:          # "send N": the client sends N bytes; "close": both close
    if line.startswith("send"):
        n = int(line.split()[1]); c.sendall(b"x" * n); got = 0
        while got < n:
            got += len(s.recv(65536))
        print("ok", flush=True)
    else:
        break
c.close(); s.close()
print("closed", flush=True)
"""


def test_connections_older_than_the_agent_go_live_and_survive_a_restart(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.netns import VethPair

    instance = f"test-{secrets.token_hex(3)}"
    monkeypatch.setenv("CONN_TRACER_PIN", "1")
    with VethPair() as net:
        # Opened before the agent starts: loopback IPv4 and IPv6 here, IPv4 inside another namespace.
        holders = [subprocess.Popen([sys.executable, "-c", HOLD, addr], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True) for addr in ("127.0.0.1", "::1")]
        holders.append(net.run_in(net.ns_a, [sys.executable, "-c", HOLD, net.addr_a4]))
        ends = []
        for h in holders:
            cport, sport = map(int, h.stdout.readline().split())  # type: ignore[union-attr]
            ends.append((cport, sport))
        svc = start_service(tmp_path / "one.log", "--instance", instance)
        try:
            ports = {p for e in ends for p in e}
            want = {(c, s) for c, s in ends} | {(s, c) for c, s in ends}
            before = wait_for(lambda: (d if set(d := listed(svc, ports)) == want else None), 10,
                              "the preexisting connections listed")
            assert all(c["id"].startswith("p") and c["preexisting"] for c in before.values())
            assert {before[(s, c)]["role"] for c, s in ends} == {"server"}
            assert {before[(c, s)]["role"] for c, s in ends} == {"client"}
            svc.proc.kill()
            svc.proc.wait(10)
            svc.http.close()
            svc = start_service(tmp_path / "two.log", "--instance", instance)
            after = wait_for(lambda: (d if set(d := listed(svc, ports)) == want else None), 10, "listed again")
            assert {k: c["id"] for k, c in after.items()} == {k: c["id"] for k, c in before.items()}
            for h, (c, s) in zip(holders, ends, strict=True):
                h.stdin.write("send 7000\n")  # type: ignore[union-attr]
                h.stdin.flush()  # type: ignore[union-attr]
                assert h.stdout.readline().strip() == "ok"  # type: ignore[union-attr]
                got = wait_for(lambda c=c, s=s: (d if (d := listed(svc, ports)).get((c, s), {}).get("bytes_sent", 0)
                                                 >= 7000 else None), 1.0, "bytes sent, live")
                assert got[(c, s)]["id"] == before[(c, s)]["id"]
            for h in holders:
                h.stdin.write("close\n")  # type: ignore[union-attr]
                h.stdin.flush()  # type: ignore[union-attr]
                assert h.stdout.readline().strip() == "closed"  # type: ignore[union-attr]

            def closes() -> dict[tuple[int, int], dict[str, Any]] | None:
                d = {(x["src_port"], x["dst_port"]): x for x in svc.json("/connections", state="closed", limit=100000)
                     if (x["src_port"], x["dst_port"]) in want}
                return d if set(d) == want else None

            closed = wait_for(closes, 5, "close events for all")
            for c, s in ends:
                assert closed[(c, s)]["close_reason"] == "normal"
                assert closed[(s, c)]["bytes_received"] >= 7000
        finally:
            for h in holders:
                if h.poll() is None:
                    h.kill()
                h.wait(5)
                for f in (h.stdin, h.stdout):
                    if f is not None:
                        f.close()
            svc.stop()
            subprocess.run([str(CONN_TRACER), "cleanup", "--instance", instance], capture_output=True, check=True)


def test_two_agents_cannot_share_a_named_instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    instance = f"test-{secrets.token_hex(3)}"
    monkeypatch.setenv("CONN_TRACER_PIN", "1")
    svc = start_service(tmp_path / "one.log", "--instance", instance)
    try:
        second = subprocess.run([str(CONN_TRACER), "serve", "--port", "0", "--instance", instance],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"another conn-tracer uses instance {instance!r}" in lines[0], second.stderr
        assert svc.healthy()
    finally:
        svc.stop()
        subprocess.run([str(CONN_TRACER), "cleanup", "--instance", instance], capture_output=True, check=True)


def test_a_restart_drops_what_closed_or_vanished_while_it_was_down(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.netns import VethPair

    instance = f"test-{secrets.token_hex(3)}"
    monkeypatch.setenv("CONN_TRACER_PIN", "1")
    svc = start_service(tmp_path / "one.log", "--instance", instance)
    try:
        with VethPair() as net:
            holder = net.run_in(net.ns_a, [sys.executable, "-c", HOLD, net.addr_a4])
            cport, sport = map(int, holder.stdout.readline().split())  # type: ignore[union-attr]
            ports = {cport, sport}
            wait_for(lambda: exactly(listed(svc, ports), 2), 10, "both ends listed")
            svc.proc.kill()
            svc.proc.wait(10)
            svc.http.close()
        # The namespace, its sockets and the process are gone while no agent ran: nothing to list.
        svc = start_service(tmp_path / "two.log", "--instance", instance)
        assert listed(svc, ports) == {}
    finally:
        svc.stop()
        subprocess.run([str(CONN_TRACER), "cleanup", "--instance", instance], capture_output=True, check=True)
