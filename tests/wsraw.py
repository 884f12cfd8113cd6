"""WebSocket clients made of raw sockets, for behaving badly on purpose (no library in the way)."""

from __future__ import annotations

import base64
import os
import re
import socket
import struct
from pathlib import Path


def upgrade_request(port: int, query: str = "", host: str | None = None, extra: str = "") -> bytes:
    """The client's opening handshake for /ws."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET /ws{'?' + query if query else ''} HTTP/1.1\r\nHost: {host or f'127.0.0.1:{port}'}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


def read_response_head(sock: socket.socket) -> bytes:
    """Reads up to the end of the HTTP response head (and nothing of the frames after it, byte by byte)."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        b = sock.recv(1)
        if not b:
            raise ConnectionError(f"closed during the handshake after {head!r}")
        head += b
    return head


def stuck_subscriber(port: int, query: str = "after=0", rcvbuf: int = 4096) -> socket.socket:
    """A subscriber that completes the handshake and then never reads again (a tiny receive buffer)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    s.sendall(upgrade_request(port, query))
    head = read_response_head(s)
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"handshake refused: {head!r}")
    return s


def ping_frames(count: int, payload: int = 125) -> bytes:
    """`count` masked ping frames (a client must mask) with `payload` bytes each (125 at most)."""
    one = struct.pack("!BB", 0x89, 0x80 | payload) + b"\0\0\0\0" + b"p" * payload   # mask 0: payload as is
    return one * count


def read_close(sock: socket.socket) -> tuple[int, str]:
    """Reads frames until a close frame; returns its code and reason."""
    buf = b""
    while True:
        while len(buf) < 2:
            buf += _recv(sock)
        b1, b2 = buf[0], buf[1]
        n, off = b2 & 0x7F, 2
        if n == 126:
            while len(buf) < 4:
                buf += _recv(sock)
            n, off = struct.unpack("!H", buf[2:4])[0], 4
        elif n == 127:
            while len(buf) < 10:
                buf += _recv(sock)
            n, off = struct.unpack("!Q", buf[2:10])[0], 10
        while len(buf) < off + n:
            buf += _recv(sock)
        payload, buf = buf[off:off + n], buf[off + n:]
        if b1 & 0x0F == 0x8:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            return code, payload[2:].decode()


def _recv(sock: socket.socket) -> bytes:
    b = sock.recv(65536)
    if not b:
        raise ConnectionError("closed without a close frame")
    return b


def rss_kib(pid: int) -> int:
    m = re.search(r"^VmRSS:\s*(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert m
    return int(m.group(1))


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
