"""TCP sockets from netlink sock_diag (inet_diag dumps), IPv4 and IPv6, in every network namespace of the host.

sock_diag answers for the namespace its netlink socket was created in, and a socket keeps its namespace for
life: so a dedicated short-lived thread enters each namespace with setns(2), opens the netlink socket there,
dumps, and returns to where it started. Only that thread moves; the asyncio loop thread never does.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from app.bpf.event import PREEXISTING_ID, ROLE_CLIENT, ROLE_SERVER, EventRecord, make_record

log = logging.getLogger(__name__)

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
CLONE_NEWNET = 0x40000000

# Response attributes (uapi linux/inet_diag.h).
INET_DIAG_INFO = 2
INET_DIAG_SKV6ONLY = 11
INET_DIAG_CGROUP_ID = 21   # sent unconditionally (kernels with socket cgroup data)

NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid (zeros: match all).
REQ_V2 = struct.Struct("=BBBxI48x")
# inet_diag_req_v2 naming one socket: its inet_diag_sockid (ports and addresses big-endian, from the socket's
# own point of view: src = local), any interface, no cookie to match.
REQ_V2_ONE = struct.Struct("=BBBxI")
SOCKID = struct.Struct("!HH16s16s")
SOCKID_TAIL = struct.Struct("=III")
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
# inet_diag_msg: family state timer retrans | sport dport (be) src[16] dst[16] if cookie[8] |
# expires rqueue wqueue uid inode
DIAG_MSG = struct.Struct("=BBBB4x16s16sIQIIIII")
DIAG_MSG_PORTS = struct.Struct("!4xHH")
RTATTR = struct.Struct("=HH")
U64 = struct.Struct("=Q")
U8 = struct.Struct("=B")
# struct tcp_info (uapi linux/tcp.h): the fields we read, (format, offset); a short (older) tcp_info leaves 0.
TCPI_RTT = struct.Struct("=I"), 68              # smoothed RTT, us
TCPI_RTTVAR = struct.Struct("=I"), 72           # its mean deviation, us
TCPI_TOTAL_RETRANS = struct.Struct("=I"), 100   # segments retransmitted over the connection's life
TCPI_BYTES_ACKED = struct.Struct("=Q"), 120     # counts the SYN (and FIN) the peer acknowledged
TCPI_BYTES_RECEIVED = struct.Struct("=Q"), 128
TCPI_BYTES_SENT = struct.Struct("=Q"), 200
TCPI_BYTES_RETRANS = struct.Struct("=Q"), 208   # bytes_sent counts retransmissions again
# tcpi_options at 5; at 7 delivery_rate_app_limited:1, fastopen_client_fail:2 (bit fields from the low bit).
TCPI_OPT_TFO_CHILD = 128   # a passive open made by Fast Open; recent kernels only (6.18 has it, 6.1 not)
# All of the above in one unpack (options flags | rtt rttvar | total_retrans | bytes_acked bytes_received |
# sent retrans): parsing is most of a dump's cost (~5 us a socket), and this halves the tcp_info part.
TCPI_ALL = struct.Struct("=5xBxB60xII24xI16xQQ64xQQ")

# TCP states as the kernel numbers them.
ST_ESTABLISHED, ST_SYN_SENT, ST_SYN_RECV = 1, 2, 3
ST_TIME_WAIT, ST_CLOSE, ST_LISTEN, ST_NEW_SYN_RECV = 6, 7, 10, 12
SKIP_STATES = {ST_TIME_WAIT, ST_CLOSE, ST_LISTEN, ST_NEW_SYN_RECV}  # not connections, or request socks
ALL_STATES = 0xFFFFFFFF
# Every state but TIME_WAIT and NEW_SYN_RECV: busy hosts hold many of those, and neither is a connection.
DUMP_STATES = ALL_STATES & ~((1 << ST_TIME_WAIT) | (1 << ST_NEW_SYN_RECV))
# States reached by receiving a FIN: tcp_sock.bytes_received counts it (KERNEL.md), payload does not.
FIN_RECEIVED_STATES = {8, 9, 11}  # CLOSE_WAIT, LAST_ACK, CLOSING
FAMILIES = (socket.AF_INET, socket.AF_INET6)
# The kernel's default net.ipv4.ip_local_port_range, for sockets whose namespace could not be asked.
DEFAULT_EPHEMERAL = (32768, 60999)

# How a role was decided (DiagSocket.role_from), most to least certain.
ROLE_FROM_STATE = "state"          # SYN_SENT is only ever an active open, SYN_RECV a passive one
ROLE_FROM_TFO = "tfo"              # tcp_info marks Fast Open children and failed Fast Open connects
ROLE_FROM_LISTENER = "listener"    # its local address and port are listened on in its namespace
ROLE_FROM_PORTS = "ports"          # only one of its two ports is in the namespace's ephemeral range
ROLE_FROM_DEFAULT = "default"      # nothing tells: client


@dataclass(slots=True)
class DiagSocket:
    """One TCP socket as sock_diag reports it (bytes_sent is payload: retransmissions taken out)."""

    family: int
    state: int
    src_addr: str
    src_port: int
    dst_addr: str
    dst_port: int
    inode: int
    bytes_sent: int
    bytes_received: int
    netns: int = 0
    uid: int = 0
    cookie: int = 0
    timer: int = 0            # idiag_timer: 0 none, 1 retransmit (SYN_SENT waits on it), 2 keepalive, 4 probe
    rtt_us: int = 0
    rttvar_us: int = 0
    total_retrans: int = 0
    bytes_acked: int = 0
    cgroup_id: int = 0
    v6only: bool = False
    tcpi_options: int = 0
    fastopen_client_fail: int = 0   # non-zero: a Fast Open connect that fell back (so an active open)
    bytes_retrans: int = 0
    role: int | None = None   # set by assign_roles (dump_all does)
    role_from: str = ""


@dataclass(slots=True)
class Sweep:
    """What one dump_all saw: the sockets, the namespaces read in full, and those that could not be read."""

    sockets: list[DiagSocket] = field(default_factory=list)
    netns_ok: set[int] = field(default_factory=set)
    netns_failed: dict[int, str] = field(default_factory=dict)
    ephemeral: dict[int, tuple[int, int]] = field(default_factory=dict)
    elapsed_s: float = 0.0


def _align4(n: int) -> int:
    return (n + 3) & ~3


def parse_messages(data: bytes, out: list[DiagSocket], netns: int = 0) -> bool:
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
            out.append(_parse_diag(data, off + NLMSGHDR.size, off + length, netns))
        off += _align4(length)
    return False


def _parse_diag(data: bytes, off: int, end: int, netns: int) -> DiagSocket:
    (family, state, timer, _retrans, src, dst, _if, cookie,
     _expires, _rq, _wq, uid, inode) = DIAG_MSG.unpack_from(data, off)
    sport, dport = DIAG_MSG_PORTS.unpack_from(data, off)
    alen = 4 if family == socket.AF_INET else 16
    d = DiagSocket(family, state, socket.inet_ntop(family, src[:alen]), sport,
                   socket.inet_ntop(family, dst[:alen]), dport, inode, 0, 0, netns, uid, cookie, timer)
    a = off + DIAG_MSG.size
    while a + RTATTR.size <= end:
        rlen, rtype = RTATTR.unpack_from(data, a)
        if rlen < RTATTR.size:
            break
        if rtype == INET_DIAG_INFO:
            _parse_info(d, data[a + RTATTR.size:a + rlen])
        elif rtype == INET_DIAG_CGROUP_ID and rlen >= RTATTR.size + 8:
            d.cgroup_id = U64.unpack_from(data, a + RTATTR.size)[0]
        elif rtype == INET_DIAG_SKV6ONLY and rlen > RTATTR.size:
            d.v6only = U8.unpack_from(data, a + RTATTR.size)[0] != 0
        a += _align4(rlen)
    if state in FIN_RECEIVED_STATES and d.bytes_received > 0:
        d.bytes_received -= 1
    return d


def _field(info: bytes, spec: tuple[struct.Struct, int]) -> int:
    fmt, off = spec
    return fmt.unpack_from(info, off)[0] if len(info) >= off + fmt.size else 0  # type: ignore[no-any-return]


def _parse_info(d: DiagSocket, info: bytes) -> None:
    if len(info) >= TCPI_ALL.size:
        (d.tcpi_options, flags, d.rtt_us, d.rttvar_us, d.total_retrans, d.bytes_acked, d.bytes_received, sent,
         d.bytes_retrans) = TCPI_ALL.unpack_from(info)
        d.fastopen_client_fail = (flags >> 1) & 3
        d.bytes_sent = sent - min(sent, d.bytes_retrans)
        return
    # An older kernel's shorter tcp_info: what it has.
    d.bytes_received = _field(info, TCPI_BYTES_RECEIVED)
    sent = _field(info, TCPI_BYTES_SENT)
    d.bytes_retrans = _field(info, TCPI_BYTES_RETRANS)
    d.bytes_sent = sent - min(sent, d.bytes_retrans)
    d.rtt_us = _field(info, TCPI_RTT)
    d.rttvar_us = _field(info, TCPI_RTTVAR)
    d.total_retrans = _field(info, TCPI_TOTAL_RETRANS)
    d.bytes_acked = _field(info, TCPI_BYTES_ACKED)


def _dump_here(netns: int, states: int, families: Iterable[int], info: bool) -> list[DiagSocket]:
    """Every TCP socket of the calling thread's namespace whose state is in the mask."""
    out: list[DiagSocket] = []
    ext = (1 << (INET_DIAG_INFO - 1)) if info else 0
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as s:
        s.settimeout(5)
        s.bind((0, 0))
        for seq, fam in enumerate(families, 1):
            body = REQ_V2.pack(fam, socket.IPPROTO_TCP, ext, states & ALL_STATES)
            s.send(NLMSGHDR.pack(NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY,
                                 NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body)
            while not parse_messages(s.recv(1 << 16), out, netns):
                pass
    return out


SocketId = tuple[int, bytes, int, bytes, int]
"""(family 4|6, local address as 16 bytes (IPv4 in the first 4), local port, remote address, remote port)."""


def _lookup_here(netns: int, ids: list[SocketId]) -> dict[SocketId, DiagSocket]:
    """The sockets with these ids in the calling thread's namespace (absent ones are left out), with tcp_info.

    One exact lookup each (the kernel's own hash lookup), so the cost follows the number asked for, not the
    number of sockets on the host (a dump walks the whole table, TIME_WAIT included).
    """
    found: dict[SocketId, DiagSocket] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as s:
        s.settimeout(5)
        s.bind((0, 0))
        for seq, sid in enumerate(ids, 1):
            fam, saddr, sport, daddr, dport = sid
            body = (REQ_V2_ONE.pack(socket.AF_INET if fam == 4 else socket.AF_INET6, socket.IPPROTO_TCP,
                                    1 << (INET_DIAG_INFO - 1), ALL_STATES)
                    + SOCKID.pack(sport, dport, saddr, daddr) + SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE,
                                                                                 INET_DIAG_NOCOOKIE))
            s.send(NLMSGHDR.pack(NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0) + body)
            out: list[DiagSocket] = []
            try:
                parse_messages(s.recv(1 << 16), out, netns)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    continue   # no such socket (any more)
                raise
            if out:
                found[sid] = out[0]
    return found


