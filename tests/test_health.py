"""The truth during and at the end of a connection: live bytes both ways, close reasons, RTT, retransmits, cgroups.

Real kernel, real sockets: loopback and a veth pair between two network namespaces.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from ipaddress import ip_address
from pathlib import Path

import pytest

from app.cgroups import cgroup2_root
from tests.netns import VethPair
from tests.tracestream import Event as Ev
from tests.tracestream import TraceStream, between

pytestmark = pytest.mark.bpf


def closed(local: int, remote: int) -> Callable[[list[Ev]], bool]:
    return lambda evs: any(e["type"] == "close" for e in between(evs, local, remote))


def close_of(trace: TraceStream, local: int, remote: int, timeout: float = 10) -> Ev:
    evs = trace.wait_for(closed(local, remote), timeout)
    return next(e for e in between(evs, local, remote) if e["type"] == "close")


def listener(family: int = socket.AF_INET, addr: str = "127.0.0.1") -> socket.socket:
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.bind((addr, 0))
    srv.listen(8)
    return srv


def test_refused_connect_says_refused(trace: TraceStream) -> None:
    probe = listener()
    port = probe.getsockname()[1]
    probe.close()   # nothing listens there now: the kernel answers our SYN with an RST
    c = socket.socket()
    with pytest.raises(ConnectionRefusedError):
        c.connect(("127.0.0.1", port))
    local = c.getsockname()[1]
    c.close()
    ev = close_of(trace, local, port) if local else None
    if ev is None:   # the socket lost its port with the failed connect: find it by remote port and pid
        evs = trace.wait_for(lambda es: any(e["type"] == "close" and e["dst_port"] == port for e in es))
        ev = next(e for e in evs if e["type"] == "close" and e["dst_port"] == port)
    assert (ev["role"], ev["close_reason"], ev["bytes_sent"], ev["pid"]) == ("client", "refused", 0, os.getpid())
    assert ev["srtt_us"] is None and ev["connect_us"] is None


@pytest.mark.parametrize("family,addr", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_normal_close_and_reset_on_both_sides(trace: TraceStream, family: int, addr: str) -> None:
    srv = listener(family, addr)
    port = srv.getsockname()[1]
    # An orderly exchange.
    c = socket.create_connection((addr, port))
    s, _ = srv.accept()
    c.sendall(b"x" * 1000)
    assert s.recv(4096)
    s.sendall(b"y" * 10)
    assert c.recv(64)
    cport = c.getsockname()[1]
    c.close()
    assert s.recv(10) == b""
    s.close()
    for local, remote in ((cport, port), (port, cport)):
        ev = close_of(trace, local, remote)
        assert ev["close_reason"] == "normal", ev
        assert ev["connect_us"] and ev["connect_us"] > 0 and ev["srtt_us"] and ev["srtt_us"] > 0, ev
    # Killed with an RST: SO_LINGER 0 on the client.
    c = socket.create_connection((addr, port))
    s, _ = srv.accept()
    c.sendall(b"z" * 100)
    assert s.recv(4096)
    cport = c.getsockname()[1]
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    with pytest.raises(ConnectionResetError):
        s.recv(10)
    s.close()
    srv.close()
    assert close_of(trace, cport, port)["close_reason"] == "reset"
    server_close = close_of(trace, port, cport)
    assert (server_close["close_reason"], server_close["bytes_received"]) == ("reset", 100)


def _ss_rtt_ms(ns: str, port: int) -> tuple[float, float] | None:
    out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-tinH", f"dport = :{port}"],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"\brtt:([\d.]+)/([\d.]+)", out)
    return (float(m.group(1)), float(m.group(2))) if m else None


UPLOAD = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print(s.getsockname()[1], flush=True)
total, chunk, end = 0, b"u" * 16384, time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    s.sendall(chunk); total += len(chunk); time.sleep(0.002)
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(total, flush=True)
s.close()
"""

SINK = r"""
import socket, sys
srv = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
srv.bind((sys.argv[1], 0)); srv.listen(1)
print(srv.getsockname()[1], flush=True)
c, _ = srv.accept()
n = 0
while True:
    b = c.recv(65536)
    if not b:
        break
    n += len(b)
print(n, flush=True)
c.close()
"""


