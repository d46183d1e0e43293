//! `lora_analysis.json` and `lora_metadata.json`, and writing the adapter with its
//! verification.

use crate::comparison::{LoraReport, SCHEMA_VERSION};
use crate::error::{Error, Result, ShardError};
use crate::fsio::{to_json, write_atomic};
use crate::lowrank::TensorSpectrum;
use crate::pairing::{layer_index, module_type};
use crate::peft::adapter;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const LORA_ANALYSIS_JSON: &str = "lora_analysis.json";
pub const LORA_METADATA_JSON: &str = "lora_metadata.json";
pub const EXTRACTED_WEIGHTS: &str = "extracted_lora_weights.safetensors";
pub const ADAPTER_DIR: &str = "lora_adapter";
pub const ADAPTER_MODEL: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

fn aggregate<'a>(items: impl Iterator<Item = &'a TensorSpectrum>) -> Value {
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
    json!({
        "tensors": n,
        "low_rank": low,
        "detected_ranks": ranks,
        "mean_stable_rank": if n > 0 { Some(stable / n as f64) } else { None },
        "mean_effective_rank_90": if eff_n > 0 { Some(eff90 / eff_n as f64) } else { None },
        "delta_frobenius_norm": norm2.sqrt(),
    })
}

fn skipped(r: &LoraReport) -> Vec<Value> {
    r.skipped
        .iter()
        .map(|(n, why)| json!({"tensor": n, "reason": why}))
        .collect()
}

/// The LoRA stage as the summary and HTML reports read it: the JSON documents written
/// to disk, so that `weightdiff report DIR` renders exactly what `compare` rendered.
#[derive(Debug, Clone)]
pub struct LoraDocs {
    /// `lora_analysis.json`.
    pub analysis: Value,
    /// `lora_metadata.json`, when factors were extracted.
    pub metadata: Option<Value>,
}

/// Renders `lora_analysis.json`.
pub fn analysis(r: &LoraReport) -> Value {
    let mut tensors = Map::new();
    let mut by_module: BTreeMap<String, Vec<&TensorSpectrum>> = BTreeMap::new();
    let mut by_layer: BTreeMap<usize, Vec<&TensorSpectrum>> = BTreeMap::new();
    for (name, s) in &r.spectra {
        tensors.insert(
            name.clone(),
            serde_json::to_value(s).expect("spectrum serializes"),
        );
        by_module.entry(module_type(name)).or_default().push(s);
        if let Some(l) = layer_index(name) {
            by_layer.entry(l).or_default().push(s);
        }
    }
    let modules: Map<String, Value> = by_module
        .into_iter()
        .map(|(k, v)| (k, aggregate(v.into_iter())))
        .collect();
    let layers: Map<String, Value> = by_layer
        .into_iter()
        .map(|(k, v)| (k.to_string(), aggregate(v.into_iter())))
        .collect();
    json!({
        "schema_version": SCHEMA_VERSION,
        "complete": r.complete(),
        "not_analysed": r.not_analysed,
        "verdict": r.verdict,
        "detection": {
            "rule": "rank = number of singular values above 1.5 x the predicted rounding-noise top singular value, accepted when sigma_r / sigma_(r+1) >= 2",
            "floor_margin": crate::lowrank::detect::FLOOR_MARGIN,
            "min_gap": crate::lowrank::detect::MIN_GAP,
        },
        "options": r.options,
        "tensors": tensors,
        "modules": modules,
        "layers": layers,
        "skipped": skipped(r),
        "errors": r.errors,
    })
}

