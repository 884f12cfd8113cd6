"""Host checks, compile (bcc), attach, read and detach: owns every kernel handle.

One lifecycle: Tracer.open() compiles and attaches (undoing any partial attach
on failure), start_reading() hooks the ring buffer fd into asyncio, close()
detaches everything. Nothing else in the app touches bcc.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import logging
import mmap
import os
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.bpf.btf import BtfError, tracer_defines
from app.bpf.event import (
    CGROUP_ID,
    COMM,
    CONN_ID,
    EV_STATE_CHANGE,
    FRAME,
    PID,
    PREEXISTING_ID,
    RECORD,
    RING_HEADER_SIZE,
    ROLE,
    ST_ESTABLISHED,
    START_NS,
    EventRecord,
    make_record,
)
from app.bpf.pins import DEFAULT_INSTANCE, PinError, PinLocked, PinSet
from app.config import Settings

log = logging.getLogger(__name__)

TRACER_C = Path(__file__).with_name("tracer.c")
SETUP_HINT = "run scripts/setup.sh (or `make setup`) as root"

# Raw tracepoints tracer.c attaches in every mode, as (tracepoint, program). Raw: the
# program gets the tracepoint's arguments as they are, no perf buffer filled per hit.
BASE_TRACEPOINTS = (("inet_sock_set_state", "ct_state"), ("sock_send_length", "ct_send"),
                    ("sock_recv_length", "ct_recv"))
DATA_QUEUE_TRACEPOINT = ("sk_data_ready", "ct_data_ready")
DATA_QUEUE_KPROBE = "tcp_data_queue"
DATA_QUEUE_KPROBE_PROGRAM = "ct_dq_kprobe"
# The tracefs category of every tracepoint above, for the host check.
TRACEPOINT_CATEGORY = "sock"

CTR_LOST = 1   # tracer.c: counters[CTR_LOST]
# struct bpf_prog_info (uapi, stable ABI): recursion_misses is the u64 at byte 208 (Linux 5.12+).
PROG_INFO_SIZE = 256
PROG_INFO_RECURSION_MISSES = 208


@functools.cache
def _libbpf_info() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)
    lib.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
    return lib
# A wake-up window with this many records means "busy": the next window is wakeup_busy_interval_us.
# 16 in a 1 ms window is 4,000 connections/s at 4 records each: above that a wake-up every 4 ms. (At
# 64, set when connections made more records, 10,000/s stayed below it and woke the reader ~1,000
# times a second: serve at 5,000/s 38-40 -> 22-24 us CPU per connection, p99 1.6-2.4 -> 4.5 ms.)
WAKEUP_BUSY_RECORDS = 16

BPF_PROG_TYPE_TRACEPOINT = 5
BPF_MAP_TYPE_RINGBUF = 27


class TracerError(RuntimeError):
    """The tracer cannot start; the message says what is missing and how to fix it."""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


@dataclass
class HostReport:
    checks: list[Check] = field(default_factory=list)
    kprobes: bool = False
    defines: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks if c.required)

    @property
    def data_queue_hook(self) -> str:
        if self.kprobes:
            return f"kprobe:{DATA_QUEUE_KPROBE}"
        return f"raw_tracepoint:{TRACEPOINT_CATEGORY}:{DATA_QUEUE_TRACEPOINT[0]}"

    @property
    def attach_mode(self) -> str:
        return f"raw_tracepoint:{TRACEPOINT_CATEGORY}:inet_sock_set_state+{self.data_queue_hook}"

    def first_failure(self) -> str:
        """One line: what is missing and how to fix it."""
        for c in self.checks:
            if c.required and not c.ok:
                return f"{c.name}: {c.detail}; fix: {c.fix}"
        return ""


def _libbpf() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libbpf.so.1")
    except OSError:
        return None


def _mount(fstype: str, target: Path) -> str | None:
    """Mounts a pseudo file system; returns an error text or None."""
    source = "nodev" if fstype == "tracefs" else "none"
    res = subprocess.run(["mount", "-t", fstype, source, str(target)], capture_output=True, text=True)
    return None if res.returncode == 0 else (res.stderr.strip() or f"mount exited {res.returncode}")


def _exists(path: Path) -> bool:
    """Path.exists() that says False where we may not look (tracefs is root-only): the root check names that."""
    try:
        return path.exists()
    except OSError:
        return False


def _check_fs(name: str, fstype: str, path: Path, probe: Path, mount: bool) -> Check:
    if _exists(probe):
        return Check(name, True, f"{path} mounted")
    fix = f"mount -t {fstype} {'nodev' if fstype == 'tracefs' else 'none'} {path}"
    if mount and os.geteuid() == 0:
        err = _mount(fstype, path)
        if err is None and _exists(probe):
            return Check(name, True, f"{path} was not mounted; mounted it")
        return Check(name, False, f"{path} not mounted and mounting failed ({err})", fix)
    return Check(name, False, f"{path} not mounted", fix)


def _kprobes_available(tracefs: Path) -> bool:
    if not _exists(tracefs / "kprobe_events"):
        return False   # CONFIG_KPROBES / CONFIG_KPROBE_EVENTS not set
    try:
        with open("/proc/kallsyms", "rb") as f:
            return any(line.rstrip().endswith(b" " + DATA_QUEUE_KPROBE.encode()) for line in f)
    except OSError:
        return False


def check_host(settings: Settings, mount: bool = True) -> HostReport:
    """Probes everything the tracer needs; mounts tracefs/debugfs if allowed."""
    rep = HostReport()
    add = rep.checks.append
    root = os.geteuid() == 0
    add(Check("root", root, "running as root" if root else f"running as uid {os.geteuid()}",
              "run as root (sudo), or grant CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN"))

    lib = _libbpf()
    if lib is None:
        add(Check("libbpf", False, "libbpf.so.1 not found", "apt-get install libbpf1"))
    else:
        prog = lib.libbpf_probe_bpf_prog_type(BPF_PROG_TYPE_TRACEPOINT, None) == 1
        add(Check("bpf()", prog, "bpf() syscall loads tracepoint programs" if prog
                  else "bpf() cannot load a tracepoint program",
                  "run as root on a kernel with CONFIG_BPF_SYSCALL=y and CONFIG_BPF_EVENTS=y"))
        ring = lib.libbpf_probe_bpf_map_type(BPF_MAP_TYPE_RINGBUF, None) == 1
        add(Check("ring buffer", ring, "BPF_MAP_TYPE_RINGBUF available" if ring else "no BPF ring buffer",
                  "a kernel >= 5.8 is needed"))

    tracefs = settings.tracefs_path
    add(_check_fs("tracefs", "tracefs", tracefs, tracefs / "events", mount))
    add(_check_fs("debugfs", "debugfs", settings.debugfs_path, settings.debugfs_path / "tracing", mount))

    have_kprobes = _kprobes_available(tracefs)
    add(Check("kprobes", have_kprobes,
              f"kprobe on {DATA_QUEUE_KPROBE} available" if have_kprobes
              else f"no kprobes (CONFIG_KPROBES unset or {DATA_QUEUE_KPROBE} not in kallsyms); "
                   "data-queue events use sock:sk_data_ready",
              "none needed: the tracepoint fallback is used", required=False))
    hook = settings.data_queue_hook
    rep.kprobes = hook == "kprobe" or (hook == "auto" and have_kprobes)
    needed = list(BASE_TRACEPOINTS) + ([] if rep.kprobes else [DATA_QUEUE_TRACEPOINT])
    missing = [f"{TRACEPOINT_CATEGORY}:{tp}" for tp, _ in needed
               if not _exists(tracefs / "events" / TRACEPOINT_CATEGORY / tp / "format")]
    add(Check("tracepoints", not missing, "missing " + ", ".join(missing) if missing
              else "all needed tracepoints present", "a kernel >= 6.1 with CONFIG_BPF_EVENTS=y is needed"))

    try:
        rep.defines = tracer_defines(settings.btf_path)
        add(Check("BTF", True, f"{settings.btf_path}: {len(rep.defines)} offsets resolved"))
    except BtfError as exc:
        add(Check("BTF", False, str(exc), "use a kernel with CONFIG_DEBUG_INFO_BTF=y, "
                  "or point CONN_TRACER_BTF_PATH at its BTF file"))

    build = Path("/lib/modules") / os.uname().release / "build"
    headers = build.exists() or bool(os.environ.get("BCC_KERNEL_SOURCE"))
    add(Check("headers", headers, f"{build} present" if headers else f"no kernel header tree at {build}",
              f"{SETUP_HINT}: it installs linux-headers-amd64 and links {build} to it"))
    try:
        import bcc  # noqa: F401

        add(Check("bcc", True, "python bcc module imports"))
    except ImportError:
        add(Check("bcc", False, "python module bcc not importable",
                  "apt-get install python3-bpfcc and use the .venv made with --system-site-packages"))
    return rep


def build_cflags(settings: Settings, rep: HostReport) -> list[str]:
    """-D flags for tracer.c: BTF offsets, sizes, filters and mode."""
    defs: dict[str, int] = dict(rep.defines)
    defs.update(
        EVENT_SIZE=RECORD.size,
        RINGBUF_PAGES=settings.ringbuf_pages,
        WAKEUP_INTERVAL_NS=int(settings.wakeup_interval_us * 1000),
        WAKEUP_RECORDS=settings.wakeup_batch_records,
        WAKEUP_BUSY_INTERVAL_NS=int(settings.wakeup_busy_interval_us * 1000),
        WAKEUP_BUSY_RECORDS=WAKEUP_BUSY_RECORDS,
        MAX_SOCKETS=settings.max_sockets,
        DATA_QUEUE_INTERVAL_NS=int(settings.data_queue_interval_ms * 1_000_000),
        FILTER_PORT=settings.filter_port,
        FILTER_PID=settings.filter_pid,
        FILTER_FAMILY=settings.filter_family or 0,
        FILTER_NETNS=settings.filter_netns_inode(),
    )
    flags = [f"-D{k}={v}" for k, v in sorted(defs.items())]
    if rep.kprobes:
        flags.append("-DDATA_QUEUE_KPROBE")
    if settings.state_events:
        flags.append("-DSTATE_EVENTS")
    return flags


MADV_PAGEOUT = 21
_COMPILER_LIBS = (b"libLLVM", b"libclang")


def release_compiler_memory() -> None:
    """Gives back what compiling with bcc left behind; the compiler is not used again.

    LLVM's freed heap stays in glibc's arenas (malloc_trim returns it), and the
    pages of libLLVM/libclang it touched stay resident (~80 MB here): MADV_PAGEOUT
    drops those clean file pages; they would simply fault back in if ever needed.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    with contextlib.suppress(AttributeError):
        libc.malloc_trim(0)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    try:
        with open("/proc/self/maps", "rb") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 6 or not any(lib in fields[5] for lib in _COMPILER_LIBS):
                    continue
                lo, hi = (int(x, 16) for x in fields[0].split(b"-"))
                libc.madvise(lo, hi - lo, MADV_PAGEOUT)   # best effort: EINVAL on old kernels
    except OSError:
        pass


