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
use crate::error::{Error, Result};
use crate::report::refuse_symlink;
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
        let bad = |reason: String| Error::InvalidOption(format!("{}: {reason}", path.display()));
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

/// Removes the journal of a finished run.
pub fn remove(dir: &Path) -> Result<()> {
    let path = dir.join(JOURNAL_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(&path, "cannot remove journal", e)),
    }
}
