"""``uv run python -m tests.bench [--quick] [--scenario i,ii,iii,iv,v] [--targets floor,floor_sdk,relay,service]``.

Starts the fake upstream on the load core, then for every scenario, target and transport a
fresh target process alone on the target core, measured from /proc while the load client
streams. Prints the table, the ratios and PASS/FAIL per target line, and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from tests.bench import report
from tests.bench.client import Transport
from tests.bench.procs import pinned
from tests.bench.runner import ROOT, Context, Row, launched, measure
from tests.bench.scenarios import ALIASES, FULL, QUICK, Scenario, Target, service_available, targets
from tests.bench.upstream import run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m tests.bench", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller counts, about a minute")
    p.add_argument("--scenario", default="i,ii,iii,iv,v", help="comma list of i, ii, iii, iv, v (or 1 to 5)")
    p.add_argument(
        "--targets", default="floor,floor_sdk,relay,service", help="comma list of floor, floor_sdk, relay, service"
    )
    p.add_argument("--transports", default="sse,ws", help="comma list of sse, ws")
    p.add_argument("--out", type=Path, default=ROOT / "bench-results" / "bench.json", help="JSON output file")
    p.add_argument("--clients", type=int, default=1, help="load-client processes per run")
    p.add_argument("--target-cpu", type=int, default=1, help="core for the process under test")
    p.add_argument("--load-cpu", type=int, default=0, help="core for upstream, clients and driver")
    p.add_argument(
        "--reuse",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one target process per target and transport for all scenarios (default: on with --quick)",
    )
    p.add_argument("--max-minutes", type=float, default=10.0, help="skip the remaining runs after this")
    p.add_argument(
        "--profile",
        action="store_true",
        help="sample each target with py-spy during the streaming window (py-spy on PATH; CPU figures then "
        "include its interruptions); folded stacks and a self-time summary go next to the logs",
    )
    return p.parse_args(argv)


def _names(value: str, allowed: set[str]) -> list[str]:
    names = [ALIASES.get(n.strip(), n.strip()) for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise SystemExit(f"unknown name(s): {', '.join(unknown)}; choose from {', '.join(sorted(allowed))}")
    return names


async def start_upstream(cpu: int) -> tuple[asyncio.subprocess.Process, int]:
    """The fake upstream as its own process on the load core; returns it and its port."""
    proc = await asyncio.create_subprocess_exec(
        *pinned(cpu, [sys.executable, "-m", "tests.bench.upstream", "--port", "0"]),
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    if not line.startswith(b"LISTENING "):
        raise SystemExit(f"fake upstream did not start: {line!r}")
    return proc, int(line.split()[1])


async def main_async(args: argparse.Namespace) -> int:
    """Run every selected (scenario, target, transport) and report."""
    table = QUICK if args.quick else FULL
    scenarios = [table[n] for n in _names(args.scenario, set(table))]
    chosen = _names(args.targets, {"floor", "floor_sdk", "relay", "service"})
    transports: list[Transport] = [t for t in ("sse", "ws") if t in _names(args.transports, {"sse", "ws"})]
    deadline = time.monotonic() + args.max_minutes * 60
    proc, port = await start_upstream(args.load_cpu)
    ctx = Context(
        upstream_port=port,
        target_cpu=args.target_cpu,
        load_cpu=args.load_cpu,
        clients=args.clients,
        profile=args.profile,
    )
    all_targets = targets(f"http://127.0.0.1:{port}/v1")
    skip: dict[str, str] = {}
    if why := service_available(ROOT):
        skip["service"] = why
    runner = Runner(ctx, skip, deadline)
    try:
        if args.quick if args.reuse is None else args.reuse:
            for name in chosen:
                for tr in transports:
                    await runner.reusing(all_targets[name], tr, scenarios)
        else:
            for sc in scenarios:
                for name in chosen:
                    for tr in transports:
                        await runner.reusing(all_targets[name], tr, [sc])
    finally:
        proc.terminate()
        await proc.wait()
    order = {n: i for i, n in enumerate([*(s.name for s in scenarios), *chosen, *transports])}
    rows = sorted(runner.rows, key=lambda r: (order[r["scenario"]], order[r["target"]], order[r["transport"]]))
    print(report.render(rows, [f"({s.name}) {s.describe()}" for s in scenarios]))
    meta: dict[str, Any] = {
        "quick": args.quick,
        "reuse": bool(args.quick if args.reuse is None else args.reuse),
        "target_cpu": args.target_cpu,
        "load_cpu": args.load_cpu,
        "clients": args.clients,
    }
    meta["scenarios"] = {s.name: s.describe() for s in scenarios}
    report.write_json(args.out, rows, meta)
    print(f"\nJSON written to {args.out}; server logs in {ctx.logs}")
    return 0


class Runner:
    """Runs rows, remembers why a target is skipped, and prints one progress line per row."""

    def __init__(self, ctx: Context, skip: dict[str, str], deadline: float) -> None:
        self.ctx, self.skip, self.deadline = ctx, skip, deadline
        self.rows: list[Row] = []

    async def reusing(self, target: Target, tr: Transport, scenarios: list[Scenario]) -> None:
        """Start ``target`` once and measure ``scenarios`` on it (or record why they are skipped)."""
        if time.monotonic() > self.deadline:
            self.skip.setdefault(target.name, "--max-minutes reached")
        if target.name not in self.skip:
            tag = f"{target.name}-{tr}-{'-'.join(s.name for s in scenarios)}"
            try:
                async with launched(self.ctx, target, tag) as server:
                    for sc in scenarios:
                        if time.monotonic() > self.deadline:
                            break
                        self._add(await measure(self.ctx, server, target, tr, sc))
            except RuntimeError as exc:  # could not start: do not try again for every row
                self.skip[target.name] = str(exc)
        done = {(r["target"], r["transport"], r["scenario"]) for r in self.rows}
        for sc in scenarios:
            if (target.name, tr, sc.name) not in done:
                why = self.skip.get(target.name, "--max-minutes reached")
                self._add(
                    {"target": target.name, "label": target.label, "transport": tr, "scenario": sc.name, "skipped": why}
                )

    def _add(self, row: Row) -> None:
        self.rows.append(row)
        status = row.get("skipped") or row.get("failed") or f"{row.get('errors')} errors, {row.get('wall_s')} s"
        print(f"[{row['scenario']:>3}] {row['target']:<7} {row['transport']:<3} {status}"[:300], flush=True)


def main() -> None:
    """Entry point: the driver itself stays on the load core."""
    args = parse_args()
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {args.load_cpu})
    sys.exit(run(main_async(args)))


if __name__ == "__main__":
    main()
