"""Every setting, with its default, in one place: flags > CONN_TRACER_* env vars > config file > defaults."""

from __future__ import annotations

import os
import socket
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

CONFIG_ENV = "CONN_TRACER_CONFIG"
DEFAULT_CONFIG = Path("/etc/conn-tracer/config.toml")

# The TOML file the next Settings() reads, set only by load_settings(): a bare Settings()
# (tests, library use) never picks up a file that happens to be on the host.
_config_file: ContextVar[Path | None] = ContextVar("conn_tracer_config_file", default=None)


class ConfigError(ValueError):
    """The config file is missing or unreadable; the message names it."""


class Settings(BaseSettings):
    """Start-up settings; each bound's unit or limit is in its name."""

    model_config = SettingsConfigDict(env_prefix="CONN_TRACER_", extra="forbid")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Earlier sources win: flags (init) > environment > config file > field defaults.
        path = _config_file.get()
        if path is None:
            return init_settings, env_settings
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=path)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    # In-kernel filters (0 / None = off).
    filter_port: int = Field(0, ge=0, le=65535)
    filter_pid: int = Field(0, ge=0, le=4_194_304)   # the kernel's largest pid_max
    filter_family: Literal[4, 6] | None = None
    # A network namespace: its inode number, or a path to it (/proc/PID/ns/net, /run/netns/NAME).
    filter_netns: str | None = None

    @field_validator("filter_netns")
    @classmethod
    def _netns_exists(cls, v: str | None) -> str | None:
        if v and not v.isdigit() and not os.path.exists(v):
            raise ValueError(f"no network namespace at {v} (give an inode number or a path such as /run/netns/NAME)")
        return v

    # This agent's name on every event and connection (fleet views tell hosts apart by it).
    host_name: str = Field(default_factory=socket.gethostname, min_length=1, max_length=253)

    # Kernel side.
    data_queue_interval_ms: float = Field(100.0, ge=0, le=60_000)
    # auto: kprobe on tcp_data_queue where kprobes work, else the sk_data_ready tracepoint.
    data_queue_hook: Literal["auto", "kprobe", "tracepoint"] = "auto"
    state_events: bool = False
    # 16 MiB: at this machine's max churn it holds ~2 s of events for a reader that falls behind.
    # Upper bounds here: a huge value used to overflow in the kernel build and fail with a misleading message.
    ringbuf_pages: int = Field(4096, ge=1, le=262_144, description="ring buffer pages; a power of two (<= 1 GiB)")
    max_sockets: int = Field(65536, ge=16, le=16_777_216, description="LRU map of tracked sockets")
    btf_path: Path = Path("/sys/kernel/btf/vmlinux")
    tracefs_path: Path = Path("/sys/kernel/tracing")
    debugfs_path: Path = Path("/sys/kernel/debug")

    # Restart continuity: the socket map and id counter pinned under /sys/fs/bpf/conn-tracer/<instance>/.
    pin: bool = True
    # None: "default", and if another running agent holds it this one runs unpinned (with a warning)
    # rather than not at all; a name given explicitly must be free.
    instance: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")

    # User side bounds.
    max_closed_connections: int = Field(10_000, ge=0, le=10_000_000)
    replay_events: int = Field(100_000, ge=1, le=50_000_000)
    # How far a subscriber may fall behind before it loses its oldest events. A subscriber is a
    # cursor into the replay buffer, so this costs no memory of its own; capped at replay_events.
    subscriber_queue_events: int = Field(100_000, ge=1, le=50_000_000)
    max_open_connections: int = Field(262_144, ge=1, le=16_777_216,
                                      description="bounds the table if close events are lost")

    # Connections open before start-up, from sock_diag (every network namespace).
    preexisting: bool = True
    # How often the table is compared with the kernel's sockets (sock_diag, every namespace): it ends
    # connections whose close was lost (absent from two sweeps in a row), corrects states (e.g.
    # CLOSE_WAIT, which emits no event) and refreshes preexisting ones. 0 = never.
    sweep_interval_s: float = Field(2.0, ge=0, le=3600)

    # Reading the ring buffer. The kernel wakes the reader for the first record after
    # wakeup_interval_us without a wake-up (wakeup_busy_interval_us while many records flow),
    # or once wakeup_batch_records wait; while records flow, the reader also drains every
    # drain_interval_ms (the latency bound for stragglers).
    wakeup_interval_us: int = Field(1000, ge=0, le=1_000_000)
    wakeup_busy_interval_us: int = Field(4000, ge=0, le=1_000_000)
    wakeup_batch_records: int = Field(1024, ge=1, le=1_000_000)
    drain_interval_ms: float = Field(10.0, gt=0, le=1000)
    read_batch_records: int = Field(1024, ge=1, le=1_000_000, description="records handled per loop turn")

    # Per-second counters kept for GET /history (and the dashboard's chart after a reload).
    history_seconds: int = Field(3600, ge=60, le=7 * 86400)

    # The dashboard's static files; None = the web/ folder next to the app package.
    web_dir: Path | None = None

    # Access (README "Security and reliability"). A token is required whenever `host` is not loopback.
    token: SecretStr | None = Field(None, description="bearer token (CONN_TRACER_TOKEN); token_file wins if both")
    token_file: Path | None = Field(None, description="file holding the bearer token")
    insecure_no_token: bool = Field(False, description="serve a non-loopback address without a token")
    # Host names (beyond the bind address and localhost) and origins (beyond the page's own) accepted;
    # "*" accepts any. Defeat DNS rebinding and cross-site WebSocket reads.
    allowed_hosts: list[str] = Field(default_factory=list)
    allowed_origins: list[str] = Field(default_factory=list)
    tls_cert: Path | None = None
    tls_key: Path | None = None

    # WebSocket robustness: concurrent subscribers (more are closed with 1013), and keepalive pings
    # (a client that does not answer within the timeout is closed; 0 = no pings).
    max_subscribers: int = Field(64, ge=1, le=100_000)
    # Connections the kernel queues for us until we accept them (uvicorn's default).
    listen_backlog: int = Field(2048, ge=1, le=65_535)
    ws_ping_interval_s: float = Field(20.0, ge=0, le=3600)
    ws_ping_timeout_s: float = Field(20.0, gt=0, le=3600)

    @field_validator("ringbuf_pages")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"must be a power of two, got {v}")
        return v

    # Export to NATS JetStream (serve --nats) and the fleet view that reads it (conn-tracer fleet).
    nats_url: str | None = Field(None, description="nats://HOST:4222 (comma-separated for a cluster); None = off")
    nats_subject_prefix: str = Field("conntracer", pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$",
                                     description="subjects are <prefix>.<host>.events")
    nats_stream: str = Field("CONNTRACER", pattern=r"^[A-Za-z0-9_-]+$", description="created if missing")
    nats_creds_file: Path | None = Field(None, description="NATS user credentials (.creds: JWT and NKey seed)")
    nats_tls_ca: Path | None = None
    nats_tls_cert: Path | None = None
    nats_tls_key: Path | None = None
    # Bounds of the stream, applied when it is created (file storage): whichever is reached first.
    nats_stream_max_age_s: float = Field(86_400.0, gt=0)
    nats_stream_max_bytes: int = Field(1 << 30, ge=1 << 20)
    # Events waiting for JetStream's acknowledgement (NATS slow or away); beyond it new events are
    # dropped and counted (loss source "export").
    nats_buffer_events: int = Field(100_000, ge=1)
    nats_batch_events: int = Field(1000, ge=1, le=100_000, description="events per message at most")
    nats_ack_timeout_s: float = Field(2.0, gt=0, le=60)
    # The fleet view's consumer of the stream (one fleet view per name).
    fleet_durable: str = Field("conntracer-fleet", pattern=r"^[A-Za-z0-9_-]+$")

    def filter_netns_inode(self) -> int:
        """filter_netns as an inode number (0 = no filter); a path is resolved now."""
        v = self.filter_netns
        if not v:
            return 0
        if v.isdigit():
            return int(v)
        try:
            return os.stat(v).st_ino
        except OSError as exc:
            raise ValueError(f"filter_netns {v}: {exc.strerror}") from exc



def config_path(explicit: Path | None = None) -> Path | None:
    """The config file to read: --config, else $CONN_TRACER_CONFIG, else /etc/conn-tracer/config.toml if it exists."""
    if explicit is not None:
        return explicit
    if env := os.environ.get(CONFIG_ENV):
        return Path(env)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Settings from flags (`overrides`), the environment and the config file; raises ConfigError, ValidationError."""
    path = config_path(config)
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} not found; fix the path (--config or ${CONFIG_ENV})")
    token = _config_file.set(path)
    try:
        return Settings(**overrides)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    finally:
        _config_file.reset(token)
