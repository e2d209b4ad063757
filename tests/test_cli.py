"""The command line as a newcomer meets it: help and argument errors answer without importing torch, and a
missing input file is named as missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from datadistill.cli import main

# Runs the CLI in a fresh interpreter and reports whether torch got imported (help exits through SystemExit).
PROBE = """
import sys
from datadistill.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("TORCH" if "torch" in sys.modules else "NO-TORCH", file=sys.stderr)
"""


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["--help"], id="help"),
        pytest.param(["--version"], id="version"),
        pytest.param(["train", "--help"], id="train-help"),
        pytest.param(["label", "--help"], id="label-help"),
        pytest.param(["select", "--help"], id="select-help"),
        pytest.param(["evaluate", "--help"], id="evaluate-help"),
        pytest.param(["run", "--help"], id="run-help"),
        pytest.param(["demo", "--help"], id="demo-help"),
        pytest.param(["train", "--epochs", "ten"], id="bad-argument"),
        pytest.param(["nosuchcommand"], id="unknown-command"),
    ],
)
def test_help_and_argument_errors_do_not_import_torch(argv: list[str]) -> None:
    result = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    assert result.stderr.strip().splitlines()[-1] == "NO-TORCH", result.stderr


def test_a_missing_data_file_is_named_without_sending_the_user_to_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.json"
    assert main(["train", "--data", str(missing), "--images", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {missing}: file not found\n"
