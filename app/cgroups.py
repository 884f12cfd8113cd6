"""cgroup v2 ids (the kernel's bpf_get_current_cgroup_id) -> paths, and what a path names.

The id of a v2 cgroup is the inode number of its directory in the cgroup2 mount, so a
path is found by walking that tree: done again at most once a second, and only when an
id is not known yet (a new cgroup); results are cached.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

# A container runtime's cgroup carries the 64-hex container id: docker-<id>.scope,
# /docker/<id>, cri-containerd-<id>.scope, crio-<id>.scope, libpod-<id>.scope, /kubepods/.../<id>.
_CONTAINER_ID = re.compile(r"(?:^|[/-])([0-9a-f]{64})(?:\.scope)?$")
RESCAN_INTERVAL_S = 1.0
MAX_CACHED = 65536


def cgroup2_root(mounts: Path = Path("/proc/self/mounts")) -> Path | None:
    """Where the cgroup2 hierarchy is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified in hybrid mode)."""
    try:
        for line in mounts.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "cgroup2":
                return Path(fields[1].replace("\\040", " "))
    except OSError:
        pass
    return None


def container_id(path: str) -> str | None:
    """The container id a cgroup path names, if any."""
    m = _CONTAINER_ID.search(path)
    return m.group(1) if m else None


class CgroupPaths:
    """cgroup id -> path relative to the cgroup2 root ("/" for the root itself), cached."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else cgroup2_root()
        self._paths: dict[int, str] = {}
        self._scanned_at = -RESCAN_INTERVAL_S

    def path(self, cgroup_id: int) -> str | None:
        if not cgroup_id or self.root is None:
            return None
        p = self._paths.get(cgroup_id)
        if p is None and time.monotonic() - self._scanned_at >= RESCAN_INTERVAL_S:
            self._scan()
            p = self._paths.get(cgroup_id)
        return p

    def _scan(self) -> None:
        self._scanned_at = time.monotonic()
        root = str(self.root)
        found: dict[int, str] = {}
        for dirpath, _dirs, _files in os.walk(root):
            try:
                ino = os.stat(dirpath).st_ino
            except OSError:
                continue   # removed while walking
            # A directory name that is not UTF-8 (a delegated subtree's owner may make one) comes back
            # surrogate-escaped from os.walk and would not serialise: shown with replacement characters.
            rel = (dirpath[len(root):] or "/").encode(errors="surrogateescape").decode(errors="replace")
            found[ino] = rel
            if len(found) >= MAX_CACHED:
                break
        self._paths = found
