"""conn-tracer benchmark suite: overhead, completeness, CPU, BPF time, latency, start-up, memory.

Every figure is measured side by side in one run: each round runs every configuration once, in an
order rotated per round, so slow drift of a noisy machine spreads over all of them. Reported
values are medians over rounds (report.py); configurations are in configs.py, the table in table.py.

Usage (root): .venv/bin/python bench/run.py [--quick] [--rounds N] [--configs a,b] ...
Results: the table on stdout; the run's JSON and table in bench/runs/ (ignored by git:
<timestamp>.json/.txt and latest.json/.txt). The reference the README quotes,
bench/results/reference.json/.txt, changes only with --save-reference.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

import kernel
from configs import BASELINE, CONFIGS, TRACER_QUERIES, Context
from export import run_export
from extras import run_iperf, run_profile, run_rss
from harness import BUILD, CONN_TRACER, FULL, QUICK, RESULTS, ROOT, RUNS, VENV_PY, Churn, Skip, build_churn, stop_all
from report import summarise, targets
from table import render

CLOSES_COUNTED = ("close events for the churn port: role=client with dst_port=P plus role=server with src_port=P; "
                  "expected = client connections completed + server sockets closed (2 per connection)")


def preflight(configs: list[str], bpf_stats: bool) -> dict[str, str]:
    """Why a configuration cannot run, by name; checked once so rounds do not retry hopeless ones."""
    skip: dict[str, str] = {}
    if os.geteuid() != 0:
        raise SystemExit("run as root: every configuration but 'none' attaches BPF programs")
    try:
        out = subprocess.run([str(CONN_TRACER), "--help"], capture_output=True, text=True, timeout=30)
        if "serve" not in out.stdout:
            skip.update(dict.fromkeys(TRACER_QUERIES, "`conn-tracer --help` lists no serve command"))
    except (OSError, subprocess.TimeoutExpired) as exc:
        skip.update(dict.fromkeys(TRACER_QUERIES, f"conn-tracer not runnable: {exc}"))
    for tool in ("tcplife", "tcpstates"):
        if not Path(f"/usr/sbin/{tool}-bpfcc").exists():
            skip[tool] = f"/usr/sbin/{tool}-bpfcc missing: apt-get install -y bpfcc-tools"
    for cfg, module in (("bare", "bcc"), ("empty", "bcc"), ("floor", "app.bpf.loader"),
                        ("untracked", "app.bpf.loader")):
        if subprocess.run([str(VENV_PY), "-c", f"import {module}"], capture_output=True).returncode != 0:
            skip[cfg] = f"`import {module}` fails in the venv (needs --system-site-packages and python3-bpfcc)"
    why = kernel.stats_available() if bpf_stats else None
    if why:
        print(f"in-kernel BPF time not measured: {why}", flush=True)
    return {k: v for k, v in skip.items() if k in configs}


def baseline_worktree(rev: str) -> Path:
    """A detached worktree of `rev` under bench/build/, with its C helpers built by this venv's Python."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True,
                         check=True).stdout.strip()
    tree = BUILD / f"baseline-{sha}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), sha], check=True,
                       capture_output=True)
    subprocess.run([str(VENV_PY), "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, capture_output=True)
    return tree


def run_rounds(ctx: Context, configs: list[str], skipped: dict[str, str]) -> list[dict[str, Any]]:
    rounds: list[dict[str, Any]] = []
    for rnd in range(ctx.prof.rounds if configs else 0):
        k = rnd % len(configs)
        for cfg in configs[k:] + configs[:k]:  # rotate the order each round
            if cfg in skipped:
                continue
            t = time.monotonic()
            try:
                r = CONFIGS[cfg](ctx, rnd, cfg)
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
            print(f"round {rnd} {cfg:<18} {r['churn']['rate']:>9.0f} conn/s  {r['wall_s']:>5.1f} s", flush=True)
    return rounds


def guarded(phase: Callable[[], Any]) -> Any:
    """Runs one of the phases after the rounds; a failure is reported, not fatal to the run."""
    try:
        return phase()
    except Skip as exc:
        return {"skipped": str(exc)}
    except (subprocess.SubprocessError, RuntimeError, OSError, ValueError, KeyError) as exc:
        print(f"  error: {exc!r}", flush=True)
        return {"error": repr(exc)}


def write(result: dict[str, Any], table: str, stamp: str, reference: bool) -> None:
    text = json.dumps(result, indent=1, default=str)
    if stamp:
        RUNS.mkdir(parents=True, exist_ok=True)
        for name in (stamp, "latest"):
            (RUNS / f"{name}.json").write_text(text)
            (RUNS / f"{name}.txt").write_text(table)
        print(f"\nwrote bench/runs/{stamp}.json and .txt")
    if reference:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "reference.json").write_text(text)
        (RESULTS / "reference.txt").write_text(table)
        print("wrote bench/results/reference.json and .txt: commit them with the README text that quotes them")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 short rounds, no 1M-connection memory test, no profile")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--churn-seconds", type=float, help="length of each max-rate churn")
    ap.add_argument("--configs", default=",".join(c for c in CONFIGS if c != BASELINE),
                    help="subset of " + ",".join(CONFIGS))
    ap.add_argument("--no-bpf-stats", dest="bpf_stats", action="store_false",
                    help="do not switch kernel.bpf_stats_enabled on during the max-rate churns (no BPF figures)")
    ap.add_argument("--skip-iperf", action="store_true")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--skip-export", action="store_true",
                    help="no export phase (serve without and with --nats, a fleet view, nats-server -js)")
    ap.add_argument("--only-export", action="store_true",
                    help="only the export phase: no configuration rounds, iperf3, memory or profile")
    ap.add_argument("--export-rounds", type=int, metavar="N", help="export phase rounds (default 3 full, 1 quick)")
    ap.add_argument("--rss-count", type=int, help="connections for the memory test (default 1,000,000; quick: 0)")
    ap.add_argument("--profile", type=float, metavar="SECONDS",
                    help="py-spy on serve during a churn of this many seconds (default: 10 full, 0 quick)")
    ap.add_argument("--save-reference", action="store_true",
                    help="also write bench/results/reference.json/.txt, the run the README quotes (a full run)")
    ap.add_argument("--baseline", metavar="REV",
                    help="also run serve from git revision REV (a worktree under bench/build/), side by side")
    ap.add_argument("--report", type=Path, metavar="RUN.json",
                    help="measure nothing: print the table of a saved run (with --save-reference: make it the "
                         "reference)")
    args = ap.parse_args()
    if args.save_reference and args.quick:
        ap.error("--save-reference wants a full run, not --quick")
    if args.only_export and (args.skip_export or args.save_reference):
        ap.error("--only-export runs the export phase alone: not with --skip-export or --save-reference")
    bad = {c for c in args.configs.split(",") if c} - set(CONFIGS)
    if bad:
        ap.error(f"unknown configs: {sorted(bad)}; choose from {','.join(CONFIGS)}")
    return args


