"""Command line: ``causalmix --version``, ``causalmix lab run | report | list | export`` (also
``python -m causalmix ...``).

Every lab command takes ``--plugin MODULE`` (a module name or a ``.py`` file, repeatable:
imported first, so that the findings and tasks it registers take part) and ``--finding KEY``
(repeatable or comma-separated: only those findings' arms, sections or runs).

Every user error (a bad option value, ``--out`` that is a file, a corrupt database, a folder
without runs, an export that would write no run, a plugin that fails to import, an unknown
``--finding``) exits with status 2 and one line on stderr, never a traceback. Output piped
into a reader that stops early (``causalmix lab list | head -1``) ends quietly with status 0.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from causalmix.lab.export import FORMATS, default_name

__all__ = ["main"]

SUITE_NAMES = ("smoke", "default", "full")


class _UserError(Exception):
    """An error the user can fix; printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line (argparse prints the usage too), status 2
        raise _UserError(f"{self.prog}: {message}")


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {v}")
    return v


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("causalmix")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown (not installed)"


PLUGIN_HELP = ("import MODULE first (a module name on the path, or a .py file; repeatable): "
               "the findings and tasks it registers take part. A plugin's findings need it "
               "on every command, `lab report` too (their judge and plot are code)")
FINDING_HELP = "only these findings (keys, repeatable or comma-separated; default: all)"


