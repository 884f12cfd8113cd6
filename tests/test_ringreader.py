"""RingReader over a file laid out as a BPF ring buffer map is (no kernel needed)."""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.bpf.event import CONN_ID, FRAME, RECORD
from app.bpf.loader import RingReader
from tests.evfactory import ev

PAGE = mmap.PAGESIZE
DATA = 4 * PAGE


class FakeRing:
    """consumer_pos page, producer_pos page, then the data area twice (the kernel maps it twice)."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "w+b")  # noqa: SIM115 - closed by the fixture
        self.f.truncate(2 * PAGE + 2 * DATA)
        self.prod = 0

    def put(self, conn: int, header: int | None = None, size: int = RECORD.size) -> None:
        hdr = struct.pack("<I4x", RECORD.size if header is None else header)
        body = FRAME.pack(*ev("close", conn))[8:] if size == RECORD.size else bytes(size)
        frame = hdr + body
        frame += bytes(-len(frame) % 8)
        for base in (2 * PAGE, 2 * PAGE + DATA):
            off = base + (self.prod % DATA)
            end = min(len(frame), DATA - self.prod % DATA)
            self.f.seek(off)
            self.f.write(frame[:end])
            if base == 2 * PAGE and end < len(frame):   # wraps: the rest at the start of the area
                self.f.seek(2 * PAGE)
                self.f.write(frame[end:])
        self.prod += len(frame)
        self.f.seek(PAGE)
        self.f.write(struct.pack("<Q", self.prod))
        self.f.flush()

    def consumer(self) -> int:
        self.f.seek(0)
        return int(struct.unpack("<Q", self.f.read(8))[0])


@pytest.fixture
def ring(tmp_path: Path) -> Iterator[tuple[FakeRing, RingReader]]:
    fake = FakeRing(tmp_path / "ring")
    reader = RingReader(fake.f.fileno(), DATA)
    yield fake, reader
    reader.close()
    fake.f.close()


def conns(frames: bytes) -> list[int]:
    return [r[CONN_ID] for r in FRAME.iter_unpack(frames)]


def test_bulk_read_is_bounded_and_releases_space(ring: tuple[FakeRing, RingReader]) -> None:
    fake, reader = ring
    for i in range(10):
        fake.put(i)
    frames, n = reader.read(4)
    assert (n, conns(frames), fake.consumer()) == (4, [0, 1, 2, 3], 4 * FRAME.size)
    frames, n = reader.read(100)
    assert (n, conns(frames)) == (6, [4, 5, 6, 7, 8, 9])
    assert reader.read(100) == (b"", 0)


def test_stops_at_a_busy_record(ring: tuple[FakeRing, RingReader]) -> None:
    fake, reader = ring
    fake.put(1)
    fake.put(2, header=RECORD.size | RingReader.BUSY)
    fake.put(3)
    frames, n = reader.read(100)
    assert (n, conns(frames), fake.consumer()) == (1, [1], FRAME.size)


def test_skips_discarded_and_foreign_records(ring: tuple[FakeRing, RingReader]) -> None:
    fake, reader = ring
    fake.put(1)
    fake.put(2, header=RECORD.size | RingReader.DISCARD)
    fake.put(3, header=24, size=24)
    fake.put(4)
    frames, n = reader.read(100)
    assert (n, conns(frames), reader.bad_records) == (2, [1, 4], 1)
    assert fake.consumer() == fake.prod


def test_reads_across_the_end_of_the_data_area(ring: tuple[FakeRing, RingReader]) -> None:
    fake, reader = ring
    per_lap = DATA // FRAME.size
    for i in range(per_lap - 2):
        fake.put(i)
    assert reader.read(10_000)[1] == per_lap - 2
    for i in range(5):   # these wrap around the end of the data area
        fake.put(100 + i)
    frames, n = reader.read(100)
    assert (n, conns(frames)) == (5, [100, 101, 102, 103, 104])
