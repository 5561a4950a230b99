"""Print the results table, the ratios the targets are judged on (PASS/FAIL/SKIP), write the JSON."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Row = dict[str, Any]

COLUMNS: list[tuple[str, str, Callable[[Row], Any]]] = [
    ("target", "<26", lambda r: r["label"]),
    ("tr", "<3", lambda r: r["transport"]),
    ("sc", "<3", lambda r: r["scenario"]),
    ("streams", ">7", lambda r: r.get("streams")),
    ("err", ">5", lambda r: r.get("errors")),
    ("cpu us/tok", ">10", lambda r: r.get("cpu_us_per_token")),
    ("(sched)", ">8", lambda r: r.get("cpu_us_per_token_sched")),
    ("us/run", ">7", lambda r: r.get("cpu_us_per_run")),
    ("events/s", ">9", lambda r: r.get("events_per_s")),
    ("+ttft p50", ">9", lambda r: r.get("ttft_added_p50_ms")),
    ("+ttft p99", ">9", lambda r: r.get("ttft_added_p99_ms")),
    ("gap p99", ">8", lambda r: r.get("gap_p99_ms")),
    ("peak MB", ">7", lambda r: r.get("peak_rss_mb")),
    ("KB/strm", ">7", lambda r: r.get("rss_per_stream_kb")),
    ("other%", ">6", lambda r: r.get("foreign_load_pct")),
    ("wall s", ">6", lambda r: r.get("wall_s")),
]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def table(rows: Sequence[Row]) -> str:
    """The results as a fixed-width table (times in ms, CPU in microseconds per token)."""
    head = " ".join(f"{name:{fmt}}" for name, fmt, _ in COLUMNS)
    lines = [head, "-" * len(head)]
    for row in rows:
        if "skipped" in row or "failed" in row:
            why = row.get("skipped") or row.get("failed")
            status = "SKIPPED" if "skipped" in row else "FAILED"
            lines.append(f"{row['label']:<26} {row['transport']:<3} {row['scenario']:<3} {status}: {why}"[:240])
            continue
        lines.append(" ".join(f"{_cell(get(row)):{fmt}}" for _, fmt, get in COLUMNS))
        lines += [f"{'':>36}error: {sample}"[:240] for sample in row.get("error_samples", [])]
    return "\n".join(lines)


def _find(rows: Sequence[Row], target: str, transport: str, scenario: str) -> Row | None:
    for row in rows:
        if (row["target"], row["transport"], row["scenario"]) == (target, transport, scenario) and "streams" in row:
            return row
    return None


def _ratio(a: Row | None, b: Row | None, key: str) -> float | None:
    x, y = (a or {}).get(key), (b or {}).get(key)
    return x / y if x is not None and y not in (None, 0) and y > 0 else None


def _check(name: str, value: float | None, limit: str, ok: Callable[[float], bool]) -> dict[str, Any]:
    status = "SKIP" if value is None else "PASS" if ok(value) else "FAIL"
    return {"check": name, "value": value, "limit": limit, "status": status}


def _get(row: Row | None, key: str) -> float | None:
    value = (row or {}).get(key)
    return None if value is None else float(value)


def checks(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """The targets from the issues, each PASS / FAIL, or SKIP when a row is missing."""
    out: list[dict[str, Any]] = []
    for tr in ("sse", "ws"):
        for sc, limit in (("i", 0.25), ("ii", 0.20)):
            svc, relay = _find(rows, "service", tr, sc), _find(rows, "relay", tr, sc)
            ratio = _ratio(svc, relay, "cpu_us_per_token")
            out.append(
                _check(
                    f"({sc}) {tr}: service CPU/token / relay CPU/token", ratio, f"<= {limit}", lambda v, m=limit: v <= m
                )
            )
        svc = _find(rows, "service", tr, "iii")
        out.append(_check(f"(iii) {tr}: service errors", _get(svc, "errors"), "== 0", lambda v: v == 0))
        out.append(_check(f"(iii) {tr}: service peak RSS MB", _get(svc, "peak_rss_mb"), "< 200", lambda v: v < 200))
        ratio = _ratio(svc, _find(rows, "floor", tr, "iii"), "ttft_added_p50_ms")
        out.append(_check(f"(iii) {tr}: service added TTFT p50 / floor's", ratio, "<= 2", lambda v: v <= 2))
        p99 = _get(svc, "ttft_added_p99_ms")
        out.append(_check(f"(iii) {tr}: service added TTFT p99 ms", p99, "<= 1000", lambda v: v <= 1000))
        out += _steady_checks(rows, tr)
        svc = _find(rows, "service", tr, "v")
        out.append(
            _check(f"(v) {tr}: service CPU us per run", _get(svc, "cpu_us_per_run"), "<= 500", lambda v: v <= 500)
        )
        eps = _get(_find(rows, "service", tr, "i"), "events_per_s")
        out.append(_check(f"(i) {tr}: service events/s", eps, ">= 20000", lambda v: v >= 20000))
    return out


def _steady_checks(rows: Sequence[Row], tr: str) -> list[dict[str, Any]]:
    """Scenario (iv): no errors, added TTFT p50 within 2x the floor's + 5 ms, p99 and added gap p99."""
    svc, floor = _find(rows, "service", tr, "iv"), _find(rows, "floor", tr, "iv")
    floor_p50 = _get(floor, "ttft_added_p50_ms")
    p50 = _get(svc, "ttft_added_p50_ms")
    excess = None if p50 is None or floor_p50 is None else p50 - (2 * floor_p50 + 5)
    return [
        _check(f"(iv) {tr}: service errors", _get(svc, "errors"), "== 0", lambda v: v == 0),
        _check(
            f"(iv) {tr}: service added TTFT p50 - (2 x floor's + 5 ms), ms "
            f"(service {_cell(p50)}, floor {_cell(floor_p50)})",
            excess,
            "<= 0",
            lambda v: v <= 0,
        ),
        _check(f"(iv) {tr}: service added TTFT p99 ms", _get(svc, "ttft_added_p99_ms"), "<= 100", lambda v: v <= 100),
        _check(f"(iv) {tr}: service added gap p99 ms", _get(svc, "gap_added_p99_ms"), "<= 50", lambda v: v <= 50),
    ]


