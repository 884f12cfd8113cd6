"""Export to NATS JetStream and the fleet view, end to end: a real `nats-server -js`, two agents
(real BPF), each filtered to its own network namespace as if it were its own host, one fleet view."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import ClientConnection

from app.api.app import create_app
from app.bpf.event import CR_REFUSED, EV_CLOSE, RECORD_FIELDS, ROLE_SERVER, ST_CLOSE
from app.config import Settings
from app.export import MAX_MESSAGE_BYTES, Exporter
from app.filters import Filter
from app.fleet import MAX_ACK_PENDING, FleetCore
from app.hub import EventHub
from app.models import EventWriter, Texts
from app.service import Core
from tests.evfactory import TEXTS, ev
from tests.exchange import Exchange, run_exchange
from tests.netns import VethPair
from tests.test_api import TestClient
from tests.test_serve import CONN_TRACER, Service, free_port, read_until, wait_for

NATS_SERVER = "nats-server"
# The workload in one namespace: N connections from a client to a server on `addr`, a bytes one
# way and b the other, one every `pause` seconds (default: at once), in one process (pid printed).
LOOP = r"""
import json, os, socket, sys, threading, time
addr, n, a, b = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
pause = float(sys.argv[5]) if len(sys.argv) > 5 else 0
ls = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
ls.bind((addr, 0))
ls.listen(64)
port = ls.getsockname()[1]
def serve():
    for _ in range(n):
        c, _ = ls.accept()
        got = 0
        while got < a:
            got += len(c.recv(65536))
        c.sendall(b"y" * b)
        c.close()
t = threading.Thread(target=serve)
t.start()
for _ in range(n):
    s = socket.create_connection((addr, port), timeout=10)
    s.sendall(b"x" * a)
    while s.recv(65536):
        pass
    s.close()
    time.sleep(pause)
t.join()
print(json.dumps({"pid": os.getpid(), "port": port}), flush=True)
"""
# One connect that the peer refuses (nothing listens there); prints the local port it had.
REFUSED = r"""
import json, os, socket, sys
s = socket.socket()
s.bind((sys.argv[1], 0))
port = s.getsockname()[1]
try:
    s.connect((sys.argv[2], int(sys.argv[3])))
except ConnectionRefusedError:
    print(json.dumps({"pid": os.getpid(), "port": port}), flush=True)
"""


class Nats:
    """A `nats-server -js` on a free loopback port with a store of its own; killed and restarted at will."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen([NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port),
                                      "-sd", str(self.store)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._ready, 10, "nats-server accepting connections")

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"nats-server exited with {self.proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                return s.recv(4) == b"INFO"
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start(log: Path, *args: str) -> Service:
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(CONN_TRACER), *args, "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT)
    svc = Service(proc, port, log)
    try:
        wait_for(svc.healthy, 30, f"/healthz 200 from {args[0]}", interval=0.1)
    except BaseException:
        svc.stop()
        raise
    return svc


@dataclass
class Fleet:
    nats: Nats
    net: VethPair
    a: Service
    b: Service
    view: Service
    tmp: Path
    durable: str

    def start_view(self) -> Service:
        return start(self.tmp / "fleet.log", "fleet", "--nats", self.nats.url, "--durable", self.durable)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    nats = Nats(tmp / "store")
    nats.start()
    started: list[Service] = []
    try:
        with VethPair() as net:
            # hostB's buffer is small on purpose: the outage test overflows it.
            for name, ns, extra in (("hostA", net.ns_a, []), ("hostB", net.ns_b, ["--nats-buffer-events", "20"])):
                started.append(start(tmp / f"{name}.log", "serve", "--nats", nats.url, "--host-name", name,
                                     "--filter-netns", f"/run/netns/{ns}", "--no-pin", *extra))
            durable = f"test-{os.getpid()}"
            view = start(tmp / "fleet.log", "fleet", "--nats", nats.url, "--durable", durable)
            started.append(view)
            f = Fleet(nats, net, started[0], started[1], view, tmp, durable)
            yield f
            if f.view not in started:
                started.append(f.view)   # the restart test replaced it
    finally:
        for svc in started:
            svc.stop()
        nats.kill()


def netns_inode(ns: str) -> int:
    return os.stat(f"/run/netns/{ns}").st_ino


def run_in(net: VethPair, ns: str, code: str, *args: object) -> dict[str, Any]:
    p = net.run_in(ns, [sys.executable, "-c", code, *map(str, args)], stdin=subprocess.DEVNULL)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0 and out.strip(), err
    return json.loads(out.splitlines()[-1])  # type: ignore[no-any-return]


