//! Fixture writers shared by the integration tests.

#![allow(dead_code)]

use assert_cmd::Command;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The `weightdiff` binary under test.
pub fn weightdiff() -> Command {
    Command::cargo_bin("weightdiff").expect("binary built")
}

/// `weightdiff compare --quiet -o OUT BASE FT`; further flags can be appended.
pub fn compare_cli(
    out: impl AsRef<std::ffi::OsStr>,
    base: impl AsRef<std::ffi::OsStr>,
    ft: impl AsRef<std::ffi::OsStr>,
) -> Command {
    let mut c = weightdiff();
    c.args(["compare", "--quiet", "-o"])
        .arg(out)
        .arg(base)
        .arg(ft);
    c
}

/// Bytes of a safetensors file from a raw header string and a data section.
pub fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

/// A tensor to write: name, dtype string, shape, little-endian bytes.
pub struct T {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

pub fn f32_tensor(name: &str, shape: &[usize], values: &[f32]) -> T {
    T {
        name: name.into(),
        dtype: "F32",
        shape: shape.to_vec(),
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

pub fn bf16_tensor(name: &str, shape: &[usize], values: &[f32]) -> T {
    T {
        name: name.into(),
        dtype: "BF16",
        shape: shape.to_vec(),
        data: values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
    }
}

/// A valid safetensors file holding `tensors` in the given order.
pub fn file_bytes(tensors: &[T]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for t in tensors {
        let start = data.len();
        data.extend_from_slice(&t.data);
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [start, data.len()]}),
        );
    }
    raw_file(&Value::Object(header).to_string(), &data)
}

pub fn write_file(path: &Path, tensors: &[T]) -> PathBuf {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, file_bytes(tensors)).unwrap();
    path.to_path_buf()
}

/// Deterministic pseudo-random f32 values in about [-1, 1].
pub fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut g = weightdiff::synthetic::Gaussian::new(seed, "test", "values");
    (0..n).map(|_| (g.next() * 0.3) as f32).collect()
}

/// Reads a JSON output.
pub fn read_json(path: &Path) -> Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The metrics of `all_differences` with the timing fields removed, for comparing runs.
pub fn metrics_without_times(wd: &Value) -> Value {
    let mut all = wd["all_differences"].clone();
    for (_, m) in all.as_object_mut().unwrap() {
        let o = m.as_object_mut().unwrap();
        for k in ["total_time", "compute_time", "reference_time", "speedup"] {
            o.remove(k);
        }
    }
    all
}

/// Writes `base` and `ft` as single files and compares them through the library.
pub fn compare_files(
    base: &[T],
    ft: &[T],
    opts: &weightdiff::CompareOptions,
) -> weightdiff::Comparison {
    let dir = tempfile::tempdir().unwrap();
    let b = write_file(&dir.path().join("base.safetensors"), base);
    let f = write_file(&dir.path().join("ft.safetensors"), ft);
    let (b, f) = (
        weightdiff::Checkpoint::open(&b).unwrap(),
        weightdiff::Checkpoint::open(&f).unwrap(),
    );
    weightdiff::compare(&b, &f, opts, &weightdiff::pipeline::NoProgress).unwrap()
}

/// A comparison's results with the timing fields zeroed, for comparing runs.
pub fn results_without_times(
    c: &weightdiff::Comparison,
) -> Vec<(String, weightdiff::TensorMetrics)> {
    c.results
        .iter()
        .map(|(n, m)| {
            let m = weightdiff::TensorMetrics {
                total_time: 0.0,
                compute_time: 0.0,
                reference_time: None,
                speedup: None,
                ..m.clone()
            };
            (n.clone(), m)
        })
        .collect()
}

/// The one JSON document a successful `--json` run printed on stdout; fails the test,
/// with the run's stderr, when it did not succeed or printed anything else.
pub fn stdout_json(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON document ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}
