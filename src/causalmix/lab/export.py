"""``causalmix lab export``: every run of a folder's database as CSV or JSON lines."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from causalmix.lab.db import RunDB

__all__ = ["FORMATS", "export_runs"]

FORMATS = ("csv", "jsonl")
COLUMNS = ("key", "experiment", "task", "seed", "suite", "status", "git_rev", "attempts",
           "started_at", "finished_at", "wall_time_s", "config", "metrics", "curve", "info")


def _flat(prefix: str, x, out: dict) -> None:
    if isinstance(x, dict):
        for k, v in x.items():
            _flat(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = x


def export_runs(out: str | Path, dest: str | Path, fmt: str = "jsonl", *,
                suite: str | None = None) -> int:
    """Write every run in ``out/runs.sqlite`` (of ``suite`` if given; finished and
    interrupted) to ``dest``: ``fmt="jsonl"``, one JSON object per run with the columns of
    :data:`COLUMNS` (config, metrics, curve and info as nested objects; specs in the config in
    their tagged form, ``{"type": "Prefix", "n": 9}``); ``fmt="csv"``, one row per run with
    those columns (nested ones as JSON text) plus one ``metric.<name>`` column per scalar metric
    (nested metrics flattened, e.g. ``metric.accuracy_by_pairs.32``). Returns the number of
    runs written. With no run to write it raises ``ValueError`` and leaves ``dest`` as it was."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {list(FORMATS)}, got {fmt!r}")
    db = RunDB(out, create=False)
    try:
        rows = [r for r in db.runs(status=None) if suite is None or r["suite"] == suite]
    finally:
        db.close()
    if not rows:
        what = "no runs" if suite is None else f"no runs of suite {suite!r}"
        raise ValueError(f"{what} in {Path(out) / 'runs.sqlite'}: nothing to export ({dest} "
                         f"left as it was)")
    with Path(dest).open("w", newline="") as f:
        (_write_jsonl if fmt == "jsonl" else _write_csv)(rows, f)
    return len(rows)


def _write_jsonl(rows: list[dict], f) -> None:
    for r in rows:
        f.write(json.dumps({c: r[c] for c in COLUMNS}, sort_keys=True) + "\n")


def _write_csv(rows: list[dict], f) -> None:
    flat = []
    for r in rows:
        m: dict = {}
        _flat("metric", r["metrics"] or {}, m)
        flat.append(m)
    metric_cols = sorted({k for m in flat for k in m})
    w = csv.writer(f)
    w.writerow([*COLUMNS, *metric_cols])
    for r, m in zip(rows, flat, strict=True):
        w.writerow([json.dumps(r[c]) if c in ("config", "metrics", "curve", "info")
                    else r[c] for c in COLUMNS] + [m.get(k, "") for k in metric_cols])
