"""Pinned maps: the socket table, listener owners and id counter outlive the process (restart continuity).

One directory per named instance under bpffs, `/sys/fs/bpf/conn-tracer/<instance>/`. A
restarted `serve` (SIGTERM, kill -9, upgrade) compiles tracer.c against the same maps, so
the kernel keeps tracking every connection across the gap and ids keep counting. Pin names
carry a hash of the pinned structs' definitions: a version whose layout differs replaces
them (one log line) instead of misreading them. A lock file keeps two running instances
from sharing one set. `conn-tracer cleanup` (remove()) deletes them.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import re
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

BPFFS = Path("/sys/fs/bpf")
PIN_ROOT = BPFFS / "conn-tracer"
LOCK_DIR = Path("/run")
BPF_FS_MAGIC = 0xCAFE4A11
# Maps tracer.c pins, with the structs whose layout they hold.
PINNED_MAPS = {"sockets": ("sock_info",), "listeners": ("listener_key", "owner"), "ids": ()}
IDS_ENTRIES = 2   # tracer.c's ids array: next connection number, wall clock offset
INSTANCE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


DEFAULT_INSTANCE = "default"


class PinError(RuntimeError):
    """The pinned state cannot be used (bpffs, lock, permissions); the message says what to do."""


class PinLocked(PinError):
    """Another running agent holds this instance."""


def struct_text(source: str, name: str) -> str:
    m = re.search(rf"struct {name} \{{.*?\n\}};", source, re.S)
    if m is None:
        raise PinError(f"tracer.c has no struct {name}")
    return re.sub(r"//[^\n]*", "", m.group(0))   # comments do not change a layout


def layout_tag(source: str, sizes: dict[str, int]) -> str:
    """8 hex digits naming the layout of the pinned maps: their structs and sizes."""
    h = hashlib.sha256()
    for mp, structs in sorted(PINNED_MAPS.items()):
        h.update(mp.encode())
        for s in structs:
            h.update(" ".join(struct_text(source, s).split()).encode())
    h.update(repr(sorted(sizes.items())).encode())
    h.update(f"ids{IDS_ENTRIES}".encode())
    return h.hexdigest()[:8]


def _is_bpffs(path: Path) -> bool:
    class _StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]

    libc = ctypes.CDLL(None, use_errno=True)
    st = _StatFs()
    return libc.statfs(str(path).encode(), ctypes.byref(st)) == 0 and st.f_type & 0xFFFFFFFF == BPF_FS_MAGIC


def mount_bpffs() -> None:
    """Mounts bpffs at /sys/fs/bpf if it is not (most distributions do it at boot; ours do not)."""
    if _is_bpffs(BPFFS):
        return
    r = subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], capture_output=True, text=True)
    if r.returncode != 0 or not _is_bpffs(BPFFS):
        raise PinError(f"bpffs is not mounted at {BPFFS} and mounting it failed ({r.stderr.strip()}); "
                       f"fix: mount -t bpf bpf {BPFFS}, or run with --no-pin")


class PinSet:
    """The pinned maps of one instance: prepare() before compiling, release() after detaching."""

    def __init__(self, instance: str, source: str, sizes: dict[str, int]) -> None:
        _check_instance(instance)
        self.instance = instance
        self.dir = PIN_ROOT / instance
        self.tag = layout_tag(source, sizes)
        self.sizes = sizes
        self._lock_fd = -1

    def path(self, name: str) -> Path:
        return self.dir / f"{name}_{self.tag}"

    def cflags(self) -> list[str]:
        return [f'-DPIN_{name.upper()}="{self.path(name)}"' for name in PINNED_MAPS]

    def prepare(self) -> bool:
        """Locks the instance, mounts bpffs, drops pins of another layout; True if this layout's pins exist."""
        self._lock()
        mount_bpffs()
        self.dir.mkdir(parents=True, exist_ok=True)
        wanted = {self.path(n).name for n in PINNED_MAPS}
        for entry in self.dir.iterdir():
            if entry.name not in wanted:
                log.warning("pinned map %s has another version's layout; replaced", entry)
                entry.unlink()
        return all(self.path(n).exists() for n in PINNED_MAPS)

    def _lock(self) -> None:
        path = lock_path(self.instance)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if not _try_lock(fd):
            os.close(fd)
            raise PinLocked(f"another conn-tracer uses instance {self.instance!r} ({self.dir}); "
                           "fix: stop it, or give this one --instance NAME (or --no-pin)") from None
        self._lock_fd = fd

    def release(self) -> None:
        """Unlocks (the pins stay: that is their point)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def lock_path(instance: str) -> Path:
    return LOCK_DIR / f"conn-tracer-{instance}.lock"


def _check_instance(instance: str) -> None:
    if not INSTANCE_NAME.match(instance):
        raise PinError(f"instance name {instance!r}: use 1-64 of A-Z a-z 0-9 _ . -")


def _try_lock(fd: int) -> bool:
    """Takes an instance's lock on fd without waiting; False while a running agent holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def remove(instance: str) -> list[Path]:
    """Deletes an instance's pins and its directory, and its lock file unless a running agent holds it;
    returns what was removed."""
    _check_instance(instance)
    d = PIN_ROOT / instance
    removed: list[Path] = []
    if d.is_dir():
        for entry in d.iterdir():
            entry.unlink()
            removed.append(entry)
        d.rmdir()
        removed.append(d)
    if PIN_ROOT.is_dir() and not any(PIN_ROOT.iterdir()):
        PIN_ROOT.rmdir()
    lock = lock_path(instance)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return removed
    try:
        if _try_lock(fd):   # not while an agent of that instance runs
            lock.unlink()
            removed.append(lock)
    finally:
        os.close(fd)
    return removed