def ws(svc: Service, query: str = "") -> ClientConnection:
    return svc.ws(query)


def side(c: dict[str, Any]) -> tuple[str, str, int, str, int]:
    return (c["role"], c["src_addr"], c["src_port"], c["dst_addr"], c["dst_port"])


def exported_all(svc: Service) -> bool:
    """Everything this agent's hub published has been acknowledged by JetStream or counted as dropped."""
    s = svc.json("/stats")
    e = s["export"]
    return bool(e["buffered"] == 0 and e["acknowledged"] + e["dropped"] == s["seq"])


def fleet_events(view: Service, host: str) -> list[dict[str, Any]]:
    evs: list[dict[str, Any]] = view.json("/events", host=host, limit=1_000_000)
    assert all(e["host"] == host and e["conn_id"].startswith(f"{host}:") for e in evs)
    return evs


def received_all(view: Service, host: str, agent: Service) -> bool:
    """The fleet view holds this host's last event (so everything before it, in stream order)."""
    s = agent.json("/stats")
    evs = view.json("/events", host=host, limit=1_000_000)
    return bool(evs) and evs[-1]["host_seq"] == s["seq"]


@pytest.mark.bpf
def test_fleet_view_attributes_each_hosts_connections(fleet: Fleet) -> None:
    """IPv4 and IPv6 across the two hosts and a refused connect: right host, tuples, pids, exact bytes."""
    net, view = fleet.net, fleet.view
    with ws(view) as every, ws(view, "host=hostB") as only_b:
        ex4 = run_exchange(net.addr_a4, 1234, 5678, net=net, client_ns=net.ns_b, server_ns=net.ns_a)
        ex6 = run_exchange(net.addr_b6, 2345, 3456, net=net, client_ns=net.ns_a, server_ns=net.ns_b)
        refused = run_in(net, net.ns_a, REFUSED, net.addr_a4, net.addr_b4, 9)

        def on_a(ex: Exchange, role: str) -> tuple[str, str, int, str, int]:
            if role == "server":
                return ("server", ex.server_addr, ex.server_port, ex.client_addr, ex.client_port)
            return ("client", ex.client_addr, ex.client_port, ex.server_addr, ex.server_port)

        want = {
            "hostA": {on_a(ex4, "server"): (ex4.server_pid, 5678, 1234, "normal"),
                      on_a(ex6, "client"): (ex6.client_pid, 2345, 3456, "normal"),
                      ("client", net.addr_a4, refused["port"], net.addr_b4, 9): (refused["pid"], 0, 0, "refused")},
            "hostB": {on_a(ex4, "client"): (ex4.client_pid, 1234, 5678, "normal"),
                      on_a(ex6, "server"): (ex6.server_pid, 3456, 2345, "normal")},
        }

        def closed(host: str) -> dict[tuple[str, str, int, str, int], dict[str, Any]] | None:
            got = {side(c): c for c in view.json("/connections", host=host, state="closed")}
            return got if all(k in got for k in want[host]) else None

        for host, netns in (("hostA", netns_inode(net.ns_a)), ("hostB", netns_inode(net.ns_b))):
            got = wait_for(lambda h=host: closed(h), 20, f"{host}'s connections in the fleet view")
            # Nothing of the other host here: every connection listed for this host is one of its own.
            assert set(got) == set(want[host]), (host, sorted(got))
            for key, (pid, sent, received, reason) in want[host].items():
                c = got[key]
                assert (c["host"], c["pid"], c["bytes_sent"], c["bytes_received"], c["close_reason"], c["netns"]) == \
                    (host, pid, sent, received, reason, netns), c
                assert c["id"].startswith(f"{host}:")
                assert view.json(f"/connections/{c['id']}")["id"] == c["id"]
                timeline = view.json(f"/connections/{c['id']}/events")
                assert timeline[-1]["type"] == "close" and {e["conn_id"] for e in timeline} == {c["id"]}

        for host, agent, ns in (("hostA", fleet.a, net.ns_a), ("hostB", fleet.b, net.ns_b)):
            netns = netns_inode(ns)
            # Open ones too, and the agent's own table (with what it found at start-up): this namespace only.
            assert {c["netns"] for c in view.json("/connections", host=host, limit=100_000)} == {netns}
            assert {c["netns"] for c in agent.json("/connections", limit=100_000)} == {netns}
        ids = {c["id"]: h for h in want for c in view.json("/connections", host=h)}
        evs = read_until(every, lambda k: sum(e["type"] == "close" for e in k) >= 5, 20,
                         keep=lambda e: e.get("conn_id") in ids)
        for e in evs:
            assert e["host"] == ids[e["conn_id"]], e
        assert [e["seq"] for e in evs] == sorted(e["seq"] for e in evs)
        # The stream's close events: the same tuples, owners and exact bytes as the table.
        for e in (e for e in evs if e["type"] == "close"):
            pid, sent, received, reason = want[e["host"]][side(e)]
            assert (e["pid"], e["bytes_sent"], e["bytes_received"], e["close_reason"]) == (pid, sent, received, reason)
        b_evs = read_until(only_b, lambda k: sum(e["type"] == "close" for e in k) >= 2, 20)
        assert {e["host"] for e in b_evs} == {"hostB"}
        assert {e["conn_id"] for e in b_evs} == {i for i, h in ids.items() if h == "hostB"}


