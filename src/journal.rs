//! The run journal: per-tensor results appended to a file in the output directory as
//! they complete, so that a run killed at any point (even by SIGKILL) can be resumed
//! with `--resume` without recomputing what it finished.
//!
//! Format: JSON lines. The first line is a header with the fingerprint of the inputs
//! and options; each further line is one tensor's metrics. Lines are flushed and the
//! file fsync'd every [`SYNC_EVERY`] tensors and at the end, so a crash loses at most
//! that many results; a torn last line is ignored on reading. Only successful results
//! are journaled: a tensor that failed is tried again on resume.

use crate::comparison::TensorMetrics;
use crate::error::{Error, JournalError, Result};
use crate::fsio::refuse_symlink;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

/// File name of the journal inside the output directory.
pub const JOURNAL_FILE: &str = ".weightdiff-journal.jsonl";
/// Results between two fsyncs: bounds what a crash can lose, while keeping the cost of
/// fsync (milliseconds on many filesystems) far from every tensor.
pub const SYNC_EVERY: usize = 32;
const VERSION: u32 = 1;
/// The low-rank journal's format: 2 since its factors are stored in their own dtype, 3
/// since a screen's B may come from its first pass (`lowrank::rsvd::decompose`), which
/// changes the last bits of the results an older journal holds.
const LOWRANK_VERSION: u32 = 3;

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Line {
    Header {
        version: u32,
        fingerprint: String,
        description: String,
    },
    Tensor {
        name: String,
        metrics: Box<TensorMetrics>,
    },
}

/// An open journal, appending.
pub struct Journal {
    path: PathBuf,
    out: BufWriter<File>,
    unsynced: usize,
}

/// Fingerprint of a run: a hash of its description (inputs with sizes and modification
/// times, and the options that change results), plus the description itself for messages.
#[derive(Debug, Clone, PartialEq)]
pub struct Fingerprint {
    pub hash: String,
    pub description: String,
}

impl Fingerprint {
    /// Hashes `description` (FNV-1a, 64 bits: identity, not security).
    pub fn new(description: String) -> Fingerprint {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in description.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        Fingerprint {
            hash: format!("{h:016x}"),
            description,
        }
    }
}

impl Journal {
    /// Starts a new journal in `dir` (replacing any old one).
    pub fn create(dir: &Path, fp: &Fingerprint) -> Result<Journal> {
        let path = dir.join(JOURNAL_FILE);
        refuse_symlink(&path)?;
        let file = File::create(&path).map_err(|e| Error::io(&path, "cannot create journal", e))?;
        let mut j = Journal {
            path,
            out: BufWriter::new(file),
            unsynced: 0,
        };
        j.write(&Line::Header {
            version: VERSION,
            fingerprint: fp.hash.clone(),
            description: fp.description.clone(),
        })?;
        j.sync()?;
        Ok(j)
    }

    /// Reopens the journal in `dir` for a resumed run: checks that it was written for the
    /// same fingerprint and returns the results it holds. Without a journal, starts one.
    pub fn resume(
        dir: &Path,
        fp: &Fingerprint,
    ) -> Result<(Journal, BTreeMap<String, TensorMetrics>)> {
        let path = dir.join(JOURNAL_FILE);
        if !path.exists() {
            return Ok((Journal::create(dir, fp)?, BTreeMap::new()));
        }
        refuse_symlink(&path)?;
        let file = File::open(&path).map_err(|e| Error::io(&path, "cannot open journal", e))?;
        let mut lines = BufReader::new(file).lines();
        let bad = |reason: String| Error::from(JournalError::new(&path, reason));
        let header = lines
            .next()
            .transpose()
            .map_err(|e| Error::io(&path, "cannot read journal", e))?
            .and_then(|l| serde_json::from_str::<Line>(&l).ok());
        match header {
            Some(Line::Header {
                version,
                fingerprint,
                description,
            }) => {
                if version != VERSION || fingerprint != fp.hash {
                    return Err(bad(format!(
                        "cannot resume: the journal was written for other inputs or options.\n  journal: {description}\n  now:     {}\nRun without --resume to start over.",
                        fp.description
                    )));
                }
            }
            _ => {
                return Err(bad(
                    "cannot resume: not a weightdiff journal (no header); run without --resume"
                        .into(),
                ));
            }
        }
        let mut done = BTreeMap::new();
        for line in lines {
            let Ok(line) = line else { break };
            // A torn last line (killed mid-write) does not parse: stop there.
            match serde_json::from_str::<Line>(&line) {
                Ok(Line::Tensor { name, metrics }) => {
                    done.insert(name, *metrics);
                }
                _ => break,
            }
        }
        // Rewrite the journal with the complete lines only, so appends follow a clean line.
        let mut j = Journal::create(dir, fp)?;
        for (name, metrics) in &done {
            j.write(&Line::Tensor {
                name: name.clone(),
                metrics: Box::new(metrics.clone()),
            })?;
        }
        j.sync()?;
        Ok((j, done))
    }

