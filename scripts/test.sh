#!/usr/bin/env bash
# The whole test suite:
#  1. a Python virtual environment, target/test-venv (never the system interpreter: stock
#     Debian and Ubuntu refuse system-wide pip installs, PEP 668), with the pinned packages of
#     tests/python/requirements.txt: numpy, safetensors and huggingface_hub for the interop
#     tests, torch, transformers and peft for the architecture matrix (tests/it/peft.rs).
#     pip runs only when that file changed since the last install; its wheels come from pip's
#     cache after the first download. `cargo test` finds the venv through WEIGHTDIFF_PYTHON.
#     Debian and Ubuntu need their python3-venv package for it (installed under CI as root);
#  2. the Python package (pyproject.toml, python/): maturin (pinned in
#     tests/python/package-requirements.txt, in target/py-build-venv) builds the wheel with
#     the dev profile (its dependencies are optimized, see Cargo.toml; a release wheel
#     costs minutes of compiling more); pip installs it into a fresh target/py-venv
#     (made anew whenever the wheel changes) with pytest, pandas, pyarrow, polars and
#     tqdm, and pytest runs tests/python/test_package.py there;
#  3. the SLURM example on a single-node cluster (examples/slurm/test_cluster.sh), only under
#     CI or with WEIGHTDIFF_SLURM_TEST=1: it installs Debian's slurm-wlm and munge when
#     missing (apt-get: root) and starts (then stops) their daemons;
#  4. under CI, Debian's chromium for the browser test of report.html (elsewhere that
#     test runs when a chromium is installed and says so when it is not);
#  5. every Rust test (unit, integration, doc).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=$PWD/target/test-venv
requirements=tests/python/requirements.txt
if [ ! -x "$venv/bin/pip" ]; then # none yet, or one left half-made (no ensurepip)
  rm -rf "$venv"
  mkdir -p target
  if ! python3 -m venv "$venv" >&2; then
    rm -rf "$venv"
    if [ -n "${CI:-}" ] && [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
      apt-get update -qq >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
      python3 -m venv "$venv" >&2
    else
      echo "error: python3 -m venv failed; on Debian/Ubuntu install python3-venv (apt-get install python3-venv)" >&2
      exit 1
    fi
  fi
fi
if ! cmp -s "$requirements" "$venv/installed-requirements.txt"; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" >&2
  cp "$requirements" "$venv/installed-requirements.txt"
fi
export WEIGHTDIFF_PYTHON=$venv/bin/python

cargo build --locked

py_requirements=tests/python/package-requirements.txt
build_venv=$PWD/target/py-build-venv
if ! cmp -s "$py_requirements" "$build_venv/installed-requirements.txt"; then
  rm -rf "$build_venv"
  python3 -m venv "$build_venv" >&2
  "$build_venv/bin/pip" install --quiet --disable-pip-version-check "$(grep '^maturin==' "$py_requirements")" >&2
  cp "$py_requirements" "$build_venv/installed-requirements.txt"
fi
rm -rf target/wheels
"$build_venv/bin/maturin" build --locked --profile dev --strip --quiet \
  --interpreter "$build_venv/bin/python" --out target/wheels >&2
wheel=$(ls target/wheels/weightdiff-*.whl)
py_venv=$PWD/target/py-venv
# The wheel's package files (its dist-info's SBOM has a new timestamp every build).
installed() {
  "$build_venv/bin/python" -c 'import hashlib, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
print(hashlib.sha256(b"".join(z.read(n) for n in sorted(z.namelist()) if n.startswith("weightdiff/"))).hexdigest())' "$wheel"
  cat "$py_requirements"
}
if ! installed | cmp -s - "$py_venv/installed-wheel"; then
  rm -rf "$py_venv"
  python3 -m venv "$py_venv" >&2
  "$py_venv/bin/pip" install --quiet --disable-pip-version-check -r "$py_requirements" "$wheel" >&2
  installed > "$py_venv/installed-wheel"
fi
# From a directory without a `weightdiff` package: the installed one is tested.
(cd target && "$py_venv/bin/python" -m pytest -q -p no:cacheprovider ../tests/python/test_package.py)
if [ -n "${CI:-}" ] || [ -n "${WEIGHTDIFF_SLURM_TEST:-}" ]; then
  if ! command -v slurmctld > /dev/null || ! command -v munged > /dev/null; then
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >&2
  fi
  timeout 600 bash examples/slurm/test_cluster.sh target/debug/weightdiff
else
  echo "note: SLURM cluster test skipped (it runs under CI or with WEIGHTDIFF_SLURM_TEST=1)" >&2
fi
if [ -n "${CI:-}" ] && ! command -v chromium > /dev/null; then
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >&2
fi
cargo test --locked "$@"
