"""The command line: flags in bcc's habits, the event table, config precedence, completion, pipes, a taken port."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import __version__
from app.cli import bash_completion, build_parser, main, settings_from_args
from app.config import Settings
from app.render import Renderer, endpoint, human_bytes, human_duration_ms, zone_label
from tests.test_serve import bpf_prog_ids

REPO = Path(__file__).resolve().parents[1]
CONN_TRACER = Path(sys.prefix) / "bin" / "conn-tracer"
OUR_PROGRAMS = {"ct_state", "ct_data_ready", "ct_send", "ct_recv"}


def parse(*argv: str) -> Settings:
    return settings_from_args(build_parser().parse_args(argv))


# --- flags --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "want"), [
    (["trace", "--family", "4"], 4),
    (["trace", "--family", "ipv6"], 6),
    (["trace", "--family", "IPv4"], 4),
    (["trace", "-4"], 4),
    (["trace", "-6"], 6),
    (["serve", "--family", "6"], 6),
    (["serve", "--family", "ipv4"], 4),
    (["trace"], None),
])
def test_family_has_one_spelling_everywhere(argv: list[str], want: int | None) -> None:
    assert parse(*argv).filter_family == want


@pytest.mark.parametrize(("argv", "port", "pid"), [
    (["trace", "-P", "443", "-p", "12"], 443, 12),
    (["trace", "--port", "80", "--pid", "7"], 80, 7),
    (["trace", "-L", "8080"], 8080, 0),          # the kernel's either-end filter narrows to the local port
    (["trace", "-D", "53"], 53, 0),
    (["trace", "-P", "22", "-D", "53"], 22, 0),   # an explicit -P is what the kernel filters on
    (["serve", "--filter-port", "9", "--pid", "3"], 9, 3),
])
def test_kernel_filters_from_short_and_long_flags(argv: list[str], port: int, pid: int) -> None:
    s = parse(*argv)
    assert (s.filter_port, s.filter_pid) == (port, pid)


@pytest.mark.parametrize(("argv", "message"), [
    (["trace", "--family", "5"], "family must be 4, 6, ipv4 or ipv6, got '5'"),
    (["trace", "-P", "70000"], "port must be 1-65535, got 70000"),
    (["trace", "-p", "x"], "pid must be a positive number, got 'x'"),
    (["trace", "-4", "-6"], "not allowed with argument"),
    (["observe", "-o", "xml"], "invalid choice: 'xml'"),
])
def test_bad_flags_exit_2_naming_the_value(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_version_comes_from_package_metadata() -> None:
    out = subprocess.run([str(CONN_TRACER), "--version"], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0
    assert out.stdout.strip() == f"conn-tracer {__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", __version__)


# --- config file --------------------------------------------------------------------------------

def test_flags_beat_env_beat_file_beat_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("port = 9001\nreplay_events = 5\nmax_sockets = 128\n")
    monkeypatch.setenv("CONN_TRACER_REPLAY_EVENTS", "7")
    monkeypatch.setenv("CONN_TRACER_CONFIG", str(cfg))
    s = parse("serve", "--port", "9002")
    assert (s.port, s.replay_events, s.max_sockets, s.ringbuf_pages) == (9002, 7, 128, 4096)
    s = parse("serve")
    assert s.port == 9001
    other = tmp_path / "d.toml"
    other.write_text("port = 9003\n")
    assert parse("serve", "--config", str(other)).port == 9003   # --config beats $CONN_TRACER_CONFIG
    assert Settings().port == 8000   # a bare Settings() reads no file


@pytest.mark.parametrize(("text", "message"), [
    (None, "config file {path} not found"),
    ("bogus = 1\n", "invalid setting bogus: Extra inputs are not permitted"),
    ("port = \n", "config file {path} is not valid TOML"),
    ("port = 'x'\n", "invalid setting port:"),
])
def test_bad_config_file_is_one_line_exit_2(tmp_path: Path, text: str | None, message: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    if text is not None:
        path.write_text(text)
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert message.format(path=path) in err


# --- rendering ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "want"), [
    (0, "0B"), (1023, "1023B"), (1024, "1.0KiB"), (1536, "1.5KiB"), (200 * 1024, "200KiB"),
    (5 * 1024 * 1024 + 1, "5.0MiB"), (3 * 1024**3, "3.0GiB"), (None, "-"),
])
def test_human_bytes(n: int | None, want: str) -> None:
    assert human_bytes(n) == want


@pytest.mark.parametrize(("ms", "want"), [
    (0.42, "0.42ms"), (153.2, "153ms"), (12_300, "12.3s"), (302_000, "5m02s"), (11_040_000, "3h04m"), (None, "-"),
])
def test_human_duration(ms: float | None, want: str) -> None:
    assert human_duration_ms(ms) == want


@pytest.mark.parametrize(("addr", "port", "want"), [
    ("10.0.0.1", 80, "10.0.0.1:80"), ("::1", 43332, "[::1]:43332"), ("fe80::1:2", 22, "[fe80::1:2]:22"),
])
def test_ipv6_endpoints_are_bracketed(addr: str, port: int, want: str) -> None:
    assert endpoint(addr, port) == want


@pytest.mark.parametrize(("offset", "want"), [
    (0, "UTC"), (3600, "UTC+01"), (-12600, "UTC-03:30"), (19800, "UTC+05:30"),
])
def test_zone_label(offset: int, want: str) -> None:
    assert zone_label(offset) == want


def _event(**kw: object) -> dict[str, object]:
    ev: dict[str, object] = {
        "seq": 1, "type": "syn_sent", "ts": "2026-11-30T10:00:00.250000Z", "conn_id": "c1", "family": "ipv4",
        "role": "client", "state": "SYN_SENT", "src_addr": "127.0.0.1", "src_port": 40000, "dst_addr": "127.0.0.1",
        "dst_port": 80, "pid": 42, "comm": "curl", "bytes_sent": 0, "bytes_received": 0,
    }
    ev.update(kw)
    return ev


def test_table_has_header_fixed_columns_duration_and_dashes() -> None:
    r = Renderer(time_mode="utc", wide=True)
    v6 = "2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff"
    lines = [
        r.header(),
        r.line(_event()),
        r.line(_event(type="close", ts="2026-11-30T10:00:01.750000Z", state="CLOSE", bytes_sent=2 * 1024 * 1024,
                      bytes_received=532, srtt_us=1250, retrans_segs=0, close_reason="normal", connect_us=75,
                      host="web-1")),
        r.line(_event(family="ipv6", src_addr=v6, dst_addr="::1", pid=None, comm=None, conn_id="c2")),
    ]
    assert lines[0] is not None and lines[0].startswith("TIME(UTC)")
    for col in ("EVENT", "PID", "COMM", "LOCAL", "REMOTE", "STATE", "TX", "RX", "DUR", "RTT_ms", "RETR", "REASON"):
        assert col in lines[0]
    # Every column starts at the same offset on every line, whatever the address length (-w).
    starts = [m.start() for m in re.finditer(r"(?<= )\S", str(lines[0]))]
    remote = str(lines[0]).index("REMOTE")
    for line in lines[1:]:
        assert line is not None
        assert line[remote - 1] == " " and line[remote] != " ", line
    close = str(lines[2])
    assert "10:00:01.750" in close and "2.0MiB" in close and "532B" in close and "1.5s" in close
    assert "1.25" in close and "normal" in close and "0.07" in close and "web-1" in close
    assert f"[{v6}]:40000" in str(lines[3])
    assert re.search(r"\s-\s", str(lines[3]))   # no pid: a dash, not "None"
    assert len(starts) > 10


def test_local_time_header_names_the_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    try:
        r = Renderer()
        assert str(r.header()).startswith("TIME(UTC+05:30)")
        assert r.line(_event()).startswith("15:30:00.250")
        assert Renderer(time_mode="clock").line(_event()).startswith("15:30:00 ")
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_csv_and_json_keep_exact_values() -> None:
    ev = _event(type="close", bytes_sent=123456789, close_reason=None)
    rows = list(csv.DictReader(io.StringIO("\n".join([str(Renderer(output="csv").header()),
                                                      Renderer(output="csv").line(ev)]))))
    assert rows[0]["bytes_sent"] == "123456789" and rows[0]["src_addr"] == "127.0.0.1" and rows[0]["close_reason"] == ""
    assert json.loads(Renderer(output="json").line(ev)) == ev
    assert Renderer(output="json").header() is None


# --- completion ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("words", "want"), [
    (["conn-tracer", "obs"], {"observe"}),
    (["conn-tracer", "trace", "--fam"], {"--family"}),
    (["conn-tracer", "trace", "--family", ""], {"4", "6", "ipv4", "ipv6"}),
    (["conn-tracer", "observe", "-o", ""], {"table", "json", "csv"}),
    (["conn-tracer", "completion", ""], {"bash", "-h", "--help"}),
])
def test_bash_completion(words: list[str], want: set[str]) -> None:
    script = bash_completion(build_parser())
    line = " ".join(f"'{w}'" for w in words)
    call = f'COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _conn_tracer; printf "%s\\n" "${{COMPREPLY[@]}}"'
    prog = f"{script}\n{call}"
    out = subprocess.run(["bash", "--norc", "-c", prog], capture_output=True, text=True, timeout=10, check=True)
    assert set(out.stdout.split()) == want


def test_completion_command_prints_the_script() -> None:
    out = subprocess.run([str(CONN_TRACER), "completion", "bash"], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0 and "complete -F _conn_tracer conn-tracer" in out.stdout


# --- real BPF: pipes and signals ----------------------------------------------------------------

def _wait_for_tracing(proc: subprocess.Popen[bytes], deadline: float) -> None:
    """Reads trace's stderr until it says it is attached."""
    assert proc.stderr is not None
    buf = b""
    while b"tracing (" not in buf:
        left = deadline - time.monotonic()
        assert left > 0 and proc.poll() is None, f"trace did not start: {buf.decode()}"
        ready, _, _ = select.select([proc.stderr], [], [], left)
        if ready:
            buf += os.read(proc.stderr.fileno(), 4096)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(16)
        yield ls