@pytest.mark.bpf
def test_nats_outage_buffered_in_order_overflow_counted(fleet: Fleet) -> None:
    """NATS killed during traffic and restarted on the same port and store: what fitted arrives in
    order without duplicates; what did not fit (hostB's buffer of 20) is counted, on both sides."""
    net, view = fleet.net, fleet.view
    acked = fleet.a.json("/stats")["export"]["acknowledged"]
    # Steady traffic in both namespaces (a connection every 10-20 ms for a few seconds), NATS killed in the middle.
    traffic = [net.run_in(net.ns_a, [sys.executable, "-c", LOOP, net.addr_a4, "200", "100", "200", "0.01"]),
               net.run_in(net.ns_b, [sys.executable, "-c", LOOP, net.addr_b6, "100", "300", "400", "0.02"])]
    wait_for(lambda: fleet.a.json("/stats")["export"]["acknowledged"] > acked + 50, 10, "traffic being exported")
    fleet.nats.kill()
    wait_for(lambda: fleet.a.json("/stats")["export"]["buffered"] > 300, 15, "hostA events piling up")
    wait_for(lambda: fleet.b.json("/stats")["export"]["dropped"] > 0, 10, "hostB's export buffer to overflow")
    a = fleet.a.json("/stats")["export"]
    assert a["dropped"] == 0 and not a["connected"], a
    fleet.nats.start()
    for p in traffic:
        assert p.wait(30) == 0
    for agent in (fleet.a, fleet.b):
        wait_for(lambda s=agent: exported_all(s), 20, "the agents' buffers sent")
        assert agent.json("/stats")["export"]["reconnects"] >= 1
    # Traffic after: hostB's gap is then in the middle of its sequence, where the fleet view sees it.
    run_in(net, net.ns_a, LOOP, net.addr_a4, 2, 10, 20)
    run_in(net, net.ns_b, LOOP, net.addr_b4, 2, 10, 20)
    for agent in (fleet.a, fleet.b):
        wait_for(lambda s=agent: exported_all(s), 20, "the agents' new events sent")
    for host, agent in (("hostA", fleet.a), ("hostB", fleet.b)):
        wait_for(lambda h=host, s=agent: received_all(view, h, s), 20, f"{host}'s last event in the fleet view")
    seq_a = fleet.a.json("/stats")["seq"]
    assert [e["host_seq"] for e in fleet_events(view, "hostA")] == list(range(1, seq_a + 1))
    sb = fleet.b.json("/stats")
    dropped = sb["export"]["dropped"]
    got = [e["host_seq"] for e in fleet_events(view, "hostB")]
    assert got == sorted(set(got)) and len(got) == sb["seq"] - dropped, (len(got), sb["seq"], dropped)
    assert sb["lost_export"] == dropped
    lost = {s.labels["source"]: s.value for m in text_string_to_metric_families(fleet.b.get("/metrics").text)
            for s in m.samples if s.name == "conn_tracer_lost_events_total"}
    assert lost["export"] == dropped
    hosts = view.json("/stats")["hosts"]
    assert hosts["hostB"]["lost_export"] == dropped and hosts["hostA"]["lost_export"] == 0
    assert hosts["hostA"]["duplicates"] == 0 and hosts["hostA"]["events"] == seq_a


