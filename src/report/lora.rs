//! `lora_analysis.json` and `lora_metadata.json`, and writing the adapter with its
//! verification.

use super::json::Named;
use crate::checkpoint::dtype::DType;
use crate::comparison::{LoraReport, SCHEMA_VERSION};
use crate::error::{Error, Result};
use crate::fsio::{to_json, write_atomic};
use crate::lowrank::detect::Verdict;
use crate::lowrank::{LowRankOptions, RankRule, TensorSpectrum};
use crate::pairing::{layer_index, module_type};
use crate::peft::adapter::{self, Verification};
use crate::peft::{ModuleKind, Profile, TargetModules, TaskType};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const LORA_ANALYSIS_JSON: &str = "lora_analysis.json";
pub const LORA_METADATA_JSON: &str = "lora_metadata.json";
pub const EXTRACTED_WEIGHTS: &str = "extracted_lora_weights.safetensors";
pub const ADAPTER_DIR: &str = "lora_adapter";
pub use crate::peft::adapter::{ADAPTER_CONFIG, ADAPTER_MODEL};

/// Figures over a group of analysed matrices (a module type or a layer).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Aggregate {
    pub tensors: usize,
    pub low_rank: usize,
    /// Detected rank → how many matrices.
    pub detected_ranks: BTreeMap<String, usize>,
    pub mean_stable_rank: Option<f64>,
    pub mean_effective_rank_90: Option<f64>,
    pub delta_frobenius_norm: f64,
}

impl Aggregate {
    fn of<'a>(items: impl Iterator<Item = &'a TensorSpectrum>) -> Aggregate {
        let mut n = 0usize;
        let mut low = 0usize;
        let mut ranks: BTreeMap<String, usize> = BTreeMap::new();
        let (mut stable, mut eff90, mut eff_n) = (0.0, 0.0, 0usize);
        let mut norm2 = 0.0;
        for s in items {
            n += 1;
            if let Some(r) = s.detected_rank {
                low += 1;
                *ranks.entry(r.to_string()).or_default() += 1;
            }
            stable += s.stable_rank.unwrap_or(0.0);
            if let Some(e) = s.effective_rank_90 {
                eff90 += e as f64;
                eff_n += 1;
            }
            norm2 += s.frobenius_norm * s.frobenius_norm;
        }
        Aggregate {
            tensors: n,
            low_rank: low,
            detected_ranks: ranks,
            mean_stable_rank: (n > 0).then(|| stable / n as f64),
            mean_effective_rank_90: (eff_n > 0).then(|| eff90 / eff_n as f64),
            delta_frobenius_norm: norm2.sqrt(),
        }
    }
}

/// A changed tensor left out of the adapter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Skipped {
    pub tensor: String,
    pub reason: String,
}

fn skipped(r: &LoraReport) -> Vec<Skipped> {
    r.skipped
        .iter()
        .map(|(tensor, reason)| Skipped {
            tensor: tensor.clone(),
            reason: reason.clone(),
        })
        .collect()
}

/// The rank rule of the analysis, in words and numbers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Detection {
    pub rule: String,
    pub floor_margin: f64,
    pub min_gap: f64,
}

/// `lora_analysis.json`: the low-rank stage's findings, written and read back by this
/// one type.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoraAnalysis {
    pub schema_version: u32,
    pub complete: bool,
    #[serde(default)]
    pub not_analysed: Vec<String>,
    pub verdict: Verdict,
    pub detection: Detection,
    pub options: LowRankOptions,
    /// Tensor → spectrum, in natural name order.
    pub tensors: Named<TensorSpectrum>,
    /// Module type → figures.
    pub modules: Named<Aggregate>,
    /// Layer index → figures.
    pub layers: Named<Aggregate>,
    pub skipped: Vec<Skipped>,
    pub errors: BTreeMap<String, String>,
}

/// One extracted module of `lora_metadata.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModuleDoc {
    pub tensor: String,
    pub kind: ModuleKind,
    pub shape: [usize; 2],
    pub rank: usize,
    pub dtype: DType,
    pub residual: f64,
    pub residual_stored: f64,
    pub time: Option<f64>,
}

/// The options of `lora_metadata.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetadataOptions {
    pub rank_rule: RankRule,
    pub max_rank: Option<usize>,
    pub uniform_rank: Option<usize>,
    /// `bf16`, `f16`, `f32`, or `base` (each base tensor's dtype).
    pub dtype: String,
    pub seed: u64,
    pub oversample: usize,
    pub power_iters: usize,
    pub analysis_rank: usize,
}

/// Seconds of the stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Timings {
    pub total_time: f64,
}

/// `lora_metadata.json`: what the adapter holds and how it was made, written and read
/// back by this one type.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoraMetadata {
    pub schema_version: u32,
    pub base_model: String,
    pub options: MetadataOptions,
    pub scale_rule: String,
    #[serde(default)]
    pub task_type: Option<TaskType>,
    #[serde(default)]
    pub architecture: Option<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub profile: Profile,
    #[serde(default)]
    pub lora_bias: bool,
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    #[serde(default)]
    pub notes: Vec<String>,
    /// Module path → what was extracted.
    pub modules: Named<ModuleDoc>,
    pub mean_residual_stored: Option<f64>,
    pub modules_to_save: Vec<String>,
    pub default_rank: usize,
    pub skipped: Vec<Skipped>,
    pub errors: BTreeMap<String, String>,
    pub verification: Verification,
    pub timings: Timings,
}

/// The LoRA stage as the summary and HTML reports read it: the documents written to
/// disk, so that `weightdiff report DIR` renders exactly what `compare` rendered.
#[derive(Debug, Clone)]
pub struct LoraDocs {
    /// `lora_analysis.json`.
    pub analysis: LoraAnalysis,
    /// `lora_metadata.json`, when factors were extracted.
    pub metadata: Option<LoraMetadata>,
}

