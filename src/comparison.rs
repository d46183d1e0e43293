//! The results of a comparison: one set of types that feeds every report.
//!
//! Field names are exactly SPEC §4's JSON keys, so no report can rename one; a NOTE on
//! a field means a renderer that lists fields by hand must be updated with it.

use crate::kernels::Accum;
use crate::pairing::{Mismatch, PrefixAlignment};
pub use crate::peft::{ExtractedModule, LoraReport, ModuleKind, SavedTensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Seconds.
pub type Second = f64;

/// Version of the JSON schemas written by this crate.
pub const SCHEMA_VERSION: u32 = 1;

/// Per-tensor metrics of SPEC §3.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TensorMetrics {
    /// Shape as stored in the base (the fine-tuned shape follows when it differs).
    pub shape: Vec<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finetuned_shape: Option<Vec<usize>>,
    /// Base dtype (the fine-tuned dtype follows when it differs).
    pub dtype: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finetuned_dtype: Option<String>,
    /// For a shape mismatch: the leading rows that were compared.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compared_rows: Option<usize>,
    /// Elements compared.
    pub num_elements: u64,
    /// Σ|d| / n over finite pairs.
    #[serde(deserialize_with = "null_as_infinity")]
    pub mean_abs_diff: f64,
    /// max |d| over finite pairs.
    #[serde(deserialize_with = "null_as_infinity")]
    pub max_abs_diff: f64,
    /// max |d| / step over finite pairs, the step being the quantization step of the one
    /// encoded side at that element ([`crate::checkpoint::encoding`]); absent unless
    /// exactly one side is encoded. ≤ 0.5 for a round-to-nearest quant of the other side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_steps: Option<f64>,
    /// sqrt(Σd² / n).
    #[serde(deserialize_with = "null_as_infinity")]
    pub rms_diff: f64,
    /// sqrt(Σd²), the Frobenius norm of the delta.
    #[serde(deserialize_with = "null_as_infinity")]
    pub l2_diff: f64,
    /// sqrt(Σa²).
    #[serde(deserialize_with = "null_as_infinity")]
    pub base_l2: f64,
    /// sqrt(Σb²).
    #[serde(deserialize_with = "null_as_infinity")]
    pub finetuned_l2: f64,
    /// l2_diff / base_l2; null when base_l2 = 0 and the delta is not zero.
    pub relative_diff: Option<f64>,
    /// Why `relative_diff` or `cosine_similarity` is null.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Σab / (‖a‖‖b‖); null when either norm is zero.
    pub cosine_similarity: Option<f64>,
    /// #{|d| > threshold} / n.
    pub changed_ratio: f64,
    /// The stored bytes are equal.
    pub identical: bool,
    /// NaN values in either tensor.
    pub nan_count: u64,
    /// ±Inf values in either tensor.
    pub inf_count: u64,
    /// Seconds spent on this tensor, I/O included (summed over its parallel windows).
    pub total_time: Second,
    /// Seconds in the fast kernel.
    pub compute_time: Second,
    /// Seconds in the reference kernel (`--verify`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_time: Option<Second>,
    /// reference_time / compute_time (`--verify`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speedup: Option<f64>,
}

/// JSON has no infinity: serde_json writes a non-finite f64 as `null`. These metrics are
/// sums and maxima over finite values (NaN pairs are left out), so a `null` one
/// overflowed: it reads back as +∞ (reports, `--resume` journals, shard parts).
fn null_as_infinity<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::INFINITY))
}

impl TensorMetrics {
    /// A tensor is modified when any element changed by more than the threshold.
    pub fn is_modified(&self) -> bool {
        self.changed_ratio > 0.0
    }
}

