"""Command line: `conn-tracer serve | trace | check`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from app.bpf.loader import Tracer, TracerError, check_host
from app.config import Settings
from app.decode import DecodeError, Decoder
from app.models import Event, EventWriter, Texts


def _port(value: str) -> int:
    n = int(value)
    if not 0 < n < 65536:
        raise argparse.ArgumentTypeError(f"port must be 1-65535, got {n}")
    return n


def _add_filters(p: argparse.ArgumentParser, *port_flags: str) -> None:
    p.add_argument(*port_flags, dest="filter_port", type=_port,
                   help="only connections with this port at either end (in-kernel)")
    p.add_argument("--pid", dest="filter_pid", type=int, help="only connections owned by this pid (in-kernel)")
    p.add_argument("--family", dest="filter_family", type=int, choices=(4, 6), help="only IPv4 or IPv6")
    p.add_argument("--data-queue-interval-ms", type=float,
                   help="at most one data_queue event per connection per interval (0 = every one)")
    p.add_argument("--state-events", action="store_true", default=None,
                   help="also emit a state_change event for every other TCP state change")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conn-tracer", description="Watch every TCP connection with eBPF.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="attach the tracer and serve the API and dashboard")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="bind port (default 8000)")
    _add_filters(serve, "--filter-port")
    serve.add_argument("--max-closed-connections", type=int, help="closed connections kept in the table")
    serve.add_argument("--replay-events", type=int, help="events kept for /events and WebSocket resume")
    serve.add_argument("--subscriber-queue-events", type=int, help="events queued per WebSocket subscriber")
    serve.add_argument("--max-subscribers", type=int, help="concurrent WebSocket subscribers (default 64)")
    serve.add_argument("--token-file", type=Path, help="file holding the bearer token (or set CONN_TRACER_TOKEN)")
    serve.add_argument("--insecure-no-token", action="store_true", default=None,
                       help="allow a non-loopback --host without a token")
    serve.add_argument("--allow-host", dest="allowed_hosts", action="append",
                       help="also answer to this Host name (repeatable)")
    serve.add_argument("--allow-origin", dest="allowed_origins", action="append",
                       help="also accept WebSockets from this origin, e.g. https://grafana.example (repeatable)")
    serve.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (PEM)")
    serve.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")

    trace = sub.add_parser("trace", help="print events to stdout, one line each")
    trace.add_argument("--json", action="store_true", help="JSON lines, fields as in API.md")
    # `serve --port` is the bind port, so its port filter is --filter-port; trace has no bind port.
    _add_filters(trace, "--port", "--filter-port")

    sub.add_parser("check", help="say what this host supports and which attach mode will be used")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags override CONN_TRACER_* environment variables, which override defaults."""
    keys = ("host", "port", "filter_port", "filter_pid", "filter_family", "data_queue_interval_ms",
            "state_events", "max_closed_connections", "replay_events", "subscriber_queue_events",
            "max_subscribers", "token_file", "insecure_no_token", "allowed_hosts", "allowed_origins", "tls_cert",
            "tls_key")
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    return Settings(**overrides)


def format_event(ev: Event) -> str:
    """One human line per event."""
    who = f"{ev.pid}/{ev.comm}" if ev.pid else "-"
    return (f"{ev.seq:>7} {ev.ts.strftime('%H:%M:%S.%f')} {ev.type:<12} {ev.role:<6} {ev.state:<11} "
            f"{ev.src_addr}:{ev.src_port} -> {ev.dst_addr}:{ev.dst_port} pid={who} "
            f"tx={ev.bytes_sent} rx={ev.bytes_received}")


def cmd_check(settings: Settings) -> int:
    rep = check_host(settings)
    for c in rep.checks:
        mark = "ok  " if c.ok else ("MISSING" if c.required else "no  ")
        line = f"{mark:<8}{c.name:<12} {c.detail}"
        if not c.ok:
            line += f"\n{'':<21}fix: {c.fix}"
        print(line)
    print(f"attach mode: {rep.attach_mode}")
    if rep.ok:
        print("serve and trace can run on this host")
        return 0
    print(f"cannot trace: {rep.first_failure()}", file=sys.stderr)
    return 1


async def _trace(settings: Settings, as_json: bool) -> int:
    tracer = Tracer(settings)
    tracer.open()
    decoder = Decoder()
    writer = EventWriter(Texts(time.time_ns() - time.monotonic_ns(), settings.host_name))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal() -> None:
        # Stop consuming at once: under a flood the reader would keep the loop busy.
        tracer.stop_reading()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    seq = 0
    bad = 0
    out = sys.stdout

    def on_records(frames: bytes, count: int) -> None:
        nonlocal seq, bad
        try:
            recs = decoder.decode(frames)
        except DecodeError:
            bad += count
            return
        if as_json:
            lines = writer.json_many(seq + 1, recs)   # one call per batch
        else:
            lines = [format_event(writer.event(seq + 1 + i, rec)) for i, rec in enumerate(recs)]
        seq += len(recs)
        if lines:
            out.write("\n".join(lines) + "\n")
            out.flush()

    try:
        tracer.start_reading(loop, on_records)
        print(f"tracing ({tracer.attach_mode}); Ctrl-C to stop", file=sys.stderr)
        await stop.wait()
    finally:
        lost = tracer.lost_kernel()
        tracer.close()
    print(f"stopped: {seq} events, {lost} lost in kernel, {bad + decoder.bad_records} undecodable", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        err = exc.errors()[0]
        print(f"conn-tracer: invalid setting {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2
    try:
        if args.command == "check":
            return cmd_check(settings)
        if args.command == "trace":
            with contextlib.suppress(BrokenPipeError):
                return asyncio.run(_trace(settings, args.json))
            return 0
        from app.api.server import run

        return run(settings)
    except TracerError as exc:
        print(f"conn-tracer: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
