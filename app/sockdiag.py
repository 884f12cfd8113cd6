"""Connections already open at start-up, from netlink sock_diag (inet_diag dump), TCP over IPv4 and IPv6.

Only the service's own network namespace: sock_diag answers for the netns of the socket asking.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass

from app.bpf.event import ROLE_CLIENT, ROLE_SERVER, EventRecord, make_record

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
INET_DIAG_INFO = 2

NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid (zeros: match all).
REQ_V2 = struct.Struct("=BBBxI48x")
# inet_diag_msg: family state timer retrans | sport dport (be) src[16] dst[16] if cookie[8] |
# expires rqueue wqueue uid inode
DIAG_MSG = struct.Struct("=BBBB2H16s16sI8sIIIII")
DIAG_MSG_PORTS = struct.Struct("!HH")
RTATTR = struct.Struct("=HH")
# struct tcp_info (uapi linux/tcp.h): u64 tcpi_bytes_received at 128, u64 tcpi_bytes_sent at 200.
TCPI_BYTES_RECEIVED = struct.Struct("=Q"), 128
TCPI_BYTES_SENT = struct.Struct("=Q"), 200
TCPI_BYTES_RETRANS = struct.Struct("=Q"), 208   # bytes_sent counts retransmissions again

ST_LISTEN = 10
SKIP_STATES = {6, 7, 10, 12}  # TIME_WAIT, CLOSE (not a connection), LISTEN, NEW_SYN_RECV (request socks)
# Ask the kernel for every state but TIME_WAIT and NEW_SYN_RECV: busy hosts hold many of those.
DUMP_STATES = 0xFFFFFFFF & ~((1 << 6) | (1 << 12))
# States reached by receiving a FIN: tcp_sock.bytes_received counts it (KERNEL.md), payload does not.
FIN_RECEIVED_STATES = {8, 9, 11}  # CLOSE_WAIT, LAST_ACK, CLOSING


@dataclass
class DiagSocket:
    family: int
    state: int
    src_addr: str
    src_port: int
    dst_addr: str
    dst_port: int
    inode: int
    bytes_sent: int
    bytes_received: int


def _align4(n: int) -> int:
    return (n + 3) & ~3


def parse_messages(data: bytes, out: list[DiagSocket]) -> bool:
    """Parses one netlink read; returns True when the dump is done."""
    off = 0
    while off + NLMSGHDR.size <= len(data):
        length, mtype, _flags, _seq, _pid = NLMSGHDR.unpack_from(data, off)
        if length < NLMSGHDR.size:
            return True
        if mtype == NLMSG_DONE:
            return True
        if mtype == NLMSG_ERROR:
            err = struct.unpack_from("=i", data, off + NLMSGHDR.size)[0]
            raise OSError(-err, f"sock_diag: {os.strerror(-err)}")
        if mtype == SOCK_DIAG_BY_FAMILY:
            out.append(_parse_diag(data, off + NLMSGHDR.size, off + length))
        off += _align4(length)
    return False


def _parse_diag(data: bytes, off: int, end: int) -> DiagSocket:
    (family, state, _timer, _retrans, sport_raw, dport_raw, src, dst, _if, _cookie,
     _expires, _rq, _wq, _uid, inode) = DIAG_MSG.unpack_from(data, off)
    sport, dport = DIAG_MSG_PORTS.unpack(struct.pack("=HH", sport_raw, dport_raw))
    alen = 4 if family == socket.AF_INET else 16
    sent = received = 0
    a = off + DIAG_MSG.size
    while a + RTATTR.size <= end:
        rlen, rtype = RTATTR.unpack_from(data, a)
        if rlen < RTATTR.size:
            break
        if rtype == INET_DIAG_INFO:
            info = data[a + RTATTR.size:a + rlen]
            (fmt_r, off_r), (fmt_s, off_s) = TCPI_BYTES_RECEIVED, TCPI_BYTES_SENT
            if len(info) >= off_r + 8:
                received = fmt_r.unpack_from(info, off_r)[0]
            if len(info) >= off_s + 8:
                sent = fmt_s.unpack_from(info, off_s)[0]
            fmt_x, off_x = TCPI_BYTES_RETRANS
            if len(info) >= off_x + 8:
                sent -= min(sent, fmt_x.unpack_from(info, off_x)[0])
        a += _align4(rlen)
    if state in FIN_RECEIVED_STATES and received > 0:
        received -= 1
    return DiagSocket(family, state, socket.inet_ntop(family, src[:alen]), sport,
                      socket.inet_ntop(family, dst[:alen]), dport, inode, sent, received)


def dump(families: tuple[int, ...] = (socket.AF_INET, socket.AF_INET6)) -> list[DiagSocket]:
    """Every TCP socket of this netns, any state, with tcp_info byte counters."""
    out: list[DiagSocket] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as s:
        s.settimeout(5)
        s.bind((0, 0))
        for seq, fam in enumerate(families, 1):
            ext = 1 << (INET_DIAG_INFO - 1)
            body = REQ_V2.pack(fam, socket.IPPROTO_TCP, ext, DUMP_STATES)
            s.send(NLMSGHDR.pack(NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY,
                                 NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body)
            while not parse_messages(s.recv(1 << 16), out):
                pass
    return out


def socket_owners() -> dict[int, tuple[int, str]]:
    """Socket inode -> (pid, comm) from /proc/*/fd; best effort (processes come and go)."""
    owners: dict[int, tuple[int, str]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        comm: str | None = None
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in owners:
                    continue
                if comm is None:
                    try:
                        with open(f"/proc/{pid}/comm") as f:
                            comm = f.read().strip()
                    except OSError:
                        comm = ""
                owners[inode] = (pid, comm)
    return owners


def current_netns() -> int:
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return 0


def preexisting(socks: list[DiagSocket], owners: dict[int, tuple[int, str]] | None = None,
                start: int = 1) -> list[EventRecord]:
    """Records (ids "p<n>": conn_id -n) for every connection socket: not LISTEN, TIME_WAIT or a request."""
    owners = owners if owners is not None else {}
    listen_ports = {d.src_port for d in socks if d.state == ST_LISTEN}
    netns = current_netns()
    now_ns = time.monotonic_ns()
    out: list[EventRecord] = []
    n = start
    for d in socks:
        if d.state in SKIP_STATES:
            continue
        v4 = d.family == socket.AF_INET
        # A guess: sock_diag does not say who opened; a local port someone listens on means server.
        role = ROLE_SERVER if d.src_port in listen_ports else ROLE_CLIENT
        pid, comm = owners.get(d.inode, (0, "")) if d.inode else (0, "")
        out.append(make_record(
            ts_ns=now_ns, start_ns=now_ns, conn_id=-n, bytes_sent=d.bytes_sent, bytes_received=d.bytes_received,
            pid=pid, netns=netns, saddr=_addr16(d.family, d.src_addr), daddr=_addr16(d.family, d.dst_addr),
            sport=d.src_port, dport=d.dst_port, family=4 if v4 else 6, role=role, state=d.state,
            comm=comm.encode()[:16]))
        n += 1
    return out


def _addr16(family: int, text: str) -> bytes:
    """An address as event records hold it: 16 bytes, IPv4 in the first 4."""
    return socket.inet_pton(family, text).ljust(16, b"\0")
