"""The real kernel path: bcc programs attached, real TCP traffic, exact facts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from app.bpf.loader import Tracer, TracerError, check_host
from app.config import Settings
from app.decode import Decoder
from app.models import Event, EventWriter, Texts
from tests.exchange import Exchange, run_exchange
from tests.netns import VethPair
from tests.tracestream import VENV_BIN, TraceStream, between
from tests.tracestream import Event as Ev

pytestmark = pytest.mark.bpf


def both_closed(ex: Exchange) -> Callable[[list[Ev]], bool]:
    def done(events: list[Ev]) -> bool:
        c = between(events, ex.client_port, ex.server_port)
        s = between(events, ex.server_port, ex.client_port)
        return any(e["type"] == "close" for e in c) and any(e["type"] == "close" for e in s)
    return done


def assert_exchange(events: list[Ev], ex: Exchange, family: str,
                    netns: dict[str, int] | None = None) -> None:
    cli = between(events, ex.client_port, ex.server_port)
    srv = between(events, ex.server_port, ex.client_port)
    ctypes_, stypes = [e["type"] for e in cli], [e["type"] for e in srv]

    # The client's life: SYN_SENT (carrying the port the kernel chose), ESTABLISHED, CLOSE.
    assert ctypes_[0] == "syn_sent" and ctypes_[1] == "established" and ctypes_[-1] == "close", ctypes_
    syn = cli[0]
    assert syn["role"] == "client" and syn["state"] == "SYN_SENT"
    assert syn["pid"] == ex.client_pid and syn["comm"]
    assert (syn["src_addr"], syn["src_port"]) == (ex.client_addr, ex.client_port)
    assert (syn["dst_addr"], syn["dst_port"]) == (ex.server_addr, ex.server_port)
    assert syn["family"] == family

    # The server's: SYN_RECV, ESTABLISHED, (data events only past the coalescing interval), CLOSE.
    assert stypes[0] == "syn_recv" and stypes[1] == "established" and stypes[-1] == "close", stypes
    assert all(e["role"] == "server" for e in srv) and all(e["role"] == "client" for e in cli)
    assert (srv[0]["src_addr"], srv[0]["dst_addr"]) == (ex.server_addr, ex.client_addr)

    # Exact payload bytes at close, each side from its own point of view.
    cclose, sclose = cli[-1], srv[-1]
    assert (cclose["bytes_sent"], cclose["bytes_received"]) == (ex.sent_by_client, ex.sent_by_server)
    assert (sclose["bytes_sent"], sclose["bytes_received"]) == (ex.sent_by_server, ex.sent_by_client)
    assert cclose["state"] == sclose["state"] == "CLOSE"
    # The server socket belongs to the server process, not whoever ran the softirq:
    # from the start (the listener's owner) to the end (the process that used it).
    assert all(e["pid"] == ex.server_pid for e in srv), [(e["type"], e["pid"]) for e in srv]
    assert cclose["pid"] == ex.client_pid

    # One id per socket, distinct between the two sockets.
    assert len({e["conn_id"] for e in cli}) == 1 and len({e["conn_id"] for e in srv}) == 1
    assert cli[0]["conn_id"] != srv[0]["conn_id"]
    if netns is not None:
        assert {e["netns"] for e in cli} == {netns["client"]}
        assert {e["netns"] for e in srv} == {netns["server"]}


def assert_seq_increasing(events: list[Ev]) -> None:
    seqs = [e["seq"] for e in events]
    assert all(a < b for a, b in zip(seqs, seqs[1:], strict=False))


def ns_inode(ns: str) -> int:
    return os.stat(f"/run/netns/{ns}").st_ino


@pytest.mark.parametrize("server_closes_first", [True, False], ids=["server-closes", "client-closes"])
@pytest.mark.parametrize("family,addr", [("ipv4", "127.0.0.1"), ("ipv6", "::1")])
def test_loopback_exchange(trace: TraceStream, family: str, addr: str, server_closes_first: bool) -> None:
    ex = run_exchange(addr, 1234, 56789, server_closes_first=server_closes_first)
    events = trace.wait_for(both_closed(ex))
    assert_exchange(events, ex, family)
    assert_seq_increasing(events)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_netns_exchange(trace: TraceStream, net: VethPair, family: str) -> None:
    server_addr = net.addr_b4 if family == "ipv4" else net.addr_b6
    ex = run_exchange(server_addr, 100_000, 4321, net=net, client_ns=net.ns_a, server_ns=net.ns_b)
    assert ex.client_addr == (net.addr_a4 if family == "ipv4" else net.addr_a6)
    events = trace.wait_for(both_closed(ex))
    assert_exchange(events, ex, family, {"client": ns_inode(net.ns_a), "server": ns_inode(net.ns_b)})
    assert_seq_increasing(events)


@pytest.mark.parametrize("addr", ["127.0.0.1", "::1"])
def test_connect_refused(trace: TraceStream, addr: str) -> None:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    # A bound socket that never listens holds the port, so the SYN gets a RST.
    with socket.socket(fam) as holder, socket.socket(fam) as cli:
        holder.bind((addr, 0))
        port = holder.getsockname()[1]
        with pytest.raises(ConnectionRefusedError):
            cli.connect((addr, port))
        local_port = cli.getsockname()[1] if cli.fileno() >= 0 else None

    def done(events: list[Ev]) -> bool:
        return any(e["dst_port"] == port and e["type"] == "close" for e in events)

    mine = [e for e in trace.wait_for(done) if e["dst_port"] == port]
    assert [e["type"] for e in mine] == ["syn_sent", "close"]
    assert mine[0]["pid"] == os.getpid() and mine[0]["role"] == "client"
    assert mine[0]["conn_id"] == mine[1]["conn_id"]
    assert mine[0]["src_port"] != 0
    if local_port:
        assert mine[0]["src_port"] == local_port
    assert mine[1]["bytes_sent"] == mine[1]["bytes_received"] == 0


def _burst(listener: socket.socket, n: int) -> None:
    host, port = listener.getsockname()[:2]
    for _ in range(n):
        with socket.create_connection((host, port)) as c:
            c.sendall(b"z" * 10)
        a, _ = listener.accept()
        a.close()


async def test_ring_buffer_overflow_is_counted() -> None:
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(512)
        port = ls.getsockname()[1]
        # One page of ring buffer holds ~30 events; nothing reads it during the burst.
        tracer = Tracer(Settings(ringbuf_pages=1, filter_port=port))
        tracer.open()
        got: list[Event] = []
        decoder = Decoder()
        writer = EventWriter(Texts(0))
        arrived = asyncio.Event()
        try:
            _burst(ls, 200)
            lost = tracer.lost_kernel()
            assert lost > 0

            def on_records(frames: bytes, count: int) -> None:
                got.extend(writer.event(0, r) for r in decoder.decode(frames))
                arrived.set()

            tracer.start_reading(asyncio.get_running_loop(), on_records)
            tracer.drain()
            assert 0 < len(got) < 200 * 8
            # After the burst: a fresh exchange is reported exactly.
            got.clear()
            c = socket.create_connection(("127.0.0.1", port))
            a, _ = ls.accept()
            c.sendall(b"q" * 777)
            assert a.recv(1000) == b"q" * 777
            a.sendall(b"r" * 55)
            assert c.recv(1000) == b"r" * 55
            cport = c.getsockname()[1]
            c.close()
            a.close()

            async def closes() -> list[Event]:
                while True:
                    mine = [e for e in got if e.type == "close" and port in (e.src_port, e.dst_port)]
                    if len(mine) == 2:
                        return mine
                    arrived.clear()
                    await arrived.wait()

            mine = await asyncio.wait_for(closes(), 10)
            by_role = {e.role: e for e in mine}
            assert (by_role["client"].src_port, by_role["client"].bytes_sent) == (cport, 777)
            assert by_role["client"].bytes_received == 55
            assert (by_role["server"].bytes_sent, by_role["server"].bytes_received) == (55, 777)
            assert tracer.lost_kernel() == lost
        finally:
            tracer.close()


def our_prog_ids() -> set[int]:
    out = subprocess.run(["bpftool", "prog", "list", "--json"], capture_output=True, text=True, check=True)
    return {p["id"] for p in json.loads(out.stdout) if p.get("name", "").startswith("ct_")}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_exit_detaches_everything(sig: int) -> None:
    before = our_prog_ids()
    stream = TraceStream()
    mine = our_prog_ids() - before
    assert len(mine) >= 4, "trace attached fewer programs than expected"
    assert stream.stop(sig) == 0
    # The kernel frees a program once its last fd is closed, asynchronously (RCU):
    # allow it a bounded moment.
    deadline = time.monotonic() + 5
    while our_prog_ids() & mine and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (our_prog_ids() & mine)


def test_check_reports_tracepoint_mode() -> None:
    res = subprocess.run([str(VENV_BIN / "conn-tracer"), "check"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert ("attach mode: raw_tracepoint:sock:inet_sock_set_state+raw_tracepoint:sock:sk_data_ready"
            in res.stdout)


def test_check_missing_btf_says_one_line(tmp_path: Path) -> None:
    env = dict(os.environ, CONN_TRACER_BTF_PATH=str(tmp_path / "no-vmlinux"))
    res = subprocess.run([str(VENV_BIN / "conn-tracer"), "check"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "BTF" in lines[0] and "fix:" in lines[0]


def test_trace_refuses_to_start_without_btf(tmp_path: Path) -> None:
    env = dict(os.environ, CONN_TRACER_BTF_PATH=str(tmp_path / "no-vmlinux"))
    res = subprocess.run([str(VENV_BIN / "conn-tracer"), "trace"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1 and "BTF" in res.stderr


def test_failed_attach_leaves_nothing_loaded() -> None:
    # Forcing the kprobe hook on a kernel without kprobes: the tracepoints attach,
    # then the kprobe fails; open() must undo the tracepoints it already attached.
    rep = check_host(Settings())
    if rep.kprobes:
        pytest.skip("this kernel has kprobes; the forced failure needs a host without them")
    before = our_prog_ids()
    tracer = Tracer(Settings(data_queue_hook="kprobe"))
    assert tracer.report.data_queue_hook == "kprobe:tcp_data_queue"
    with pytest.raises(TracerError, match="attaching the tracer failed"):
        tracer.open()
    assert not tracer.attached
    deadline = time.monotonic() + 5
    while our_prog_ids() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (our_prog_ids() - before)


PREFORK_SERVER = r"""
import json, os, socket, sys
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(8)
print(json.dumps({"pid": os.getpid(), "port": ls.getsockname()[1]}), flush=True)
child = os.fork()
if child == 0:
    c, _ = ls.accept()
    c.recv(100)
    c.sendall(b"w" * 11)
    c.close()
    print(json.dumps({"worker": os.getpid()}), flush=True)
    os._exit(0)
os.waitpid(child, 0)
"""


def test_prefork_server_socket_belongs_to_the_worker(trace: TraceStream) -> None:
    import sys

    srv = subprocess.Popen([sys.executable, "-c", PREFORK_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None
        hello = json.loads(srv.stdout.readline())
        with socket.create_connection(("127.0.0.1", hello["port"])) as c:
            c.sendall(b"hello")
            assert c.recv(100) == b"w" * 11
            cport = c.getsockname()[1]
        worker = json.loads(srv.stdout.readline())["worker"]
        assert srv.wait(timeout=10) == 0
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
        if srv.stdout is not None:
            srv.stdout.close()

    def done(events: list[Ev]) -> bool:
        return any(e["type"] == "close" for e in between(events, hello["port"], cport))

    mine = between(trace.wait_for(done), hello["port"], cport)
    # Provisionally the listener's process, then the worker that accepted and read.
    assert mine[0]["type"] == "syn_recv" and mine[0]["pid"] == hello["pid"]
    assert mine[-1]["type"] == "close" and mine[-1]["pid"] == worker != hello["pid"]
