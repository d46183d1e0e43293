//! Reports: one module per output file, each a pure renderer from a [`Comparison`] to
//! bytes, and one writer that puts bytes on disk atomically.

pub mod architecture;
pub mod config;
pub mod html;
pub mod json;
pub mod lora;
pub mod outputs;
pub mod quantization;
pub mod summary;
pub mod text;
pub mod trajectory;

use crate::comparison::Comparison;
use crate::error::{Error, Result};
use crate::fsio::{to_json, write_atomic};
use crate::lowrank::detect::Verdict;
use outputs::{Place, Stage};
use std::path::{Path, PathBuf};

/// File names of SPEC §4 (comparison part).
pub const DIFFERENCE_TXT: &str = "difference.txt";
pub const WEIGHT_DIFFERENCES_JSON: &str = "weight_differences.json";
pub const CONFIG_COMPARISON_JSON: &str = "config_comparison.json";
pub const ARCHITECTURE_COMPARISON_JSON: &str = "architecture_comparison.json";
pub const COMPARISON_REPORT_TXT: &str = "comparison_report.txt";
/// Files written for several fine-tunes of one base.
pub const TRAJECTORY_JSON: &str = "trajectory.json";
pub const TRAJECTORY_TXT: &str = "trajectory.txt";

/// Renders and writes every comparison report into `dir` (created if needed);
/// returns the paths written, in the order of SPEC §4.
pub fn write_comparison_reports(c: &Comparison, dir: &Path, top: usize) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(dir, "cannot create output directory", e))?;
    let mut written = write_diff_files(c, dir, top, |_| true)?;
    let docs = match &c.lora {
        Some(lora) => {
            let (files, docs) = lora::write_lora_outputs(lora, dir)?;
            written.extend(files);
            Some(docs)
        }
        None => None,
    };
    written.extend(write_pages(c, docs.as_ref(), dir, top, written.clone())?);
    Ok(written)
}

/// Renders and writes the diff's files of [`outputs::OUTPUTS`] that `which` selects.
fn write_diff_files(
    c: &Comparison,
    dir: &Path,
    top: usize,
    which: impl Fn(&outputs::Output) -> bool,
) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for o in outputs::of(Stage::Diff).filter(|o| which(o)) {
        let render = o.render.expect("every diff output has a renderer");
        let path = o.path(dir);
        write_atomic(&path, &render(c, top))?;
        written.push(path);
    }
    Ok(written)
}

/// Writes the reports rendered for people — `report.html` and `comparison_report.txt`,
/// which lists `written` plus both of them — and returns their paths.
fn write_pages(
    c: &Comparison,
    docs: Option<&lora::LoraDocs>,
    dir: &Path,
    top: usize,
    mut written: Vec<PathBuf>,
) -> Result<Vec<PathBuf>> {
    let html_path = dir.join(html::REPORT_HTML);
    write_atomic(&html_path, html::render(c, docs, top).as_bytes())?;
    let summary_path = dir.join(COMPARISON_REPORT_TXT);
    written.push(html_path.clone());
    written.push(summary_path.clone());
    write_atomic(
        &summary_path,
        summary::render(c, docs, &written, top).as_bytes(),
    )?;
    Ok(vec![html_path, summary_path])
}

/// `weightdiff report DIR`: renders `difference.txt`, `report.html` and
/// `comparison_report.txt` again from the JSON reports in `dir` (after an upgrade, or
/// when they were deleted to save space). Returns the paths written.
pub fn regenerate(dir: &Path, top: usize) -> Result<Vec<PathBuf>> {
    let (c, docs) = load_recorded(dir)?;
    render_recorded(dir, &c, docs.as_ref(), top)
}

