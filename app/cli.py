"""Command line: `conn-tracer serve | trace | check | observe | completion`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app import __version__
from app.config import CONFIG_ENV, DEFAULT_CONFIG, ConfigError, Settings, load_settings
from app.render import Output, OutputFormat, Renderer, TimeMode

FAMILY_SPELLINGS = {"4": 4, "6": 6, "ipv4": 4, "ipv6": 6}
EVENT_TYPE_CHOICES = ("syn_sent", "syn_recv", "established", "data_queue", "close", "state_change")
DRAIN_ON_STOP_S = 1.0          # how long `trace` keeps printing what is still in the ring after SIGTERM
DRAIN_ON_STOP_BATCHES = 4096   # and at most this many batches (bounds the count of what is left too)


def _port(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be a number 1-65535, got {value!r}") from None
    if not 0 < n < 65536:
        raise argparse.ArgumentTypeError(f"port must be 1-65535, got {n}")
    return n


def _bind_port(value: str) -> int:
    n = int(value) if value.isdigit() else -1
    if not 0 <= n < 65536:
        raise argparse.ArgumentTypeError(f"port must be 0-65535 (0: any free port), got {value!r}")
    return n


def _pid(value: str) -> int:
    n = int(value) if value.isdigit() else 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"pid must be a positive number, got {value!r}")
    return n


def _family(value: str) -> int:
    """4, 6, ipv4 or ipv6 (any case) -> 4 or 6."""
    n = FAMILY_SPELLINGS.get(value.lower())
    if n is None:
        raise argparse.ArgumentTypeError(f"family must be 4, 6, ipv4 or ipv6, got {value!r}")
    return n


def _add_family(p: argparse.ArgumentParser, short: bool) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--family", dest="filter_family", type=_family, metavar="{4,6,ipv4,ipv6}",
                   help="only IPv4 or IPv6 connections")
    if short:
        g.add_argument("-4", dest="filter_family", action="store_const", const=4, help="only IPv4 (= --family 4)")
        g.add_argument("-6", dest="filter_family", action="store_const", const=6, help="only IPv6 (= --family 6)")


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="PATH",
                   help=f"TOML settings file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG} if it exists); "
                        "flags > CONN_TRACER_* env > file > defaults")


def _add_kernel_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-queue-interval-ms", type=float, metavar="MS",
                   help="at most one data_queue event per connection per interval (0 = every one)")
    p.add_argument("--state-events", action="store_true", default=None,
                   help="also emit a state_change event for every other TCP state change")


def _add_nats(p: argparse.ArgumentParser, url_help: str) -> None:
    p.add_argument("--nats", dest="nats_url", metavar="URL", help=url_help)
    p.add_argument("--nats-subject-prefix", metavar="PREFIX",
                   help="subjects are PREFIX.<host>.events (default conntracer)")
    p.add_argument("--nats-stream", metavar="NAME", help="JetStream stream, created if missing (default CONNTRACER)")
    p.add_argument("--nats-creds", dest="nats_creds_file", metavar="PATH", help="NATS credentials file (.creds)")
    p.add_argument("--nats-tls-ca", metavar="PATH", help="CA certificate for NATS over TLS")
    p.add_argument("--nats-tls-cert", metavar="PATH", help="client certificate for NATS over TLS")
    p.add_argument("--nats-tls-key", metavar="PATH", help="client key for NATS over TLS")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conn-tracer", description="Watch every TCP connection with eBPF.")
    parser.add_argument("--version", action="version", version=f"conn-tracer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="attach the tracer and serve the API and dashboard",
                           description="Attach the tracer; serve the REST API, WebSocket and dashboard.")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=_bind_port, help="bind port (default 8000; 0 = any free port)")
    # `serve --port` is the bind port, so its port filter is --filter-port.
    serve.add_argument("--filter-port", dest="filter_port", type=_port, metavar="PORT",
                       help="only connections with this port at either end (in-kernel)")
    serve.add_argument("--pid", dest="filter_pid", type=_pid, metavar="PID",
                       help="only connections owned by this pid (in-kernel)")
    _add_family(serve, short=False)
    _add_kernel_options(serve)
    serve.add_argument("--max-closed-connections", type=int, metavar="N", help="closed connections kept in the table")
    serve.add_argument("--replay-events", type=int, metavar="N", help="events kept for /events and WebSocket resume")
    serve.add_argument("--subscriber-queue-events", type=int, metavar="N",
                       help="how far a WebSocket subscriber may fall behind before it loses events")
    serve.add_argument("--instance", help="name of this agent's pinned state under /sys/fs/bpf/conn-tracer/ "
                                          "(default: default, or nothing pinned if another agent holds it)")
    serve.add_argument("--no-pin", dest="pin", action="store_false", default=None,
                       help="do not pin the socket map: a restart forgets the connections being tracked")
    serve.add_argument("--host-name", metavar="NAME", help="this agent's name on every event (default: the hostname)")
    serve.add_argument("--filter-netns", metavar="PATH|INODE",
                       help="only this network namespace: an inode number or a path (in-kernel)")
    serve.add_argument("--max-subscribers", type=int, metavar="N", help="concurrent WebSocket subscribers (default 64)")
    serve.add_argument("--token-file", type=Path, metavar="PATH",
                       help="file holding the bearer token (or set CONN_TRACER_TOKEN)")
    serve.add_argument("--insecure-no-token", action="store_true", default=None,
                       help="allow a non-loopback --host without a token")
    serve.add_argument("--allow-host", dest="allowed_hosts", action="append", metavar="NAME",
                       help="also answer to this Host name (repeatable)")
    serve.add_argument("--allow-origin", dest="allowed_origins", action="append", metavar="ORIGIN",
                       help="also accept WebSockets from this origin, e.g. https://grafana.example (repeatable)")
    serve.add_argument("--tls-cert", type=Path, metavar="PATH", help="serve HTTPS with this certificate (PEM)")
    serve.add_argument("--tls-key", type=Path, metavar="PATH", help="the certificate's private key (PEM)")
    _add_config(serve)
    _add_nats(serve, "export every event to NATS JetStream at this URL, e.g. nats://HOST:4222")
    serve.add_argument("--nats-buffer-events", type=int, metavar="N",
                       help="events held while NATS is unreachable; beyond, new ones are dropped and counted")

    fleet = sub.add_parser("fleet", help="serve the API and dashboard over every host exporting to NATS",
                           description="Read what the agents export to NATS JetStream; serve the same REST API, "
                                       "WebSocket and dashboard over all of them (no BPF, no root).")
    fleet.add_argument("--host", help="bind address (default 127.0.0.1)")
    fleet.add_argument("--port", type=_bind_port, help="bind port (default 8000; 0 = any free port)")
    _add_nats(fleet, "the NATS server the agents export to, e.g. nats://HOST:4222")
    fleet.add_argument("--durable", dest="fleet_durable", metavar="NAME",
                       help="name of this fleet view's JetStream consumer (default conntracer-fleet)")
    fleet.add_argument("--max-closed-connections", type=int, metavar="N", help="closed connections kept in the table")
    fleet.add_argument("--replay-events", type=int, metavar="N", help="events kept for /events and WebSocket resume")
    _add_config(fleet)

    trace = sub.add_parser(
        "trace", help="print events to stdout, one line each (needs root)",
        description="Attach the tracer and print every event, one line each: a table (default), "
                    "CSV (-s) or JSON lines (--json). -p, -P and the family filter run in the kernel; "
                    "-L and -D are applied here, on top of the kernel's either-end port filter.")
    trace.add_argument("-p", "--pid", dest="filter_pid", type=_pid, metavar="PID",
                       help="only connections owned by this pid (kernel)")
    trace.add_argument("-P", "--port", "--filter-port", dest="filter_port", type=_port, metavar="PORT",
                       help="only connections with this port at either end (kernel)")
    trace.add_argument("-L", "--local-port", type=_port, metavar="PORT",
                       help="only this local port (user space, on top of the kernel's either-end filter)")
    trace.add_argument("-D", "--remote-port", type=_port, metavar="PORT",
                       help="only this remote port (user space, on top of the kernel's either-end filter)")
    _add_family(trace, short=True)
    _add_output_options(trace, json_flag=True)
    _add_kernel_options(trace)
    _add_config(trace)

    cleanup = sub.add_parser("cleanup", help="remove the pinned maps an instance left under /sys/fs/bpf")
    cleanup.add_argument("--instance", default="default", help="which instance (default: default)")
    cleanup.add_argument("--all", action="store_true", help="every instance")

    check = sub.add_parser("check", help="say what this host supports and which attach mode will be used")
    _add_config(check)

    observe = sub.add_parser(
        "observe", help="read a running agent's events over its API (no root needed)",
        description="Print a running agent's events: the latest ones (--last, --since) from GET /events, "
                    "and with --follow the live stream from WS /ws, resumed by seq across reconnects. "
                    "Gaps (events dropped or overwritten before this client got them) are reported on stderr.")
    observe.add_argument("--url", default=os.environ.get("CONN_TRACER_URL", "http://127.0.0.1:8000"),
                         help="the agent's base URL (default $CONN_TRACER_URL or http://127.0.0.1:8000)")
    observe.add_argument("-f", "--follow", action="store_true", help="keep printing live events until Ctrl-C")
    observe.add_argument("--last", type=int, metavar="N",
                         help="start with the latest N matching events (default 20 without --follow or --since)")
    observe.add_argument("--since", metavar="DURATION",
                         help="start with the events of the last DURATION (e.g. 90s, 5m, 2h, 1d) "
                              "or since an ISO 8601 time")
    observe.add_argument("-p", "--pid", type=_pid, help="only connections owned by this pid")
    observe.add_argument("-P", "--port", type=_port, help="only connections with this port at either end")
    observe.add_argument("-L", "--local-port", type=_port, metavar="PORT", help="only this local port")
    observe.add_argument("-D", "--remote-port", type=_port, metavar="PORT", help="only this remote port")
    _add_family(observe, short=True)
    observe.add_argument("--role", choices=("client", "server"), help="client = active open, server = passive open")
    observe.add_argument("--type", dest="types", metavar="TYPES",
                         help=f"comma-separated event types ({', '.join(EVENT_TYPE_CHOICES)})")
    _add_output_options(observe, json_flag=True)
    observe.add_argument("--token-file", type=Path, metavar="PATH",
                         help="file holding the agent's bearer token (default: $CONN_TRACER_TOKEN)")
    observe.add_argument("--timeout", type=float, default=10.0, metavar="S", help="HTTP timeout in seconds")

    comp = sub.add_parser("completion", help="print a shell completion script",
                          description="Print a completion script: `source <(conn-tracer completion bash)`, "
                                      "or save it as /etc/bash_completion.d/conn-tracer.")
    comp.add_argument("shell", choices=("bash",), help="the shell (bash; zsh can load it with bashcompinit)")
    return parser


def _add_output_options(p: argparse.ArgumentParser, json_flag: bool) -> None:
    fmt = p.add_mutually_exclusive_group()
    if json_flag:
        fmt.add_argument("--json", dest="output", action="store_const", const="json",
                         help="JSON lines, fields as in docs/API.md")
    fmt.add_argument("-s", "--csv", dest="output", action="store_const", const="csv", help="CSV with a header row")
    fmt.add_argument("-o", "--output", dest="output", choices=("table", "json", "csv"),
                     help="table (default), json (one event per line) or csv")
    tm = p.add_mutually_exclusive_group()
    tm.add_argument("-T", "--clock", dest="time_mode", action="store_const", const="clock",
                    help="time as local HH:MM:SS")
    tm.add_argument("-t", "--relative", dest="time_mode", action="store_const", const="relative",
                    help="time as seconds since this command started")
    tm.add_argument("--utc", dest="time_mode", action="store_const", const="utc", help="time in UTC, HH:MM:SS.mmm")
    p.add_argument("-w", "--wide", action="store_true",
                   help="wide columns: full IPv6 addresses aligned, connection id, connect time, host, container")
    p.add_argument("--no-header", action="store_true", help="no header row")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags override CONN_TRACER_* environment variables, which override the config file and the defaults.

    Every flag whose dest is a Settings field and that was given is an override (a new setting needs only its flag).
    """
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    if args.command == "trace" and not overrides.get("filter_port"):
        # The kernel only filters on a port at either end; a local or remote port narrows to that
        # already, and user space keeps only the right end on top.
        port = getattr(args, "local_port", None) or getattr(args, "remote_port", None)
        if port:
            overrides["filter_port"] = port
    if args.command != "serve":
        overrides["pin"] = False   # only the long-running service keeps state across restarts
    return load_settings(getattr(args, "config", None), **overrides)


