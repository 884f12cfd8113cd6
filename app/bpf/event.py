"""The kernel's event record, once: its layout, its field positions and its number tables.

`struct event` in tracer.c is the other side; tests/test_event.py parses tracer.c and
checks it against FIELDS field by field. The loader passes RECORD.size to the compiler,
whose static assert rejects a size mismatch too.

The internal event is the plain tuple struct.unpack gives for one record (fields in
FIELDS order, addressed by the index constants below): decoding a batch is then one
C-level iter_unpack over the ring's contiguous pages, with no per-event object. Text
(names, addresses, JSON) is made only where something leaves the process.
"""

from __future__ import annotations

import struct
from typing import Any

# (name, struct code) in tracer.c's order; "_pad" is C padding, not a field.
FIELDS: tuple[tuple[str, str], ...] = (
    ("ts_ns", "Q"),
    ("start_ns", "Q"),
    ("conn_id", "Q"),
    ("bytes_sent", "Q"),
    ("bytes_received", "Q"),
    ("bytes_retrans", "Q"),
    ("cgroup_id", "Q"),
    ("pid", "I"),
    ("netns", "I"),
    ("srtt_us", "I"),
    ("rttvar_us", "I"),
    ("retrans_segs", "I"),
    ("connect_us", "I"),
    ("saddr", "16s"),
    ("daddr", "16s"),
    ("sport", "H"),
    ("dport", "H"),
    ("family", "B"),
    ("type", "B"),
    ("role", "B"),
    ("state", "B"),
    ("oldstate", "B"),
    ("flags", "B"),
    ("close_reason", "B"),
    ("_pad", "1x"),
    ("comm", "16s"),
)
_CODES = "".join(code for _, code in FIELDS)
_UNPADDED = struct.calcsize("<" + _CODES)
_TAIL = (-_UNPADDED) % 8   # C pads the struct to its 8-byte alignment

RECORD = struct.Struct(f"<{_CODES}{_TAIL}x")
# A record as the BPF ring buffer holds it: an 8-byte header (length, busy and discard
# bits; kernel/bpf/ringbuf.c), then the record, padded to 8 bytes. Batches of records
# arrive as contiguous runs of frames; the header is skipped by the unpack itself.
RING_HEADER_SIZE = 8
FRAME = struct.Struct(f"<{RING_HEADER_SIZE}x{_CODES}{_TAIL + (-RECORD.size) % 8}x")

EventRecord = tuple[Any, ...]
"""One decoded record: the values of FIELDS (without _pad), in order."""


def make_record(**values: Any) -> EventRecord:
    """A record from field values by name, the rest zero (b"" padded for bytes): for records made
    in user space (sock_diag, the sweep) and tests, so that none depends on field positions."""
    out = []
    for name, code in FIELDS:
        if name == "_pad":
            continue
        v = values.pop(name, None)
        if code.endswith("s"):
            out.append((v or b"").ljust(int(code[:-1]), b"\0"))
        else:
            out.append(v or 0)
    if values:
        raise TypeError(f"not record fields: {sorted(values)}")
    return tuple(out)


# Positions in an EventRecord.
(TS_NS, START_NS, CONN_ID, BYTES_SENT, BYTES_RECEIVED, BYTES_RETRANS, CGROUP_ID, PID, NETNS, SRTT_US, RTTVAR_US,
 RETRANS_SEGS, CONNECT_US, SADDR, DADDR, SPORT, DPORT, FAMILY, TYPE, ROLE, STATE, OLDSTATE, FLAGS, CLOSE_REASON,
 COMM) = range(25)
RECORD_FIELDS: tuple[str, ...] = tuple(name for name, _ in FIELDS if name != "_pad")

# enum event_type
EV_SYN_SENT, EV_SYN_RECV, EV_ESTABLISHED, EV_DATA_QUEUE, EV_CLOSE, EV_STATE_CHANGE = 1, 2, 3, 4, 5, 6
EVENT_TYPE_NAMES: dict[int, str] = {
    EV_SYN_SENT: "syn_sent",
    EV_SYN_RECV: "syn_recv",
    EV_ESTABLISHED: "established",
    EV_DATA_QUEUE: "data_queue",
    EV_CLOSE: "close",
    EV_STATE_CHANGE: "state_change",
}
EVENT_TYPE_NUMBERS: dict[str, int] = {name: n for n, name in EVENT_TYPE_NAMES.items()}

# Connection numbers from 2**63 up name sockets found open at start-up: PREEXISTING_ID + their
# socket cookie (fixed for a socket's life, so a restart gives the same id), shown as p<cookie>.
# The kernel counts c<n> from 1; it takes over a preexisting socket with its p-id (tracer.c adopt).
PREEXISTING_ID = 1 << 63

# enum role
ROLE_CLIENT, ROLE_SERVER = 0, 1
ROLE_NAMES: tuple[str, ...] = ("client", "server")
ROLE_NUMBERS: dict[str, int] = {name: n for n, name in enumerate(ROLE_NAMES)}

# enum close_reason; CR_UNKNOWN is user space's: a close the kernel's records never showed (lost
# events), found by the sweep that compares the table with the kernel's sockets.
CR_NONE, CR_NORMAL, CR_REFUSED, CR_TIMEOUT, CR_RESET, CR_UNKNOWN = 0, 1, 2, 3, 4, 5
CLOSE_REASON_NAMES: dict[int, str] = {
    CR_NORMAL: "normal", CR_REFUSED: "refused", CR_TIMEOUT: "timeout", CR_RESET: "reset", CR_UNKNOWN: "unknown",
}

# The record's family field (not AF_*: 4 or 6).
FAMILY_NAMES: dict[int, str] = {4: "ipv4", 6: "ipv6"}
FAMILY_NUMBERS: dict[str, int] = {name: n for n, name in FAMILY_NAMES.items()}

# EVF_* flags
FLAG_FIN_RECEIVED = 1
FLAG_PID_FROM_CONNECT = 2
FLAG_PID_FROM_LISTENER = 4
FLAG_SYN = 8   # the record also stands for the syn_sent/syn_recv event at start_ns

# Kernel TCP states (include/net/tcp_states.h), names without the TCP_ prefix.
ST_ESTABLISHED, ST_SYN_SENT, ST_SYN_RECV, ST_CLOSE = 1, 2, 3, 7
TCP_STATES: dict[int, str] = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
    13: "BOUND_INACTIVE",
}
TCP_STATE_NUMBERS: dict[str, int] = {name: n for n, name in TCP_STATES.items()}

# What a FLAG_SYN record's syn event is, by role.
SYN_TYPE_BY_ROLE = (EV_SYN_SENT, EV_SYN_RECV)
SYN_STATE_BY_ROLE = (ST_SYN_SENT, ST_SYN_RECV)
# What a syn event does not have yet: counters, RTT, connect latency, an old state, a close reason.
SYN_ZEROED = (BYTES_SENT, BYTES_RECEIVED, BYTES_RETRANS, SRTT_US, RTTVAR_US, RETRANS_SEGS, CONNECT_US, OLDSTATE,
              CLOSE_REASON)