    fn write(&mut self, line: &Line) -> Result<()> {
        serde_json::to_writer(&mut self.out, line)
            .map_err(|e| Error::io(&self.path, "cannot write journal", std::io::Error::other(e)))?;
        self.out
            .write_all(b"\n")
            .map_err(|e| Error::io(&self.path, "cannot write journal", e))
    }

    /// Appends one tensor's result; syncs every [`SYNC_EVERY`] results.
    pub fn record(&mut self, name: &str, metrics: &TensorMetrics) -> Result<()> {
        self.write(&Line::Tensor {
            name: name.to_string(),
            metrics: Box::new(metrics.clone()),
        })?;
        self.unsynced += 1;
        if self.unsynced >= SYNC_EVERY {
            self.sync()?;
        }
        Ok(())
    }

    /// Flushes and fsyncs.
    pub fn sync(&mut self) -> Result<()> {
        self.out
            .flush()
            .map_err(|e| Error::io(&self.path, "cannot write journal", e))?;
        self.out
            .get_ref()
            .sync_data()
            .map_err(|e| Error::io(&self.path, "cannot sync journal", e))?;
        self.unsynced = 0;
        Ok(())
    }
}

impl crate::comparison::ResultSink for Journal {
    fn record(&mut self, name: &str, metrics: &TensorMetrics) -> Result<()> {
        Journal::record(self, name, metrics)
    }
    fn sync(&mut self) -> Result<()> {
        Journal::sync(self)
    }
}

/// Removes the journals (the diff's and the low-rank stage's) of a finished run.
pub fn remove(dir: &Path) -> Result<()> {
    for name in [JOURNAL_FILE, LOWRANK_JOURNAL_FILE, LOWRANK_FACTORS_FILE] {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&path, "cannot remove journal", e)),
        }
    }
    Ok(())
}

/// File names of the low-rank stage's journal: JSON lines (header, then one line per
/// finished matrix: its spectrum and its factors' metadata) and the factors themselves,
/// appended as raw little-endian values of their storage dtype (B then A; the factors
/// hold values of that dtype, so this is lossless and a quarter of f64's bytes for bf16)
/// to a sidecar at the offset each line names. A matrix counts as finished only once its
/// line is complete, and its line is written after its factors, so a kill at any point
/// leaves a readable prefix.
pub const LOWRANK_JOURNAL_FILE: &str = ".weightdiff-lowrank-journal.jsonl";
pub const LOWRANK_FACTORS_FILE: &str = ".weightdiff-lowrank-factors.bin";

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum LowRankLine {
    Header {
        version: u32,
        fingerprint: String,
    },
    Tensor {
        name: String,
        spectrum: Box<crate::lowrank::TensorSpectrum>,
        factors: Option<FactorsMeta>,
    },
}

#[derive(Serialize, Deserialize)]
struct FactorsMeta {
    rank: usize,
    m: usize,
    n: usize,
    dtype: crate::checkpoint::dtype::DType,
    residual: f64,
    residual_stored: f64,
    /// Byte offset of B (m·rank values) then A (rank·n values) in the sidecar.
    offset: u64,
    /// The dtype of those values in the sidecar: `dtype`, or F64 for a dtype that
    /// [`crate::checkpoint::dtype::encode`] does not write.
    stored: crate::checkpoint::dtype::DType,
}

/// What a finished matrix contributes on resume.
pub type LowRankDone = (
    crate::lowrank::TensorSpectrum,
    Option<crate::lowrank::extract::Factors>,
);