def renderer_from_args(args: argparse.Namespace) -> Renderer:
    output: OutputFormat = args.output or "table"
    time_mode: TimeMode = args.time_mode or "local"
    return Renderer(output=output, time_mode=time_mode, wide=args.wide)


def cmd_check(settings: Settings) -> int:
    from app.bpf.loader import check_host

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


def cmd_cleanup(instance: str, every: bool) -> int:
    from app.bpf.pins import PIN_ROOT, PinError, remove

    names = sorted(p.name for p in PIN_ROOT.iterdir()) if every and PIN_ROOT.is_dir() else [instance]
    removed = []
    try:
        for name in names:
            removed += remove(name)
    except (PinError, OSError) as exc:
        print(f"conn-tracer: cleanup: {exc}", file=sys.stderr)
        return 1
    for path in removed:
        print(f"removed {path}")
    if not removed:
        print("nothing pinned" if every else f"nothing pinned for instance {instance!r}")
    return 0


# --- trace ------------------------------------------------------------------------------------

def _port_predicate(local: int | None, remote: int | None) -> Callable[[Any], bool] | None:
    """User-space local/remote port test on internal records (the kernel has only either-end)."""
    from app.bpf.event import DPORT, SPORT

    if local is None and remote is None:
        return None
    if remote is None:
        return lambda r: r[SPORT] == local
    if local is None:
        return lambda r: r[DPORT] == remote
    return lambda r: r[SPORT] == local and r[DPORT] == remote