/// `lora_analysis.json` of a stage's findings.
pub fn analysis(r: &LoraReport) -> LoraAnalysis {
    let mut by_module: BTreeMap<String, Vec<&TensorSpectrum>> = BTreeMap::new();
    let mut by_layer: BTreeMap<usize, Vec<&TensorSpectrum>> = BTreeMap::new();
    for (name, s) in &r.spectra {
        by_module.entry(module_type(name)).or_default().push(s);
        if let Some(l) = layer_index(name) {
            by_layer.entry(l).or_default().push(s);
        }
    }
    LoraAnalysis {
        schema_version: SCHEMA_VERSION,
        complete: r.complete(),
        not_analysed: r.not_analysed.clone(),
        verdict: r.verdict.clone(),
        detection: Detection {
            rule: "rank = number of singular values above 1.5 x the predicted rounding-noise top singular value, accepted when sigma_r / sigma_(r+1) >= 2".into(),
            floor_margin: crate::lowrank::detect::FLOOR_MARGIN,
            min_gap: crate::lowrank::detect::MIN_GAP,
        },
        options: r.options.clone(),
        tensors: Named(r.spectra.clone()),
        modules: Named(
            by_module
                .into_iter()
                .map(|(k, v)| (k, Aggregate::of(v.into_iter())))
                .collect(),
        ),
        layers: Named(
            by_layer
                .into_iter()
                .map(|(k, v)| (k.to_string(), Aggregate::of(v.into_iter())))
                .collect(),
        ),
        skipped: skipped(r),
        errors: r.errors.clone(),
    }
}

/// `lora_metadata.json`; `verification` is what reloading the adapter found.
pub fn metadata(r: &LoraReport, verification: &Verification) -> LoraMetadata {
    let modules = r
        .extracted
        .iter()
        .map(|e| {
            let doc = ModuleDoc {
                tensor: e.tensor.clone(),
                kind: e.kind,
                shape: [e.factors.m, e.factors.n],
                rank: e.factors.rank,
                dtype: e.factors.dtype,
                residual: e.factors.residual,
                residual_stored: e.factors.residual_stored,
                time: r
                    .spectra
                    .iter()
                    .find(|(n, _)| n == &e.tensor)
                    .map(|(_, s)| s.time),
            };
            (e.module.clone(), doc)
        })
        .collect();
    let residuals: Vec<f64> = r
        .extracted
        .iter()
        .map(|e| e.factors.residual_stored)
        .collect();
    LoraMetadata {
        schema_version: SCHEMA_VERSION,
        base_model: r.base_model.clone(),
        options: MetadataOptions {
            rank_rule: r.options.rank_rule,
            max_rank: r.options.max_rank,
            uniform_rank: r.uniform_rank,
            dtype: r.dtype.map_or("base".to_string(), |d| d.to_string()),
            seed: r.options.seed,
            oversample: r.options.oversample,
            power_iters: r.options.power_iters,
            analysis_rank: r.options.analysis_rank,
        },
        scale_rule: "lora_alpha = r for every module: the factors carry the whole delta, scale 1"
            .into(),
        task_type: r.facts.task_type,
        architecture: r.facts.architecture.clone(),
        model_type: r.facts.model_type.clone(),
        profile: r.profile,
        lora_bias: r.lora_bias,
        target_modules: Some(r.target_modules.clone()),
        notes: r.notes.clone(),
        modules: Named(modules),
        mean_residual_stored: (!residuals.is_empty())
            .then(|| residuals.iter().sum::<f64>() / residuals.len() as f64),
        modules_to_save: r.modules_to_save.clone(),
        default_rank: adapter::default_rank(r),
        skipped: skipped(r),
        errors: r.errors.clone(),
        verification: verification.clone(),
        timings: Timings {
            total_time: r.total_time,
        },
    }
}

/// Writes every LoRA output of `compare` into `dir`: the analysis, and when factors were
/// extracted, the weights, the adapter directory and the metadata. Returns the paths
/// and the documents written.
pub fn write_lora_outputs(r: &LoraReport, dir: &Path) -> Result<(Vec<PathBuf>, LoraDocs)> {
    let mut written = Vec::new();
    let path = dir.join(LORA_ANALYSIS_JSON);
    let mut docs = LoraDocs {
        analysis: analysis(r),
        metadata: None,
    };
    write_atomic(&path, &to_json(&docs.analysis))?;
    written.push(path);
    // A stopped stage writes no adapter: one missing modules would load in PEFT as if
    // it were the whole fine-tune. `lora_analysis.json` says what is missing.
    if !r.complete() {
        // Nor leaves one of an earlier run beside the new analysis.
        let stale_files = super::outputs::of(super::outputs::Stage::LowRank)
            .filter(|o| o.name != LORA_ANALYSIS_JSON)
            .map(|o| o.path(dir));
        for stale in stale_files {
            match std::fs::remove_file(&stale) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::io(&stale, "cannot remove the stale output", e));
                }
                _ => {}
            }
        }
        return Ok((written, docs));
    }
    if r.extracted.is_empty() && r.saved.is_empty() {
        return Ok((written, docs));
    }
    let weights = dir.join(EXTRACTED_WEIGHTS);
    let (adapter_files, verification) =
        adapter::write_adapter(r, &dir.join(ADAPTER_DIR), Some(&weights))?;
    written.extend(adapter_files);
    let meta = dir.join(LORA_METADATA_JSON);
    let m = metadata(r, &verification);
    write_atomic(&meta, &to_json(&m))?;
    docs.metadata = Some(m);
    written.push(meta);
    Ok((written, docs))
}