@pytest.mark.bpf
def test_fleet_view_restart_rebuilds_then_goes_on_live(fleet: Fleet) -> None:
    """The fleet view restarted: it lists what it listed, has what happened meanwhile, and goes on
    live with no gap and no duplicate."""
    net = fleet.net
    before = {c["id"]: c for c in fleet.view.json("/connections", state="closed", limit=100_000)}
    assert before
    assert fleet.view.stop() == 0
    run_in(net, net.ns_a, LOOP, net.addr_a6, 2, 11, 22)   # while the fleet view is down
    wait_for(lambda: exported_all(fleet.a), 10, "hostA's events exported")
    fleet.view = view = fleet.start_view()
    after = {c["id"]: c for c in view.json("/connections", state="closed", limit=100_000)}
    keys = ("host", "role", "src_addr", "src_port", "dst_addr", "dst_port", "pid", "bytes_sent", "bytes_received",
            "started_at", "closed_at", "close_reason")
    for cid, c in before.items():
        assert cid in after and {k: after[cid][k] for k in keys} == {k: c[k] for k in keys}, cid
    with ws(view, "host=hostA") as live:
        last = fleet_events(view, "hostA")[-1]["host_seq"]
        done = run_in(net, net.ns_a, LOOP, net.addr_a4, 1, 5, 6)
        evs = read_until(live, lambda k: sum(e["type"] == "close" for e in k) >= 2, 20,
                         keep=lambda e: e.get("src_port") == done["port"] or e.get("dst_port") == done["port"])
    seq_a = fleet.a.json("/stats")["seq"]
    wait_for(lambda: received_all(view, "hostA", fleet.a), 10, "hostA's last event")
    host_seqs = [e["host_seq"] for e in fleet_events(view, "hostA")]
    assert host_seqs == list(range(1, seq_a + 1)), "a gap or a duplicate across the restart"
    assert evs[0]["host_seq"] > last
    assert view.json("/stats")["hosts"]["hostA"]["duplicates"] == 0


@pytest.mark.bpf
def test_nats_back_without_its_store(fleet: Fleet) -> None:
    """NATS comes back with an empty store: the agents make the stream again, the fleet view reads
    the new one from its start, and nothing is missing or doubled (run last: the old stream is gone)."""
    net, view = fleet.net, fleet.view
    fleet.nats.kill()
    fleet.nats.store = fleet.tmp / "store-new"
    fleet.nats.start()
    run_in(net, net.ns_a, LOOP, net.addr_a4, 2, 7, 8)
    wait_for(lambda: exported_all(fleet.a), 20, "hostA's events exported to the new stream")
    wait_for(lambda: received_all(view, "hostA", fleet.a), 20, "hostA's last event in the fleet view")
    seq_a = fleet.a.json("/stats")["seq"]
    assert [e["host_seq"] for e in fleet_events(view, "hostA")] == list(range(1, seq_a + 1))
    assert view.json("/stats")["hosts"]["hostA"]["lost_export"] == 0


