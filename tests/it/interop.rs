//! Python's `safetensors` + `numpy` recompute our metrics from the same files, as an
//! implementation independent of ours. `scripts/test.sh` installs both into its virtual
//! environment; under CI a missing module fails the test instead of skipping it.

use crate::common::*;
use std::process::Command;

/// The Python of the tests: `$WEIGHTDIFF_PYTHON` (`scripts/test.sh` sets it to the virtual
/// environment it makes, `target/test-venv`), else `python3` on PATH. Every test that runs
/// Python starts it here.
pub fn python() -> Command {
    Command::new(std::env::var_os("WEIGHTDIFF_PYTHON").unwrap_or_else(|| "python3".into()))
}

pub fn python_ready() -> bool {
    python_has("numpy, safetensors")
}

/// Whether [`python`] can import `modules` (comma-separated). Under CI a missing module
/// fails the test instead: `scripts/test.sh` installs them.
pub fn python_has(modules: &str) -> bool {
    let ok = python()
        .args(["-c", &format!("import {modules}")])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "a Python with {modules} is required in CI (scripts/test.sh installs it and sets \
             WEIGHTDIFF_PYTHON)"
        );
        eprintln!(
            "skipping Python test: no {modules} in $WEIGHTDIFF_PYTHON or python3 \
             (scripts/test.sh makes a virtual environment with them)"
        );
    }
    ok
}

#[test]
fn numpy_recomputes_the_reported_metrics() {
    if !python_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut spec = weightdiff::synthetic::demo_spec();
    spec.dtype = weightdiff::checkpoint::dtype::DType::F16;
    let pair = weightdiff::synthetic::build_pair(&spec, dir.path()).unwrap();
    let out = dir.path().join("out");
    compare_cli(&out, &pair.base, &pair.finetuned)
        .assert()
        .success();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/check_metrics.py");
    let status = python()
        .arg(script)
        .arg(&pair.base)
        .arg(&pair.finetuned)
        .arg(out.join("weight_differences.json"))
        .status()
        .unwrap();
    assert!(
        status.success(),
        "numpy disagrees with weightdiff (see output above)"
    );
}
