"""``causalmix lab export``: every run of a folder's database as JSON lines or CSV (one line or
row per run), or as a long CSV table (one row per run and metric value)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from causalmix.lab.db import RunDB, run_finding

__all__ = ["FORMATS", "LONG_COLUMNS", "default_name", "export_runs"]

#: What ``export_runs(fmt=...)`` writes: ``"jsonl"``, ``"csv"`` (one row per run) or ``"long"``
#: (a CSV of one row per (run, metric value), :data:`LONG_COLUMNS`).
FORMATS = ("csv", "jsonl", "long")

#: The header of ``fmt="long"``: the run's key, suite, finding, experiment (``"<finding>/<arm>"``),
#: arm, task, seed, status, then ``metric`` (the path of a value in the run's metrics, nested
#: keys and list indices joined by ``.``: ``accuracy_by_pairs.16``) and its ``value``.
LONG_COLUMNS = ("key", "suite", "finding", "experiment", "arm", "task", "seed", "status",
                "metric", "value")
COLUMNS = ("key", "experiment", "task", "seed", "suite", "status", "git_rev", "attempts",
           "started_at", "finished_at", "wall_time_s", "config", "metrics", "curve", "info")


def _flat(prefix: str, x, out: dict, lists: bool = False) -> None:
    if isinstance(x, dict) or (lists and isinstance(x, list)):
        for k, v in (x.items() if isinstance(x, dict) else enumerate(x)):
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out, lists)
    else:
        out[prefix] = x


def default_name(fmt: str) -> str:
    """The file ``causalmix lab export`` writes in the output folder without ``--to``:
    ``runs.jsonl``, ``runs.csv`` or, for ``fmt="long"``, ``runs_long.csv``."""
    return "runs_long.csv" if fmt == "long" else f"runs.{fmt}"


def export_runs(out: str | Path, dest: str | Path, fmt: str = "jsonl", *,
                suite: str | None = None, findings: list[str] | None = None) -> int:
    """Write every run in ``out/runs.sqlite`` (of ``suite`` if given; finished and
    interrupted) to ``dest``: ``fmt="jsonl"``, one JSON object per run with the columns of
    :data:`COLUMNS` (config, metrics, curve and info as nested objects; specs in the config in
    their tagged form, ``{"type": "Prefix", "n": 9}``); ``fmt="csv"``, one row per run with
    those columns (nested ones as JSON text) plus one ``metric.<name>`` column per scalar metric
    (nested metrics flattened, e.g. ``metric.accuracy_by_pairs.32``); ``fmt="long"``, a CSV
    with the header :data:`LONG_COLUMNS` and one row per leaf value of each run's metrics
    (dicts and lists walked down to numbers, strings, booleans and nulls; a boolean is
    written 1 or 0, a null as an empty cell; a run still running has no metrics and no row).
    ``findings``: only the runs of those finding keys (:func:`~causalmix.lab.db.run_finding`).
    Returns the number of runs written. With no run to write it raises ``ValueError`` and
    leaves ``dest`` as it was."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {list(FORMATS)}, got {fmt!r}")
    db = RunDB(out, create=False)
    try:
        rows = [r for r in db.runs(status=None) if (suite is None or r["suite"] == suite)
                and (findings is None or run_finding(r) in findings)]
    finally:
        db.close()
    if not rows:
        what = "no runs" + ("" if suite is None else f" of suite {suite!r}") + \
            ("" if findings is None else f" of {', '.join(findings)}")
        raise ValueError(f"{what} in {Path(out) / 'runs.sqlite'}: nothing to export ({dest} "
                         f"left as it was)")
    write = {"jsonl": _write_jsonl, "csv": _write_csv, "long": _write_long}[fmt]
    with Path(dest).open("w", newline="") as f:
        write(rows, f)
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


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return int(v)
    return v


def _write_long(rows: list[dict], f) -> None:
    w = csv.writer(f)
    w.writerow(LONG_COLUMNS)
    for r in rows:
        leaves: dict = {}
        _flat("", r["metrics"] or {}, leaves, lists=True)
        head = [r["key"], r["suite"], run_finding(r), r["experiment"],
                (r["info"] or {}).get("arm", r["experiment"].partition("/")[2]), r["task"],
                r["seed"], r["status"]]
        for path, v in leaves.items():
            w.writerow([*head, path, _cell(v)])