def _selection_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE", help=PLUGIN_HELP)
    p.add_argument("--finding", action="append", default=None, metavar="KEY",
                   help=FINDING_HELP.replace("these findings", f"these findings' {what}"))


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="causalmix", description="causalmix command line")
    p.add_argument("--version", action="version", version=f"causalmix {_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    lab = sub.add_parser("lab", help="train the lab's findings and report on them")
    labsub = lab.add_subparsers(dest="lab_command", required=True, parser_class=_Parser)
    out_help = "output folder (default: lab_out)"
    run = labsub.add_parser("run", help="train a suite (resumes: finished runs are skipped)")
    run.add_argument("--suite", default="default", choices=SUITE_NAMES)
    run.add_argument("--out", default="lab_out", help=out_help)
    run.add_argument("--seeds", type=_positive, default=None,
                     help="seeds per arm (default: the suite's own, 3 for default)")
    run.add_argument("--threads", type=_positive, default=None,
                     help="torch threads (default: 1; the models are tiny)")
    run.add_argument("--workers", type=_positive, default=None,
                     help="runs trained at a time, each in its own process (default: the CPUs "
                          "divided by --threads, at most 4; results do not depend on it)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    _selection_options(run, "arms")
    rep = labsub.add_parser("report", help="write report.html and report.md")
    rep.add_argument("--out", default="lab_out", help=out_help)
    rep.add_argument("--suite", default=None, choices=SUITE_NAMES,
                     help="suite to report on (default: that of the latest run)")
    _selection_options(rep, "sections")
    lst = labsub.add_parser("list", help="list the suites and the runs recorded")
    lst.add_argument("--out", default="lab_out", help=out_help)
    _selection_options(lst, "arms")
    exp = labsub.add_parser("export", help="write every run (config, seed, metrics, curves) "
                                           "as JSON lines or CSV, or its metrics as a long "
                                           "CSV (one row per run and metric value)")
    exp.add_argument("--out", default="lab_out", help=out_help)
    exp.add_argument("--format", default="jsonl", choices=FORMATS)
    exp.add_argument("--to", default=None,
                     help="file to write (default: <out>/runs.<format>, <out>/runs_long.csv "
                          "for long; '-' for stdout)")
    exp.add_argument("--suite", default=None, choices=SUITE_NAMES,
                     help="only the runs of this suite")
    _selection_options(exp, "runs")
    return p


def _load_plugins(args) -> None:
    from causalmix.lab.plugins import load_plugin

    for plugin in args.plugin:
        load_plugin(plugin)


def _findings(args, recorded: set[str] = frozenset()) -> list[str] | None:
    """The finding keys ``--finding`` names (None: every one); known are the registered ones
    and ``recorded`` (those the database holds runs of, for export)."""
    from causalmix.lab.findings import FINDINGS

    if args.finding is None:
        return None
    keys = [k.strip() for arg in args.finding for k in arg.split(",") if k.strip()]
    known = [*FINDINGS, *sorted(recorded - set(FINDINGS))]
    unknown = [k for k in keys if k not in known]
    if unknown or not keys:
        raise _UserError(f"causalmix: --finding: unknown finding "
                         f"{', '.join(map(repr, unknown)) or 'none given'}; findings: "
                         f"{', '.join(known)} (a plugin's findings need --plugin)")
    return list(dict.fromkeys(keys))


def _run(args) -> int:
    import torch

    from causalmix.lab.runner import run_suite

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise _UserError(f"--out {out} is a file, not a folder")
    # the command owns its process: one thread by default (the models are so small that a step
    # is dominated by per-op overhead; on a loaded 2-core machine two threads made the smoke
    # suite 20x slower, 66 s against 3 s)
    threads = 1 if args.threads is None else args.threads
    torch.set_num_threads(threads)
    workers = args.workers or max(1, min(4, (os.cpu_count() or 1) // threads))
    run_suite(args.suite, out, seeds=args.seeds, progress=not args.no_progress and workers == 1,
              findings=_findings(args), workers=workers, plugins=tuple(args.plugin))
    return 0


def _report(args) -> int:
    from causalmix.lab.db import RunDB
    from causalmix.lab.report import write_report

    RunDB(args.out, create=False).close()  # says what is missing, creates nothing
    paths = write_report(args.out, args.suite, _findings(args))
    print(f"wrote {paths['html']} and {paths['markdown']}")
    return 0


def _list(args) -> int:
    from causalmix.lab.db import RunDB, run_key
    from causalmix.lab.findings import SUITES
    from causalmix.lab.runner import suite_jobs

    done: dict[str, dict] = {}
    if (Path(args.out) / "runs.sqlite").exists() or Path(args.out).is_file():
        db = RunDB(args.out, create=False)
        try:
            done = {r["key"]: r for r in db.runs(status=None)}
        finally:
            db.close()
    selected = _findings(args)
    for name, size in SUITES.items():
        jobs = suite_jobs(name, selected)
        print(f"suite {name} ({len(jobs)} arms x {size.seeds} seed"
              f"{'' if size.seeds == 1 else 's'})")
        for job in jobs:
            st = [done.get(run_key(job, s), {}).get("status", "-") for s in range(size.seeds)]
            print(f"  {job.name:48s} seeds: {' '.join(st)}")
    return 0


def _export(args) -> int:
    import tempfile

    from causalmix.lab.db import RunDB, run_finding
    from causalmix.lab.export import export_runs

    db = RunDB(args.out, create=False)  # says what is missing, creates nothing
    try:
        selected = _findings(args, {run_finding(r) for r in db.runs(status=None)})
    finally:
        db.close()
    if args.to == "-":
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / default_name(args.format)
            n = export_runs(args.out, path, args.format, suite=args.suite, findings=selected)
            sys.stdout.write(path.read_text())
        return 0
    dest = Path(args.to) if args.to else Path(args.out) / default_name(args.format)
    if dest.is_dir():
        raise _UserError(f"--to {dest} is a folder; give a file name")
    if not dest.parent.is_dir():
        raise _UserError(f"--to {dest}: folder {dest.parent} does not exist")
    n = export_runs(args.out, dest, args.format, suite=args.suite, findings=selected)
    print(f"wrote {n} runs to {dest}")
    return 0


def _stdout_closed() -> int:
    """The reader of stdout went away (``| head``): send what is left to ``/dev/null`` so that
    the interpreter's last flush is quiet too, and end with status 0."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is no file (captured in tests)
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2: a user error, one line on
    stderr; 0 when stdout's reader stops early)."""
    try:
        args = _parser().parse_args(argv)
        if args.command == "lab":
            _load_plugins(args)
        command = {"run": _run, "report": _report, "list": _list, "export": _export}
        status = command[args.lab_command](args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return status
    except BrokenPipeError:
        return _stdout_closed()
    except (_UserError, ValueError, OSError) as err:
        msg = str(err)
        print(msg if msg.startswith("causalmix") else f"causalmix: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("causalmix: interrupted (finished runs are kept; rerun to resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