def test_fleet_without_nats_says_so_in_one_line(tmp_path: Path) -> None:
    """No NATS server at the URL: one line with the fix, exit 1 (no BPF or root involved)."""
    url = f"nats://127.0.0.1:{free_port()}"
    p = subprocess.run([str(CONN_TRACER), "fleet", "--nats", url, "--port", str(free_port())],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith(f"conn-tracer: cannot reach NATS at {url}") and "nats-server -js" in lines[-1], p.stderr


def test_signal_terms_fleet_exit_0(tmp_path: Path) -> None:
    """SIGTERM stops a fleet view cleanly (exit 0); no root or BPF needed."""
    nats = Nats(tmp_path / "store")
    nats.start()
    try:
        view = start(tmp_path / "fleet.log", "fleet", "--nats", nats.url, "--durable", "sigterm")
        assert view.json("/healthz")["attach_mode"] == "fleet"
        assert view.get("/connections", host="").status_code == 422
        view.proc.send_signal(signal.SIGTERM)
        assert view.proc.wait(20) == 0
        view.http.close()
    finally:
        nats.kill()


def _message(host: str, seqs_and_recs: list[tuple[int, Any]]) -> bytes:
    """An exported message of these events, as an agent named `host` writes it."""
    w = EventWriter(Texts(TEXTS.wall_offset_ns, host))
    return "\n".join(w.json_many(seq, [rec])[0] for seq, rec in seqs_and_recs).encode()


def test_fleet_applies_batches_per_host_dedups_and_counts_gaps() -> None:
    """The fleet view's apply path, without NATS: ids per host, duplicates dropped, holes counted."""
    core = FleetCore(Settings(nats_url="nats://127.0.0.1:1"))
    a1 = [(1, ev("syn_sent", 1, 0)), (2, ev("established", 1, 1)), (3, ev("close", 1, 2, bytes_sent=7))]
    b1 = [(1, ev("syn_sent", 1, 0, role="client", dst_port=443)),
          (2, ev("close", 1, 3, dst_port=443, close_reason=CR_REFUSED))]
    headers = {"Conntracer-Host": "hostA", "Conntracer-Run": "r1"}
    core.apply_message(_message("hostA", a1), headers, "conntracer.hostA.events")
    core.apply_message(_message("hostB", b1), {**headers, "Conntracer-Host": "hostB"}, "conntracer.hostB.events")
    # hostA's batch again (stored twice past the duplicate window), then a batch after a hole.
    core.apply_message(_message("hostA", a1[1:]), headers, "conntracer.hostA.events")
    core.apply_message(_message("hostA", [(6, ev("syn_sent", 2, 10))]), headers, "conntracer.hostA.events")
    hosts = core.host_stats()
    assert hosts is not None
    assert {h: (v["events"], v["duplicates"], v["lost_export"], v["failures"]) for h, v in hosts.items()} == \
        {"hostA": (4, 2, 2, 0), "hostB": (2, 0, 0, 1)}
    a = core.table.get("hostA:c1")
    b = core.table.get("hostB:c1")
    assert a is not None and b is not None and core.table.get("c1") is None
    assert (a.host, a.bytes_sent, a.state, a.events) == ("hostA", 7, "CLOSE", 3)
    assert (b.host, b.dst_port, b.close_reason) == ("hostB", 443, "refused")
    only_b = core.table.query("all", core.predicate(Filter(host="hostB")))
    assert [c.id for c in only_b] == ["hostB:c1"]
    evs = [json.loads(t) for t in core.hub.events_after(0, 100)]
    assert [(e["seq"], e["host"], e["host_seq"], e["conn_id"]) for e in evs] == [
        (1, "hostA", 1, "hostA:c1"), (2, "hostA", 2, "hostA:c1"), (3, "hostA", 3, "hostA:c1"),
        (4, "hostB", 1, "hostB:c1"), (5, "hostB", 2, "hostB:c1"), (6, "hostA", 6, "hostA:c2")]
    assert core.hub.writer.event(1, core.hub.chunks[0].recs[0]).conn_id == "hostA:c1"
    # hostA restarted without its pins: a new run whose c1 is a new connection.
    core.apply_message(_message("hostA", [(1, ev("syn_sent", 1, 20, src_port=50001))]),
                       {**headers, "Conntracer-Run": "r2"}, "conntracer.hostA.events")
    again = core.table.get("hostA:c1")
    assert again is not None and (again.src_port, again.state, again.closed_at) == (50001, "SYN_SENT", None)


def test_fleet_record_puts_each_exported_field_in_its_place() -> None:
    """FleetTable.record() writes the record as one tuple in field order: every value lands under its name."""
    rec = ev("close", 7, 5, start_ms=1, bytes_sent=11, bytes_received=12, bytes_retrans=13, pid=14, netns=15,
             srtt_us=16, rttvar_us=17, retrans_segs=18, connect_us=19, src_port=20, dst_port=21, family="ipv6",
             role="server", state="CLOSE", comm="c22", close_reason=CR_REFUSED)
    line = _message("hostA", [(3, rec)]).decode()
    core = FleetCore(Settings(nats_url="nats://127.0.0.1:1"))
    core.apply_message(line.encode(), {"Conntracer-Host": "hostA", "Conntracer-Run": "r1"}, "conntracer.hostA.events")
    got = dict(zip((*RECORD_FIELDS, "host", "text"), core.hub.chunks[0].recs[0], strict=True))
    assert got.pop("ts_ns") == got.pop("start_ns") > 0   # no earlier event of c7: it starts at its close
    assert got.pop("text").startswith('"host_seq":3,')
    assert got == dict(conn_id="hostA:c7", bytes_sent=11, bytes_received=12, bytes_retrans=13, cgroup_id=0, pid=14,
                       netns=15, srtt_us=16, rttvar_us=17, retrans_segs=18, connect_us=19, saddr=0, daddr=0,
                       sport=20, dport=21, family=6, type=EV_CLOSE, role=ROLE_SERVER, state=ST_CLOSE, oldstate=0,
                       flags=0, close_reason=CR_REFUSED, comm="c22", host="hostA")


def test_fleet_counts_bad_lines_and_keeps_the_rest_of_their_batch() -> None:
    """A line that is not JSON, and one missing a field the fleet view reads, are counted as bad events;
    the good events of the same message are applied, in order."""
    core = FleetCore(Settings(nats_url="nats://127.0.0.1:1"))
    good = _message("hostA", [(1, ev("syn_sent", 1, 0)), (2, ev("established", 1, 1))]).split(b"\n")
    no_port = json.loads(_message("hostA", [(3, ev("close", 1, 2))]))
    del no_port["src_port"]
    data = b"\n".join([good[0], b"{not json", good[1], json.dumps(no_port).encode()])
    core.apply_message(data, {"Conntracer-Host": "hostA", "Conntracer-Run": "r1"}, "conntracer.hostA.events")
    assert core.decode_errors() == 2
    assert [json.loads(t)["host_seq"] for t in core.hub.events_after(0, 10)] == [1, 2]
    conn = core.table.get("hostA:c1")
    assert conn is not None and conn.state == "ESTABLISHED"


def test_agent_host_filter_is_all_or_nothing() -> None:
    """An agent serves one host: host=<its name> keeps everything, another name nothing."""
    core = Core(Settings(host_name="hostA"), lambda s: None)  # type: ignore[arg-type,return-value]
    rec = ev("syn_sent", 1)
    keep, drop = core.predicate(Filter(host="hostA", port=40001)), core.predicate(Filter(host="hostB"))
    assert keep is not None and keep(rec) and drop is not None and not drop(rec)
    assert core.predicate(Filter(host="hostA")) is None


def test_fleet_metrics_count_every_hosts_closes() -> None:
    """The fleet view's /metrics: traffic totals over all hosts, per-host families, export losses."""
    core = FleetCore(Settings(nats_url="nats://127.0.0.1:1"))
    for host, srtt in (("hostA", 40), ("hostB", 90)):
        core.apply_message(_message(host, [(1, ev("syn_sent", 1, 0)),
                                           (2, ev("close", 1, 2, bytes_sent=10, srtt_us=srtt, close_reason=1))]),
                           {"Conntracer-Host": host, "Conntracer-Run": "r"}, f"conntracer.{host}.events")
    # No lifespan: nothing to connect to. localhost: the service answers only Host names it serves.
    client = TestClient(create_app(core=core), base_url="http://localhost")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for m in text_string_to_metric_families(client.get("/metrics").text) for s in m.samples}
    assert samples[("conn_tracer_fleet_host_events_total", (("host", "hostA"),))] == 2
    assert samples[("conn_tracer_bytes_sent_total", (("role", "client"),))] == 20
    assert samples[("conn_tracer_rtt_seconds_count", (("role", "client"),))] == 2
    assert samples[("conn_tracer_lost_events_total", (("source", "export"),))] == 0
    assert client.get("/connections/hostB:c1/events").json()[-1]["srtt_us"] == 90