def lookup(ids_by_netns: dict[int, list[SocketId]]) -> tuple[dict[tuple[int, SocketId], DiagSocket], dict[int, str]]:
    """Exact lookups, namespace by namespace: ((netns, id) -> socket for those that exist, netns -> why it could
    not be read). Blocking; run it in a thread."""
    known = namespaces()
    targets = {ino: known.get(ino, []) for ino in ids_by_netns}
    done, failed = in_namespaces(targets, lambda ino: _lookup_here(ino, ids_by_netns[ino]))
    return {(ino, sid): d for ino, got in done.items() for sid, d in got.items()}, failed


def dump(families: tuple[int, ...] = FAMILIES, states: int = DUMP_STATES) -> list[DiagSocket]:
    """Every TCP socket of the calling thread's netns in the state mask, with tcp_info counters."""
    return _dump_here(thread_netns(), states, families, True)


# --- namespaces -------------------------------------------------------------------------------------------

def thread_netns() -> int:
    """Inode of the calling thread's network namespace (0 if unreadable)."""
    try:
        return os.stat("/proc/thread-self/ns/net").st_ino
    except OSError:
        return 0


def current_netns() -> int:
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return 0


def namespaces() -> dict[int, list[str]]:
    """Network namespace inode -> files naming it: bind mounts under /run/netns first, then /proc/PID/ns/net.

    Misses a namespace that no process is in and none of those files names (kept alive only by an open fd
    or by a socket); its sockets are not dumped.
    """
    found: dict[int, list[str]] = {}
    try:
        nsfs_dev = os.stat("/proc/self/ns/net").st_dev
    except OSError:
        return found
    try:
        names = sorted(os.listdir("/run/netns"))
    except OSError:
        names = []
    for name in names:
        path = f"/run/netns/{name}"
        try:
            st = os.stat(path)
        except OSError:
            continue
        if st.st_dev == nsfs_dev:   # an unmounted leftover file is not a namespace
            found.setdefault(st.st_ino, []).append(path)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        path = f"/proc/{name}/ns/net"
        try:
            ino = os.stat(path).st_ino
        except OSError:   # gone, a kernel thread, or not ours to see
            continue
        paths = found.setdefault(ino, [])
        if len(paths) < 3:   # a few candidates: a process may exit before we open its file
            paths.append(path)
    return found


