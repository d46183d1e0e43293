//! The PEFT adapter: `adapter_model.safetensors` (also written as
//! `extracted_lora_weights.safetensors`) and `adapter_config.json`.
//!
//! Scale rule: PEFT applies ΔW = (lora_alpha / r)·B·A per module. The factors are split
//! so that B·A alone is the extracted delta (see `lowrank::extract`), so every module
//! gets `lora_alpha = r`: the default `r`/`lora_alpha` are the most common rank, and
//! modules of another rank get the same value in both `rank_pattern` and
//! `alpha_pattern`. The scale is exactly 1 for every module, whichever way a runtime
//! resolves the patterns. Pattern keys are full module paths escaped as regexes, since
//! PEFT matches them as regexes against module names.

use super::{LoraReport, ModuleKind};
use crate::checkpoint::dtype::{DType, encode};
use crate::error::{Error, Result, ShardError};
use crate::fsio::{to_json, write_atomic};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One tensor of the adapter file.
pub struct AdapterTensor {
    pub key: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl safetensors::View for &AdapterTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.to_safetensors()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn transpose(v: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut t = vec![0.0; v.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = v[i * cols + j];
        }
    }
    t
}

/// The adapter's tensors, with PEFT key names, in key order. Factors in a dtype that
/// is not a float weightdiff writes are refused, naming the tensor.
pub fn tensors(r: &LoraReport) -> Result<Vec<AdapterTensor>> {
    if let Some(e) = r
        .extracted
        .iter()
        .find(|e| !e.factors.dtype.is_writable_float())
    {
        return Err(Error::InvalidOption(format!(
            "tensor `{}`: cannot store LoRA factors as {} (BF16, F16, F32 or F64)",
            e.tensor, e.factors.dtype
        )));
    }
    let mut out = Vec::new();
    let mut push = |key: String, dtype: DType, shape: Vec<usize>, bytes: Vec<u8>| {
        out.push(AdapterTensor {
            key,
            dtype,
            shape,
            bytes,
        })
    };
    let encoded = |dtype: DType, values: &[f64]| -> Vec<u8> {
        encode(dtype, values).expect("checked above: a float dtype")
    };
    for e in &r.extracted {
        let f = &e.factors;
        let p = format!("base_model.model.{}", e.module);
        match e.kind {
            ModuleKind::Linear => {
                // Held in the dtype's bytes (checked above), written as they are.
                push(
                    format!("{p}.lora_A.weight"),
                    f.dtype,
                    vec![f.rank, f.n],
                    f.a_bytes().to_vec(),
                );
                push(
                    format!("{p}.lora_B.weight"),
                    f.dtype,
                    vec![f.m, f.rank],
                    f.b_bytes().to_vec(),
                );
            }
            ModuleKind::Conv1d => {
                // Conv1D stores W as [in, out] and PEFT (fan_in_fan_out) adds (B·A)ᵀ:
                // with Δ = B'A' as stored, lora_A = B'ᵀ [r, in] and lora_B = A'ᵀ [out, r].
                let a = transpose(&f.b(), f.m, f.rank);
                let b = transpose(&f.a(), f.rank, f.n);
                let (a, b) = (encoded(f.dtype, &a), encoded(f.dtype, &b));
                push(format!("{p}.lora_A.weight"), f.dtype, vec![f.rank, f.m], a);
                push(format!("{p}.lora_B.weight"), f.dtype, vec![f.n, f.rank], b);
            }
            ModuleKind::Embedding => {
                // PEFT's embedding LoRA: ΔW[vocab, hidden] = lora_embedding_Aᵀ · lora_embedding_Bᵀ.
                let a = transpose(&f.b(), f.m, f.rank);
                let b = transpose(&f.a(), f.rank, f.n);
                push(
                    format!("{p}.lora_embedding_A"),
                    f.dtype,
                    vec![f.rank, f.m],
                    encoded(f.dtype, &a),
                );
                push(
                    format!("{p}.lora_embedding_B"),
                    f.dtype,
                    vec![f.n, f.rank],
                    encoded(f.dtype, &b),
                );
            }
        }
        if let Some(bias) = &e.bias {
            let bytes = encoded(f.dtype, bias);
            push(format!("{p}.lora_B.bias"), f.dtype, vec![bias.len()], bytes);
        }
    }
    for s in &r.saved {
        out.push(AdapterTensor {
            key: s.key.clone(),
            dtype: s.dtype,
            shape: s.shape.clone(),
            bytes: s.bytes.clone(),
        });
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// Serialized `adapter_model.safetensors`.
pub fn safetensors_bytes(tensors: &[AdapterTensor]) -> Vec<u8> {
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(tensors.iter().map(|t| (t.key.as_str(), t)), Some(meta))
        .expect("adapter tensors have consistent shapes and sizes")
}

/// Escapes a module path for use as a PEFT pattern key.
fn escape(module: &str) -> String {
    regex::escape(module)
}

/// The default rank: the experts' rank in a fused-expert model (PEFT converts the
/// per-expert factors to the fused parameters under the default rank), else the most
/// common one (ties to the larger).
pub fn default_rank(r: &LoraReport) -> usize {
    if r.facts.fused_experts()
        && let Some(e) = r
            .extracted
            .iter()
            .find(|e| super::expert_of(&e.tensor).is_some())
    {
        return e.factors.rank;
    }
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for e in &r.extracted {
        *counts.entry(e.factors.rank).or_default() += 1;
    }
    counts
        .iter()
        .max_by_key(|(k, c)| (**c, **k))
        .map_or(r.uniform_rank.unwrap_or(8), |(k, _)| *k)
}

/// `adapter_config.json`: PEFT's `LoraConfig` fields, with the values this writer uses
/// (PEFT reads every field it knows and ignores the rest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// Always `LORA`.
    pub peft_type: String,
    /// PEFT's task type (`CAUSAL_LM`, …); `null` loads as the base `PeftModel`.
    pub task_type: Option<String>,
    pub base_model_name_or_path: String,
    /// The rank of most modules; the others are in `rank_pattern`.
    pub r: usize,
    /// Equal to the rank: the factors carry the scale, so alpha / r = 1.
    pub lora_alpha: usize,
    pub target_modules: crate::peft::TargetModules,
    /// Anchored module-name regexes → rank, for modules whose rank is not `r` (in the
    /// order of the extracted modules).
    pub rank_pattern: IndexMap<String, usize>,
    /// The same keys → alpha (= their rank).
    pub alpha_pattern: IndexMap<String, usize>,
    /// Modules saved whole (`null` when none).
    pub modules_to_save: Option<Vec<String>>,
    /// Always `none`: bias deltas go to `modules_to_save` or `lora_bias`.
    pub bias: String,
    /// Whether `lora_B` carries a bias (changed biases of target modules).
    pub lora_bias: bool,
    pub lora_dropout: f64,
    /// GPT-2's `Conv1D` stores weights transposed.
    pub fan_in_fan_out: bool,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub init_lora_weights: bool,
    pub inference_mode: bool,
    pub layers_to_transform: Option<Vec<usize>>,
    pub layers_pattern: Option<String>,
    /// The base model's hub revision, when it came from the hub.
    pub revision: Option<String>,
}

/// `adapter_config.json`.
pub fn config(r: &LoraReport) -> AdapterConfig {
    let rank = default_rank(r);
    let mut rank_pattern = IndexMap::new();
    for e in r.extracted.iter().filter(|e| e.factors.rank != rank) {
        rank_pattern.insert(escape(&e.module), e.factors.rank);
    }
    AdapterConfig {
        peft_type: "LORA".into(),
        task_type: r.facts.task_type.map(|t| t.as_str().to_string()),
        base_model_name_or_path: r.base_model.clone(),
        r: rank,
        lora_alpha: rank,
        target_modules: r.target_modules.clone(),
        alpha_pattern: rank_pattern.clone(),
        rank_pattern,
        modules_to_save: (!r.modules_to_save.is_empty()).then(|| r.modules_to_save.clone()),
        bias: "none".into(),
        lora_bias: r.lora_bias,
        lora_dropout: 0.0,
        fan_in_fan_out: r.extracted.iter().any(|e| e.kind == ModuleKind::Conv1d),
        use_rslora: false,
        use_dora: false,
        init_lora_weights: true,
        inference_mode: true,
        layers_to_transform: None,
        layers_pattern: None,
        revision: r.base_revision.clone(),
    }
}

/// The adapter's weights file, inside the adapter directory.
pub const ADAPTER_MODEL: &str = "adapter_model.safetensors";
/// PEFT's `adapter_config.json`.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// What reloading a written adapter found (`lora_metadata.json` → `verification`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verification {
    pub reloaded: bool,
    pub tensors_checked: usize,
}

