"""Ring-buffer frames -> internal event records. Pure: no I/O, no kernel.

A batch is read by the C helper (app/_speedups.c) where it is built, else by one
struct.iter_unpack and a Python loop (the reference): a validity check per record and the
syn event a record carries.
"""

from __future__ import annotations

from app.bpf.event import (
    EVENT_TYPE_NAMES,
    FAMILY,
    FAMILY_NAMES,
    FLAG_SYN,
    FLAGS,
    FRAME,
    ROLE,
    ROLE_NAMES,
    START_NS,
    STATE,
    SYN_STATE_BY_ROLE,
    SYN_TYPE_BY_ROLE,
    SYN_ZEROED,
    TCP_STATES,
    TS_NS,
    TYPE,
    EventRecord,
)
from app.speedups import speedups


class DecodeError(ValueError):
    """Frames that are not a whole number of records."""


def syn_record(rec: EventRecord) -> EventRecord:
    """The syn_sent/syn_recv event a FLAG_SYN record stands for: at start_ns, with this record's tuple and
    owner, before any byte, RTT sample or retransmission."""
    syn = list(rec)
    role = rec[ROLE]
    syn[TS_NS] = rec[START_NS]
    for i in SYN_ZEROED:
        syn[i] = 0
    syn[TYPE] = SYN_TYPE_BY_ROLE[role]
    syn[STATE] = SYN_STATE_BY_ROLE[role]
    syn[FLAGS] = rec[FLAGS] & ~FLAG_SYN
    return tuple(syn)


class Decoder:
    """Counts what it cannot decode (`bad_records`) and skips it: the consume loop never dies on one record."""

    def __init__(self) -> None:
        self.bad_records = 0

    def decode(self, frames: bytes) -> list[EventRecord]:
        """Every event the frames hold, in ring order (a syn event just before the record carrying it)."""
        if len(frames) % FRAME.size:
            raise DecodeError(f"{len(frames)} bytes of frames, not a multiple of {FRAME.size}")
        if speedups is not None:
            out: list[EventRecord] = []
            self.bad_records += speedups.decode(frames, out)
            return out
        return self.decode_py(frames)

    def decode_py(self, frames: bytes) -> list[EventRecord]:
        """decode() in Python: the reference for the C helper."""
        out: list[EventRecord] = []
        append = out.append
        types, states, families, roles = EVENT_TYPE_NAMES, TCP_STATES, FAMILY_NAMES, len(ROLE_NAMES)
        type_, state, family, role, flags, syn = TYPE, STATE, FAMILY, ROLE, FLAGS, FLAG_SYN   # locals: hot loop
        for rec in FRAME.iter_unpack(frames):
            if rec[type_] not in types or rec[state] not in states or rec[family] not in families or rec[role] >= roles:
                self.bad_records += 1
                continue
            if rec[flags] & syn:
                append(syn_record(rec))
            append(rec)
        return out

