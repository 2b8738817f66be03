"""Shared scaffolding of the lab's tests (test modules never import each other)."""

from __future__ import annotations

import pytest

from causalmix.cli import main


@pytest.fixture
def cli_error(capsys):
    """``cli_error(argv)``: run the command line, assert it exits with status 2 and one line
    on stderr (no traceback), and return that line."""

    def run(argv) -> str:
        assert main(argv) == 2
        cap = capsys.readouterr()
        lines = cap.err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in cap.err, cap.err
        return lines[0]

    return run
