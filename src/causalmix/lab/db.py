"""Every lab run recorded in an embedded SQLite database (``<out>/runs.sqlite``).

A run is keyed by a hash of its whole config and seed (:func:`run_key`, the one key scheme of
every job: experiments and adaptive-study points alike). A row is
written with status ``running`` when the run starts and replaced, in one transaction, by the
finished row (config, metrics, seed, wall time, git revision). SQLite commits are atomic, so a
run killed at any moment leaves either its ``running`` row (re-run on the next invocation) or
its complete ``done`` row (skipped): none is lost and none duplicated.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["RunDB", "git_revision", "run_finding", "run_key"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key          TEXT PRIMARY KEY,
    experiment   TEXT NOT NULL,
    task         TEXT NOT NULL,
    seed         INTEGER NOT NULL,
    suite        TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('running', 'done')),
    config       TEXT NOT NULL,
    metrics      TEXT,
    curve        TEXT,
    info         TEXT,
    wall_time_s  REAL,
    git_rev      TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 1,
    started_at   TEXT NOT NULL,
    finished_at  TEXT
)
"""


def git_revision() -> str:
    """``git rev-parse HEAD`` of the checkout this package runs from (``+dirty`` when the
    working tree has changes), or ``"unknown"`` outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def run_key(job: Any, seed: int) -> str:
    """Identity of (``job``, ``seed``): a hash of ``job.to_json()`` (the job's whole config, as
    JSON: specs in their tagged form, :func:`causalmix.nn.spec_to_dict`) and the seed, so that a
    changed config never reuses a stale result and the same config always finds its run."""
    blob = json.dumps({"experiment": job.to_json(), "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_finding(row: dict) -> str:
    """The key of the finding a run (a row of :meth:`RunDB.runs`) belongs to: its
    ``info["finding"]`` (recorded since findings could come from plugins), else its config's
    ``"finding"``, else the part of its experiment name (``"<finding>/<arm>"``) before the
    first ``/``."""
    info, config = row.get("info") or {}, row.get("config") or {}
    if isinstance(info, dict) and info.get("finding"):
        return info["finding"]
    if isinstance(config, dict) and isinstance(config.get("finding"), str):
        return config["finding"]
    return row["experiment"].partition("/")[0]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class RunDB:
    """The run database of one output folder.

    ``create=False``: the database must exist already. Raises ``ValueError`` when ``out_dir``
    is not a folder, or its ``runs.sqlite`` is missing (``create=False``) or is not a lab run
    database (corrupt, or another file)."""

    def __init__(self, out_dir: str | Path, *, create: bool = True):
        out_dir = Path(out_dir)
        self.path = out_dir / "runs.sqlite"
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"{out_dir} is a file, not a folder: give --out a folder")
        if not create and not self.path.is_file():
            raise ValueError(f"no lab runs in {out_dir}; run `causalmix lab run --out "
                             f"{out_dir}` first")
        out_dir.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path, timeout=30)
        self.conn.row_factory = sqlite3.Row
        try:
            with self.conn:
                self.conn.execute(_SCHEMA)
                cols = {r["name"] for r in self.conn.execute("PRAGMA table_info(runs)")}
        except sqlite3.DatabaseError as err:
            self.conn.close()
            raise ValueError(f"{self.path} is not a lab run database ({err})") from None
        if not {"key", "status", "config", "metrics"} <= cols:
            self.conn.close()
            raise ValueError(f"{self.path} is not a lab run database (its runs table has "
                             f"columns {sorted(cols)})")

    def close(self) -> None:
        self.conn.close()

    def status(self, key: str) -> str | None:
        row = self.conn.execute("SELECT status FROM runs WHERE key = ?", (key,)).fetchone()
        return None if row is None else row["status"]

    def start(self, key: str, *, experiment: str, task: str, seed: int, suite: str,
              config: dict, git_rev: str) -> None:
        """Mark a run as started (an interrupted earlier attempt is overwritten)."""
        with self.conn:
            prev = self.conn.execute("SELECT status, attempts FROM runs WHERE key = ?",
                                     (key,)).fetchone()
            if prev is not None and prev["status"] == "done":
                raise ValueError(f"run {key} ({experiment}, seed {seed}) is already done")
            attempts = 1 if prev is None else prev["attempts"] + 1
            self.conn.execute(
                "INSERT OR REPLACE INTO runs (key, experiment, task, seed, suite, status, "
                "config, git_rev, attempts, started_at) VALUES (?, ?, ?, ?, ?, 'running', ?, ?, "
                "?, ?)",
                (key, experiment, task, seed, suite, json.dumps(config, sort_keys=True), git_rev,
                 attempts, _now()))

    def finish(self, key: str, *, metrics: dict, curve: list, info: dict,
               wall_time_s: float) -> None:
        with self.conn:
            cur = self.conn.execute(
                "UPDATE runs SET status = 'done', metrics = ?, curve = ?, info = ?, "
                "wall_time_s = ?, finished_at = ? WHERE key = ? AND status = 'running'",
                (json.dumps(metrics), json.dumps(curve), json.dumps(info), wall_time_s, _now(),
                 key))
            if cur.rowcount != 1:
                raise RuntimeError(f"run {key} was not marked running; cannot finish it")

    def runs(self, *, status: str | None = "done", keys: list[str] | None = None) -> list[dict]:
        """Rows as dicts (JSON columns decoded), oldest first."""
        q, args = "SELECT * FROM runs", []
        where = []
        if status is not None:
            where.append("status = ?")
            args.append(status)
        if where:
            q += " WHERE " + " AND ".join(where)
        rows = [dict(r) for r in self.conn.execute(q + " ORDER BY started_at, rowid", args)]
        if keys is not None:
            wanted = set(keys)
            rows = [r for r in rows if r["key"] in wanted]
        for r in rows:
            for col in ("config", "metrics", "curve", "info"):
                if r[col] is not None:
                    r[col] = json.loads(r[col])
        return rows
