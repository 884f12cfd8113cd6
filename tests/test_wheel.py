"""Packaging: the wheel installs into a fresh venv and serves; the systemd unit and example config are what they say."""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.config import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "scripts" / "conn-tracer.service"
EXAMPLE_CONFIG = REPO / "scripts" / "config.example.toml"


def _source_copy(dest: Path) -> Path:
    """The files git would ship (tracked and new, not ignored): no build/ or .so left over from this tree."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True, timeout=30).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO / name.decode()
        if src.is_file():
            target = dest / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = _source_copy(tmp / "src")
    # CC pointing nowhere: the build must go on without a C compiler (the C helper is optional).
    env = {**os.environ, "CC": str(tmp / "no-such-cc")}
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    (whl,) = (tmp / "dist").glob("conn_tracer-*.whl")
    return whl


def test_wheel_holds_every_package_and_the_dashboard(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for init in (REPO / "app").rglob("__init__.py"):
        assert f"{init.relative_to(REPO)}" in names
    for f in (REPO / "web").rglob("*"):
        if f.is_file():
            assert f"app/web/{f.relative_to(REPO / 'web')}" in names
    assert "app/bpf/tracer.c" in names
    assert not any(n.endswith(".so") for n in names)   # built without a compiler: pure Python


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv as the README makes one (Debian's bcc from the system site), with the wheel installed."""
    root = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(root)], check=True, timeout=60)
    out = subprocess.run([str(root / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel)],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    return root


def test_installed_version(venv: Path) -> None:
    out = subprocess.run([str(venv / "bin" / "conn-tracer"), "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("conn-tracer 0."), out.stderr


@pytest.fixture
def installed_serve(venv: Path, tmp_path: Path) -> Iterator[str]:
    log = tmp_path / "serve.log"
    # cwd outside the repository, so nothing can be imported from the source tree.
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(venv / "bin" / "conn-tracer"), "serve", "--port", "0"], cwd=tmp_path,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        url = ""
        while not url:
            text = log.read_text()
            assert proc.poll() is None, f"serve from the wheel exited {proc.returncode}: {text}"
            assert time.monotonic() < deadline, f"serve from the wheel did not start: {text}"
            for line in text.splitlines():
                if line.startswith("conn-tracer serving on "):
                    url = line.split()[3].rstrip("/")
            time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(20) == 0, log.read_text()
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise


@pytest.mark.bpf
def test_serve_from_the_installed_wheel_answers_healthz_and_the_dashboard(installed_serve: str, venv: Path) -> None:
    with urllib.request.urlopen(f"{installed_serve}/healthz", timeout=10) as resp:
        assert resp.status == 200
    with urllib.request.urlopen(f"{installed_serve}/", timeout=10) as resp:
        page = resp.read().decode()
    assert page == (REPO / "web" / "index.html").read_text()   # the dashboard, not the placeholder
    with urllib.request.urlopen(f"{installed_serve}/static/app.js", timeout=10) as resp:
        assert resp.read() == (REPO / "web" / "app.js").read_bytes()
    # It ran from the venv's own copy.
    out = subprocess.run([str(venv / "bin" / "python"), "-c", "import app, sys; print(app.__file__)"],
                         capture_output=True, text=True, cwd="/", timeout=30)
    assert out.stdout.startswith(str(venv)), out.stdout


# --- systemd unit and example config, checked by reading them -----------------------------------

def test_systemd_unit() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]   # systemd keys are case-sensitive
    unit.read(UNIT)
    svc = unit["Service"]
    assert svc["Type"] == "exec"
    exec_start = svc["ExecStart"].split()
    assert exec_start[0].endswith("/bin/conn-tracer") and exec_start[1] == "serve"
    assert exec_start[exec_start.index("--config") + 1] == "/etc/conn-tracer/config.toml"
    assert svc["KillSignal"] == "SIGTERM"
    assert int(svc["TimeoutStopSec"]) > 5   # serve's own graceful shutdown is 5 s
    caps = {"CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_SYS_RESOURCE", "CAP_DAC_READ_SEARCH",
            "CAP_SYS_PTRACE"}
    assert set(svc["CapabilityBoundingSet"].split()) == caps
    assert set(svc["AmbientCapabilities"].split()) <= caps
    assert svc["RestartPreventExitStatus"] == "2"   # a bad setting: restarting cannot help
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    # Every flag in ExecStart is one `serve` accepts.
    from app.cli import build_parser

    build_parser().parse_args(exec_start[1:])


def test_example_config_keys_are_settings_and_it_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONN_TRACER_PIN", raising=False)   # conftest's; the environment would win over the file
    data = tomllib.loads(EXAMPLE_CONFIG.read_text())
    assert data and set(data) <= set(Settings.model_fields)
    loaded = load_settings(EXAMPLE_CONFIG)
    for key, value in data.items():
        assert getattr(loaded, key) == value
    # It lists the defaults, so installing it as is changes nothing.
    defaults = Settings()
    assert {k: getattr(defaults, k) for k in data} == data
