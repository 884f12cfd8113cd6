"""Real TCP exchanges for tests: a server and a client process, optionally in network namespaces."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass

from tests.netns import VethPair

# Peers run as their own processes (pids to check), in a namespace where asked.
# SERVER host port a b n server_closes_first: accepts n clients in turn.
SERVER = r"""
import json, os, socket, sys
host, server_closes_first = sys.argv[1], sys.argv[6] == "1"
port, a, b, n = (int(x) for x in sys.argv[2:6])
ls = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((host, port))
ls.listen(8)
print(json.dumps({"pid": os.getpid(), "port": ls.getsockname()[1]}), flush=True)
for _ in range(n):
    c, peer = ls.accept()
    got = 0
    while got < a:
        d = c.recv(65536)
        if not d:
            break
        got += len(d)
    c.sendall(b"y" * b)
    if not server_closes_first:
        while c.recv(65536):  # the client closes first; we close on its FIN
            pass
    c.close()
    print(json.dumps({"received": got, "peer_port": peer[1]}), flush=True)
ls.close()
"""

# CLIENT host port a b server_closes_first: sends a, reads b (to EOF if the server closes first).
CLIENT = r"""
import json, os, socket, sys
host, server_closes_first = sys.argv[1], sys.argv[5] == "1"
port, a, b = (int(x) for x in sys.argv[2:5])
s = socket.create_connection((host, port), timeout=20)
local = s.getsockname()
s.sendall(b"x" * a)
got = 0
while server_closes_first or got < b:
    d = s.recv(65536)
    if not d:
        break
    got += len(d)
s.close()
print(json.dumps({"pid": os.getpid(), "addr": local[0], "port": local[1], "received": got}), flush=True)
"""


@dataclass
class Exchange:
    """What really happened: both ends' pids, addresses and ports, bytes each way."""

    server_pid: int
    server_addr: str
    server_port: int
    client_pid: int
    client_addr: str
    client_port: int
    sent_by_client: int
    sent_by_server: int


def _spawn(net: VethPair | None, ns: str | None, code: str, *args: object) -> subprocess.Popen[str]:
    argv = [sys.executable, "-c", code, *map(str, args)]
    if net is not None and ns is not None:
        return net.run_in(ns, argv)
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _line(p: subprocess.Popen[str]) -> dict[str, object]:
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        raise RuntimeError(f"peer exited without output: {p.stderr.read() if p.stderr else ''}")
    return json.loads(line)  # type: ignore[no-any-return]


def run_exchange(server_addr: str, a: int, b: int, *, net: VethPair | None = None,
                 client_ns: str | None = None, server_ns: str | None = None,
                 server_closes_first: bool = True, timeout: float = 20) -> Exchange:
    """Client sends `a` bytes, server answers `b`, both close; returns the facts."""
    first = "1" if server_closes_first else "0"
    srv = _spawn(net, server_ns, SERVER, server_addr, 0, a, b, 1, first)
    try:
        hello = _line(srv)
        cli = _spawn(net, client_ns, CLIENT, server_addr, hello["port"], a, b, first)
        out, err = cli.communicate(timeout=timeout)
        if cli.returncode != 0:
            raise RuntimeError(f"client failed: {err}")
        c = json.loads(out.splitlines()[-1])
        done = _line(srv)
        srv.wait(timeout=timeout)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
        for f in (srv.stdin, srv.stdout, srv.stderr):
            if f is not None:
                f.close()
    assert done["received"] == a and c["received"] == b, (done, c)
    return Exchange(
        server_pid=int(hello["pid"]), server_addr=server_addr, server_port=int(hello["port"]),
        client_pid=int(c["pid"]), client_addr=str(c["addr"]), client_port=int(c["port"]),
        sent_by_client=a, sent_by_server=b,
    )


# --- in this process, on loopback ---------------------------------------------------------------

@dataclass(frozen=True)
class LocalExchange:
    """One finished TCP connection made by this test process, seen from both ends."""

    client_port: int
    server_port: int
    pid: int
    client_sent: int
    server_sent: int


def recv_exactly(sock: socket.socket, n: int) -> None:
    got = 0
    while got < n:
        chunk = sock.recv(min(65536, n - got))
        if not chunk:
            raise ConnectionError(f"peer closed after {got} of {n} bytes")
        got += len(chunk)


def local_exchange(client_sends: int, server_sends: int) -> LocalExchange:
    """Listen on 127.0.0.1, connect, send A bytes, answer B bytes, close both ends."""
    failures: list[BaseException] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        server_port = listener.getsockname()[1]

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(5)
                    recv_exactly(conn, client_sends)
                    conn.sendall(b"y" * server_sends)
            except BaseException as exc:  # surfaced in the test thread below
                failures.append(exc)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with socket.create_connection(("127.0.0.1", server_port), timeout=5) as client:
            client_port = client.getsockname()[1]
            client.sendall(b"x" * client_sends)
            recv_exactly(client, server_sends)
        thread.join(5)
    if failures:
        raise failures[0]
    assert not thread.is_alive(), "server side of the exchange hung"
    return LocalExchange(client_port, server_port, os.getpid(), client_sends, server_sends)
