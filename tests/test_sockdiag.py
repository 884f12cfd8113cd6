"""sock_diag in every network namespace: real sockets in namespaces the tests make, roles, owners, ports."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from app import sockdiag
from app.bpf.event import CGROUP_ID, COMM, NETNS, ROLE, ROLE_CLIENT, ROLE_SERVER, RTTVAR_US, SPORT, SRTT_US, STATE
from app.cgroups import cgroup2_root
from app.models import Texts
from app.sockdiag import DiagSocket
from tests.conftest import require_root
from tests.netns import PYTHON, VethPair

# SERVER host port close_listener: accepts one client; says its pid, port and socket inodes; holds until stdin ends.
SERVER = r"""
import json, os, socket, sys
host, port, close_listener = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
ls = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
ls.bind((host, port))
ls.listen(8)
print(json.dumps({"pid": os.getpid(), "port": ls.getsockname()[1]}), flush=True)
c, _ = ls.accept()
got = 0
while got < 1234:  # what the client sends first
    got += len(c.recv(65536))
c.sendall(b"y" * 567)
out = {"listener": os.fstat(ls.fileno()).st_ino, "inode": os.fstat(c.fileno()).st_ino}
if close_listener:
    ls.close()
print(json.dumps(out), flush=True)
sys.stdin.read()
"""

# CLIENT host port bind_port wait: connects (non-blocking when not waiting: a SYN may go unanswered) from
# bind_port (0: any); says its pid, socket inode and local port; holds until stdin ends.
CLIENT = r"""
import json, os, socket, sys
host, port, bind_port, wait = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
if bind_port:
    s.bind(("", bind_port))
if wait:
    s.connect((host, port))
    s.sendall(b"x" * 1234)
    got = 0
    while got < 567:
        got += len(s.recv(65536))
else:
    s.setblocking(False)
    try:
        s.connect((host, port))
    except BlockingIOError:
        pass
print(json.dumps({"pid": os.getpid(), "inode": os.fstat(s.fileno()).st_ino, "port": s.getsockname()[1]}),
      flush=True)
sys.stdin.read()
"""

# A process named b"\xff\xfebad" (not UTF-8) holding a listening socket; run as nobody.
BAD_NAME = r"""
import ctypes, json, os, socket, sys
ctypes.CDLL(None).prctl(15, b"\xff\xfebad", 0, 0, 0)  # PR_SET_NAME
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
print(json.dumps({"pid": os.getpid(), "inode": os.fstat(s.fileno()).st_ino}), flush=True)
sys.stdin.read()
"""

# Two Fast Open connects on loopback: the first gets a cookie (and says its Fast Open failed), the second
# carries data in its SYN (its accepted child is a Fast Open child). Says each socket's inode; holds.
FAST_OPEN = r"""
import json, os, socket, sys
ls = socket.socket()
ls.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 16)
ls.bind(("127.0.0.1", 0))
ls.listen()
out, keep = [], []
for _ in range(2):
    c = socket.socket()
    c.sendto(b"hello", socket.MSG_FASTOPEN, ls.getsockname())
    a, _ = ls.accept()
    assert a.recv(5) == b"hello"
    keep += [a, c]
    out.append({"client": c.fileno(), "server": a.fileno()})
