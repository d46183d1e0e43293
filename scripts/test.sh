#!/usr/bin/env bash
# The whole test suite:
#  1. Python's numpy, safetensors and huggingface_hub (PyPI) for the interop tests;
#  2. the SLURM example on a single-node cluster (examples/slurm/test_cluster.sh), when
#     running as root under CI or with WEIGHTDIFF_SLURM_TEST=1: it installs Debian's
#     slurm-wlm and munge and starts (then stops) their daemons;
#  3. under CI, Debian's chromium for the browser test of report.html (elsewhere that
#     test runs when a chromium is installed and says so when it is not);
#  4. every Rust test (unit, integration, doc).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check numpy safetensors huggingface_hub >&2
cargo build --locked
if [ -n "${CI:-}" ] || [ -n "${WEIGHTDIFF_SLURM_TEST:-}" ]; then
  if ! command -v slurmctld > /dev/null || ! command -v munged > /dev/null; then
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >&2
  fi
  timeout 600 bash examples/slurm/test_cluster.sh target/debug/weightdiff
else
  echo "note: SLURM cluster test not run (needs root; set WEIGHTDIFF_SLURM_TEST=1 to run it)" >&2
fi
if [ -n "${CI:-}" ] && ! command -v chromium > /dev/null; then
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >&2
fi
cargo test --locked "$@"