/// A JSON report in an output directory; `Ok(None)` when it is not there.
fn read_report_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, "cannot read", e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::InvalidJson {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// The comparison an output directory records (`weight_differences.json`) and, when
/// the LoRA stage ran, its documents.
fn load_recorded(dir: &Path) -> Result<(Comparison, Option<lora::LoraDocs>)> {
    let wd_path = dir.join(WEIGHT_DIFFERENCES_JSON);
    if !wd_path.exists() {
        return Err(Error::NotAModel {
            path: dir.to_path_buf(),
            reason: format!(
                "no {WEIGHT_DIFFERENCES_JSON} here: not the output directory of `weightdiff compare`"
            ),
        });
    }
    let c = json::WeightDifferences::read(&wd_path)?.into_comparison();
    let docs = match read_report_json(&dir.join(lora::LORA_ANALYSIS_JSON))? {
        Some(analysis) => Some(lora::LoraDocs {
            analysis,
            metadata: read_report_json(&dir.join(lora::LORA_METADATA_JSON))?,
        }),
        None => None,
    };
    // Never two runs on one page: LoRA documents that analyse tensors this comparison did
    // not find modified (left by an earlier run, before runs removed what they did not
    // write), or that go with models which are not a base and a derivative, are not it.
    let docs = docs.filter(|d| {
        let modified = c.modified();
        let same_run = d
            .analysis
            .tensors
            .0
            .iter()
            .all(|(k, _)| modified.contains(&k.as_str()));
        if !same_run {
            tracing::warn!(
                dir = %dir.display(),
                "{} belongs to another run than {WEIGHT_DIFFERENCES_JSON}: not rendered",
                lora::LORA_ANALYSIS_JSON
            );
        }
        same_run && crate::relatedness::assess(&c).verdict.is_none()
    });
    Ok((c, docs))
}

/// Writes `difference.txt`, `report.html` and `comparison_report.txt` of a recorded
/// comparison into `dir`; returns their paths.
fn render_recorded(
    dir: &Path,
    c: &Comparison,
    docs: Option<&lora::LoraDocs>,
    top: usize,
) -> Result<Vec<PathBuf>> {
    // The diff's files rendered again (`difference.txt`), then the pages, which list the
    // files a `compare` run writes, in its order, as far as they are still here.
    let mut written = write_diff_files(c, dir, top, |o| o.regenerated)?;
    let present: Vec<PathBuf> = outputs::of(Stage::Diff)
        .chain(outputs::of(Stage::LowRank))
        .map(|o| o.path(dir))
        .filter(|p| p.exists())
        .collect();
    written.extend(write_pages(c, docs, dir, top, present)?);
    Ok(written)
}

/// `weightdiff report DIR` for the directory of several fine-tunes: renders each
/// comparison's pages again, then `trajectory.html`, from the JSON files (the
/// checkpoints in the order `trajectory.json` lists them).
pub fn regenerate_trajectory(dir: &Path, top: usize) -> Result<Vec<PathBuf>> {
    let tj_path = dir.join(TRAJECTORY_JSON);
    let tj: trajectory::Trajectory = read_report_json(&tj_path)?.ok_or_else(|| {
        Error::io(
            &tj_path,
            "cannot read",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        )
    })?;
    let order: Vec<&str> = tj.finetuned.iter().map(String::as_str).collect();
    let mut found: Vec<(usize, String, Comparison, Option<Verdict>)> = Vec::new();
    let mut written = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, "cannot list", e))?;
    for e in entries.filter_map(|e| e.ok()) {
        let sub = e.path();
        if !sub.join(WEIGHT_DIFFERENCES_JSON).is_file() {
            continue;
        }
        let (c, docs) = load_recorded(&sub)?;
        written.extend(render_recorded(&sub, &c, docs.as_ref(), top)?);
        let verdict = match crate::relatedness::assess(&c).verdict {
            Some(v) => Some(v),
            None => docs.map(|d| d.analysis.verdict),
        };
        let rank = order
            .iter()
            .position(|s| *s == c.finetuned.source)
            .unwrap_or(usize::MAX);
        let label = e.file_name().to_string_lossy().into_owned();
        found.push((rank, label, c, verdict));
    }
    found.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    let labels: Vec<String> = found.iter().map(|f| f.1.clone()).collect();
    let verdicts: Vec<Option<Verdict>> = found.iter().map(|f| f.3.clone()).collect();
    let cs: Vec<Comparison> = found.into_iter().map(|f| f.2).collect();
    let page = dir.join(trajectory::TRAJECTORY_HTML);
    write_atomic(
        &page,
        trajectory::render_html(&cs, &labels, &verdicts).as_bytes(),
    )?;
    written.push(page);
    Ok(written)
}

/// Writes `trajectory.json`, `trajectory.txt` and `trajectory.html` for comparisons
/// whose reports are in `dir/labels[i]`; returns the paths.
pub fn write_trajectory(dir: &Path, cs: &[Comparison], labels: &[String]) -> Result<Vec<PathBuf>> {
    let json_path = dir.join(TRAJECTORY_JSON);
    write_atomic(&json_path, &to_json(&trajectory::Trajectory::of(cs)))?;
    let txt_path = dir.join(TRAJECTORY_TXT);
    write_atomic(&txt_path, trajectory::render_text(cs).as_bytes())?;
    let verdicts: Vec<Option<Verdict>> = cs
        .iter()
        .map(|c| {
            crate::relatedness::assess(c)
                .verdict
                .or_else(|| c.lora.as_ref().map(|l| l.verdict.clone()))
        })
        .collect();
    let html_path = dir.join(trajectory::TRAJECTORY_HTML);
    write_atomic(
        &html_path,
        trajectory::render_html(cs, labels, &verdicts).as_bytes(),
    )?;
    Ok(vec![json_path, txt_path, html_path])
}

