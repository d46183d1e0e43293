//! Reports: one module per output file, each a pure renderer from a [`Comparison`] to
//! bytes, and one writer that puts bytes on disk atomically.

pub mod adapter;
pub mod architecture;
pub mod config;
pub mod json;
pub mod lora;
pub mod summary;
pub mod text;

use crate::comparison::Comparison;
use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// File names of SPEC §4 (comparison part).
pub const DIFFERENCE_TXT: &str = "difference.txt";
pub const WEIGHT_DIFFERENCES_JSON: &str = "weight_differences.json";
pub const CONFIG_COMPARISON_JSON: &str = "config_comparison.json";
pub const ARCHITECTURE_COMPARISON_JSON: &str = "architecture_comparison.json";
pub const COMPARISON_REPORT_TXT: &str = "comparison_report.txt";

/// Writes `bytes` to `path` atomically: a temp file in the same directory, flushed to
/// disk, then renamed over `path`. A reader (or a run killed half-way) sees either the
/// old file or the whole new one, never a truncated one, because rename within a
/// directory is atomic on POSIX filesystems.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".weightdiff-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, "cannot create a temporary file", e))?;
    tmp.write_all(bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .map_err(|e| Error::io(path, "cannot write", e))?;
    tmp.persist(path)
        .map_err(|e| Error::io(path, "cannot rename into place", e.error))?;
    Ok(())
}

/// Renders and writes every comparison report into `dir` (created if needed);
/// returns the paths written, in the order of SPEC §4.
pub fn write_comparison_reports(c: &Comparison, dir: &Path, top: usize) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(dir, "cannot create output directory", e))?;
    let outputs: [(&str, Vec<u8>); 4] = [
        (DIFFERENCE_TXT, text::render(c, top).into_bytes()),
        (WEIGHT_DIFFERENCES_JSON, to_json(&json::render(c))),
        (CONFIG_COMPARISON_JSON, to_json(&config::render(c))),
        (
            ARCHITECTURE_COMPARISON_JSON,
            to_json(&architecture::render(c)),
        ),
    ];
    let mut written = Vec::new();
    for (name, bytes) in outputs {
        let path = dir.join(name);
        write_atomic(&path, &bytes)?;
        written.push(path);
    }
    if let Some(lora) = &c.lora {
        written.extend(lora::write_lora_outputs(lora, dir)?);
    }
    // The summary lists the files written, itself included.
    let summary_path = dir.join(COMPARISON_REPORT_TXT);
    written.push(summary_path.clone());
    write_atomic(&summary_path, summary::render(c, &written, top).as_bytes())?;
    Ok(written)
}

/// Pretty JSON with a trailing newline.
pub fn to_json(v: &serde_json::Value) -> Vec<u8> {
    let mut s = serde_json::to_vec_pretty(v).expect("a Value always serializes");
    s.push(b'\n');
    s
}

/// `1.234e-5`-style formatting of an optional number, `n/a` for none.
pub(crate) fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_string(), |x| format!("{x:.6e}"))
}

/// Human size with binary units.
pub(crate) fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}