_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


T = TypeVar("T")


def in_namespaces(targets: dict[int, list[str]], fn: Callable[[int], T]) -> tuple[dict[int, T], dict[int, str]]:
    """Runs fn(inode) inside each namespace, in one dedicated thread that returns to its own namespace.

    Returns (inode -> result, inode -> why it failed). Blocking; the caller's thread never changes namespace.
    """
    done: dict[int, T] = {}
    failed: dict[int, str] = {}
    fatal: list[BaseException] = []

    def worker() -> None:
        try:
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            fatal.append(exc)
            return
        cur = home_ino = os.fstat(home).st_ino
        try:
            for ino, paths in targets.items():
                why = "no file names it"
                entered = False
                for path in paths:
                    try:
                        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                    except OSError as exc:
                        why = f"{path}: {exc.strerror}"
                        continue
                    try:
                        if os.fstat(fd).st_ino != ino:   # the pid was reused by a process elsewhere
                            why = f"{path}: now another namespace"
                            continue
                        if ino != cur:
                            _setns(fd)
                            cur = ino
                        entered = True
                        break
                    except OSError as exc:
                        why = f"{path}: {exc.strerror}"
                    finally:
                        os.close(fd)
                if not entered:
                    failed[ino] = why
                    continue
                try:
                    done[ino] = fn(ino)
                except Exception as exc:   # one namespace (a vanished one, a strange reply) never ends the sweep
                    failed[ino] = f"{paths[0]}: {exc}"
        except BaseException as exc:
            fatal.append(exc)
        finally:
            try:
                if cur != home_ino:
                    _setns(home)
            except OSError as exc:   # the thread ends here anyway; nothing else runs in it
                log.warning("sock_diag thread could not return to its namespace: %s", exc)
            os.close(home)

    t = threading.Thread(target=worker, name="sockdiag-netns", daemon=True)
    t.start()
    t.join()
    if fatal:
        raise fatal[0]
    return done, failed