@pytest.mark.parametrize("v6", [False, True])
def test_rtt_and_retransmits_across_veth_with_loss(trace: TraceStream, net: VethPair, v6: bool) -> None:
    server_addr = net.addr_b6 if v6 else net.addr_b4
    sink = net.run_in(net.ns_b, [sys.executable, "-c", SINK, server_addr])
    port = int(sink.stdout.readline())  # type: ignore[union-attr]
    # Drop one in ten segments the server receives: the client retransmits.
    net.drop_input(net.ns_b, f"tcp dport {port} numgen random mod 10 == 0")
    up = net.run_in(net.ns_a, [sys.executable, "-c", UPLOAD, server_addr, str(port), "1.5"])
    cport = int(up.stdout.readline())  # type: ignore[union-attr]
    # During the transfer: the client's RTT as events report it agrees with ss for the same socket.
    agreed = []
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline and not agreed:
        ss = _ss_rtt_ms(net.ns_a, port)
        evs = [e for e in between(trace.events, cport, port) if e["srtt_us"]]
        if ss and evs:
            ours = evs[-1]["srtt_us"] / 1000
            if ss[0] / 2 <= ours <= ss[0] * 2:
                agreed.append((ours, ss[0], evs[-1]["rttvar_us"], ss[1]))
        time.sleep(0.05)
    total = int(up.stdout.readline())  # type: ignore[union-attr]
    assert up.wait(10) == 0 and int(sink.stdout.readline()) == total  # type: ignore[union-attr]
    assert agreed, "no sample where srtt_us agreed with ss -ti within a factor of 2"
    cli = close_of(trace, cport, port)
    srv = close_of(trace, port, cport)
    assert cli["retrans_segs"] > 0 and cli["bytes_retrans"] > 0, cli
    assert (cli["bytes_sent"], srv["bytes_received"]) == (total, total)
    assert cli["rttvar_us"] is not None and cli["close_reason"] == srv["close_reason"] == "normal"


def test_syn_timeout_says_timeout(trace: TraceStream, net: VethPair) -> None:
    net.drop_input(net.ns_b, "tcp dport 9 tcp flags syn")
    # One SYN retry: the connect times out after ~3 s instead of ~2 minutes.
    subprocess.run(["ip", "netns", "exec", net.ns_a, "sysctl", "-qw", "net.ipv4.tcp_syn_retries=1"], check=True)
    code = (
        "import socket, select, sys\n"
        "s = socket.socket(); s.setblocking(False)\n"
        f"s.connect_ex(({net.addr_b4!r}, 9))\n"
        "print(s.getsockname()[1], flush=True)\n"
        "select.select([], [s], [], 10)\n"
        "print(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), flush=True)\n"
    )
    p = net.run_in(net.ns_a, [sys.executable, "-c", code])
    cport = int(p.stdout.readline())  # type: ignore[union-attr]
    assert int(p.stdout.readline()) == 110  # type: ignore[union-attr]   # ETIMEDOUT
    ev = close_of(trace, cport, 9)
    assert (ev["close_reason"], ev["role"], ev["connect_us"]) == ("timeout", "client", None)


def test_bytes_are_live_in_both_directions(trace: TraceStream) -> None:
    srv = listener()
    port = srv.getsockname()[1]
    c = socket.create_connection(("127.0.0.1", port))
    s, _ = srv.accept()
    cport = c.getsockname()[1]
    for sender, receiver, local, remote in ((s, c, port, cport), (c, s, cport, port)):
        written = 0
        stop = threading.Event()
        got = [0]

        def drain(sock: socket.socket = receiver, stop: threading.Event = stop, got: list[int] = got) -> None:
            sock.settimeout(0.2)
            while not stop.is_set():
                try:
                    got[0] += len(sock.recv(65536))
                except TimeoutError:
                    pass

        t = threading.Thread(target=drain)
        t.start()
        try:
            for _ in range(8):   # ~100 KB/s, the stream
                sender.sendall(b"d" * 10_000)
                written += 10_000
                time.sleep(0.1)
            # While the connection stays open, both ends' counters catch up within an interval.
            want = written

            def live(evs: list[Ev], want: int = want, local: int = local, remote: int = remote) -> bool:
                snd = [e for e in between(evs, local, remote) if e["type"] != "close"]
                rcv = [e for e in between(evs, remote, local) if e["type"] != "close"]
                return bool(snd and rcv and snd[-1]["bytes_sent"] >= want and rcv[-1]["bytes_received"] >= want)

            trace.wait_for(live, timeout=1.0)
        finally:
            stop.set()
            t.join()
        assert got[0] == written
    c.close()
    s.close()
    srv.close()
    assert close_of(trace, port, cport)["bytes_sent"] == 80_000
    assert close_of(trace, cport, port)["bytes_received"] == 80_000


def test_owner_cgroup_is_reported(trace: TraceStream) -> None:
    root = cgroup2_root()
    assert root is not None, "no cgroup2 mount"
    name = f"ct-test-{secrets.token_hex(3)}"
    cg = root / name
    cg.mkdir()
    try:
        srv = listener()
        port = srv.getsockname()[1]
        code = (
            "import os, socket, sys\n"
            f"open({str(cg / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
            f"c = socket.create_connection(('127.0.0.1', {port}))\n"
            "c.sendall(b'hello'); print(c.getsockname()[1], flush=True); c.recv(1); c.close()\n"
        )
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        s, _ = srv.accept()
        assert s.recv(5) == b"hello"
        cport = int(p.stdout.readline())  # type: ignore[union-attr]
        s.close()
        assert p.wait(10) == 0
        p.stdout.close()  # type: ignore[union-attr]
        srv.close()
        ev = close_of(trace, cport, port)
        assert (ev["cgroup"], ev["container_id"]) == (f"/{name}", None)
    finally:
        deadline = time.monotonic() + 5
        while cg.exists() and time.monotonic() < deadline:
            try:
                cg.rmdir()
            except OSError:
                time.sleep(0.05)   # the child's exit reaches the cgroup asynchronously


