//! The summary documents `--json` prints, one type per job.

use crate::comparison::Comparison;
use crate::lowrank::detect::Verdict;
use crate::peft::{LoraReport, TaskType};
use crate::relatedness::{self, Relatedness};
use crate::report::trajectory::Overall;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The `--json` document of a job.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Summary {
    Compare(Box<CompareSummary>),
    Shard(ShardSummary),
    Trajectory(TrajectorySummary),
    Adapter(Box<AdapterSummary>),
    /// `extract-lora` on models that are not a base and a derivative.
    NotExtracted(Box<NotExtractedSummary>),
    Written(WrittenSummary),
}

/// `compare` of one pair.
#[derive(Debug, Clone, Serialize)]
pub struct CompareSummary {
    /// [`verdict`].
    pub verdict: Option<Verdict>,
    pub relatedness: Relatedness,
    pub base: String,
    pub finetuned: String,
    pub compared: usize,
    pub modified: usize,
    pub identical: usize,
    /// Tensor errors, by tensor.
    pub errors: BTreeMap<String, String>,
    pub only_in_base: usize,
    pub only_in_finetuned: usize,
    pub mismatches: usize,
    pub top_modified: Vec<TopModified>,
    /// Of the diff.
    pub throughput_gbps: f64,
    pub total_time: f64,
    /// Seconds of the low-rank stage (`null` when it did not run).
    pub lowrank_time: Option<f64>,
    pub outputs: Vec<PathBuf>,
}

/// One of the most changed tensors.
#[derive(Debug, Clone, Serialize)]
pub struct TopModified {
    pub name: String,
    /// ‖Δ‖ / ‖base‖ (`null` when the base is zero).
    pub relative_diff: Option<f64>,
}

/// `compare --shard I/N`.
#[derive(Debug, Clone, Serialize)]
pub struct ShardSummary {
    pub shard: String,
    pub compared: usize,
    pub outputs: Vec<PathBuf>,
}

/// `compare BASE FT1 FT2 …`.
#[derive(Debug, Clone, Serialize)]
pub struct TrajectorySummary {
    pub overall: Vec<Overall>,
    pub checkpoints: Vec<CompareSummary>,
    pub outputs: Vec<PathBuf>,
}

/// `extract-lora`.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterSummary {
    pub verdict: Verdict,
    pub modules: usize,
    pub default_rank: usize,
    /// Mean over the extracted modules of ‖Δ − BA‖_F / ‖Δ‖_F (stored factors).
    pub mean_residual: f64,
    pub modules_to_save: Vec<String>,
    pub skipped: usize,
    pub task_type: Option<TaskType>,
    pub notes: Vec<String>,
    pub outputs: Vec<PathBuf>,
}

/// `extract-lora` that wrote nothing: the models are not a base and a derivative.
#[derive(Debug, Clone, Serialize)]
pub struct NotExtractedSummary {
    pub verdict: Option<Verdict>,
    pub relatedness: Relatedness,
    /// Always 0.
    pub modules: usize,
    /// Always empty.
    pub outputs: Vec<PathBuf>,
}

/// `merge`, `report`: the files written.
#[derive(Debug, Clone, Serialize)]
pub struct WrittenSummary {
    pub outputs: Vec<PathBuf>,
}

/// The verdict of one comparison, as the `--json` summary gives it: the relatedness
/// check's when the models are not a base and a derivative, else the low-rank stage's
/// (`None` when that stage did not run).
pub fn verdict(c: &Comparison) -> Option<Verdict> {
    relatedness::assess(c)
        .verdict
        .or_else(|| c.lora.as_ref().map(|l| l.verdict.clone()))
}

impl CompareSummary {
    /// The summary of one comparison whose reports are `written`.
    pub fn of(c: &Comparison, written: &[PathBuf], top: usize) -> Self {
        CompareSummary {
            verdict: verdict(c),
            relatedness: relatedness::assess(c),
            base: c.base.source.clone(),
            finetuned: c.finetuned.source.clone(),
            compared: c.results.len(),
            modified: c.modified().len(),
            identical: c.results.iter().filter(|(_, m)| m.identical).count(),
            errors: c.errors.clone(),
            only_in_base: c.only_in_base.len(),
            only_in_finetuned: c.only_in_finetuned.len(),
            mismatches: c.mismatches.len(),
            top_modified: c
                .top_modified(top)
                .iter()
                .map(|(n, m)| TopModified {
                    name: n.to_string(),
                    relative_diff: m.relative_diff,
                })
                .collect(),
            throughput_gbps: c.performance.throughput_gbps,
            total_time: c.performance.total_time,
            lowrank_time: c.lora.as_ref().map(|l| l.total_time),
            outputs: written.to_vec(),
        }
    }
}

impl AdapterSummary {
    /// The summary of an adapter extracted as `lora` reports it.
    pub fn of(
        lora: &LoraReport,
        default_rank: usize,
        mean_residual: f64,
        written: &[PathBuf],
    ) -> Self {
        AdapterSummary {
            verdict: lora.verdict.clone(),
            modules: lora.extracted.len(),
            default_rank,
            mean_residual,
            modules_to_save: lora.modules_to_save.clone(),
            skipped: lora.skipped.len(),
            task_type: lora.facts.task_type,
            notes: lora.notes.clone(),
            outputs: written.to_vec(),
        }
    }
}