/// Derives the metrics from kernel sums. Shape, dtype and timing fields are filled by
/// the caller.
pub fn metrics_from_accum(acc: &Accum) -> TensorMetrics {
    let n = acc.finite as f64;
    let per = |s: f64| if acc.finite == 0 { 0.0 } else { s / n };
    let l2_diff = acc.sum_d2.sqrt();
    let base_l2 = acc.sum_a2.sqrt();
    let finetuned_l2 = acc.sum_b2.sqrt();
    let mut note = None;
    let relative_diff = if base_l2 > 0.0 {
        Some(l2_diff / base_l2)
    } else if l2_diff == 0.0 {
        Some(0.0)
    } else {
        note = Some("base tensor is all zeros: relative_diff is undefined".to_string());
        None
    };
    let cosine_similarity = if base_l2 > 0.0 && finetuned_l2 > 0.0 {
        Some((acc.sum_ab / (base_l2 * finetuned_l2)).clamp(-1.0, 1.0))
    } else {
        if note.is_none() {
            note = Some("a tensor is all zeros: cosine_similarity is undefined".to_string());
        }
        None
    };
    TensorMetrics {
        shape: Vec::new(),
        finetuned_shape: None,
        dtype: String::new(),
        finetuned_dtype: None,
        compared_rows: None,
        num_elements: acc.count,
        mean_abs_diff: per(acc.sum_abs_d),
        max_abs_diff: acc.max_abs_d,
        max_error_steps: None,
        rms_diff: per(acc.sum_d2).sqrt(),
        l2_diff,
        base_l2,
        finetuned_l2,
        relative_diff,
        note,
        cosine_similarity,
        changed_ratio: if acc.count == 0 {
            0.0
        } else {
            acc.changed as f64 / acc.count as f64
        },
        identical: false,
        nan_count: acc.nan,
        inf_count: acc.inf,
        total_time: 0.0,
        compute_time: 0.0,
        reference_time: None,
        speedup: None,
    }
}

/// A model's tensors as listed by its headers (no data).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub nbytes: u64,
}

/// What the reports need to know about one model, without touching its files.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The model argument as given.
    pub source: String,
    /// Shard files.
    pub files: Vec<String>,
    pub config: Option<serde_json::Value>,
    pub generation_config: Option<serde_json::Value>,
    /// Readable tensors, in natural name order.
    pub tensors: Vec<TensorInfo>,
    /// Index or file problems that did not stop the run.
    pub warnings: Vec<String>,
    /// Repo, revision and commit when the model came from a hub id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<crate::checkpoint::HubOrigin>,
}

impl ModelInfo {
    /// The model argument, with the commit and snapshot read when it was a hub id.
    pub fn describe(&self) -> String {
        match &self.hub {
            Some(h) => format!(
                "{} (hub commit {}, {})",
                self.source,
                h.commit,
                h.snapshot.display()
            ),
            None => self.source.clone(),
        }
    }
}

/// Whole-run figures (SPEC §4 `performance`).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Performance {
    /// Wall-clock seconds of the comparison.
    pub total_time: Second,
    /// Mean of the per-tensor `total_time`.
    pub avg_layer_time: Second,
    /// Largest per-tensor `total_time`.
    pub max_layer_time: Second,
    /// The tensor with the largest `total_time`.
    pub slowest_tensor: Option<String>,
    /// Tensor bytes read from both models.
    pub bytes_read: u64,
    /// bytes_read / total_time, in GB/s (1e9 bytes).
    pub throughput_gbps: f64,
    /// Threads used.
    pub threads: usize,
    /// Σ compute_time (fast kernel).
    pub compute_time: Second,
    /// Σ reference_time, under `--verify`.
    pub reference_time: Option<Second>,
    /// reference_time / compute_time, under `--verify`.
    pub speedup: Option<f64>,
    /// The low-rank analyses run during the diff (`compare`'s default), whose time is
    /// inside `total_time`: so `throughput_gbps` is then not the read speed alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lowrank_during_diff: Option<DuringDiffTime>,
}

/// Low-rank analyses run by the diff's workers as each matrix was compared.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct DuringDiffTime {
    /// Matrices analysed.
    pub matrices: usize,
    /// Their seconds, summed over the workers.
    pub worker_time: Second,
}

/// Where the diff puts each tensor's metrics the moment they are final (the journal, so
/// that a killed run resumes without redoing them). Called from the worker threads,
/// under a lock.
pub trait ResultSink: Send {
    /// Takes one finished tensor.
    fn record(&mut self, name: &str, metrics: &TensorMetrics) -> crate::error::Result<()>;
    /// Makes everything recorded so far durable.
    fn sync(&mut self) -> crate::error::Result<()>;
}

