"""Small predicates, one per query dimension, built once and combined.

Predicates test internal event records (app/bpf/event.py): the names a user gives
(`ipv6`, `server`, `close`) are turned into the record's numbers once, when the
filter is built, so the test per event is an integer compare. The same filter
serves the table (the connection's latest record) and the hub (each event).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from app.bpf.event import (
    DPORT,
    EVENT_TYPE_NUMBERS,
    FAMILY,
    FAMILY_NUMBERS,
    PID,
    RECORD_FIELDS,
    ROLE,
    ROLE_NUMBERS,
    SPORT,
    TYPE,
    EventRecord,
)
from app.models import EVENT_TYPES

Predicate = Callable[[EventRecord], bool]

# Records of a fleet view (app/fleet.py) carry the host name after the kernel's fields; an
# agent's records have one host, which its service checks before any record (Core.predicate).
FLEET_HOST = len(RECORD_FIELDS)

FAMILIES = ("ipv4", "ipv6")
# The CLI's `--family 4|6` spelling, accepted everywhere a family is.
FAMILY_ALIASES = {"4": "ipv4", "6": "ipv6"}
ROLES = ("client", "server")
STATES = ("open", "closed", "all")


class FilterError(ValueError):
    """A bad filter value; `param` names the query parameter."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"invalid {param}: {message}")
        self.param = param


def port_is(port: int) -> Predicate:
    return lambda r: r[SPORT] == port or r[DPORT] == port


def pid_is(pid: int) -> Predicate:
    return lambda r: r[PID] == pid


def family_is(family: str) -> Predicate:
    n = FAMILY_NUMBERS[family]
    return lambda r: r[FAMILY] == n


def role_is(role: str) -> Predicate:
    n = ROLE_NUMBERS[role]
    return lambda r: r[ROLE] == n


def host_is(host: str) -> Predicate:
    return lambda r: len(r) > FLEET_HOST and r[FLEET_HOST] == host


def type_in(types: Iterable[str]) -> Predicate:
    wanted = frozenset(EVENT_TYPE_NUMBERS[t] for t in types)
    return lambda r: r[TYPE] in wanted


def combine(preds: list[Predicate]) -> Predicate | None:
    """None means "everything matches", which callers skip cheaply."""
    if not preds:
        return None
    if len(preds) == 1:
        return preds[0]
    ps = tuple(preds)
    return lambda r: all(p(r) for p in ps)


@dataclass(frozen=True)
class Filter:
    """Filter values, already validated; `predicate()` builds the combined test once."""

    port: int | None = None
    pid: int | None = None
    family: str | None = None
    role: str | None = None
    types: frozenset[str] | None = None
    host: str | None = None

    def predicate(self) -> Predicate | None:
        preds: list[Predicate] = []
        if self.host is not None:
            preds.append(host_is(self.host))
        if self.port is not None:
            preds.append(port_is(self.port))
        if self.pid is not None:
            preds.append(pid_is(self.pid))
        if self.family is not None:
            preds.append(family_is(self.family))
        if self.role is not None:
            preds.append(role_is(self.role))
        if self.types is not None:
            preds.append(type_in(self.types))
        return combine(preds)


def plain_int(raw: str) -> int:
    """ASCII digits only: int() would also take "1_000", "+80", " 80" and non-ASCII digits. Raises ValueError."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 30:
        raise ValueError(f"{raw!r} is not a plain decimal integer")
    return int(raw)


def _int(param: str, raw: str, lo: int, hi: int) -> int:
    try:
        n = plain_int(raw)
    except ValueError as exc:
        raise FilterError(param, str(exc)) from None
    if not lo <= n <= hi:
        raise FilterError(param, f"{n} is not in {lo}..{hi}")
    return n


def _choice(param: str, raw: str, choices: tuple[str, ...]) -> str:
    if raw not in choices:
        raise FilterError(param, f"{raw!r} is not one of {', '.join(choices)}")
    return raw


def parse_batch(params: dict[str, str]) -> int:
    """`batch=N` (WebSocket): up to N events per message as a JSON array; 0 or absent: one per message."""
    return _int("batch", params.pop("batch"), 0, 65536) if "batch" in params else 0


def parse_filter(params: dict[str, str]) -> tuple[Filter, int | None]:
    """Validates raw query parameters (WebSocket); returns the filter and `after`. Raises FilterError."""
    known = {"port", "pid", "family", "role", "type", "after", "host"}
    for k in params:
        if k not in known:
            raise FilterError(k, f"unknown parameter; expected one of {', '.join(sorted(known))}")
    port = _int("port", params["port"], 1, 65535) if "port" in params else None
    pid = _int("pid", params["pid"], 1, 2**31 - 1) if "pid" in params else None
    family = None
    if "family" in params:
        family = _choice("family", FAMILY_ALIASES.get(params["family"], params["family"]), FAMILIES)
    role = _choice("role", params["role"], ROLES) if "role" in params else None
    types = None
    if "type" in params:
        parts = [t.strip() for t in params["type"].split(",") if t.strip()]
        if not parts:
            raise FilterError("type", "empty list")
        for t in parts:
            _choice("type", t, EVENT_TYPES)
        types = frozenset(parts)
    after = _int("after", params["after"], 0, 2**63 - 1) if "after" in params else None
    host = _host(params["host"]) if "host" in params else None
    return Filter(port, pid, family, role, types, host), after


def _host(raw: str) -> str:
    if not 1 <= len(raw) <= 253:
        raise FilterError("host", f"{raw!r} is not a host name (1 to 253 characters)")
    return raw