async def _trace(settings: Settings, args: argparse.Namespace) -> int:
    from app.bpf.loader import Tracer
    from app.decode import DecodeError, Decoder
    from app.models import EventWriter, Texts

    tracer = Tracer(settings)
    tracer.open()
    decoder = Decoder()
    writer = EventWriter(Texts(time.time_ns() - time.monotonic_ns(), settings.host_name))
    render = renderer_from_args(args)
    keep = _port_predicate(args.local_port, args.remote_port)
    out = Output(sys.stdout)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    why = "stopped"
    counts = {"events": 0, "filtered": 0, "unprinted": 0, "bad": 0, "numbered": 0}
    counting_only = False   # past the drain deadline: count what is left, print nothing

    def on_signal(name: str) -> None:
        nonlocal why
        # Stop consuming at once: under a flood the reader would keep the loop busy.
        tracer.stop_reading()
        why = f"stopped by {name}"
        stop.set()

    def on_stdout_error() -> None:
        if out.reader_gone():
            out.mark_closed()
            on_signal("closed output")

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig.name)
    watching_stdout = out.is_pipe()
    if watching_stdout:
        # The write end of a pipe reports an error as soon as its reader closes: notice that
        # (`| head -2`) at once rather than at the next event, which may never come.
        loop.add_reader(sys.stdout.fileno(), on_stdout_error)

    def on_records(frames: bytes, count: int) -> None:
        try:
            recs = decoder.decode(frames)
        except DecodeError:
            counts["bad"] += count
            return
        counts["events"] += len(recs)
        if keep is not None:
            kept = [r for r in recs if keep(r)]
            counts["filtered"] += len(recs) - len(kept)
            recs = kept
        if not recs:
            return
        if counting_only or out.closed:
            counts["unprinted"] += len(recs)
            return
        # seq numbers the events that pass the filters, 1, 2, 3, ... as they are printed.
        texts = writer.json_many(counts["numbered"] + 1, recs)   # one call per batch; C where built
        counts["numbered"] += len(recs)
        if render.output == "json":
            lines = texts
        else:
            lines = [render.line(json.loads(t)) for t in texts]
        counts["unprinted"] += out.write(lines)
        if out.closed:
            on_signal("closed output")

    header_lines = 0
    try:
        if not args.no_header and (head := render.header()) is not None:
            out.write([head])
            header_lines = out.written
        tracer.start_reading(loop, on_records)
        print(f"tracing ({tracer.attach_mode}); Ctrl-C to stop", file=sys.stderr)
        if not out.closed:
            await stop.wait()
        # Print what the kernel had already written before the signal, within a bound; then only count the rest.
        deadline = time.monotonic() + DRAIN_ON_STOP_S
        for _ in range(DRAIN_ON_STOP_BATCHES):
            counting_only = counting_only or time.monotonic() > deadline
            if tracer.drain() == 0:
                break
    finally:
        if watching_stdout:
            with contextlib.suppress(Exception):
                loop.remove_reader(sys.stdout.fileno())
        lost = tracer.lost_kernel()
        tracer.close()
    print(f"{why}: {counts['events']} events, {out.written - header_lines} printed, "
          f"{counts['filtered']} filtered out (-L/-D), "
          f"{lost} lost in kernel, {counts['unprinted']} unprinted, "
          f"{counts['bad'] + decoder.bad_records} undecodable", file=sys.stderr)
    return 0


