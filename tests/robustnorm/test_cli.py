"""The ``robustnorm`` command line: ``--help`` is plain text and loads no torch; the package imports lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest

import robustnorm

# Runs the command line's main() in a fresh interpreter and reports whether torch got imported.
HELP_WITHOUT_TORCH = """
import sys
from robustnorm.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exited:
    assert exited.code == 0, exited.code
print("TORCH IMPORTED" if "torch" in sys.modules else "NO TORCH")
"""


def run_help(*argv: str) -> str:
    done = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH, *argv], capture_output=True, text=True,
                          timeout=120, check=True)
    return done.stdout


def test_help_is_plain_text_and_imports_no_torch() -> None:
    text = run_help("--help")
    assert text.rstrip().endswith("NO TORCH")
    assert "usage: robustnorm" in text and "train" in text and "evaluate" in text
    assert "``" not in text and ":func:" not in text and ":class:" not in text


@pytest.mark.parametrize("command", ["train", "calibrate", "evaluate", "export"])
def test_each_commands_help_is_plain_text(command: str) -> None:
    text = run_help(command, "--help")
    assert f"usage: robustnorm {command}" in text
    assert "``" not in text and ":func:" not in text and ":class:" not in text


def test_the_package_resolves_every_public_name_from_its_submodule() -> None:
    import importlib

    for name in robustnorm.__all__:
        module = importlib.import_module(f"robustnorm.{robustnorm._MODULE_OF[name]}")
        assert getattr(robustnorm, name) is getattr(module, name), name
    with pytest.raises(AttributeError):
        robustnorm.no_such_name  # noqa: B018