/// The low-rank stage's journal, appending.
pub struct LowRankJournal {
    path: PathBuf,
    out: BufWriter<File>,
    factors_path: PathBuf,
    factors: File,
    factors_len: u64,
}

impl LowRankJournal {
    /// Opens the journal in `dir` for `fp` (the diff's fingerprint plus the low-rank
    /// options). With `resume`, returns the matrices a journal of the same fingerprint
    /// holds and appends after them; otherwise (or for another fingerprint) starts over.
    pub fn open(
        dir: &Path,
        fp: &Fingerprint,
        resume: bool,
    ) -> Result<(LowRankJournal, BTreeMap<String, LowRankDone>)> {
        let path = dir.join(LOWRANK_JOURNAL_FILE);
        let factors_path = dir.join(LOWRANK_FACTORS_FILE);
        refuse_symlink(&path)?;
        refuse_symlink(&factors_path)?;
        let done = if resume {
            read_lowrank(&path, &factors_path, fp).unwrap_or_default()
        } else {
            BTreeMap::new()
        };
        // Rewrite both files with what was recovered, so appends follow clean data.
        let file = File::create(&path).map_err(|e| Error::io(&path, "cannot create journal", e))?;
        let factors = File::create(&factors_path)
            .map_err(|e| Error::io(&factors_path, "cannot create journal", e))?;
        let mut j = LowRankJournal {
            path,
            out: BufWriter::new(file),
            factors_path,
            factors,
            factors_len: 0,
        };
        j.line(&LowRankLine::Header {
            version: LOWRANK_VERSION,
            fingerprint: fp.hash.clone(),
        })?;
        for (name, (spectrum, factors)) in &done {
            j.record(name, spectrum, factors.as_ref())?;
        }
        j.sync()?;
        Ok((j, done))
    }

    fn line(&mut self, line: &LowRankLine) -> Result<()> {
        serde_json::to_writer(&mut self.out, line)
            .map_err(|e| Error::io(&self.path, "cannot write journal", std::io::Error::other(e)))?;
        self.out
            .write_all(b"\n")
            .map_err(|e| Error::io(&self.path, "cannot write journal", e))?;
        // Flushed per matrix: a matrix's work is seconds, a line microseconds.
        self.out
            .flush()
            .map_err(|e| Error::io(&self.path, "cannot write journal", e))
    }

    /// Appends one finished matrix: its factors to the sidecar, then its line.
    pub fn record(
        &mut self,
        name: &str,
        spectrum: &crate::lowrank::TensorSpectrum,
        factors: Option<&crate::lowrank::extract::Factors>,
    ) -> Result<()> {
        let meta = match factors {
            None => None,
            Some(f) => {
                let offset = self.factors_len;
                let (stored, bytes) = (f.encoding(), f.bytes());
                self.factors
                    .write_all(bytes)
                    .map_err(|e| Error::io(&self.factors_path, "cannot write journal", e))?;
                self.factors_len += bytes.len() as u64;
                Some(FactorsMeta {
                    rank: f.rank,
                    m: f.m,
                    n: f.n,
                    dtype: f.dtype,
                    residual: f.residual,
                    residual_stored: f.residual_stored,
                    offset,
                    stored,
                })
            }
        };
        self.line(&LowRankLine::Tensor {
            name: name.to_string(),
            spectrum: Box::new(spectrum.clone()),
            factors: meta,
        })
    }

    /// Flushes and fsyncs both files.
    pub fn sync(&mut self) -> Result<()> {
        self.out
            .flush()
            .map_err(|e| Error::io(&self.path, "cannot write journal", e))?;
        self.factors
            .sync_data()
            .map_err(|e| Error::io(&self.factors_path, "cannot sync journal", e))?;
        self.out
            .get_ref()
            .sync_data()
            .map_err(|e| Error::io(&self.path, "cannot sync journal", e))
    }
}