def _connect_to(ls: socket.socket) -> None:
    with socket.create_connection(ls.getsockname()) as c:
        s, _ = ls.accept()
        c.sendall(b"x" * 100)
        s.recv(100)
        s.close()


@pytest.mark.bpf
def test_trace_json_into_head_exits_0_quickly_without_traceback(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    # trace | head -2 as a shell runs it: head exits after two lines and closes the pipe.
    cmd = f"'{CONN_TRACER}' trace --json -P {port} | head -2"
    proc = subprocess.Popen(["bash", "-o", "pipefail", "-c", cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_tracing(proc, time.monotonic() + 30)
        _connect_to(listener)   # 6 events; head takes 2
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    assert time.monotonic() - t0 < 5
    lines = out.decode().splitlines()
    assert len(lines) == 2
    assert all(port in (e["src_port"], e["dst_port"]) for e in map(json.loads, lines))
    assert b"Traceback" not in err and b"BrokenPipe" not in err and b"Exception ignored" not in err
    assert b"stopped by closed output" in err


@pytest.mark.bpf
def test_trace_sigterm_right_after_traffic_prints_it_all_and_counts(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    proc = subprocess.Popen([str(CONN_TRACER), "trace", "-s", "-P", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_tracing(proc, time.monotonic() + 30)
        for _ in range(3):
            _connect_to(listener)
        # No waiting for the output: what the kernel wrote before the signal is printed (read now, or
        # by the drain on stop), and the summary's counts add up.
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    rows = list(csv.DictReader(io.StringIO(out.decode())))
    closes = sorted((r["role"], r["src_port"] if r["role"] == "server" else r["dst_port"])
                    for r in rows if r["type"] == "close")
    assert closes == [("client", str(port))] * 3 + [("server", str(port))] * 3
    assert sum(r["type"] == "syn_sent" for r in rows) == 3 and sum(r["type"] == "syn_recv" for r in rows) == 3
    m = re.search(rb"stopped by SIGTERM: (\d+) events, (\d+) printed, 0 filtered out \(-L/-D\), (\d+) lost in kernel, "
                  rb"(\d+) unprinted, 0 undecodable", err)
    assert m, err.decode()
    assert int(m.group(1)) == int(m.group(2)) == len(rows) and m.group(3) == m.group(4) == b"0"


@pytest.mark.bpf
def test_trace_local_and_remote_port_filters_run_in_user_space(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    proc = subprocess.Popen([str(CONN_TRACER), "trace", "--json", "-L", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_tracing(proc, time.monotonic() + 30)
        _connect_to(listener)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [json.loads(line) for line in out.decode().splitlines()]
    # Only the server end has the port locally; the client end's events were dropped here.
    assert events and {(e["role"], e["src_port"]) for e in events} == {("server", port)}
    assert re.search(rb", [1-9]\d* filtered out", err), err.decode()


# --- a taken port -------------------------------------------------------------------------------

def test_serve_on_a_taken_port_exits_1_in_one_line_before_loading_bpf() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.Popen([str(CONN_TRACER), "serve", "--port", str(port)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        held: set[int] = set()
        deadline = time.monotonic() + 20
        # Watch the process's own fds for a BPF program for as long as it lives (other tests on this
        # host load programs of the same names, so a host-wide count would not say whose they are).
        while proc.poll() is None and time.monotonic() < deadline:
            held |= bpf_prog_ids(proc.pid)
            time.sleep(0.005)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 1
    assert held == set()
    lines = err.decode().splitlines()
    assert lines == [f"conn-tracer: port {port} on 127.0.0.1 is already in use (another conn-tracer serve?); "
                     f"stop that process or choose another port with --port N (CONN_TRACER_PORT)"]
    assert out == b""


# As root, load what the command needs, then become nobody and run it: the checkout may sit in a
# directory other users cannot read (mktemp -d), which would fail for another reason.
AS_NOBODY = """
import os, sys
import app.api.server, app.bpf.loader, app.cli, app.service
os.setgroups([]); os.setgid(65534); os.setuid(65534)
sys.exit(app.cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", [["check"], ["serve", "--port", "0"], ["trace"]])
def test_non_root_gets_one_line_naming_root_and_exit_1(command: list[str]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    r = subprocess.run([sys.executable, "-c", AS_NOBODY, *command], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "root" in lines[0] and "fix: run as root" in lines[0], r.stderr
