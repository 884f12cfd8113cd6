"""conn-tracer: every TCP connection on a Linux host, from eBPF."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("conn-tracer")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