/// Renders `lora_metadata.json`; `verification` is what reloading the adapter found.
pub fn metadata(r: &LoraReport, verification: &Value) -> Value {
    let modules: Map<String, Value> = r
        .extracted
        .iter()
        .map(|e| {
            (
                e.module.clone(),
                json!({
                    "tensor": e.tensor,
                    "kind": e.kind,
                    "shape": [e.factors.m, e.factors.n],
                    "rank": e.factors.rank,
                    "dtype": e.factors.dtype,
                    "residual": e.factors.residual,
                    "residual_stored": e.factors.residual_stored,
                    "time": r.spectra.iter().find(|(n, _)| n == &e.tensor).map(|(_, s)| s.time),
                }),
            )
        })
        .collect();
    let residuals: Vec<f64> = r
        .extracted
        .iter()
        .map(|e| e.factors.residual_stored)
        .collect();
    json!({
        "schema_version": SCHEMA_VERSION,
        "base_model": r.base_model,
        "options": {
            "rank_rule": r.options.rank_rule,
            "max_rank": r.options.max_rank,
            "uniform_rank": r.uniform_rank,
            "dtype": r.dtype.map_or("base".to_string(), |d| d.to_string()),
            "seed": r.options.seed,
            "oversample": r.options.oversample,
            "power_iters": r.options.power_iters,
            "analysis_rank": r.options.analysis_rank,
        },
        "scale_rule": "lora_alpha = r for every module: the factors carry the whole delta, scale 1",
        "task_type": r.facts.task_type,
        "architecture": r.facts.architecture,
        "model_type": r.facts.model_type,
        "profile": r.profile,
        "lora_bias": r.lora_bias,
        "target_modules": r.target_modules,
        "notes": r.notes,
        "modules": modules,
        "mean_residual_stored": if residuals.is_empty() { None } else { Some(residuals.iter().sum::<f64>() / residuals.len() as f64) },
        "modules_to_save": r.modules_to_save,
        "default_rank": adapter::default_rank(r),
        "skipped": skipped(r),
        "errors": r.errors,
        "verification": verification,
        "timings": {"total_time": r.total_time},
    })
}

/// Writes the adapter into `adapter_dir`, reloads it and checks every key, shape,
/// dtype and byte against what was meant to be written (so the residuals measured on
/// the rounded factors are those of the file). Returns the paths and the verification.
/// `also` receives a copy of `adapter_model.safetensors` (`extracted_lora_weights.safetensors`).
pub fn write_adapter(
    r: &LoraReport,
    adapter_dir: &Path,
    also: Option<&Path>,
) -> Result<(Vec<PathBuf>, Value)> {
    crate::fsio::create_output_dir(adapter_dir)?;
    let tensors = adapter::tensors(r)?;
    let bytes = adapter::safetensors_bytes(&tensors);
    let model = adapter_dir.join(ADAPTER_MODEL);
    write_atomic(&model, &bytes)?;
    let config = adapter_dir.join(ADAPTER_CONFIG);
    write_atomic(&config, &to_json(&adapter::config(r)))?;
    let verification = verify(&model, &tensors)?;
    let mut written = vec![model, config];
    if let Some(p) = also {
        write_atomic(p, &bytes)?;
        written.insert(0, p.to_path_buf());
    }
    Ok((written, verification))
}

fn verify(path: &Path, expected: &[adapter::AdapterTensor]) -> Result<Value> {
    let ck = crate::Checkpoint::open(path)?;
    let fail = |why: String| {
        Error::from(ShardError::new(
            path,
            format!("verification after writing failed: {why}"),
        ))
    };
    if ck.tensors().len() != expected.len() {
        return Err(fail(format!(
            "{} tensors read back, {} written",
            ck.tensors().len(),
            expected.len()
        )));
    }
    for t in expected {
        let e = ck
            .tensors()
            .get(&t.key)
            .ok_or_else(|| fail(format!("`{}` missing", t.key)))?;
        if e.shape != t.shape || e.dtype.as_ref().ok() != Some(&t.dtype) {
            return Err(fail(format!(
                "`{}` has shape {:?} {}",
                t.key,
                e.shape,
                e.dtype_name()
            )));
        }
        if ck.read(e, 0, e.nbytes())?[..] != t.bytes[..] {
            return Err(fail(format!("`{}` bytes differ", t.key)));
        }
    }
    Ok(json!({"reloaded": true, "tensors_checked": expected.len()}))
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
    let (adapter_files, verification) = write_adapter(r, &dir.join(ADAPTER_DIR), Some(&weights))?;
    written.extend(adapter_files);
    let meta = dir.join(LORA_METADATA_JSON);
    let m = metadata(r, &verification);
    write_atomic(&meta, &to_json(&m))?;
    docs.metadata = Some(m);
    written.push(meta);
    Ok((written, docs))
}