def test_fleet_in_flight_fits_nats_servers_client_buffer() -> None:
    """What the consumer lets JetStream send ahead fits nats-server's default max_pending (64 MiB):
    beyond it the server cuts a fleet view that fell behind as a slow consumer."""
    assert 16 <= MAX_ACK_PENDING and MAX_ACK_PENDING * MAX_MESSAGE_BYTES <= 64 << 20


def test_export_message_is_cut_at_the_size_bound_and_at_the_event_count() -> None:
    """A message holds at most nats_batch_events events and MAX_MESSAGE_BYTES bytes (unless one event alone
    is bigger), the oldest first, and its headers name exactly the seqs it holds."""
    settings = Settings(nats_url="nats://127.0.0.1:1", nats_batch_events=4)
    exporter = Exporter(settings, EventHub(EventWriter(Texts(0))), "hostA")
    big = MAX_MESSAGE_BYTES // 3
    exporter.buffer.extend(f'{{"seq":{n},"pad":"{"x" * big}"}}' for n in range(1, 4))
    n, data, headers = exporter._next_batch()
    assert (n, headers["Conntracer-Seqs"], len(data) <= MAX_MESSAGE_BYTES) == (2, "1-2", True)
    exporter.buffer.clear()
    exporter.buffer.extend(f'{{"seq":{n},"type":"close"}}' for n in range(10, 16))
    n, data, headers = exporter._next_batch()
    assert (n, headers["Conntracer-Seqs"], data.count(b"\n")) == (4, "10-13", 3)