print(json.dumps([{k: os.fstat(v).st_ino for k, v in o.items()} for o in out]), flush=True)
sys.stdin.read()
"""

DROP_PORT = 9   # SYNs to this port are dropped in ns_a

root = pytest.mark.root


def _sysctl(ns: str, setting: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", setting], check=True, timeout=10)


def _line(p: subprocess.Popen[str]) -> Any:
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        p.wait(5)
        raise AssertionError(f"peer exited {p.returncode}: {p.stderr.read() if p.stderr else ''}")
    return json.loads(line)


def _netns_ino(name: str) -> int:
    return os.stat(f"/run/netns/{name}").st_ino


def _poll(fn: Callable[[], DiagSocket | None], what: str, timeout_s: float = 5.0) -> DiagSocket:
    deadline = time.monotonic() + timeout_s
    while True:
        got = fn()
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen within {timeout_s} s: {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def net() -> Iterator[VethPair]:
    require_root()
    with VethPair() as n:
        n.drop_input(n.ns_a, f"tcp dport {DROP_PORT} tcp flags syn")
        yield n


def _by_inode(socks: list[DiagSocket], inode: int) -> DiagSocket:
    found = [d for d in socks if d.inode == inode]
    assert len(found) == 1, (inode, found)
    return found[0]


def _pair(net: VethPair, family: str, *, port: int = 0, close_listener: bool = False,
          client_port: int = 0) -> tuple[dict[str, Any], dict[str, Any], str, str]:
    """A connection from ns_b (client) to ns_a (server); returns what each side said and the addresses."""
    a, b = (net.addr_a4, net.addr_b4) if family == "ipv4" else (net.addr_a6, net.addr_b6)
    srv = net.run_in(net.ns_a, [PYTHON, "-c", SERVER, a, str(port), "1" if close_listener else "0"])
    first = _line(srv)
    cli = net.run_in(net.ns_b, [PYTHON, "-c", CLIENT, a, str(first["port"]), str(client_port), "1"])
    c = _line(cli)
    s = {**first, **_line(srv)}
    return s, c, a, b


@root
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_sockets_in_other_namespaces(net: VethPair, family: str) -> None:
    s, c, a, b = _pair(net, family)
    here = sockdiag.thread_netns()
    sw = sockdiag.sweep()
    assert sockdiag.thread_netns() == here   # only the sweep's own thread moved
    ns_a, ns_b = _netns_ino(net.ns_a), _netns_ino(net.ns_b)
    assert {ns_a, ns_b, sockdiag.current_netns()} <= sw.netns_ok
    fam = socket.AF_INET if family == "ipv4" else socket.AF_INET6
    srv, cli = _by_inode(sw.sockets, s["inode"]), _by_inode(sw.sockets, c["inode"])
    assert (srv.netns, srv.family, srv.state, srv.src_addr, srv.src_port, srv.dst_addr, srv.dst_port) == \
        (ns_a, fam, sockdiag.ST_ESTABLISHED, a, s["port"], b, c["port"])
    assert (cli.netns, cli.family, cli.state, cli.src_addr, cli.src_port, cli.dst_addr, cli.dst_port) == \
        (ns_b, fam, sockdiag.ST_ESTABLISHED, b, c["port"], a, s["port"])
    assert (srv.role, srv.role_from, cli.role) == (ROLE_SERVER, sockdiag.ROLE_FROM_LISTENER, ROLE_CLIENT)
    assert (cli.bytes_sent, cli.bytes_received, srv.bytes_sent, srv.bytes_received) == (1234, 567, 567, 1234)
    assert cli.rtt_us > 0 and srv.rtt_us > 0 and cli.total_retrans == 0
    assert srv.cookie and cli.cookie and srv.cookie != cli.cookie
    assert _by_inode(sw.sockets, s["listener"]).state == sockdiag.ST_LISTEN
    # A mask without LISTEN: listeners are still asked for (roles need them), not returned.
    est = sockdiag.dump_all(1 << sockdiag.ST_ESTABLISHED)
    assert all(d.state == sockdiag.ST_ESTABLISHED for d in est) and _by_inode(est, s["inode"]).role == ROLE_SERVER
    # The same from one namespace, named by inode and by file.
    assert _by_inode(sockdiag.dump_netns(ns_a), s["inode"]) == srv
    assert [d.inode for d in sockdiag.dump_netns(f"/run/netns/{net.ns_b}") if d.inode == c["inode"]] == [c["inode"]]
    # Start-up records: the netns of each socket, not the service's own.
    recs = {r[SPORT]: r for r in sockdiag.preexisting([srv, cli])}
    assert (recs[s["port"]][NETNS], recs[s["port"]][ROLE]) == (ns_a, ROLE_SERVER)
    assert (recs[c["port"]][NETNS], recs[c["port"]][ROLE], recs[c["port"]][STATE]) == (ns_b, ROLE_CLIENT, 1)
    assert (recs[c["port"]][SRTT_US], recs[c["port"]][RTTVAR_US]) == (cli.rtt_us, cli.rttvar_us)


@root
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_roles_when_ports_mislead(net: VethPair, family: str) -> None:
    """The client binds the very port the server listens on, in its own namespace: still a client."""
    port = 4999 if family == "ipv4" else 4998
    s, c, _, _ = _pair(net, family, port=port, client_port=port)
    socks = sockdiag.dump_all()
    srv, cli = _by_inode(socks, s["inode"]), _by_inode(socks, c["inode"])
    assert (srv.src_port, cli.src_port) == (port, port)
    assert (srv.role, srv.role_from) == (ROLE_SERVER, sockdiag.ROLE_FROM_LISTENER)
    assert (cli.role, cli.role_from) == (ROLE_CLIENT, sockdiag.ROLE_FROM_DEFAULT)


@root
def test_role_after_listener_closed(net: VethPair) -> None:
    """No listener left: the ephemeral range of each namespace tells the sides apart."""
    _sysctl(net.ns_b, "net.ipv4.ip_local_port_range=41000 41999")
    s, c, _, _ = _pair(net, "ipv4", port=5001, close_listener=True)
    sw = sockdiag.sweep()
    assert sw.ephemeral[_netns_ino(net.ns_b)] == (41000, 41999) and 41000 <= c["port"] <= 41999
    srv, cli = _by_inode(sw.sockets, s["inode"]), _by_inode(sw.sockets, c["inode"])
    assert (srv.role, srv.role_from) == (ROLE_SERVER, sockdiag.ROLE_FROM_PORTS)
    assert (cli.role, cli.role_from) == (ROLE_CLIENT, sockdiag.ROLE_FROM_PORTS)


@root
def test_fast_open_marks(net: VethPair) -> None:
    _sysctl(net.ns_a, "net.ipv4.tcp_fastopen=3")
    p = net.run_in(net.ns_a, [PYTHON, "-c", FAST_OPEN])
    first, second = _line(p)
    socks = sockdiag.dump_netns(_netns_ino(net.ns_a))
    cookie_miss, child = _by_inode(socks, first["client"]), _by_inode(socks, second["server"])
    assert (cookie_miss.fastopen_client_fail, cookie_miss.role, cookie_miss.role_from) == (1, ROLE_CLIENT, "tfo")
    assert child.tcpi_options & sockdiag.TCPI_OPT_TFO_CHILD and (child.role, child.role_from) == (ROLE_SERVER, "tfo")


@root
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_syn_sent_with_its_port(net: VethPair, family: str) -> None:
    a = net.addr_a4 if family == "ipv4" else net.addr_a6
    cli = net.run_in(net.ns_b, [PYTHON, "-c", CLIENT, a, str(DROP_PORT), "0", "0"])
    c = _line(cli)
    ns_b = _netns_ino(net.ns_b)
    d = _poll(lambda: next((x for x in sockdiag.dump_netns(ns_b) if x.inode == c["inode"]), None), "SYN_SENT")
    assert (d.state, d.role, d.role_from, d.dst_addr, d.dst_port) == \
        (sockdiag.ST_SYN_SENT, ROLE_CLIENT, sockdiag.ROLE_FROM_STATE, a, DROP_PORT)
    assert d.timer == 1   # the SYN retransmit timer runs
    fam = socket.AF_INET if family == "ipv4" else socket.AF_INET6
    want = (fam, net.addr_b4 if family == "ipv4" else net.addr_b6, c["port"])
    assert sockdiag.port_of_inode(c["pid"], c["inode"], 1 << sockdiag.ST_SYN_SENT) == want
    assert sockdiag.port_of_inode(c["pid"], c["inode"]) == want
    assert sockdiag._port_from_proc(c["pid"], c["inode"]) == want   # the fallback agrees
    assert sockdiag.port_of_inode(c["pid"], 1) is None


def test_port_of_inode_gone_process() -> None:
    p = subprocess.run([PYTHON, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    assert sockdiag.port_of_inode(int(p.stdout), 12345) is None


@root
def test_owner_with_non_utf8_name() -> None:
    p = subprocess.Popen(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                          "/usr/bin/python3", "-c", BAD_NAME],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        got = _line(p)
        owners = sockdiag.socket_owners()
        assert owners[got["inode"]] == (got["pid"], "\ufffd\ufffdbad")
        assert sockdiag.owner_of_inode(got["pid"], got["inode"]) == (got["pid"], "\ufffd\ufffdbad")
        assert sockdiag.owner_of_inode(got["pid"], 1) is None
        d = _by_inode(sockdiag.dump(states=1 << sockdiag.ST_LISTEN), got["inode"])
        assert d.uid == 65534
        # A start-up record of such a socket: the public name shows the replacement characters.
        conn = DiagSocket(d.family, sockdiag.ST_ESTABLISHED, d.src_addr, d.src_port, "127.0.0.1", 1, d.inode, 0, 0)
        (rec,) = sockdiag.preexisting([conn], owners)
        assert Texts(0).comm(rec[COMM]) == "\ufffd\ufffdbad"
    finally:
        p.kill()
        p.communicate(timeout=5)


@root
def test_cgroup_of_socket() -> None:
    """INET_DIAG_CGROUP_ID is the cgroup v2 id (the directory's inode) of the process that made the socket."""
    root = cgroup2_root()
    if root is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    cg = root / f"ct-diag-{secrets.token_hex(3)}"
    cg.mkdir()
    p = subprocess.Popen([PYTHON, "-c", "import sys; sys.stdin.readline(); exec(sys.argv[1])", BAD_NAME],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        (cg / "cgroup.procs").write_text(str(p.pid))
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
        got = _line(p)
        d = _by_inode(sockdiag.dump(states=1 << sockdiag.ST_LISTEN), got["inode"])
        assert d.cgroup_id == cg.stat().st_ino != 1
        (rec,) = sockdiag.preexisting([dataclasses.replace(d, state=sockdiag.ST_ESTABLISHED, dst_port=1)])
        assert rec[CGROUP_ID] == d.cgroup_id
    finally:
        p.kill()
        p.communicate(timeout=5)
        cg.rmdir()


@root
def test_unreadable_namespace_reported() -> None:
    sw = sockdiag.sweep(targets={1: ["/nonexistent/ns"], sockdiag.current_netns(): ["/proc/self/ns/net"]})
    assert set(sw.netns_failed) == {1} and "/nonexistent/ns" in sw.netns_failed[1]
    assert sw.netns_ok == {sockdiag.current_netns()}
    with pytest.raises(OSError, match="not found"):
        sockdiag.dump_netns(1)


def _sock(state: int, src: str, sport: int, dst: str = "10.9.9.9", dport: int = 50000, netns: int = 1,
          v6only: bool = False) -> DiagSocket:
    fam = socket.AF_INET6 if ":" in src else socket.AF_INET
    return DiagSocket(fam, state, src, sport, dst if fam == socket.AF_INET else "::1", dport, 0, 0, 0, netns,
                      v6only=v6only)


LISTEN, EST = sockdiag.ST_LISTEN, sockdiag.ST_ESTABLISHED


@pytest.mark.parametrize(("name", "listeners", "sock", "want"), [
    ("syn_sent is a client even on a listened port", [_sock(LISTEN, "0.0.0.0", 80)], _sock(2, "10.0.0.1", 80),
     (ROLE_CLIENT, "state")),
    ("syn_recv is a server", [], _sock(3, "10.0.0.1", 40000), (ROLE_SERVER, "state")),
    ("wildcard listener", [_sock(LISTEN, "0.0.0.0", 80)], _sock(EST, "10.0.0.1", 80), (ROLE_SERVER, "listener")),
    ("listener on another address", [_sock(LISTEN, "127.0.0.1", 80)], _sock(EST, "10.0.0.1", 80, dport=80),
     (ROLE_CLIENT, "default")),
    ("listener in another netns", [_sock(LISTEN, "0.0.0.0", 80, netns=2)], _sock(EST, "10.0.0.1", 80, dport=80),
     (ROLE_CLIENT, "default")),
    ("dual-stack listener, IPv4 child", [_sock(LISTEN, "::", 80)], _sock(EST, "::ffff:10.0.0.1", 80),
     (ROLE_SERVER, "listener")),
    ("dual-stack listener, AF_INET socket", [_sock(LISTEN, "::", 80)], _sock(EST, "10.0.0.1", 80),
     (ROLE_SERVER, "listener")),
    ("v6only listener, AF_INET socket", [_sock(LISTEN, "::", 80, v6only=True)], _sock(EST, "10.0.0.1", 80, dport=80),
     (ROLE_CLIENT, "default")),
    ("specific v6 listener", [_sock(LISTEN, "fd00::1", 443)], _sock(EST, "fd00::1", 443), (ROLE_SERVER, "listener")),
    ("no listener, local ephemeral", [], _sock(EST, "10.0.0.1", 40000, dport=443), (ROLE_CLIENT, "ports")),
    ("no listener, remote ephemeral", [], _sock(EST, "10.0.0.1", 443, dport=40000), (ROLE_SERVER, "ports")),
    ("no listener, both ephemeral", [], _sock(EST, "10.0.0.1", 40001, dport=40000), (ROLE_CLIENT, "default")),
])
def test_assign_roles(name: str, listeners: list[DiagSocket], sock: DiagSocket, want: tuple[int, str]) -> None:
    sockdiag.assign_roles([*listeners, sock])
    assert (sock.role, sock.role_from) == want, name


def test_roles_follow_each_namespace_range() -> None:
    a, b = _sock(EST, "10.0.0.1", 1500, dport=443, netns=1), _sock(EST, "10.0.0.1", 1500, dport=443, netns=2)
    sockdiag.assign_roles([a, b], {1: (1024, 2000)})
    assert (a.role, a.role_from, b.role, b.role_from) == (ROLE_CLIENT, "ports", ROLE_CLIENT, "default")


@pytest.mark.parametrize(("comm", "want"), [
    ("sshd", b"sshd"),
    ("\ufffd\ufffdbad", "\ufffd\ufffdbad".encode()),
    ("\ufffd" * 15, "\ufffd".encode() * 5),   # 45 bytes: cut at 15, never inside a character
])
def test_comm_in_records(comm: str, want: bytes) -> None:
    sock = _sock(EST, "10.0.0.1", 40000)
    sock.inode = 7
    (rec,) = sockdiag.preexisting([sock], {7: (1, comm)})
    assert rec[COMM] == want.ljust(16, b"\0")


def test_short_tcp_info() -> None:
    """An older kernel's tcp_info (no bytes_sent): the fields it has, the others 0."""
    info = bytearray(160)
    struct.pack_into("=II", info, 68, 250, 40)
    struct.pack_into("=I", info, 100, 3)
    struct.pack_into("=QQ", info, 120, 11, 22)
    full = bytes(info) + bytes(sockdiag.TCPI_ALL.size - 160)
    full = full[:200] + struct.pack("=QQ", 1000, 100) + full[216:]
    for raw, sent in ((bytes(info), 0), (full, 900)):
        d = _sock(EST, "10.0.0.1", 1)
        sockdiag._parse_info(d, raw)
        assert (d.rtt_us, d.rttvar_us, d.total_retrans, d.bytes_acked, d.bytes_received, d.bytes_sent,
                d.bytes_retrans) == (250, 40, 3, 11, 22, sent, 100 if sent else 0)