/// Every file name a run may write at the top of its output directory ([`outputs`]). A run owns these
/// names there: [`remove_stale`] deletes the ones it did not write this time, so a
/// directory never holds two runs. Other files (the user's, the journal, the lock) are
/// never touched.
pub fn owned_files() -> impl Iterator<Item = &'static str> {
    outputs::at(Place::Top).map(|o| o.name)
}

/// Removes from `dir` the outputs of an earlier run that this run (which wrote
/// `written`) did not write again: the [`owned_files`], `lora_adapter/`'s two files (and
/// the directory when that leaves it empty), and the per-model directories of an earlier
/// run of several fine-tunes (a subdirectory holding `weight_differences.json` beside a
/// `trajectory.json`), emptied of owned files the same way. `keep` names files left alone whatever (a merge keeps
/// `part.json` in a part directory it writes into). Returns what was removed.
pub fn remove_stale(dir: &Path, written: &[PathBuf], keep: &[&str]) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let written_here = |p: &Path| written.iter().any(|w| w == p || w.starts_with(p));
    let remove_owned = |d: &Path, removed: &mut Vec<PathBuf>| -> Result<()> {
        for name in owned_files().filter(|n| !keep.contains(n)) {
            let p = d.join(name);
            if !written_here(&p) && std::fs::symlink_metadata(&p).is_ok() {
                std::fs::remove_file(&p).map_err(|e| Error::io(&p, "cannot remove", e))?;
                removed.push(p);
            }
        }
        let adapter = d.join(lora::ADAPTER_DIR);
        if !written_here(&adapter) && adapter.is_dir() && !adapter.is_symlink() {
            for o in outputs::at(Place::Adapter) {
                let p = o.path(d);
                if std::fs::symlink_metadata(&p).is_ok() {
                    std::fs::remove_file(&p).map_err(|e| Error::io(&p, "cannot remove", e))?;
                }
            }
            // Only when empty: anything else in there is not ours.
            if std::fs::remove_dir(&adapter).is_ok() {
                removed.push(adapter);
            }
        }
        Ok(())
    };
    // Per-model directories only in the directory of a run of several fine-tunes.
    let several = dir.join(TRAJECTORY_JSON).is_file();
    remove_owned(dir, &mut removed)?;
    if !several {
        return Ok(removed);
    }
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, "cannot list", e))?;
    for e in entries.filter_map(|e| e.ok()) {
        let sub = e.path();
        if sub.is_symlink() || !sub.is_dir() || written_here(&sub) {
            continue;
        }
        if sub.join(WEIGHT_DIFFERENCES_JSON).is_file() {
            remove_owned(&sub, &mut removed)?;
            if std::fs::remove_dir(&sub).is_ok() {
                removed.push(sub);
            }
        }
    }
    removed.sort();
    removed.dedup();
    Ok(removed)
}

/// Scientific notation as C, Python and NumPy print it (`1.234560e-05`, `0.000000e+00`),
/// so text reports line up with the ones users already have; Rust's `{:e}` writes `e-5`.
pub(crate) fn sci(x: f64, digits: usize) -> String {
    let s = format!("{x:.digits$e}");
    match s.split_once('e') {
        Some((mantissa, exp)) => {
            let e: i32 = exp.parse().expect("Rust writes an integer exponent");
            format!("{mantissa}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs())
        }
        None => s, // NaN, inf
    }
}

/// [`sci`] with 6 digits for an optional number, `n/a` for none.
pub(crate) fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_string(), |x| sci(x, 6))
}

/// Seconds at a precision that shows short runs: `3.2 ms`, `0.41 s`, `12.3 s` (a
/// comparison of a small model takes milliseconds, which `{:.2} s` showed as `0.00 s`).
pub(crate) fn fmt_seconds(t: f64) -> String {
    if t < 0.1 {
        format!("{:.1} ms", t * 1e3)
    } else if t < 10.0 {
        format!("{t:.2} s")
    } else {
        format!("{t:.1} s")
    }
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

#[cfg(test)]
mod tests {
    use super::sci;

    #[test]
    fn scientific_notation_matches_c_and_python() {
        assert_eq!(sci(0.0, 6), "0.000000e+00");
        assert_eq!(sci(1.23456e-5, 6), "1.234560e-05");
        assert_eq!(sci(-2.5e120, 3), "-2.500e+120");
        assert_eq!(sci(1e-6, 0), "1e-06");
        assert_eq!(sci(f64::INFINITY, 6), "inf");
    }

    #[test]
    fn short_runs_show_their_time() {
        assert_eq!(super::fmt_seconds(0.0032), "3.2 ms");
        assert_eq!(super::fmt_seconds(0.412), "0.41 s");
        assert_eq!(super::fmt_seconds(12.34), "12.3 s");
    }
}
