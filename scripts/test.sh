#!/usr/bin/env bash
# The whole test suite: installs what the interop tests need (Python's numpy and
# safetensors, from PyPI), then runs every Rust test (unit, integration, doc).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check numpy safetensors >&2
cargo test --locked "$@"