# --- completion -------------------------------------------------------------------------------

def bash_completion(parser: argparse.ArgumentParser) -> str:
    """A bash completion script made from the parser itself, so it always knows every flag."""
    subs: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            subs = dict(action.choices)
    top = [*subs, "--version", "--help"]
    cases = []
    value_cases: dict[str, str] = {}
    for name, sp in subs.items():
        words: list[str] = []
        for action in sp._actions:
            words += action.option_strings
            for opt in action.option_strings:
                if action.choices is not None and action.option_strings:
                    value_cases[opt] = "compgen -W " + repr(" ".join(map(str, action.choices)))
                elif action.type is Path:
                    value_cases[opt] = "compgen -f"
                elif action.type is _family:
                    value_cases[opt] = "compgen -W '4 6 ipv4 ipv6'"
            if not action.option_strings and action.choices is not None:
                words += list(map(str, action.choices))
        cases.append(f"        {name}) opts={' '.join(sorted(set(words)))!r} ;;")
    value_lines = [f"        {opt}) COMPREPLY=( $({cmd} -- \"$cur\") ); return ;;"
                   for opt, cmd in sorted(value_cases.items())]
    nl = "\n"
    return f"""# bash completion for conn-tracer: source <(conn-tracer completion bash)
_conn_tracer() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}" opts=""
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=( $(compgen -W {' '.join(top)!r} -- "$cur") )
        return
    fi
    case "$prev" in
{nl.join(value_lines)}
    esac
    case "${{COMP_WORDS[1]}}" in
{nl.join(cases)}
    esac
    COMPREPLY=( $(compgen -W "$opts" -- "$cur") )
}}
complete -F _conn_tracer conn-tracer
"""


# --- main -------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "completion":
        print(bash_completion(parser), end="")
        return 0
    if args.command == "observe":
        from app.observe import observe_main

        return observe_main(args, renderer_from_args(args))
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"conn-tracer: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        err = exc.errors()[0]
        print(f"conn-tracer: invalid setting {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2
    from app.bpf.loader import TracerError, check_host

    try:
        if args.command == "check":
            return cmd_check(settings)
        if args.command == "cleanup":
            return cmd_cleanup(args.instance, args.all)
        if args.command == "fleet":
            if not settings.nats_url:
                print("conn-tracer: fleet needs --nats nats://HOST:4222 (or CONN_TRACER_NATS_URL)", file=sys.stderr)
                return 2
            from app.api.server import run
            from app.fleet import FleetCore

            return run(settings, FleetCore(settings))
        if os.geteuid() != 0:
            # Said before anything is built or bound (the tracer would say the same, later).
            print(f"conn-tracer: cannot trace: {check_host(settings, mount=False).first_failure()}", file=sys.stderr)
            return 1
        if args.command == "trace":
            return asyncio.run(_trace(settings, args))
        from app.api.server import run

        return run(settings)
    except TracerError as exc:
        print(f"conn-tracer: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