/// Writes the adapter into `adapter_dir`, reloads it and checks every key, shape,
/// dtype and byte against what was meant to be written (so the residuals measured on
/// the rounded factors are those of the file). Returns the paths and the verification.
/// `also` receives a copy of `adapter_model.safetensors` (`extracted_lora_weights.safetensors`).
pub fn write_adapter(
    r: &LoraReport,
    adapter_dir: &Path,
    also: Option<&Path>,
) -> Result<(Vec<PathBuf>, Verification)> {
    crate::fsio::create_output_dir(adapter_dir)?;
    let tensors = tensors(r)?;
    let bytes = safetensors_bytes(&tensors);
    let model = adapter_dir.join(ADAPTER_MODEL);
    write_atomic(&model, &bytes)?;
    let config_path = adapter_dir.join(ADAPTER_CONFIG);
    write_atomic(&config_path, &to_json(&config(r)))?;
    let verification = verify(&model, &tensors)?;
    let mut written = vec![model, config_path];
    if let Some(p) = also {
        write_atomic(p, &bytes)?;
        written.insert(0, p.to_path_buf());
    }
    Ok((written, verification))
}

fn verify(path: &Path, expected: &[AdapterTensor]) -> Result<Verification> {
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
    Ok(Verification {
        reloaded: true,
        tensors_checked: expected.len(),
    })
}