def test_container_id_is_read_off_the_path() -> None:
    from app.cgroups import container_id
    cid = "0123456789abcdef" * 4
    assert container_id(f"/system.slice/docker-{cid}.scope") == cid
    assert container_id(f"/kubepods/burstable/pod1/{cid}") == cid
    assert container_id("/system.slice/nginx.service") is None


def test_pending_connect_is_listed_within_a_second_then_times_out(net: VethPair, tmp_path: Path) -> None:
    from tests.test_serve import start_service, wait_for

    net.drop_input(net.ns_b, "tcp dport 19 tcp flags syn")
    subprocess.run(["ip", "netns", "exec", net.ns_a, "sysctl", "-qw", "net.ipv4.tcp_syn_retries=1"], check=True)
    svc = start_service(tmp_path / "serve.log")
    try:
        code = (
            "import socket, select, sys, time\n"
            "s = socket.socket(socket.AF_INET6); s.setblocking(False)\n"
            f"s.connect_ex(({net.addr_b6!r}, 19))\n"
            "print(s.getsockname()[1], flush=True)\n"
            "select.select([], [s], [], 10)\n"
            "print(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), flush=True)\n"
        )
        p = net.run_in(net.ns_a, [sys.executable, "-c", code])
        cport = int(p.stdout.readline())  # type: ignore[union-attr]
        t0 = time.monotonic()

        def pending() -> dict[str, object] | None:
            conns = svc.json("/connections", state="open", port=cport)
            return next((c for c in conns if c["src_port"] == cport and c["state"] == "SYN_SENT"), None)

        c = wait_for(pending, 1.0, "the pending connect listed as SYN_SENT with its port")
        assert time.monotonic() - t0 < 1.0
        # `ip netns exec` execs the command: the connecting process keeps its pid.
        assert (c["role"], c["dst_port"], ip_address(c["dst_addr"]), c["pid"]) == \
            ("client", 19, ip_address(net.addr_b6), p.pid)
        assert int(p.stdout.readline()) == 110  # type: ignore[union-attr]
        closed = wait_for(lambda: next((x for x in svc.json("/connections", state="closed", port=cport)
                                        if x["id"] == c["id"]), None), 5, "the timed-out connect closed")
        assert closed["close_reason"] == "timeout"
        evs = svc.json(f"/connections/{c['id']}/events")
        assert [e["type"] for e in evs].count("syn_sent") == 1, evs
    finally:
        svc.stop()


def test_table_converges_to_the_kernel_after_losses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_serve import start_service, wait_for

    srv = listener()
    port = srv.getsockname()[1]
    # A one-page ring that is read once a second: a burst overflows it, losing records.
    for k, v in (("RINGBUF_PAGES", "1"), ("WAKEUP_INTERVAL_US", "1000000"), ("WAKEUP_BUSY_INTERVAL_US", "1000000"),
                 ("WAKEUP_BATCH_RECORDS", "1000000"), ("DRAIN_INTERVAL_MS", "1000"), ("SWEEP_INTERVAL_S", "1")):
        monkeypatch.setenv(f"CONN_TRACER_{k}", v)
    svc = start_service(tmp_path / "serve.log", "--filter-port", str(port))
    kept: list[socket.socket] = []
    try:
        for i in range(300):
            c = socket.create_connection(("127.0.0.1", port))
            s, _ = srv.accept()
            if i % 30 == 0:
                kept += [c, s]
            else:
                c.close()
                s.close()
        # One more left half-closed: the server end sits in CLOSE_WAIT, the client's in FIN_WAIT2.
        c = socket.create_connection(("127.0.0.1", port))
        s, _ = srv.accept()
        c.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""
        kept += [c, s]
        assert wait_for(lambda: svc.json("/stats")["lost_kernel"] or None, 5, "records lost in the kernel")
        want = {(x.getsockname()[1], x.getpeername()[1]) for x in kept}

        last: dict[tuple[int, int], str] = {}

        def converged() -> dict[tuple[int, int], str] | None:
            last.clear()
            last.update({(x["src_port"], x["dst_port"]): x["state"]
                         for x in svc.json("/connections", state="open", port=port, limit=100000)})
            return dict(last) if set(last) == want else None

        try:
            got = wait_for(converged, 8, "open connections equal to the kernel's")
        except BaseException:
            raise AssertionError(f"extra {set(last) - want}, missing {want - set(last)}, "
                                 f"stats {svc.json('/stats')}") from None
        cport, sport = c.getsockname()[1], s.getsockname()[1]
        assert got[(sport, cport)] == "CLOSE_WAIT" and got[(cport, sport)] == "FIN_WAIT2", got
    finally:
        for x in kept:
            x.close()
        srv.close()
        svc.stop()
