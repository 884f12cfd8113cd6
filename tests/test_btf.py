"""btf.py against the running kernel's BTF."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.bpf.btf import DEFAULT_BTF_PATH, SK_HEAD_FIELDS, TRACER_OFFSETS, BtfError, KernelBtf, tracer_defines

needs_btf = pytest.mark.skipif(not DEFAULT_BTF_PATH.exists(), reason="no kernel BTF on this host")


@needs_btf
def test_every_tracer_offset_resolves_inside_its_struct() -> None:
    defs = tracer_defines()
    assert set(defs) == {m for m, _, _ in TRACER_OFFSETS} | {"SOCK_DONE_BIT", "SK_HEAD_SIZE"}
    # tracer.c reads these from one copy of the first SK_HEAD_SIZE bytes of struct sock.
    assert all(defs[m] + size <= defs["SK_HEAD_SIZE"] for m, size in SK_HEAD_FIELDS.items())
    # sock_common is the first member of struct sock, and tcp_sock embeds a sock.
    assert defs["OFF_SKC_DADDR"] < defs["OFF_SKC_FAMILY"] < 64
    assert defs["OFF_BYTES_SENT"] > 1000 and defs["OFF_BYTES_RECEIVED"] > 1000
    assert defs["OFF_BYTES_SENT"] != defs["OFF_BYTES_RECEIVED"]


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
