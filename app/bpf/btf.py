"""Struct member offsets and enum values from the running kernel's BTF.

The headers bcc compiles against may belong to another kernel, so every struct
field the BPF program reads is located here instead, via libbpf's BTF parser.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BTF_PATH = Path("/sys/kernel/btf/vmlinux")

# BTF kinds (include/uapi/linux/btf.h)
_KIND_INT = 1
_KIND_PTR = 2
_KIND_ARRAY = 3
_KIND_STRUCT = 4
_KIND_UNION = 5
_KIND_ENUM = 6
_KIND_TYPEDEF = 8
_KIND_VOLATILE = 9
_KIND_CONST = 10
_KIND_RESTRICT = 11
_KIND_TYPE_TAG = 18
_KIND_ENUM64 = 19
_MODIFIERS = {_KIND_TYPEDEF, _KIND_VOLATILE, _KIND_CONST, _KIND_RESTRICT, _KIND_TYPE_TAG}


class BtfError(RuntimeError):
    """BTF is missing or lacks a type or member the tracer needs."""


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size_or_type", ctypes.c_uint32)]


class _BtfMember(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("type", ctypes.c_uint32), ("offset", ctypes.c_uint32)]


class _BtfEnum(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("val", ctypes.c_int32)]


class _BtfEnum64(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("lo32", ctypes.c_uint32), ("hi32", ctypes.c_uint32)]


def _load_libbpf() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise BtfError(f"libbpf not found ({exc}); install it: apt-get install libbpf1") from exc
    lib.btf__parse.restype = ctypes.c_void_p
    lib.btf__parse.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    lib.btf__free.argtypes = [ctypes.c_void_p]
    lib.btf__find_by_name_kind.restype = ctypes.c_int32
    lib.btf__find_by_name_kind.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]
    lib.btf__type_by_id.restype = ctypes.POINTER(_BtfType)
    lib.btf__type_by_id.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.btf__name_by_offset.restype = ctypes.c_char_p
    lib.btf__name_by_offset.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.libbpf_get_error.restype = ctypes.c_long
    lib.libbpf_get_error.argtypes = [ctypes.c_void_p]
    return lib


@dataclass(frozen=True)
class _Member:
    name: str
    type_id: int
    bit_offset: int


class KernelBtf:
    """A parsed BTF file; free it with close() (or use as a context manager)."""

    def __init__(self, path: Path = DEFAULT_BTF_PATH) -> None:
        if not path.exists():
            raise BtfError(
                f"kernel BTF not found at {path}; a kernel built with CONFIG_DEBUG_INFO_BTF=y is needed"
            )
        self._lib = _load_libbpf()
        handle = self._lib.btf__parse(str(path).encode(), None)
        if not handle or self._lib.libbpf_get_error(handle):
            raise BtfError(f"cannot parse BTF at {path}")
        self._btf: int | None = handle

    def __enter__(self) -> KernelBtf:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._btf:
            self._lib.btf__free(self._btf)
            self._btf = None

    def _type(self, type_id: int) -> _BtfType:
        return self._lib.btf__type_by_id(self._btf, type_id).contents

    def _name(self, off: int) -> str:
        raw = self._lib.btf__name_by_offset(self._btf, off)
        return raw.decode() if raw else ""

    @staticmethod
    def _kind(t: _BtfType) -> int:
        return (t.info >> 24) & 0x1F

    def _resolve(self, type_id: int) -> int:
        """Follows typedefs and qualifiers to the underlying type."""
        while self._kind(self._type(type_id)) in _MODIFIERS:
            type_id = self._type(type_id).size_or_type
        return type_id

    def _members(self, type_id: int) -> list[_Member]:
        t = self._type(type_id)
        vlen = t.info & 0xFFFF
        kind_flag = t.info >> 31
        base = ctypes.addressof(t) + ctypes.sizeof(_BtfType)
        out = []
        for i in range(vlen):
            m = _BtfMember.from_address(base + i * ctypes.sizeof(_BtfMember))
            bit = m.offset & 0xFFFFFF if kind_flag else m.offset
            out.append(_Member(self._name(m.name_off), m.type, bit))
        return out

    def _find_member(self, type_id: int, name: str) -> tuple[int, int] | None:
        """(bit offset, member type id) of `name`, searching anonymous members too."""
        for m in self._members(type_id):
            if m.name == name:
                return m.bit_offset, m.type_id
            if not m.name:
                inner = self._resolve(m.type_id)
                if self._kind(self._type(inner)) in (_KIND_STRUCT, _KIND_UNION):
                    hit = self._find_member(inner, name)
                    if hit:
                        return m.bit_offset + hit[0], hit[1]
        return None

    def _struct_id(self, struct: str) -> int:
        for kind in (_KIND_STRUCT, _KIND_UNION):
            type_id = self._lib.btf__find_by_name_kind(self._btf, struct.encode(), kind)
            if type_id > 0:
                return type_id
        raise BtfError(f"struct {struct} not in kernel BTF")

    def offset(self, struct: str, path: str) -> int:
        """Byte offset of a dotted member path, e.g. offset("sock", "__sk_common.skc_net.net")."""
        type_id = self._struct_id(struct)
        total_bits = 0
        for part in path.split("."):
            hit = self._find_member(type_id, part)
            if hit is None:
                raise BtfError(f"struct {struct} has no member {path} in kernel BTF")
            total_bits += hit[0]
            type_id = self._resolve(hit[1])
        if total_bits % 8:
            raise BtfError(f"{struct}.{path} is a bitfield")
        return total_bits // 8

    def enum_value(self, enum: str, name: str) -> int:
        """Value of enumerator `name` in enum `enum`."""
        for kind, item in ((_KIND_ENUM, _BtfEnum), (_KIND_ENUM64, _BtfEnum64)):
            type_id = self._lib.btf__find_by_name_kind(self._btf, enum.encode(), kind)
            if type_id <= 0:
                continue
            t = self._type(type_id)
            base = ctypes.addressof(t) + ctypes.sizeof(_BtfType)
            for i in range(t.info & 0xFFFF):
                e = item.from_address(base + i * ctypes.sizeof(item))
                if self._name(e.name_off) == name:
                    return e.val if kind == _KIND_ENUM else (e.hi32 << 32) | e.lo32
        raise BtfError(f"enum {enum} has no {name} in kernel BTF")


# What tracer.c reads, as (macro, struct, member path).
TRACER_OFFSETS: tuple[tuple[str, str, str], ...] = (
    ("OFF_BYTES_RECEIVED", "tcp_sock", "bytes_received"),
    ("OFF_BYTES_SENT", "tcp_sock", "bytes_sent"),
    ("OFF_BYTES_RETRANS", "tcp_sock", "bytes_retrans"),
    ("OFF_SRTT_US", "tcp_sock", "srtt_us"),
    ("OFF_MDEV_US", "tcp_sock", "mdev_us"),
    ("OFF_TOTAL_RETRANS", "tcp_sock", "total_retrans"),
    ("OFF_SK_ERR", "sock", "sk_err"),
    ("OFF_SK_SOCKET", "sock", "sk_socket"),
    ("OFF_SKC_COOKIE", "sock_common", "skc_cookie"),
    ("OFF_SOCKET_ALLOC_SOCKET", "socket_alloc", "socket"),
    ("OFF_SOCKET_ALLOC_INODE", "socket_alloc", "vfs_inode"),
    ("OFF_INODE_INO", "inode", "i_ino"),
    ("OFF_SK_FLAGS", "sock", "__sk_common.skc_flags"),
    ("OFF_SK_NET", "sock", "__sk_common.skc_net.net"),
    ("OFF_SK_PROTOCOL", "sock", "sk_protocol"),
    ("OFF_NET_INUM", "net", "ns.inum"),
    ("OFF_SKC_FAMILY", "sock_common", "skc_family"),
    ("OFF_SKC_STATE", "sock_common", "skc_state"),
    ("OFF_SKC_DPORT", "sock_common", "skc_dport"),
    ("OFF_INET_SPORT", "inet_sock", "inet_sport"),
    ("OFF_SKC_RCV_SADDR", "sock_common", "skc_rcv_saddr"),
    ("OFF_SKC_DADDR", "sock_common", "skc_daddr"),
    ("OFF_SKC_V6_RCV_SADDR", "sock_common", "skc_v6_rcv_saddr"),
    ("OFF_SKC_V6_DADDR", "sock_common", "skc_v6_daddr"),
)


# The fields tracer.c takes from one read of the start of struct sock, with their sizes.
SK_HEAD_FIELDS = {"OFF_SKC_DADDR": 4, "OFF_SKC_RCV_SADDR": 4, "OFF_SKC_DPORT": 2, "OFF_SKC_FAMILY": 2,
                  "OFF_SKC_STATE": 1, "OFF_SKC_V6_DADDR": 16, "OFF_SKC_V6_RCV_SADDR": 16, "OFF_SK_FLAGS": 8}
MAX_SK_HEAD_SIZE = 256   # a stack buffer in the BPF program (512 bytes of stack in all)


# The tcp_sock counters every record carries, with their sizes: read in at most two probe reads
# ("windows" of up to TCP_WINDOW_MAX bytes) instead of one each; where they lie further apart
# on some kernel, TCP_WINDOWS is 0 and tracer.c reads them one by one.
TCP_WINDOW_FIELDS = {"OFF_BYTES_SENT": 8, "OFF_BYTES_RECEIVED": 8, "OFF_BYTES_RETRANS": 8, "OFF_SRTT_US": 4,
                     "OFF_MDEV_US": 4, "OFF_TOTAL_RETRANS": 4}
TCP_WINDOW_MAX = 224


def tcp_windows(offsets: dict[str, int]) -> dict[str, int]:
    """TCPW{0,1}_OFF/_SIZE and, per field, W_<field> (which window) and AT_<field> (offset in it)."""
    fields = sorted(TCP_WINDOW_FIELDS, key=lambda m: offsets[m])
    windows: list[list[str]] = []
    for m in fields:
        if windows and offsets[m] + TCP_WINDOW_FIELDS[m] - offsets[windows[-1][0]] <= TCP_WINDOW_MAX:
            windows[-1].append(m)
        else:
            windows.append([m])
    if len(windows) > 2:
        return {"TCP_WINDOWS": 0}
    out = {"TCP_WINDOWS": len(windows)}
    for i in range(2):
        members = windows[min(i, len(windows) - 1)]
        start = offsets[members[0]]
        end = max(offsets[m] + TCP_WINDOW_FIELDS[m] for m in members)
        out[f"TCPW{i}_OFF"], out[f"TCPW{i}_SIZE"] = start, (end - start + 7) & ~7
    for i, members in enumerate(windows):
        for m in members:
            name = m.removeprefix("OFF_")
            out[f"W_{name}"], out[f"AT_{name}"] = i, offsets[m] - offsets[members[0]]
    return out


def tracer_defines(path: Path = DEFAULT_BTF_PATH) -> dict[str, int]:
    """Every offset and enum value tracer.c needs, keyed by its macro name."""
    with KernelBtf(path) as btf:
        out = {macro: btf.offset(struct, member) for macro, struct, member in TRACER_OFFSETS}
        out["SOCK_DONE_BIT"] = btf.enum_value("sock_flags", "SOCK_DONE")
    out.update(tcp_windows(out))
    head = max(out[m] + size for m, size in SK_HEAD_FIELDS.items())
    out["SK_HEAD_SIZE"] = (head + 7) & ~7
    if out["SK_HEAD_SIZE"] > MAX_SK_HEAD_SIZE:
        raise BtfError(f"sock_common fields span {head} bytes, more than the {MAX_SK_HEAD_SIZE} read at once")
    return out
