"""The read floor: this project's own tracer and ring reader, with a callback that only counts.

Same programs (app/bpf/tracer.c), same loader, same ring reader and wake-ups as `serve`, but no
decoding, table, hub or JSON: the CPU this process spends per record is what reading costs
before the pipeline does anything, and the BPF time of its programs is the kernel side of serve.
Prints ``ready`` once attached and reading, and one JSON line on SIGINT/SIGTERM: records and
callbacks counted, `lost_kernel`, compile seconds.

With ``--untracked``, the lookup floor instead: the same programs, filtered to a network namespace
no socket lives in (inode 1), so every hook runs and looks its socket up but none is tracked and no
record is made. Its BPF time is what the hooks cost before tracking does anything.

Run as root from the project venv (``app`` importable).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from typing import Any


class Counter:
    """The only state the callback touches."""

    def __init__(self) -> None:
        self.records = 0
        self.callbacks = 0

    def on_records(self, *args: Any) -> None:
        # Either on_records(frames: bytes, count: int), a blob of `count` fixed-size frames, or
        # the older on_records(batch: list[bytes]); the floor must work with both loaders.
        self.records += args[1] if len(args) > 1 else len(args[0])
        self.callbacks += 1


async def run(untracked: bool) -> dict[str, Any]:
    from app.bpf.loader import Tracer  # imported late so --help works without root and bcc
    from app.config import Settings

    # As serve in the bench: no pins left behind.
    settings = Settings(preexisting=False, pin=False, filter_netns="1" if untracked else None)
    tracer = Tracer(settings)
    t0 = time.monotonic()
    tracer.open()
    compile_s = time.monotonic() - t0
    counter = Counter()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    drain = getattr(tracer, "drain", None)

    async def timer_drain() -> None:
        # As serve does: a slow timer drain besides the fd wake-ups, so records left behind
        # by a skipped or suppressed wake-up are still read. Cheap when the ring is empty.
        while drain is not None and settings.drain_interval_s > 0:
            await asyncio.sleep(settings.drain_interval_s)
            drain()

    try:
        tracer.start_reading(loop, counter.on_records)
        timer = asyncio.create_task(timer_drain())
        print("ready", flush=True)
        await stop.wait()
        timer.cancel()
        for _ in range(1000):  # whatever is still in the ring, bounded
            if drain is None or not drain():
                break
        return {"records": counter.records, "callbacks": counter.callbacks, "lost_kernel": tracer.lost_kernel(),
                "compile_s": round(compile_s, 3)}
    finally:
        tracer.close()


def main() -> int:
    if "--help" in sys.argv or "-h" in sys.argv:
        print(__doc__)
        return 0
    print(json.dumps(asyncio.run(run("--untracked" in sys.argv))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
