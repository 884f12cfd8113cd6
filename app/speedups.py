"""The optional C helpers (app/_speedups.c), configured with the record layout; None where not built.

setup.py builds them where a C compiler and Python headers exist; the Python code they stand
in for (app/decode.py, app/models.py) is the reference and runs wherever they are absent, or
when CONN_TRACER_PURE_PYTHON=1.
"""

from __future__ import annotations

import os
import struct
from types import ModuleType

from app.bpf import event


def _load() -> ModuleType | None:
    if os.environ.get("CONN_TRACER_PURE_PYTHON") == "1":
        return None
    try:
        from app import _speedups  # type: ignore[attr-defined]
    except ImportError:
        return None

    def dense(table: dict[int, str]) -> tuple[str | None, ...]:
        return tuple(table.get(i) for i in range(max(table) + 1))

    positions = (event.TS_NS, event.START_NS, event.CONN_ID, event.BYTES_SENT, event.BYTES_RECEIVED,
                 event.BYTES_RETRANS, event.CGROUP_ID, event.PID, event.NETNS, event.SRTT_US, event.RTTVAR_US,
                 event.RETRANS_SEGS, event.CONNECT_US, event.SADDR, event.DADDR, event.SPORT, event.DPORT,
                 event.FAMILY, event.TYPE, event.ROLE, event.STATE, event.OLDSTATE, event.FLAGS, event.CLOSE_REASON,
                 event.COMM)
    _speedups.configure(positions, len(event.RECORD_FIELDS), dense(event.EVENT_TYPE_NAMES),
                        dense(event.TCP_STATES), event.ROLE_NAMES, dense(event.FAMILY_NAMES),
                        event.SYN_TYPE_BY_ROLE, event.SYN_STATE_BY_ROLE, dense(event.CLOSE_REASON_NAMES),
                        event.FLAG_SYN, event.EV_CLOSE)
    _speedups.configure_frames(event.FRAME.size, frame_layout())
    return _speedups


def frame_layout() -> tuple[tuple[int, int], ...]:
    """(offset in a ring frame, size) of each record field, from event.FIELDS."""
    out = []
    codes = ""
    for name, code in event.FIELDS:
        off = event.RING_HEADER_SIZE + struct.calcsize("<" + codes)
        codes += code
        if name != "_pad":
            out.append((off, struct.calcsize("<" + code)))
    return tuple(out)


speedups: ModuleType | None = _load()
