"""Two network namespaces joined by a veth pair, with IPv4 and IPv6 addresses, for BPF tests."""

from __future__ import annotations

import ipaddress
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Sequence
from types import TracebackType

PYTHON = sys.executable


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


class VethPair:
    """`with VethPair() as net:` -> net.ns_a / ns_b, addr_a4 / b4 / a6 / b6, run_in(ns, args)."""

    def __init__(self, subnet: int | None = None) -> None:
        tag = secrets.token_hex(3)
        # 10.200.<subnet>.0/24 and fd00:200:<subnet>::/64; random so parallel runs do not collide.
        n = subnet if subnet is not None else int.from_bytes(secrets.token_bytes(1), "big")
        self.ns_a = f"ct-a-{tag}"
        self.ns_b = f"ct-b-{tag}"
        self.veth_a = f"cta{tag}"
        self.veth_b = f"ctb{tag}"
        self.addr_a4 = f"10.200.{n}.1"
        self.addr_b4 = f"10.200.{n}.2"
        # Canonical text (subnet 0 would read fd00:200:0::1), as the kernel and inet_ntop print it.
        self.addr_a6 = str(ipaddress.ip_address(f"fd00:200:{n:x}::1"))
        self.addr_b6 = str(ipaddress.ip_address(f"fd00:200:{n:x}::2"))
        self._procs: list[subprocess.Popen[str]] = []

    def __enter__(self) -> VethPair:
        try:
            self._setup()
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._teardown()

    def _setup(self) -> None:
        _ip("netns", "add", self.ns_a)
        _ip("netns", "add", self.ns_b)
        _ip("link", "add", self.veth_a, "type", "veth", "peer", "name", self.veth_b)
        _ip("link", "set", self.veth_a, "netns", self.ns_a)
        _ip("link", "set", self.veth_b, "netns", self.ns_b)
        for ns, dev, a4, a6 in ((self.ns_a, self.veth_a, self.addr_a4, self.addr_a6),
                                (self.ns_b, self.veth_b, self.addr_b4, self.addr_b6)):
            _ip("-n", ns, "addr", "add", f"{a4}/24", "dev", dev)
            # nodad: the address is usable at once instead of after duplicate detection.
            _ip("-n", ns, "addr", "add", f"{a6}/64", "dev", dev, "nodad")
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        self._wait_ipv6()

    def _wait_ipv6(self) -> None:
        # Even with nodad the link can take a moment to leave "tentative"; poll, bounded.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            out = _ip("-n", self.ns_a, "-6", "addr", "show", "tentative").stdout + \
                _ip("-n", self.ns_b, "-6", "addr", "show", "tentative").stdout
            if "fd00:200" not in out:
                return
            time.sleep(0.05)
        raise RuntimeError("IPv6 addresses stayed tentative")

    def _teardown(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    f.close()
        for ns in (self.ns_a, self.ns_b):
            # Deleting a namespace removes the veth end inside it, and with it the peer.
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.veth_a, check=False)

    def run_in(self, ns: str, args: Sequence[str], **kwargs: object) -> subprocess.Popen[str]:
        """Starts `args` inside namespace `ns` (text pipes on stdin/stdout/stderr unless overridden)."""
        opts: dict[str, object] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE,
                                   "stderr": subprocess.PIPE, "text": True, "env": dict(os.environ)}
        opts.update(kwargs)
        p: subprocess.Popen[str] = subprocess.Popen(["ip", "netns", "exec", ns, *args], **opts)  # type: ignore[call-overload]
        self._procs.append(p)
        return p

    def drop_input(self, ns: str, match: str) -> None:
        """Drops packets entering namespace `ns` that match an nft expression (a table of its own; it goes
        with the namespace), e.g. "tcp dport 9 tcp flags syn" or "tcp dport 80 numgen random mod 10 == 0"."""
        table = f"ct{secrets.token_hex(3)}"
        rules = (f"add table inet {table}\n"
                 f"add chain inet {table} in {{ type filter hook input priority 0; }}\n"
                 f"add rule inet {table} in {match} drop\n")
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, text=True, check=True)

    def python_in(self, ns: str, code: str, **kwargs: object) -> subprocess.Popen[str]:
        """Runs `python -c code` inside namespace `ns`."""
        return self.run_in(ns, [PYTHON, "-c", code], **kwargs)