def ephemeral_range() -> tuple[int, int]:
    """net.ipv4.ip_local_port_range of the calling thread's namespace (net sysctls follow the opener's)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", "rb") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL


def sweep(states: int = DUMP_STATES, families: tuple[int, ...] = FAMILIES, info: bool = True,
          roles: bool = True, targets: dict[int, list[str]] | None = None) -> Sweep:
    """Dumps TCP sockets in every network namespace (or in `targets`); blocking, run it in a thread.

    With roles, LISTEN sockets are asked for too (roles need them) and left out again unless in `states`.
    """
    t0 = time.perf_counter()
    targets = namespaces() if targets is None else targets
    ask = states | (1 << ST_LISTEN) if roles else states

    def one(ino: int) -> tuple[list[DiagSocket], tuple[int, int]]:
        return _dump_here(ino, ask, families, info), ephemeral_range() if roles else DEFAULT_EPHEMERAL

    done, failed = in_namespaces(targets, one)
    out = Sweep(netns_ok=set(done), netns_failed=failed)
    for ino, (socks, eph) in done.items():
        out.ephemeral[ino] = eph
        out.sockets.extend(socks)
    if roles:
        assign_roles(out.sockets, out.ephemeral)
        if not states & (1 << ST_LISTEN):
            out.sockets = [d for d in out.sockets if d.state != ST_LISTEN]
    for ino, why in failed.items():
        log.debug("sock_diag: netns %d not read: %s", ino, why)
    out.elapsed_s = time.perf_counter() - t0
    return out


def dump_all(states: int = DUMP_STATES, families: tuple[int, ...] = FAMILIES, info: bool = True) -> list[DiagSocket]:
    """TCP sockets of every network namespace on the host, roles assigned; blocking (run it in a thread)."""
    return sweep(states, families, info).sockets


def dump_netns(target: int | str, states: int = DUMP_STATES, families: tuple[int, ...] = FAMILIES,
               info: bool = True, roles: bool = True) -> list[DiagSocket]:
    """TCP sockets of one namespace, named by inode or by a file (/run/netns/X, /proc/PID/ns/net)."""
    if isinstance(target, str):
        ino = os.stat(target).st_ino
        paths = [target]
    else:
        ino = target
        paths = namespaces().get(ino, [])
        if not paths:
            raise OSError(errno.ENOENT, f"network namespace {ino} not found")
    s = sweep(states, families, info, roles, {ino: paths})
    if ino in s.netns_failed:
        raise OSError(errno.ENOENT, f"network namespace {ino}: {s.netns_failed[ino]}")
    return s.sockets


# --- roles ------------------------------------------------------------------------------------------------

def _norm(addr: str) -> str:
    """IPv4-mapped IPv6 addresses as IPv4, so a dual-stack listener matches its children either way."""
    return addr[7:] if addr.startswith("::ffff:") and "." in addr else addr


def assign_roles(socks: list[DiagSocket], ephemeral: dict[int, tuple[int, int]] | None = None) -> None:
    """Sets role and role_from on every socket, from what the kernel showed at dump time.

    Nothing in sock_diag marks a passive open in general (not INET_DIAG_SOCKOPT, not idiag_timer; tcp_info
    marks Fast Open ones only), so in order: SYN_SENT is a client and SYN_RECV a server; a Fast Open child
    (TCPI_OPT_TFO_CHILD) a server and a failed Fast Open connect a client; a socket whose local (address or
    wildcard, port) is listened on in its own namespace is a server; else, if exactly one of its ports is in
    the namespace's ephemeral range, that side is the client; else a client. Still wrong: a server whose
    listener has closed and that listened on an ephemeral port (or a client that bound a fixed
    non-ephemeral port to talk to one), and a client that bound a port someone also listens on
    (SO_REUSEADDR).
    """
    eph = ephemeral or {}
    listening: dict[tuple[int, int], set[str]] = {}
    for d in socks:
        if d.state == ST_LISTEN:
            addrs = listening.setdefault((d.netns, d.src_port), set())
            addrs.add(_norm(d.src_addr))
            if d.family == socket.AF_INET6 and d.src_addr == "::" and not d.v6only:
                addrs.add("0.0.0.0")   # dual stack: IPv4 children come as AF_INET6 ::ffff:a.b.c.d
    for d in socks:
        if d.state == ST_LISTEN:
            d.role, d.role_from = ROLE_SERVER, ROLE_FROM_LISTENER
            continue
        if d.state == ST_SYN_SENT:
            d.role, d.role_from = ROLE_CLIENT, ROLE_FROM_STATE
            continue
        if d.state in (ST_SYN_RECV, ST_NEW_SYN_RECV):
            d.role, d.role_from = ROLE_SERVER, ROLE_FROM_STATE
            continue
        if d.tcpi_options & TCPI_OPT_TFO_CHILD or d.fastopen_client_fail:
            d.role = ROLE_SERVER if d.tcpi_options & TCPI_OPT_TFO_CHILD else ROLE_CLIENT
            d.role_from = ROLE_FROM_TFO
            continue
        heard = listening.get((d.netns, d.src_port))
        if heard is not None:
            local = _norm(d.src_addr)
            if local in heard or ("::" in heard and ":" in local) or ("0.0.0.0" in heard and "." in local):
                d.role, d.role_from = ROLE_SERVER, ROLE_FROM_LISTENER
                continue
        lo, hi = eph.get(d.netns, DEFAULT_EPHEMERAL)
        src_eph, dst_eph = lo <= d.src_port <= hi, lo <= d.dst_port <= hi
        if src_eph != dst_eph:
            d.role, d.role_from = (ROLE_CLIENT if src_eph else ROLE_SERVER), ROLE_FROM_PORTS
        else:
            d.role, d.role_from = ROLE_CLIENT, ROLE_FROM_DEFAULT


# --- owners -----------------------------------------------------------------------------------------------

def _read_comm(pid: int | str) -> str:
    """A process name, any bytes: names are not UTF-8 by law, and any local user can pick one."""
    with open(f"/proc/{pid}/comm", "rb") as f:
        return f.read().rstrip(b"\n").decode(errors="replace")


def socket_owners() -> dict[int, tuple[int, str]]:
    """Socket inode -> (pid, comm) from /proc/*/fd; best effort: a process that goes or hides is skipped."""
    owners: dict[int, tuple[int, str]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            _scan_fds(int(name), owners)
        except (OSError, ValueError):   # ENOENT/ESRCH (exited), EACCES; one process never stops the scan
            continue
    return owners


def _scan_fds(pid: int, owners: dict[int, tuple[int, str]]) -> None:
    fd_dir = f"/proc/{pid}/fd"
    comm: str | None = None
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if not target.startswith("socket:["):
            continue
        inode = int(target[8:-1])
        if inode in owners:
            continue
        if comm is None:
            try:
                comm = _read_comm(pid)
            except OSError:
                comm = ""
        owners[inode] = (pid, comm)


def owner_of_inode(pid_hint: int, inode: int) -> tuple[int, str] | None:
    """(pid, comm) if process pid_hint holds socket `inode` (one process's fds, not the whole of /proc)."""
    want = f"socket:[{inode}]"
    fd_dir = f"/proc/{pid_hint}/fd"
    try:
        for fd in os.listdir(fd_dir):
            try:
                if os.readlink(f"{fd_dir}/{fd}") == want:
                    return pid_hint, _read_comm(pid_hint)
            except OSError:
                continue
    except OSError:
        return None
    return None


def port_of_inode(pid: int, inode: int, states: int = ALL_STATES) -> tuple[int, str, int] | None:
    """(family, local address, local port) of socket `inode`, from sock_diag in pid's network namespace.

    For a SYN_SENT socket this is the port inet_hash_connect picked, which the state change did not carry;
    `states` narrows the dump (1 << ST_SYN_SENT for that case). Falls back to /proc/PID/net/tcp{,6} where
    setns is not allowed; None if the process or the socket is gone.
    """
    try:
        socks = dump_netns(f"/proc/{pid}/ns/net", states, info=False, roles=False)
    except OSError:
        return _port_from_proc(pid, inode)
    for d in socks:
        if d.inode == inode:
            return d.family, d.src_addr, d.src_port
    return None


def _port_from_proc(pid: int, inode: int) -> tuple[int, str, int] | None:
    """port_of_inode from the text tables: every socket of the namespace formatted, ~3x slower (measured)."""
    want = b"%d" % inode
    for fam, name in ((socket.AF_INET, "tcp"), (socket.AF_INET6, "tcp6")):
        try:
            with open(f"/proc/{pid}/net/{name}", "rb") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            return None
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[9] == want:   # sl local rem st queues tr:when retrnsmt uid timeout inode
                addr_hex, port_hex = cols[1].split(b":")
                return fam, _proc_addr(fam, addr_hex), int(port_hex, 16)
    return None


def _proc_addr(family: int, hex_addr: bytes) -> str:
    """An address as /proc/net/tcp prints it: 32-bit words in host order."""
    raw = bytes.fromhex(hex_addr.decode())
    words = b"".join(struct.pack("=I", int.from_bytes(raw[i:i + 4], "big")) for i in range(0, len(raw), 4))
    return socket.inet_ntop(family, words)


# --- records ----------------------------------------------------------------------------------------------

def _comm16(comm: str) -> bytes:
    """A name as event records hold it: at most 16 bytes, never a UTF-8 sequence cut in two."""
    raw = comm.encode(errors="replace")[:16]
    return raw.decode(errors="ignore").encode().ljust(16, b"\0")


def preexisting(socks: list[DiagSocket], owners: dict[int, tuple[int, str]] | None = None,
                start: int = 1) -> list[EventRecord]:
    """Records for every connection socket (not LISTEN, TIME_WAIT or a request). Ids "p<cookie>"
    (PREEXISTING_ID + cookie): the kernel's socket cookie is fixed for a socket's life, so a restart gives
    it the same id; "p<n>", n counted from `start`, only where no cookie was read."""
    owners = owners if owners is not None else {}
    if any(d.role is None for d in socks):
        assign_roles(socks)
    here = current_netns()
    now_ns = time.monotonic_ns()
    out: list[EventRecord] = []
    n = start
    for d in socks:
        if d.state in SKIP_STATES:
            continue
        v4 = d.family == socket.AF_INET
        pid, comm = owners.get(d.inode, (0, "")) if d.inode else (0, "")
        role = d.role if d.role is not None else ROLE_CLIENT
        out.append(make_record(
            ts_ns=now_ns, start_ns=now_ns, conn_id=PREEXISTING_ID + (d.cookie or n), bytes_sent=d.bytes_sent,
            bytes_received=d.bytes_received,
            pid=pid, netns=d.netns or here, saddr=addr16(d.family, d.src_addr), daddr=addr16(d.family, d.dst_addr),
            sport=d.src_port, dport=d.dst_port, family=4 if v4 else 6, role=role, state=d.state,
            comm=_comm16(comm), bytes_retrans=d.bytes_retrans, cgroup_id=d.cgroup_id, srtt_us=d.rtt_us,
            rttvar_us=d.rttvar_us, retrans_segs=d.total_retrans))
        n += 1
    return out


def addr16(family: int, text: str) -> bytes:
    """An address as event records hold it: 16 bytes, IPv4 in the first 4."""
    return socket.inet_pton(family, text).ljust(16, b"\0")