/// The finished matrices of a low-rank journal written for `fp`; `None` when there is
/// none or it was written for other inputs or options (the stage then starts over).
fn read_lowrank(
    path: &Path,
    factors_path: &Path,
    fp: &Fingerprint,
) -> Option<BTreeMap<String, LowRankDone>> {
    let mut lines = BufReader::new(File::open(path).ok()?).lines();
    match serde_json::from_str::<LowRankLine>(&lines.next()?.ok()?).ok()? {
        LowRankLine::Header {
            version,
            fingerprint,
        } if version == LOWRANK_VERSION && fingerprint == fp.hash => {}
        _ => return None,
    }
    let bin = std::fs::read(factors_path).ok()?;
    let mut done = BTreeMap::new();
    for line in lines {
        let Ok(line) = line else { break };
        // A torn last line (killed mid-write) does not parse: stop there.
        let Ok(LowRankLine::Tensor {
            name,
            spectrum,
            factors,
        }) = serde_json::from_str::<LowRankLine>(&line)
        else {
            break;
        };
        let factors = match factors {
            None => None,
            Some(f) => {
                let (nb, na) = (f.m * f.rank, f.rank * f.n);
                let start = usize::try_from(f.offset).ok()?;
                let bytes = bin.get(start..start + (nb + na) * f.stored.size())?;
                let mut g = crate::lowrank::extract::Factors::from_bytes(
                    f.rank, f.m, f.n, f.dtype, f.stored, bytes,
                )?;
                g.residual = f.residual;
                g.residual_stored = f.residual_stored;
                Some(g)
            }
        };
        done.insert(name, (*spectrum, factors));
    }
    Some(done)
}

#[cfg(test)]
mod lowrank_tests {
    use super::*;
    use crate::checkpoint::dtype::DType;
    use crate::lowrank::TensorSpectrum;
    use crate::lowrank::extract::Factors;

    fn spectrum() -> TensorSpectrum {
        TensorSpectrum {
            shape: [2, 3],
            singular_values: vec![2.0, 1.0],
            energy: vec![0.8, 1.0],
            effective_rank_90: Some(2),
            effective_rank_99: Some(2),
            stable_rank: Some(1.25),
            detected_rank: Some(1),
            noise_floor: 0.01,
            gap_ratio: Some(2.0),
            frobenius_norm: 5f64.sqrt(),
            residuals: BTreeMap::new(),
            method: crate::lowrank::Method::Exact,
            path: crate::lowrank::DeltaPath::InMemory,
            products: crate::lowrank::rsvd::Precision::F64,
            sketch_width: 2,
            power_iters: 0,
            reads: 1,
            single_pass: false,
            time: 0.5,
        }
    }

    #[test]
    fn a_resumed_low_rank_journal_returns_what_was_recorded_for_the_same_inputs_only() {
        let dir = tempfile::tempdir().unwrap();
        let fp = Fingerprint::new("inputs and options".into());
        // Values of the dtype, as extraction leaves them.
        let mut f = Factors::new(
            1,
            2,
            3,
            DType::BF16,
            &[1.5, -2.25],
            &[0.125, -0.1875, f32::MIN_POSITIVE as f64],
        );
        f.residual = 0.25;
        f.residual_stored = 0.2500001;
        {
            let (mut j, done) = LowRankJournal::open(dir.path(), &fp, false).unwrap();
            assert!(done.is_empty());
            j.record("w1", &spectrum(), Some(&f)).unwrap();
            j.record("w2", &spectrum(), None).unwrap();
        }
        // A torn last line (killed mid-write) is ignored.
        let path = dir.path().join(LOWRANK_JOURNAL_FILE);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"kind\":\"tensor\",\"na");
        std::fs::write(&path, text).unwrap();
        let (_, done) = LowRankJournal::open(dir.path(), &fp, true).unwrap();
        assert_eq!(done.len(), 2);
        let (s, g) = &done["w1"];
        assert_eq!(s.singular_values, spectrum().singular_values);
        let g = g.as_ref().unwrap();
        assert_eq!(
            (g.b(), g.a(), g.residual_stored),
            (f.b(), f.a(), f.residual_stored)
        );
        assert!(done["w2"].1.is_none());
        // Recovered entries were rewritten: a second resume still has them.
        let (_, again) = LowRankJournal::open(dir.path(), &fp, true).unwrap();
        assert_eq!(again.len(), 2);
        let other = Fingerprint::new("other options".into());
        let (_, none) = LowRankJournal::open(dir.path(), &other, true).unwrap();
        assert!(none.is_empty());
    }
}
