"""btf.py against the running kernel's BTF."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.bpf.btf import (
    DEFAULT_BTF_PATH,
    SK_HEAD_FIELDS,
    TCP_WINDOW_FIELDS,
    TCP_WINDOW_MAX,
    TRACER_OFFSETS,
    BtfError,
    KernelBtf,
    tcp_windows,
    tracer_defines,
)

needs_btf = pytest.mark.skipif(not DEFAULT_BTF_PATH.exists(), reason="no kernel BTF on this host")


@needs_btf
def test_every_tracer_offset_resolves_inside_its_struct() -> None:
    defs = tracer_defines()
    window_keys = {k for k in defs if k.startswith(("TCPW", "W_", "AT_")) or k == "TCP_WINDOWS"}
    assert set(defs) - window_keys == {m for m, _, _ in TRACER_OFFSETS} | {"SOCK_DONE_BIT", "SK_HEAD_SIZE"}
    # tracer.c reads these from one copy of the first SK_HEAD_SIZE bytes of struct sock.
    assert all(defs[m] + size <= defs["SK_HEAD_SIZE"] for m, size in SK_HEAD_FIELDS.items())
    # sock_common is the first member of struct sock, and tcp_sock embeds a sock.
    assert defs["OFF_SKC_DADDR"] < defs["OFF_SKC_FAMILY"] < 64
    assert defs["OFF_BYTES_SENT"] > 1000 and defs["OFF_BYTES_RECEIVED"] > 1000
    assert defs["OFF_BYTES_SENT"] != defs["OFF_BYTES_RECEIVED"]


@pytest.mark.parametrize("offsets,windows", [
    # This kernel's layout: the four first counters within 224 bytes, the two retransmission ones apart.
    ({"OFF_BYTES_SENT": 1544, "OFF_MDEV_US": 1588, "OFF_SRTT_US": 1680, "OFF_BYTES_RECEIVED": 1752,
      "OFF_BYTES_RETRANS": 2192, "OFF_TOTAL_RETRANS": 2200}, 2),
    # All close together: one read.
    ({"OFF_BYTES_SENT": 100, "OFF_MDEV_US": 108, "OFF_SRTT_US": 112, "OFF_BYTES_RECEIVED": 120,
      "OFF_BYTES_RETRANS": 128, "OFF_TOTAL_RETRANS": 136}, 1),
    # Spread over three places: read one by one.
    ({"OFF_BYTES_SENT": 0, "OFF_MDEV_US": 1000, "OFF_SRTT_US": 2000, "OFF_BYTES_RECEIVED": 8,
      "OFF_BYTES_RETRANS": 1008, "OFF_TOTAL_RETRANS": 2008}, 0),
])
def test_tcp_counters_are_grouped_into_at_most_two_reads(offsets: dict[str, int], windows: int) -> None:
    d = tcp_windows(offsets)
    assert d["TCP_WINDOWS"] == windows
    if windows:
        for m, off in offsets.items():
            name = m.removeprefix("OFF_")
            w = d[f"W_{name}"]
            assert d[f"TCPW{w}_OFF"] + d[f"AT_{name}"] == off
            assert d[f"AT_{name}"] + TCP_WINDOW_FIELDS[m] <= d[f"TCPW{w}_SIZE"] <= TCP_WINDOW_MAX + 8


@needs_btf
def test_anonymous_members_are_searched() -> None:
    with KernelBtf() as btf:
        # skc_daddr sits in an anonymous union/struct inside sock_common.
        assert btf.offset("sock_common", "skc_daddr") == btf.offset("sock", "__sk_common.skc_daddr")


@needs_btf
@pytest.mark.parametrize("struct,member", [("tcp_sock", "no_such_field"), ("no_such_struct", "x")])
def test_unknown_names_raise(struct: str, member: str) -> None:
    with KernelBtf() as btf, pytest.raises(BtfError):
        btf.offset(struct, member)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(BtfError, match="no-vmlinux"):
        KernelBtf(tmp_path / "no-vmlinux")
