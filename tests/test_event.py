"""app/bpf/event.py describes tracer.c's `struct event` field by field."""

from __future__ import annotations

import re
import struct

from app.bpf.event import FIELDS, FRAME, RECORD, RECORD_FIELDS, RING_HEADER_SIZE
from app.bpf.loader import TRACER_C

C_CODES = {"u64": "Q", "u32": "I", "u16": "H", "u8": "B", "char": "B"}


def c_struct_event() -> list[tuple[str, str]]:
    """(name, struct code) of every member of `struct event` in tracer.c, in order."""
    body = re.search(r"struct event \{(.*?)\n\};", TRACER_C.read_text(), re.S)
    assert body, "struct event not found in tracer.c"
    out = []
    for line in body.group(1).splitlines():
        decl = line.split("//")[0].strip().rstrip(";")
        if not decl:
            continue
        m = re.fullmatch(r"(\w+)\s+(\w+)(?:\[(\d+)\])?", decl)
        assert m, f"unparsed member: {decl!r}"
        ctype, name, count = m.groups()
        code = C_CODES[ctype]
        if count:
            code = f"{count}x" if name.startswith("_pad") else f"{count}s"
        out.append((name, code))
    return out


def test_fields_match_tracer_c_one_by_one() -> None:
    assert list(FIELDS) == c_struct_event()


def test_record_size_is_the_c_size() -> None:
    # C pads the struct to its largest member (8 bytes); so does RECORD.
    assert RECORD.size % 8 == 0 and RECORD.size - struct.calcsize("<" + "".join(c for _, c in FIELDS)) < 8
    assert FRAME.size == RING_HEADER_SIZE + RECORD.size and FRAME.size % 8 == 0


def test_record_fields_are_the_unpacked_values() -> None:
    values = RECORD.unpack(bytes(RECORD.size))
    assert len(values) == len(RECORD_FIELDS) and "_pad" not in RECORD_FIELDS
