"""conn-tracer benchmark suite: overhead, completeness, CPU, pipeline cost, latency, start-up, memory.

Every figure is measured side by side in one run: each round runs every configuration once, in an
order rotated per round, so slow drift of a noisy machine spreads over all of them. Reported
values are medians over rounds; ratios are taken within a round first (configuration vs. the
"none" run of the same round) and then the median of those is reported.

Usage (root): .venv/bin/python bench/run.py [--quick] [--profile] [--rounds N] ...
Results: a table on stdout; the run's JSON and table in bench/runs/ (ignored by git: <timestamp>.json/.txt
and latest.json/.txt). The reference the README quotes, bench/results/reference.json/.txt, changes
only with --save-reference.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from configs import run_bare, run_conn_tracer, run_none, run_peer
from extras import run_iperf, run_profile, run_rss
from harness import (
    CONFIGS,
    CONN_TRACER,
    FULL,
    QUICK,
    RESULTS,
    ROOT,
    RUNS,
    VENV_PY,
    Churn,
    Profile,
    Skip,
    build_churn,
    stop_all,
)
from report import print_table, summarise, targets
from session import TracerSession

# ---------------------------------------------------------------- main


def preflight() -> dict[str, str]:
    """Why a configuration cannot run, by name; checked once so rounds do not retry hopeless ones."""
    skip: dict[str, str] = {}
    if os.geteuid() != 0:
        raise SystemExit("run as root: every configuration but 'none' attaches BPF programs")
    try:
        out = subprocess.run([str(CONN_TRACER), "--help"], capture_output=True, text=True, timeout=30)
        if "serve" not in out.stdout:
            skip["conn-tracer"] = "`conn-tracer --help` lists no serve command"
    except (OSError, subprocess.TimeoutExpired) as exc:
        skip["conn-tracer"] = f"conn-tracer not runnable: {exc}"
    for tool in ("tcplife", "tcpstates"):
        if not Path(f"/usr/sbin/{tool}-bpfcc").exists():
            skip[tool] = f"/usr/sbin/{tool}-bpfcc missing: apt-get install -y bpfcc-tools"
    if subprocess.run([str(VENV_PY), "-c", "import bcc"], capture_output=True).returncode != 0:
        skip["bare"] = "`import bcc` fails in the venv (needs --system-site-packages and python3-bpfcc)"
    return skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 short rounds, no 1M-connection memory test (< 3 min)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--churn-seconds", type=float)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="subset of " + ",".join(CONFIGS))
    ap.add_argument("--ws-query", default="batch=256",
                    help="query string for the subscriber (default 'batch=256': unfiltered, up to 256 events per "
                         "message, as a high-volume consumer would; '' for one event per message)")
    ap.add_argument("--skip-iperf", action="store_true")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--rss-count", type=int)
    ap.add_argument("--save-reference", action="store_true",
                    help="also write bench/results/reference.json/.txt, the run the README quotes (not with --quick)")
    ap.add_argument("--profile", type=float, metavar="SECONDS",
                    help="py-spy on serve during a churn of this many seconds (default: 10 full, 0 quick)")
    args = ap.parse_args()

    if args.save_reference and args.quick:
        ap.error("--save-reference wants a full run, not --quick")
    prof = QUICK if args.quick else FULL
    if args.rounds:
        prof.rounds = args.rounds
    if args.churn_seconds:
        prof.churn_s = args.churn_seconds
    if args.rss_count is not None:
        prof.rss_count = args.rss_count
    if args.skip_rss:
        prof.rss_count = 0
    if args.profile is None:
        args.profile = 0 if args.quick else 10
    TracerSession.ws_query = args.ws_query
    configs = [c for c in args.configs.split(",") if c]
    bad = set(configs) - set(CONFIGS)
    if bad:
        ap.error(f"unknown configs: {sorted(bad)}")

    started = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))
    skipped = preflight()
    for cfg, why in skipped.items():
        print(f"skip {cfg}: {why}", flush=True)
    churn = Churn(build_churn(), prof)
    runners: dict[str, Callable[[Churn, Profile, int], dict[str, Any]]] = {
        "none": run_none, "conn-tracer": run_conn_tracer, "bare": run_bare,
        "tcplife": lambda ch, p, r: run_peer("tcplife", ch, p, r),
        "tcpstates": lambda ch, p, r: run_peer("tcpstates", ch, p, r),
    }
    rounds: list[dict[str, Any]] = []
    iperf: list[dict[str, Any]] = []
    rss: dict[str, Any] | None = None
    profile: dict[str, Any] | None = None
    if "conn-tracer" not in configs:
        skipped.setdefault("conn-tracer", "not selected (--configs)")
    try:
        for rnd in range(prof.rounds):
            k = rnd % len(configs)
            for cfg in configs[k:] + configs[:k]:  # rotate the order each round
                if cfg in skipped:
                    continue
                t = time.monotonic()
                try:
                    r = runners[cfg](churn, prof, rnd)
                except Skip as exc:
                    # A configuration that cannot start will not start next round either.
                    skipped[cfg] = str(exc)
                    print(f"round {rnd} {cfg}: skipped: {exc}", flush=True)
                    continue
                except (subprocess.SubprocessError, RuntimeError, OSError, ValueError, KeyError) as exc:
                    rounds.append({"round": rnd, "config": cfg, "error": repr(exc)})
                    print(f"round {rnd} {cfg}: error: {exc!r}", flush=True)
                    continue
                r.update(round=rnd, config=cfg, wall_s=round(time.monotonic() - t, 1))
                rounds.append(r)
                print(f"round {rnd} {cfg:<12} {r['churn']['rate']:>9.0f} conn/s  {r['wall_s']:>5.1f} s", flush=True)
        if not args.skip_iperf:
            print("iperf3 ...", flush=True)
            iperf = run_iperf(prof, "conn-tracer" not in skipped)
        if prof.rss_count and "conn-tracer" not in skipped:
            print(f"memory after {prof.rss_count:,} connections (<= {prof.rss_time_s:.0f} s) ...", flush=True)
            try:
                rss = run_rss(churn, prof)
            except Skip as exc:
                rss = {"skipped": str(exc)}
        if args.profile and "conn-tracer" not in skipped:
            print("py-spy profile ...", flush=True)
            try:
                profile = run_profile(churn, prof, args.profile)
            except Skip as exc:
                profile = {"skipped": str(exc)}
    finally:
        stop_all()

    s = summarise(rounds, iperf, rss, prof)
    tg = targets(s, prof)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_table(s, tg, skipped)
        print_profile(profile)
    table = out.getvalue()
    print(table, end="")
    result = {
        "meta": {"ws_query": TracerSession.ws_query,
                 "timestamp": stamp, "kernel": platform.release(), "cpus": os.cpu_count(), "quick": args.quick,
                 "profile": asdict(prof), "argv": sys.argv[1:], "wall_s": round(time.time() - started, 1),
                 "git": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                       capture_output=True, text=True).stdout.strip(),
                 "closes_counted": "close events for the churn port: role=client with dst_port=P plus "
                                   "role=server with src_port=P; expected = client connections completed + "
                                   "server sockets closed (2 per connection)"},
        "skipped": skipped, "summary": s, "targets": tg, "rounds": rounds, "iperf": iperf, "rss": rss,
        "profile": profile,
    }
    text = json.dumps(result, indent=1, default=str)
    RUNS.mkdir(parents=True, exist_ok=True)
    for name in (stamp, "latest"):
        (RUNS / f"{name}.json").write_text(text)
        (RUNS / f"{name}.txt").write_text(table)
    print(f"\nwrote bench/runs/{stamp}.json and .txt ({time.time() - started:.0f} s)")
    if args.save_reference:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "reference.json").write_text(text)
        (RESULTS / "reference.txt").write_text(table)
        print("wrote bench/results/reference.json and .txt (commit them with the README that quotes them)")
    return 0


def print_profile(profile: dict[str, Any] | None) -> None:
    if profile and "self_pct" in profile:
        print(f"\n== py-spy: serve's MainThread during max-rate churn ({profile['samples']} samples at 100 Hz) ==")
        print("  self time by component: " + ", ".join(f"{k} {v}%" for k, v in profile["self_by_component_pct"][:10]))
        print("  top self time:")
        for name, pct in profile["self_pct"][:10]:
            print(f"    {pct:5.1f}%  {name[:100]}")
        print("  top inclusive time:")
        for name, pct in profile["inclusive_pct"][:18]:
            print(f"    {pct:5.1f}%  {name[:100]}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    stop_all()
    sys.exit(130)