/// How much of two models pairs up by name and shape, whatever `--include`/`--exclude`
/// select: do they share an architecture? Written into `weight_differences.json` under
/// `relatedness`, beside the figures [`crate::relatedness::assess`] derives from it.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct Overlap {
    /// Tensors of the base.
    pub base_tensors: usize,
    /// Tensors of the fine-tuned model.
    pub finetuned_tensors: usize,
    /// Names paired with equal shapes (or a vocabulary table compared on its leading rows).
    pub paired_tensors: usize,
    /// Parameters (elements) of the base.
    pub base_parameters: u64,
    /// Parameters of the fine-tuned model.
    pub finetuned_parameters: u64,
    /// Parameters of the paired tensors (the shared rows of a resized vocabulary).
    pub paired_parameters: u64,
    /// Architecture and size keys of the configs that differ: key → [base, fine-tuned]
    /// (`null` where a config lacks the key or is absent).
    pub config_differences: BTreeMap<String, [serde_json::Value; 2]>,
    /// Both arguments read the same files (`./m` and `m/.`, a symlink): a model compared
    /// with itself.
    pub same_model: bool,
    /// The low-rank stage found a merged LoRA although the weights' cosine is low: a LoRA
    /// larger than the weights decorrelates them as independent weights would, so the
    /// models are a base and a derivative after all (set by [`crate::relatedness::settle`]).
    pub low_rank_delta: bool,
}

/// Everything a comparison found; every report is rendered from this.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    pub base: ModelInfo,
    pub finetuned: ModelInfo,
    pub threshold: f64,
    pub verify: bool,
    /// Include/exclude filters as given, for the record.
    pub filters: Vec<String>,
    pub prefix: Option<PrefixAlignment>,
    /// Compared tensors in natural name order.
    pub results: Vec<(String, TensorMetrics)>,
    pub only_in_base: Vec<String>,
    pub only_in_finetuned: Vec<String>,
    pub mismatches: Vec<Mismatch>,
    /// Tensor name → why it could not be compared.
    pub errors: BTreeMap<String, String>,
    /// Tensors left out by `--include`/`--exclude`.
    pub filtered_out: usize,
    pub performance: Performance,
    /// false when the run was interrupted before every tensor was compared.
    pub complete: bool,
    /// How much of the two models pairs up, before filters: the structural half of
    /// [`crate::relatedness`]'s evidence (absent in reports of older versions).
    #[serde(default)]
    pub overlap: Overlap,
    /// The low-rank stage, when it ran (not serialized: shard parts store its inputs).
    #[serde(skip)]
    pub lora: Option<LoraReport>,
}

impl Comparison {
    /// Names of modified tensors, in natural order.
    pub fn modified(&self) -> Vec<&str> {
        self.results
            .iter()
            .filter(|(_, m)| m.is_modified())
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// The `n` tensors with the largest relative diff (ties by name).
    pub fn top_modified(&self, n: usize) -> Vec<(&str, &TensorMetrics)> {
        let mut v: Vec<(&str, &TensorMetrics)> = self
            .results
            .iter()
            .filter(|(_, m)| m.is_modified())
            .map(|(k, m)| (k.as_str(), m))
            .collect();
        let key = |m: &TensorMetrics| m.relative_diff.unwrap_or(f64::INFINITY);
        v.sort_by(|a, b| key(b.1).total_cmp(&key(a.1)).then(a.0.cmp(b.0)));
        v.truncate(n);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflowed_metrics_survive_a_json_round_trip() {
        let m = TensorMetrics {
            shape: vec![2],
            finetuned_shape: None,
            dtype: "F32".into(),
            finetuned_dtype: None,
            compared_rows: None,
            num_elements: 2,
            mean_abs_diff: f64::INFINITY,
            max_abs_diff: f64::INFINITY,
            max_error_steps: None,
            rms_diff: f64::INFINITY,
            l2_diff: f64::INFINITY,
            base_l2: 1.0,
            finetuned_l2: f64::INFINITY,
            relative_diff: None,
            note: None,
            cosine_similarity: None,
            changed_ratio: 1.0,
            identical: false,
            nan_count: 0,
            inf_count: 0,
            total_time: 0.0,
            compute_time: 0.0,
            reference_time: None,
            speedup: None,
        };
        let text = serde_json::to_string(&m).unwrap();
        assert!(text.contains("\"max_abs_diff\":null"));
        let back: TensorMetrics = serde_json::from_str(&text).unwrap();
        assert_eq!(back, m);
    }
}
