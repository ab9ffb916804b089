#!/usr/bin/env bash
# Download the wheels the GPU machine lacks (tools/device_wheels.txt) for one Python version, no dependencies, as
# binary manylinux x86-64 wheels:  tools/device_wheels.sh [PYTHON_VERSION (3.12)] [DEST (wheels/cp312)]
# `make gpu-wheels` runs it for the GPU machine's Python 3.12; docs/gpu.md says how they are carried.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
ver=${1:-3.12}
dest=${2:-$repo/wheels/cp${ver/./}}
py=${PYTHON:-python3}
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
mkdir -p "$dest"
"$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$ver" \
  --implementation cp "${platforms[@]}" -d "$dest" -r "$repo/tools/device_wheels.txt"
ls -l "$dest"
