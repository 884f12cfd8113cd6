"""Raw ring-buffer records -> Event models. Pure: no I/O, no kernel.

RECORD mirrors `struct event` in app/bpf/tracer.c field for field; the loader
passes RECORD.size to the compiler, whose static assert rejects any mismatch.
"""

from __future__ import annotations

import socket
import struct
from datetime import UTC, datetime
from typing import Any

from app.models import TCP_STATES, Event, event_json_tail, iso_utc_parts

# ts_ns conn_id start_ns bytes_sent bytes_received bytes_retrans | pid netns | saddr daddr |
# sport dport | family type role state oldstate flags pad[2] | comm | tail padding
RECORD = struct.Struct("<QQQQQQII16s16sHHBBBBBB2x16s4x")  # 4x: C pads to 8

EVENT_TYPE_NAMES: dict[int, str] = {
    1: "syn_sent",
    2: "syn_recv",
    3: "established",
    4: "data_queue",
    5: "close",
    6: "state_change",
}
ROLE_NAMES = ("client", "server")
FLAG_FIN_RECEIVED = 1


class DecodeError(ValueError):
    """A record that is not a valid event."""


def conn_id_str(kernel_id: int) -> str:
    """The public id of a connection numbered by the kernel."""
    return f"c{kernel_id}"


class Decoder:
    """Turns records into Events; `wall_offset_ns` maps CLOCK_MONOTONIC to UTC."""

    def __init__(self, wall_offset_ns: int) -> None:
        self.wall_offset_ns = wall_offset_ns
        self._comms: dict[bytes, str] = {}
        self._addrs: dict[bytes, str] = {}

    def decode(self, raw: bytes) -> Event:
        if len(raw) < RECORD.size:
            raise DecodeError(f"record of {len(raw)} bytes, expected {RECORD.size}")
        (ts_ns, conn_id, _start_ns, bytes_sent, bytes_received, bytes_retrans, pid, netns, saddr, daddr, sport, dport,
         family, type_, role, state, _oldstate, flags, comm) = RECORD.unpack_from(raw)
        try:
            type_name = EVENT_TYPE_NAMES[type_]
            role_name = ROLE_NAMES[role]
            state_name = TCP_STATES[state]
        except (KeyError, IndexError) as exc:
            raise DecodeError(f"unknown type/role/state {type_}/{role}/{state}") from exc
        if family == 4:
            family_name = "ipv4"
            saddr, daddr = saddr[:4], daddr[:4]
        elif family == 6:
            family_name = "ipv6"
        else:
            raise DecodeError(f"unknown family {family}")
        addrs = self._addrs
        src = addrs.get(saddr) or self._addr(saddr)
        dst = addrs.get(daddr) or self._addr(daddr)
        # tcp_sock.bytes_received advances with rcv_nxt, and a received FIN takes one
        # sequence number: it is not payload (KERNEL.md).
        if flags & FLAG_FIN_RECEIVED and bytes_received > 0:
            bytes_received -= 1
        # tcp_sock.bytes_sent counts every transmission; a retransmitted byte is
        # still one payload byte (KERNEL.md).
        bytes_sent -= min(bytes_retrans, bytes_sent)
        wall_ns = ts_ns + self.wall_offset_ns
        cid = conn_id_str(conn_id)
        pid_v = pid or None
        comm_v = self._comm(comm) if pid else None
        tail = event_json_tail(type_name, iso_utc_parts(wall_ns // 1_000_000_000, wall_ns // 1000 % 1_000_000),
                               ts_ns, cid, family_name, role_name, state_name, src, sport, dst, dport, pid_v,
                               comm_v, bytes_sent, bytes_received, bytes_retrans, netns)
        return _trusted_event({
            "seq": 0,
            "type": type_name,
            "ts": datetime.fromtimestamp(wall_ns // 1000 / 1e6, UTC),
            "ts_ns": ts_ns,
            "conn_id": cid,
            "family": family_name,
            "role": role_name,
            "state": state_name,
            "src_addr": src,
            "src_port": sport,
            "dst_addr": dst,
            "dst_port": dport,
            "pid": pid_v,
            "comm": comm_v,
            "bytes_sent": bytes_sent,
            "bytes_received": bytes_received,
            "bytes_retrans": bytes_retrans,
            "netns": netns,
        }, tail)

    def _addr(self, raw: bytes) -> str:
        # Hosts talk to the same few addresses over and over: format each once.
        if len(self._addrs) >= 65536:
            self._addrs.clear()
        text = self._addrs[raw] = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
        return text

    def _comm(self, raw: bytes) -> str:
        name = self._comms.get(raw)
        if name is None:
            if len(self._comms) >= 4096:   # bound the cache; process names repeat a lot
                self._comms.clear()
            name = self._comms[raw] = raw.split(b"\0", 1)[0].decode(errors="replace")
        return name


_new_event = Event.__new__
_set = object.__setattr__


def _trusted_event(fields: dict[str, Any], json_tail: str) -> Event:
    """An Event from fields this module has already checked, without validation.

    What Event.model_construct does, minus its per-field default handling: a
    decoded record always has every field, and this path runs once per event.
    """
    ev = _new_event(Event)
    _set(ev, "__dict__", fields)
    _set(ev, "__pydantic_fields_set__", set(fields))
    _set(ev, "__pydantic_extra__", None)
    _set(ev, "__pydantic_private__", {"_json_tail": json_tail})
    return ev
