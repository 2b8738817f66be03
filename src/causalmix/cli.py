"""Command line: ``causalmix lab run | report | list``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="causalmix", description="causalmix command line")
    sub = p.add_subparsers(dest="command", required=True)
    lab = sub.add_parser("lab", help="train the lab's experiments and report on them")
    labsub = lab.add_subparsers(dest="lab_command", required=True)
    run = labsub.add_parser("run", help="train a suite (resumes: finished runs are skipped)")
    run.add_argument("--suite", default="default", choices=["smoke", "default", "full"])
    run.add_argument("--out", default="lab_out", help="output folder (default: lab_out)")
    run.add_argument("--seeds", type=int, default=None,
                     help="seeds per experiment (default: the suite's own, 3 for default)")
    run.add_argument("--threads", type=int, default=None,
                     help="torch threads (default: 1; the models are tiny)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    rep = labsub.add_parser("report", help="write report.html and report.md")
    rep.add_argument("--out", default="lab_out", help="output folder (default: lab_out)")
    rep.add_argument("--suite", default=None, choices=["smoke", "default", "full"],
                     help="suite to report on (default: that of the latest run)")
    lst = labsub.add_parser("list", help="list the suites and the runs recorded")
    lst.add_argument("--out", default="lab_out", help="output folder (default: lab_out)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "lab":
        from causalmix.lab import runner
        from causalmix.lab.experiments import SUITES, suite

        if args.lab_command == "run":
            if args.seeds is not None and args.seeds < 1:
                print("causalmix: --seeds must be >= 1", file=sys.stderr)
                return 2
            runner.run_suite(args.suite, args.out, seeds=args.seeds, threads=args.threads,
                             progress=not args.no_progress)
            return 0
        if args.lab_command == "report":
            from pathlib import Path

            from causalmix.lab.report import write_report

            if not (Path(args.out) / "runs.sqlite").exists():
                print(f"causalmix: no lab runs in {args.out}; run `causalmix lab run --out "
                      f"{args.out}` first", file=sys.stderr)
                return 2
            try:
                paths = write_report(args.out, args.suite)
            except ValueError as err:  # e.g. no finished run of that suite yet
                print(f"causalmix: {err}", file=sys.stderr)
                return 2
            print(f"wrote {paths['html']} and {paths['markdown']}")
            return 0
        if args.lab_command == "list":
            from pathlib import Path

            from causalmix.lab.db import RunDB

            done: dict[str, dict] = {}
            if (Path(args.out) / "runs.sqlite").exists():
                db = RunDB(args.out)
                try:
                    done = {r["key"]: r for r in db.runs(status=None)}
                finally:
                    db.close()
            for name in SUITES:
                exps, seeds = suite(name)
                print(f"suite {name} ({len(exps)} experiments x {seeds} seeds)")
                for e in exps:
                    st = [done.get(e.run_key(s), {}).get("status", "-") for s in range(seeds)]
                    print(f"  {e.name:44s} seeds: {' '.join(st)}")
            return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
