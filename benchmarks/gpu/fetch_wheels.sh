#!/usr/bin/env bash
# Download the wheels benchmarks/gpu/perf.sh installs on a GPU machine without the service's packages, into
# .gpu-wheels/ (git-ignored), for that machine's Python and platform:
#
#   bash benchmarks/gpu/fetch_wheels.sh                 # this machine's Python version, manylinux x86_64
#   PYVER=3.12 bash benchmarks/gpu/fetch_wheels.sh      # another Python version
#
# Binary wheels only (pydantic-core and friends are compiled), resolved for PLATFORM and PYVER; torch, numpy
# and pillow are left out, the GPU machine has its own. Carry .gpu-wheels/ with the working tree.
set -euo pipefail
py="${PYTHON:-python}"
pyver="${PYVER:-$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
platform="${PLATFORM:-manylinux2014_x86_64}"
dest="${DEST:-.gpu-wheels}"
mkdir -p "$dest"
"$py" -m pip download --quiet --only-binary=:all: --python-version "$pyver" --platform "$platform" \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --dest "$dest" \
    -r benchmarks/gpu/perf-requirements.txt
# numpy and pillow come in as matplotlib's dependencies; perf.sh installs without resolving, keeping the machine's
rm -f "$dest"/numpy-*.whl "$dest"/pillow-*.whl
du -sh "$dest"
ls "$dest"