def main() -> int:
    args = parse_args()
    if args.report:
        result = json.loads(args.report.read_text())
        if args.save_reference and result["meta"].get("quick"):
            raise SystemExit(f"{args.report} is a --quick run: not a reference")
        # The measurements stay as they were; figures and targets are derived from them as report.py does now.
        result["summary"] = summarise(result["rounds"], result["iperf"], result["rss"], result["meta"]["configs"],
                                      result.get("export"))
        result["targets"] = targets(result["summary"], QUICK if result["meta"].get("quick") else FULL,
                                    result["meta"]["cpus"])
        table = render(result)
        print(table, end="")
        write(result, table, "", args.save_reference)
        return 0

    prof = QUICK if args.quick else FULL
    if args.rounds:
        prof.rounds = args.rounds
    if args.churn_seconds:
        prof.churn_s = args.churn_seconds
    if args.rss_count is not None:
        prof.rss_count = args.rss_count
    if args.skip_rss:
        prof.rss_count = 0
    if args.export_rounds is not None:
        prof.export_rounds = args.export_rounds
    if args.profile is None:
        args.profile = 0 if args.quick else 10
    if args.only_export:
        args.configs, args.baseline, args.skip_iperf, prof.rss_count, args.profile = "", None, True, 0, 0
    wanted = args.configs.split(",") + ([BASELINE] if args.baseline else [])
    configs = [c for c in CONFIGS if c in wanted]  # table order
    baseline_tree = baseline_worktree(args.baseline) if args.baseline else None

    started = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))
    skipped = preflight(configs, args.bpf_stats)
    for cfg, why in skipped.items():
        print(f"skip {cfg}: {why}", flush=True)
    ctx = Context(Churn(build_churn(), prof), prof, args.bpf_stats, baseline_tree)
    iperf: list[dict[str, Any]] = []
    rss: dict[str, Any] | None = None
    profile: dict[str, Any] | None = None
    export: dict[str, Any] | None = None
    try:
        rounds = run_rounds(ctx, configs, skipped)
        # The other phases run serve with one subscriber: all events in batches if that config ran.
        tracer = next((c for c in TRACER_QUERIES if c in configs and c not in skipped), None)
        if not args.skip_iperf:
            print("iperf3 ...", flush=True)
            got = guarded(lambda: run_iperf(prof, tracer))
            iperf = got if isinstance(got, list) else [got]
        if prof.rss_count and tracer:
            print(f"memory after {prof.rss_count:,} connections (<= {prof.rss_time_s:.0f} s) ...", flush=True)
            rss = guarded(lambda: run_rss(ctx, tracer))
        if args.profile and tracer:
            print("py-spy profile ...", flush=True)
            profile = guarded(lambda: run_profile(ctx, tracer, args.profile, RUNS / f"{stamp}-profile-collapsed.txt"))
        if not args.skip_export and prof.export_rounds:
            print(f"export to NATS: plain vs export, {prof.export_rounds} rounds ...", flush=True)
            export = guarded(lambda: run_export(ctx))
    finally:
        stop_all()

    s = summarise(rounds, iperf, rss, configs, export)
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "app"], capture_output=True,
                           text=True).stdout.strip()
    result = {
        "meta": {"timestamp": stamp, "git": git.stdout.strip() + ("+dirty app/" if dirty else ""),
                 "kernel": platform.release(), "cpus": os.cpu_count(), "quick": args.quick, "configs": configs,
                 "ws_queries": TRACER_QUERIES, "bpf_stats": args.bpf_stats, "profile": asdict(prof),
                 "argv": sys.argv[1:], "wall_s": round(time.time() - started, 1), "closes_counted": CLOSES_COUNTED},
        "skipped": skipped, "summary": s, "targets": targets(s, prof, os.cpu_count() or 1), "rounds": rounds,
        "iperf": iperf, "rss": rss,
        "profile": profile, "export": export,
    }
    table = render(result)
    print("\n" + table, end="")
    write(result, table, stamp, args.save_reference)
    print(f"({time.time() - started:.0f} s)")
    return 0


def _sigterm(signum: int, frame: Any) -> NoReturn:
    # As Ctrl-C: unwind through every finally (children stopped, bpf_stats restored).
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _sigterm)
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    stop_all()
    sys.exit(130)
