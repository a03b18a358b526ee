#!/usr/bin/env bash
# Fill ./.devcarry (git-ignored, < 64 MiB with the tree) with what a lent GPU machine lacks for the device calls of
# this folder: the wheels of envs/device-wheels.txt (the lock's versions), pytest and its two dependencies (the lock's
# versions: the GPU tests), and the demo shards (results/data/shards, made by `snakemake shards` if absent).
# Run here, in the repository root, where the package registry is reachable:   bash bench/device/prepare.sh
# Then each call: run(command="bash bench/device/callN.sh", carry=[".devcarry"]); see bench/device/README.md.
set -euo pipefail
pin() { grep -oP "^$1==\K[^ ]+" envs/requirements.lock; }
mkdir -p .devcarry/whl .devcarry/extra
wheels=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
        --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform any)
"${wheels[@]}" -d .devcarry/whl $(grep -v "^#" envs/device-wheels.txt) 2>&1 | grep -v "^WARNING: Location" || true
"${wheels[@]}" -d .devcarry/extra "pytest==$(pin pytest)" "pluggy==$(pin pluggy)" "iniconfig==$(pin iniconfig)" \
  2>&1 | grep -v "^WARNING: Location" || true
[ -f results/data/shards/report.json ] || .venv/bin/snakemake --cores 2 shards
rm -rf .devcarry/shards && cp -r results/data/shards .devcarry/shards
# PyAV for the GPU tests' demo videos (train_helpers.encode_demo_samples): 34 MB, more than .devcarry's room under
# the 64 MiB a call carries, so it travels alone in a call of its own (av.sh) on the warm machine
mkdir -p .devcarry-av
"${wheels[@]}" -d .devcarry-av "av==$(pin av)" 2>&1 | grep -v "^WARNING: Location" || true
du -sh .devcarry .devcarry-av
