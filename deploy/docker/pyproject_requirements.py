"""Print the requirements of ``pyproject.toml`` (core plus the given extras), one per line.

The Dockerfiles install these in a layer of their own that only ``pyproject.toml`` invalidates, before the
source is copied, so editing the code does not reinstall torch. Usage::

    python pyproject_requirements.py pyproject.toml service,onnx > requirements.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (the GPU image's Ubuntu 22.04) has no tomllib; tomli is the same parser
    import tomli as tomllib


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """The core dependencies and those of each extra, in order, without duplicates."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise SystemExit(f"unknown extras {unknown}; pyproject.toml defines {sorted(optional)}")
    found: list[str] = []
    for requirement in project.get("dependencies", []) + [r for extra in extras for r in optional[extra]]:
        if requirement not in found:
            found.append(requirement)
    return found


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        raise SystemExit("usage: pyproject_requirements.py PYPROJECT [EXTRA,EXTRA...]")
    extras = [extra for extra in (argv[2] if len(argv) == 3 else "").split(",") if extra]
    sys.stdout.write("".join(f"{line}\n" for line in requirements(Path(argv[1]), extras)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
