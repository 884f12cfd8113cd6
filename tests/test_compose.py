"""docker-compose.yml, Dockerfile and .dockerignore, checked by reading them (no Docker here)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVICE = "conn-tracer"

# Service keys of the Compose spec this file may use; a typo (e.g. `network-mode`) is silently
# ignored by some Compose versions, so catch it here.
KNOWN_SERVICE_KEYS = {
    "build", "image", "privileged", "pid", "network_mode", "command", "entrypoint", "environment",
    "volumes", "ulimits", "restart", "stop_signal", "stop_grace_period", "healthcheck", "cap_add",
    "security_opt", "labels", "logging", "container_name", "init",
}  # fmt: skip

_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Resolve Compose's ${VAR} / ${VAR:-default} the way `docker compose` does for these forms."""

    def one(m: re.Match[str]) -> str:
        got = env.get(m["name"], "")
        return got if got else (m["default"] or "")

    return _VAR.sub(one, value)


@pytest.fixture(scope="module")
def service() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert list(doc["services"]) == [SERVICE], "exactly one service"
    svc: dict[str, Any] = doc["services"][SERVICE]
    return svc


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuations joined, heredoc bodies skipped."""
    out: list[tuple[str, str]] = []
    lines = iter(text.splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\"):
            nxt = next(lines)
            if not nxt.lstrip().startswith("#"):
                line = line[:-1] + " " + nxt.strip()
        op, _, args = line.strip().partition(" ")
        out.append((op.upper(), args.strip()))
        if m := re.search(r"<<-?'?\"?(\w+)", args):
            for body in lines:
                if body.strip() == m[1]:
                    break
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


def instructions(dockerfile: list[tuple[str, str]], op: str) -> list[str]:
    return [args for name, args in dockerfile if name == op]


def healthcheck_code(cmd: list[str]) -> str:
    """The Python source of a `["CMD", "python", "-c", CODE]` healthcheck."""
    assert cmd[:3] == ["CMD", "python", "-c"], cmd
    return cmd[3]


# --- docker-compose.yml ------------------------------------------------------------------------


def test_service_keys_are_known(service: dict[str, Any]) -> None:
    assert set(service) <= KNOWN_SERVICE_KEYS, set(service) - KNOWN_SERVICE_KEYS


@pytest.mark.parametrize(
    ("key", "want"),
    [
        ("privileged", True),
        ("pid", "host"),
        ("network_mode", "host"),
        ("restart", "unless-stopped"),
        ("stop_signal", "SIGTERM"),
        ("stop_grace_period", "10s"),
    ],
)
def test_service_setting(service: dict[str, Any], key: str, want: object) -> None:
    assert service[key] == want


def test_builds_from_this_directory(service: dict[str, Any]) -> None:
    build = service["build"]
    context = build if isinstance(build, str) else build["context"]
    assert context == "."
    if isinstance(build, dict):
        assert interpolate(str(build["args"]["WITH_GENERIC_HEADERS"]), {}) == "0"


def test_no_published_ports_with_host_network(service: dict[str, Any]) -> None:
    # With network_mode: host, `ports:` is ignored; the bind address alone decides exposure.
    assert "ports" not in service


# (host path, container path, mode): mode is what the mount must say; no mode means rw.
MOUNTS = [
    ("/sys/kernel/debug", "/sys/kernel/debug", "rw"),
    ("/sys/kernel/tracing", "/sys/kernel/tracing", "rw"),
    ("/sys/fs/bpf", "/sys/fs/bpf", "rw"),
    ("/sys/kernel/btf", "/sys/kernel/btf", "ro"),
    ("/lib/modules", "/lib/modules", "ro"),
    ("/usr/src", "/usr/src", "ro"),
]


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """container path -> (host path, mode), from short-syntax volume strings."""
    out: dict[str, tuple[str, str]] = {}
    for spec in service["volumes"]:
        assert isinstance(spec, str), f"use the short syntax: {spec!r}"
        src, dst, *opts = spec.split(":")
        modes = {o for opt in opts for o in opt.split(",")} & {"ro", "rw"}
        assert len(modes) <= 1, spec
        out[dst] = (src, modes.pop() if modes else "rw")
    return out


@pytest.mark.parametrize(("src", "dst", "mode"), MOUNTS, ids=[m[1] for m in MOUNTS])
def test_mount(service: dict[str, Any], src: str, dst: str, mode: str) -> None:
    assert mounts(service).get(dst) == (src, mode)


def test_no_unexpected_mounts(service: dict[str, Any]) -> None:
    assert set(mounts(service)) == {dst for _, dst, _ in MOUNTS}


def command(service: dict[str, Any], env: Mapping[str, str]) -> list[str]:
    cmd = service["command"]
    assert isinstance(cmd, list), "exec form, so no shell sits between SIGTERM and the process"
    return [interpolate(str(part), env) for part in cmd]


@pytest.mark.parametrize(
    ("env", "host", "port"),
    [
        ({}, "127.0.0.1", "8000"),  # loopback unless told otherwise
        ({"CONN_TRACER_HOST": ""}, "127.0.0.1", "8000"),  # empty counts as unset (`:-`)
        ({"CONN_TRACER_HOST": "0.0.0.0"}, "0.0.0.0", "8000"),
        ({"CONN_TRACER_PORT": "9100"}, "127.0.0.1", "9100"),
    ],
)
def test_command_binds(service: dict[str, Any], env: dict[str, str], host: str, port: str) -> None:
    cmd = command(service, env)
    assert cmd[:2] == ["conn-tracer", "serve"]
    assert cmd[cmd.index("--host") + 1] == host
    assert cmd[cmd.index("--port") + 1] == port
    environment = {k: interpolate(str(v), env) for k, v in service["environment"].items()}
    assert environment["CONN_TRACER_HOST"] == host, "healthcheck must probe where serve listens"
    assert environment["CONN_TRACER_PORT"] == port


def test_healthcheck_settings(service: dict[str, Any]) -> None:
    hc = service["healthcheck"]
    code = healthcheck_code(hc["test"])
    assert "/healthz" in code
    assert "$" not in code, "compose would substitute it"
    for key in ("interval", "timeout", "start_period", "retries"):
        assert key in hc


# --- Dockerfile --------------------------------------------------------------------------------


def test_dockerfile_base(dockerfile: list[tuple[str, str]]) -> None:
    assert instructions(dockerfile, "FROM") == ["debian:bookworm-slim"]
    assert "WITH_GENERIC_HEADERS=0" in instructions(dockerfile, "ARG")


@pytest.mark.parametrize(
    "package",
    ["python3", "python3-venv", "python3-bpfcc", "libbpfcc", "libbpf1", "bpftool", "iproute2",
     "ca-certificates"],
)  # fmt: skip
def test_dockerfile_installs(dockerfile: list[tuple[str, str]], package: str) -> None:
    apt = " ".join(r for r in instructions(dockerfile, "RUN") if "apt-get install" in r)
    assert re.search(rf"(?<![\w-]){re.escape(package)}(?![\w-])", apt), package


def test_dockerfile_headers_only_on_request(dockerfile: list[tuple[str, str]]) -> None:
    runs = [r for r in instructions(dockerfile, "RUN") if "linux-headers" in r]
    assert len(runs) == 1
    assert re.search(r'if \[ "\$WITH_GENERIC_HEADERS" = "1" \]; then [^;]*linux-headers-amd64', runs[0])


@pytest.mark.parametrize(
    "pattern",
    [
        r"python3 -m venv --system-site-packages /opt/conn-tracer/\.venv",
        r"pip install (--no-cache-dir )?(-e )?\.(\s|$)",
    ],
)
def test_dockerfile_venv(dockerfile: list[tuple[str, str]], pattern: str) -> None:
    assert any(re.search(pattern, r) for r in instructions(dockerfile, "RUN")), pattern


@pytest.mark.parametrize("source", ["pyproject.toml", "app/", "web/"])
def test_dockerfile_copies(dockerfile: list[tuple[str, str]], source: str) -> None:
    assert any(c.split()[0] == source for c in instructions(dockerfile, "COPY")), source


def test_dockerfile_cmd(dockerfile: list[tuple[str, str]]) -> None:
    (cmd,) = instructions(dockerfile, "CMD")
    assert json.loads(cmd) == ["conn-tracer", "serve", "--host", "0.0.0.0", "--port", "8000"]


def dockerfile_healthcheck(dockerfile: list[tuple[str, str]]) -> list[str]:
    (hc,) = instructions(dockerfile, "HEALTHCHECK")
    cmd: list[str] = json.loads(hc[hc.index("CMD ") :].removeprefix("CMD "))
    return ["CMD", *cmd]


def test_dockerfile_healthcheck(dockerfile: list[tuple[str, str]]) -> None:
    code = healthcheck_code(dockerfile_healthcheck(dockerfile))
    assert "/healthz" in code and "curl" not in code


def test_dockerignore_allow_list() -> None:
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", "exclude everything, then allow what the Dockerfile copies"
    assert {"!pyproject.toml", "!app/", "!web/"} <= set(rules)


# --- both healthchecks, run against a stand-in /healthz -----------------------------------------


@pytest.fixture
def healthz() -> Iterator[tuple[int, list[int]]]:
    """A local HTTP server whose /healthz answers the next status in the yielded list."""
    statuses: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = statuses.pop(0) if self.path == "/healthz" else 404
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], statuses
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("source", ["compose", "dockerfile"])
@pytest.mark.parametrize(
    ("bind", "status", "healthy"),
    [
        ("127.0.0.1", 200, True),
        ("127.0.0.1", 503, False),  # tracer not attached
        ("0.0.0.0", 200, True),  # a wildcard bind is probed on loopback
    ],
)
def test_healthcheck_runs(
    healthz: tuple[int, list[int]],
    service: dict[str, Any],
    dockerfile: list[tuple[str, str]],
    source: str,
    bind: str,
    status: int,
    healthy: bool,
) -> None:
    port, statuses = healthz
    statuses.append(status)
    cmd = service["healthcheck"]["test"] if source == "compose" else dockerfile_healthcheck(dockerfile)
    env = {"CONN_TRACER_HOST": bind, "CONN_TRACER_PORT": str(port)}
    proc = subprocess.run(
        [sys.executable, "-c", healthcheck_code(cmd)], env=env, capture_output=True, timeout=30
    )
    assert (proc.returncode == 0) is healthy, proc.stderr.decode()