def per_run(rows: Sequence[Row]) -> list[str]:
    """Scenario (v): CPU per run of the four targets side by side."""
    lines = []
    for tr in ("sse", "ws"):
        targets = ("floor", "floor_sdk", "relay", "service")
        cells = [f"{t} {_cell(_get(_find(rows, t, tr, 'v'), 'cpu_us_per_run'))}" for t in targets]
        lines.append(f"(v) {tr}: CPU us per run: " + ", ".join(cells) + " (target: service <= 500)")
    return lines


def ratios(rows: Sequence[Row]) -> list[str]:
    """Informational ratios between the targets (CPU per token and added TTFT p50)."""
    lines = []
    for sc in ("i", "ii", "iii", "iv", "v"):
        for tr in ("sse", "ws"):
            floor, relay, svc = (_find(rows, t, tr, sc) for t in ("floor", "relay", "service"))
            parts = [
                f"relay/floor cpu {_cell(_ratio(relay, floor, 'cpu_us_per_token'))}x",
                f"service/relay cpu {_cell(_ratio(svc, relay, 'cpu_us_per_token'))}x",
                f"service/floor cpu {_cell(_ratio(svc, floor, 'cpu_us_per_token'))}x",
                f"service/floor +ttft p50 {_cell(_ratio(svc, floor, 'ttft_added_p50_ms'))}x",
                f"relay/floor +ttft p50 {_cell(_ratio(relay, floor, 'ttft_added_p50_ms'))}x",
            ]
            lines.append(f"({sc}) {tr}: " + ", ".join(parts))
    return lines


def render(rows: Sequence[Row], scenarios: Sequence[str]) -> str:
    """Everything printed at the end of a run."""
    out = ["", table(rows), "", "Scenarios:", *[f"  {s}" for s in scenarios], "", "Ratios:"]
    out += [f"  {line}" for line in ratios(rows)]
    out += ["", "Per run:", *[f"  {line}" for line in per_run(rows)]]
    noisy = [r for r in rows if (r.get("foreign_load_pct") or 0) > 10]
    if noisy:
        out += ["", f"WARNING: {len(noisy)} row(s) shared the target core with other processes (other% > 10):"]
        out += ["  latency and events/s there are unreliable; CPU per token is per-process and still holds."]
    busy = [r for r in rows if (r.get("load_core_pct") or 0) > 90]
    if busy:
        out += ["", f"WARNING: the load core was > 90% busy in {len(busy)} row(s): upstream/client may limit them."]
    out += ["", "Targets:"]
    out += [f"  {c['status']:4} {c['check']}: {_cell(c['value'])} ({c['limit']})" for c in checks(rows)]
    return "\n".join(out)


def write_json(path: Path, rows: Sequence[Row], meta: dict[str, Any]) -> None:
    """Write every row, the checks and the run's settings to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": {**meta, "python": platform.python_version()}, "rows": list(rows), "checks": checks(rows)}
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