RecordsCallback = Callable[[bytes, int], None]
"""Receives `count` records as one contiguous run of FRAME-sized ring frames."""


class RingReader:
    """Consumes a BPF ring buffer through its mmap'd pages, at most `max_records` per call.

    Every record tracer.c writes has the same size, so committed records sit back to
    back, FRAME.size apart: a batch is one copy of a contiguous span that the decoder
    unpacks in one call. The
    headers are checked in bulk; only a busy (reserved, not yet committed) or
    discarded record sends the read down the record-by-record path.
    Layout (kernel/bpf/ringbuf.c): page 0 consumer_pos (read-write), page 1
    producer_pos, then the data area, which the kernel lets us map twice so that a record
    never wraps; we map it once (a page mapped twice counts twice in RSS) and join the two
    parts of the rare span that wraps.
    """

    BUSY = 1 << 31
    DISCARD = 1 << 30
    _LEN = struct.Struct("<I")

    def __init__(self, map_fd: int, data_size: int) -> None:
        if data_size & (data_size - 1):
            raise TracerError(f"ring buffer size {data_size} is not a power of two")
        page = mmap.PAGESIZE
        self._cons_map = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod_map = mmap.mmap(map_fd, page + data_size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        # 8-byte typed views: each position is read and written with one aligned access.
        self._cons = memoryview(self._cons_map)[:8].cast("Q")
        prod = memoryview(self._prod_map)
        self._prod = prod[:8].cast("Q")
        self._data = prod[page:page + data_size]
        self._mask = data_size - 1
        self._data_size = data_size
        self.bad_records = 0

    def read(self, max_records: int) -> tuple[bytes, int]:
        """Copies out up to `max_records` committed records, releases their space; (frames, count)."""
        cons = self._cons[0]
        prod = self._prod[0]
        stride = FRAME.size
        n = min((prod - cons) // stride, max_records, self._data_size // stride)
        if n > 0:
            span = self._span(cons & self._mask, n * stride)
            # A committed record's header is its length with no flag bits set.
            if span.cast("I")[::stride // 4].tolist().count(RECORD.size) == n:
                frames = span.tobytes()
                self._cons[0] = cons + n * stride
                return frames, n
        return self._read_slow(cons, prod, max_records) if prod > cons else (b"", 0)

    def _span(self, off: int, size: int) -> memoryview:
        """`size` bytes of the data area from `off`, joined across its end if they wrap."""
        end = off + size
        if end <= self._data_size:
            return self._data[off:end]
        return memoryview(self._data[off:].tobytes() + self._data[:end - self._data_size].tobytes())

    def _read_slow(self, cons: int, prod: int, max_records: int) -> tuple[bytes, int]:
        """Record by record: stops at the first busy one, skips discarded and foreign-sized ones."""
        data, mask, hdr = self._data, self._mask, RING_HEADER_SIZE
        keep: list[bytes] = []
        while cons < prod and len(keep) < max_records:
            off = cons & mask
            (length,) = self._LEN.unpack_from(data, off)
            if length & self.BUSY:
                break   # reserved, not yet committed: records after it wait too (ring order)
            size = length & ~(self.BUSY | self.DISCARD)
            if not length & self.DISCARD:
                if size == RECORD.size:
                    keep.append(self._span(off, FRAME.size).tobytes())
                else:
                    self.bad_records += 1   # not ours to decode; counted, skipped
            cons += (size + hdr + 7) & ~7
        self._cons[0] = cons
        return b"".join(keep), len(keep)

    def close(self) -> None:
        for view in (self._cons, self._prod, self._data):
            view.release()
        self._cons_map.close()
        self._prod_map.close()


@dataclass(frozen=True)
class PendingConnect:
    """A connect still in SYN_SENT, as tracer.c's `connecting` map holds it (no local port yet)."""

    conn_id: int
    start_ns: int
    cgroup_id: int
    inode: int
    pid: int
    netns: int
    family: int
    dport: int
    daddr: bytes
    comm: bytes


class Tracer:
    """The compiled, attached BPF programs and their ring buffer."""

    def __init__(self, settings: Settings, report: HostReport | None = None) -> None:
        if settings.ringbuf_pages & (settings.ringbuf_pages - 1):
            raise TracerError(f"ringbuf_pages must be a power of two, got {settings.ringbuf_pages}")
        self.settings = settings
        self.report = report or check_host(settings)
        self._bpf: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1
        self._ring: RingReader | None = None
        self._on_records: RecordsCallback | None = None
        self._next_drain: asyncio.Handle | None = None
        self._next_drain_soon = False
        self.max_batch_records = settings.read_batch_records
        self.compile_seconds = 0.0
        self.callback_errors = 0
        self._pins: PinSet | None = None
        # True when pinned maps from an earlier run were found: tracked_sockets() lists what they hold.
        self.resumed = False

    @property
    def attach_mode(self) -> str:
        return self.report.attach_mode

    @property
    def attached(self) -> bool:
        return self._bpf is not None

    @property
    def reading(self) -> bool:
        return self._fd >= 0

    def open(self) -> None:
        """Compiles tracer.c and attaches every program, or attaches none."""
        if not self.report.ok:
            raise TracerError(self.report.first_failure())
        from bcc import BPF

        class _ManualBPF(BPF):  # type: ignore[misc, valid-type]
            # bcc attaches tracepoint__*/kprobe__* functions in its constructor and
            # cannot undo a partial attach; we attach ourselves, one place, below.
            def _trace_autoload(self) -> None:
                pass

        cflags = build_cflags(self.settings, self.report)
        if self.settings.pin:
            instance = self.settings.instance or DEFAULT_INSTANCE
            pins = PinSet(instance, TRACER_C.read_text(), {"MAX_SOCKETS": self.settings.max_sockets})
            try:
                self.resumed = pins.prepare()
                self._pins = pins
                cflags += pins.cflags()
            except PinLocked as exc:
                pins.release()
                if self.settings.instance is not None:
                    raise TracerError(str(exc)) from exc
                log.warning("instance %r is held by another running conn-tracer: this one pins nothing "
                            "(give it --instance NAME to survive restarts)", instance)
            except (PinError, OSError) as exc:
                pins.release()
                raise TracerError(str(exc)) from exc
        t0 = time.perf_counter()
        try:
            bpf = _ManualBPF(src_file=str(TRACER_C).encode(), cflags=cflags)
        except Exception as exc:
            self._release_pins()
            raise TracerError(f"bcc could not compile/load {TRACER_C.name}: {exc}; {SETUP_HINT}") from exc
        self.compile_seconds = time.perf_counter() - t0
        try:
            tps = list(BASE_TRACEPOINTS) + ([] if self.report.kprobes else [DATA_QUEUE_TRACEPOINT])
            for tp, prog in tps:
                bpf.attach_raw_tracepoint(tp=tp.encode(), fn_name=prog.encode())
            if self.report.kprobes:
                bpf.attach_kprobe(event=DATA_QUEUE_KPROBE.encode(), fn_name=DATA_QUEUE_KPROBE_PROGRAM.encode())
            self._ring = RingReader(bpf[b"events"].map_fd, self.settings.ringbuf_pages * mmap.PAGESIZE)
        except Exception as exc:
            bpf.cleanup()
            self._release_pins()
            raise TracerError(f"attaching the tracer failed: {exc}") from exc
        self._bpf = bpf
        release_compiler_memory()

    def start_reading(self, loop: asyncio.AbstractEventLoop, on_records: RecordsCallback) -> None:
        """Feeds record batches to `on_records`: on a wake-up from the kernel, and on a timer while records flow.

        tracer.c wakes the reader per batch, not per record (see submit_flags), so a
        record can wait in the ring until the next wake-up; while records are flowing a
        `drain_interval_ms` timer bounds that wait. When a drain finds nothing the timer
        stops, and the next record after the quiet spell wakes the reader itself.
        At most `max_batch_records` per call: the loop serves everything else that is
        ready between batches.
        """
        if self._bpf is None or self._ring is None:
            raise TracerError("tracer is not open")
        self._on_records = on_records
        self._loop = loop
        self._fd = self._bpf[b"events"].map_fd
        loop.add_reader(self._fd, self._drain_and_schedule)

    def _on_timer(self) -> None:
        self._next_drain = None
        self._drain_and_schedule()

    def _drain_and_schedule(self) -> None:
        n = self.drain()
        loop = self._loop
        if loop is None or n == 0:
            return
        # A full batch: more is waiting, come back right after the loop's other work.
        soon = n >= self.max_batch_records
        pending = self._next_drain
        if pending is not None:
            if self._next_drain_soon or not soon:
                return
            pending.cancel()
        self._next_drain_soon = soon
        if soon:
            self._next_drain = loop.call_soon(self._on_timer)
        else:
            self._next_drain = loop.call_later(self.settings.drain_interval_ms / 1000, self._on_timer)

    def drain(self) -> int:
        """Hands up to one batch of waiting records over now; returns how many."""
        if self._ring is None:
            return 0
        frames, n = self._ring.read(self.max_batch_records)
        if n and self._on_records is not None:
            try:
                self._on_records(frames, n)
            except Exception:
                # One bad batch must not stop the reader (the fd callback would be lost).
                self.callback_errors += 1
                log.exception("event consumer failed on a batch of %d records", n)
        return n

    def bad_records(self) -> int:
        """Ring records of a size tracer.c does not write (skipped)."""
        return self._ring.bad_records if self._ring is not None else 0

    def lost_kernel(self) -> int:
        """Events the kernel could not put in the full ring buffer."""
        if self._bpf is None:
            return 0
        return int(self._bpf[b"counters"][ctypes.c_int(CTR_LOST)].value)

    def stop_reading(self) -> None:
        """Unhooks the ring buffer from the event loop; programs stay attached."""
        if self._next_drain is not None:
            self._next_drain.cancel()
            self._next_drain = None
        if self._loop is not None and self._fd >= 0:
            self._loop.remove_reader(self._fd)
        self._fd = -1
        self._loop = None

    def close(self) -> None:
        """Stops reading and detaches every program. Safe to call twice."""
        self.stop_reading()
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self._bpf is not None:
            bpf, self._bpf = self._bpf, None
            bpf.cleanup()
        self._release_pins()

    def _release_pins(self) -> None:
        if self._pins is not None:
            self._pins.release()
            self._pins = None

    def tracked_sockets(self) -> list[tuple[int, EventRecord]]:
        """(map key, record) of each socket the kernel tracks whose tuple is known: after a restart with
        pinned maps, the connections the previous run was following, as records of their last state."""
        if self._bpf is None:
            return []
        now = time.monotonic_ns()
        out = []
        for key, si in self._bpf[b"sockets"].items():
            if not si.sport:
                continue   # a connect still waiting for its port: its next record lists it
            out.append((int(key.value), make_record(
                ts_ns=now, start_ns=si.start_ns, conn_id=si.conn_id, bytes_sent=si.last_tx,
                bytes_received=si.last_rx, cgroup_id=si.cgroup_id, pid=si.pid, netns=si.netns,
                connect_us=si.connect_us, saddr=bytes(si.saddr), daddr=bytes(si.daddr), sport=si.sport,
                dport=si.dport, family=si.family, type=EV_STATE_CHANGE, role=si.role, state=ST_ESTABLISHED,
                flags=si.flags, comm=bytes(si.comm))))
        return out

    def wall_offset(self, fresh_ns: int) -> int:
        """The CLOCK_MONOTONIC -> UTC offset to use: the one an earlier run pinned, unless the clock has been
        set since (more than a second apart); else `fresh_ns`, pinned for the next run."""
        if self._bpf is None:
            return fresh_ns
        ids = self._bpf[b"ids"]
        key = ids.Key(1)
        stored = ctypes.c_int64(ids[key].value).value
        if stored and abs(stored - fresh_ns) < 1_000_000_000:
            return stored
        ids[key] = ids.Leaf(fresh_ns)
        return fresh_ns

    def pending_connects(self, older_than_ns: int) -> list[PendingConnect]:
        """Connects waiting for their SYN-ACK for longer than `older_than_ns` (the kernel's `connecting` map)."""
        if self._bpf is None:
            return []
        now = time.monotonic_ns()
        return [PendingConnect(p.conn_id, p.start_ns, p.cgroup_id, p.inode, p.pid, p.netns, p.family, p.dport,
                               bytes(p.daddr), bytes(p.comm))
                for p in self._bpf[b"connecting"].values() if now - p.start_ns >= older_than_ns]

    def recursion_misses(self) -> int:
        """Runs of our programs the kernel skipped (a program was already running on that CPU, e.g. an
        interrupt hit while one ran): events that were never recorded. bpf_prog_info.recursion_misses."""
        if self._bpf is None:
            return 0
        total = 0
        for fn in self._bpf.funcs.values():
            info = ctypes.create_string_buffer(PROG_INFO_SIZE)
            size = ctypes.c_uint32(PROG_INFO_SIZE)
            if _libbpf_info().bpf_obj_get_info_by_fd(fn.fd, info, ctypes.byref(size)) == 0 and \
                    size.value >= PROG_INFO_RECURSION_MISSES + 8:
                total += int.from_bytes(info.raw[PROG_INFO_RECURSION_MISSES:PROG_INFO_RECURSION_MISSES + 8],
                                        "little")
        return total

    def offer_adoption(self, recs: list[EventRecord]) -> None:
        """Lets the kernel take over sockets found open at start-up (ids PREEXISTING_ID + socket cookie)."""
        if self._bpf is None or not recs:
            return
        table = self._bpf[b"adoptees"]
        n = 0
        for r in recs:
            if r[CONN_ID] < PREEXISTING_ID:
                continue
            a = table.Leaf()
            a.conn_id, a.start_ns, a.cgroup_id, a.pid, a.role = r[CONN_ID], r[START_NS], r[CGROUP_ID], r[PID], r[ROLE]
            a.comm = r[COMM][:15]
            try:
                table[table.Key(r[CONN_ID] - PREEXISTING_ID)] = a
            except Exception:   # the map is full: that one stays polled by the sweep
                break
            n += 1
        count = self._bpf[b"adopt_count"]
        count[count.Key(0)] = count.Leaf(n)

    def forget_sockets(self, keys: list[int]) -> None:
        """Drops map entries of sockets that are gone (closed while no reader was attached)."""
        if self._bpf is None:
            return
        table = self._bpf[b"sockets"]
        for k in keys:
            with contextlib.suppress(KeyError):
                del table[table.Key(k)]

    def __enter__(self) -> Tracer:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
