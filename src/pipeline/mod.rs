//! The pipeline: checkpoints → pairs → windows → kernels → a [`Comparison`], by job:
//! [`plan`] (which pairs, this shard's, cut into which windows), `diff` (the windows
//! compared in parallel: [`compare`], [`compare_many`]) and `lora_stage` (the low-rank
//! analysis and the adapter's contents: [`analyze_lora`], [`lora_parts`],
//! [`assemble_lora`]). This module holds their options and the progress they report.
//!
//! Every tensor pair is cut into windows of at most [`CompareOptions::window_bytes`]
//! per side, but for a matrix whose sketch the diff computes (`Capture`): its windows are
//! the sketch's row blocks, at least 32 rows and up to 4 MiB per side
//! ([`crate::lowrank::LowRankOptions::min_block_rows`]). Windows of all tensors are
//! processed in parallel by a rayon pool; each window is read, reduced to an [`Accum`],
//! and dropped, so resident memory is bounded by `threads × 2 × window_bytes` (that
//! 4 MiB for such matrices) whatever the model size. Window results are
//! merged per tensor in window order, so the numbers do not depend on the thread count.
//!
//! A tensor that fails (unreadable bytes, unsupported dtype, `--verify` disagreement)
//! gets an entry in `errors`; the others go on.

mod diff;
mod lora_stage;
pub mod plan;

pub(crate) use diff::performance;
pub use diff::{compare, compare_during, compare_many, fingerprint};
pub use lora_stage::{
    DuringDiff, LoraOptions, LoraParts, adapter_name, analyze_lora, analyze_lora_after,
    analyze_lora_parts, analyze_lora_parts_with, analyze_lora_with, assemble_lora, lora_parts,
    model_facts, uniform_rank,
};

use crate::checkpoint::Checkpoint;
use crate::checkpoint::dtype::{DType, decode_f64};
use crate::checkpoint::shard::Window;
use crate::comparison::{
    Comparison, ExtractedModule, LoraReport, ModelInfo, ModuleKind, Performance, SavedTensor,
    Second, TensorInfo, TensorMetrics, metrics_from_accum,
};
use crate::error::{Error, Result};
use crate::journal::{Fingerprint, Journal, LowRankJournal};
use crate::kernels::{self, Accum};
use crate::lowrank::detect::{Evidence, verdict};
use crate::lowrank::extract::{Factors, Target};
use crate::lowrank::{self, DeltaRows, LowRankOptions, RankRule, TensorSpectrum};
use crate::pairing::{self, TensorPair, natural_cmp};
use crate::peft::{self, ModelFacts, Profile};
use plan::Shard;
use rayon::prelude::*;
use regex::Regex;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Default window: 1 MiB per side. A window is copied from the page cache into a
/// buffer and then read by the kernel; at 1 MiB the buffer is still in the CPU's cache
/// when the kernel reads it, at 8 MiB it has gone to memory and comes back: 1 MiB ran
/// the diff 1.5–1.7x faster than 8 MiB (BENCHMARKS.md, issue 11), 512 KiB no faster.
pub const DEFAULT_WINDOW_BYTES: u64 = 1 << 20;

/// Options of a comparison (the library side of `weightdiff compare`'s flags).
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// An element is changed when |d| > threshold.
    pub threshold: f64,
    /// Run the reference kernel too and check agreement.
    pub verify: bool,
    /// Only tensors whose (aligned) name matches.
    pub include: Option<Regex>,
    /// Leave out tensors whose name matches.
    pub exclude: Option<Regex>,
    /// Worker threads; `None` for all cores.
    pub threads: Option<usize>,
    /// Largest window read at once per side, in bytes.
    pub window_bytes: u64,
    /// Keep a journal of finished tensors in this directory (the output directory).
    pub journal_dir: Option<PathBuf>,
    /// Continue from the journal in `journal_dir` instead of starting over.
    pub resume: bool,
    /// Set (by a signal handler) to stop: windows not yet started are skipped and the
    /// comparison comes back with `complete: false`.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Compare only this shard's share of the pairs (`--shard I/N`).
    pub shard: Option<Shard>,
}

impl Default for CompareOptions {
    fn default() -> Self {
        CompareOptions {
            threshold: 1e-6,
            verify: false,
            include: None,
            exclude: None,
            threads: None,
            window_bytes: DEFAULT_WINDOW_BYTES,
            journal_dir: None,
            resume: false,
            cancel: None,
            shard: None,
        }
    }
}

/// Progress as tensors complete.
#[derive(Debug, Clone, Copy)]
pub struct ProgressUpdate<'a> {
    pub tensors_done: usize,
    pub tensors_total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// The tensor that just completed.
    pub tensor: &'a str,
}

/// Progress of the low-rank stage as tensors finish, weighted by elements (the stage's
/// cost is proportional to them).
#[derive(Debug, Clone, Copy)]
pub struct LowRankUpdate<'a> {
    pub tensors_done: usize,
    pub tensors_total: usize,
    pub elements_done: u64,
    pub elements_total: u64,
    /// The tensor that just finished.
    pub tensor: &'a str,
}

/// Receives progress; called from worker threads.
pub trait Progress: Sync {
    fn update(&self, update: ProgressUpdate<'_>);
    /// Progress of the low-rank stage (ignored unless implemented).
    fn lowrank(&self, _update: LowRankUpdate<'_>) {}
}

/// Ignores progress.
pub struct NoProgress;
impl Progress for NoProgress {
    fn update(&self, _: ProgressUpdate<'_>) {}
}

/// Summarises a checkpoint's headers for the reports.
pub fn model_info(ck: &Checkpoint) -> ModelInfo {
    let mut tensors: Vec<TensorInfo> = ck
        .tensors()
        .values()
        .map(|t| TensorInfo {
            name: t.name.clone(),
            dtype: t.dtype_name(),
            shape: t.shape.clone(),
            nbytes: t.nbytes(),
        })
        .collect();
    tensors.sort_by(|a, b| natural_cmp(&a.name, &b.name));
    let mut warnings = ck.warnings.clone();
    warnings.extend(
        ck.broken
            .iter()
            .map(|(name, e)| format!("tensor `{name}`: {e}")),
    );
    ModelInfo {
        source: ck.source.display().to_string(),
        files: ck.shard_paths().map(|p| p.display().to_string()).collect(),
        config: ck.config.clone(),
        generation_config: ck.generation_config.clone(),
        tensors,
        warnings,
        hub: ck.hub.clone(),
    }
}
