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
use crate::checkpoint::dtype::DType;
use crate::checkpoint::dtype::encode;
use crate::error::{Error, Result};
use serde_json::{Map, Value, json};
use std::borrow::Cow;
use std::collections::BTreeMap;

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
    let mut push = |key: String, dtype: DType, shape: Vec<usize>, values: &[f64]| {
        out.push(AdapterTensor {
            key,
            dtype,
            shape,
            bytes: encode(dtype, values).expect("checked above: a float dtype"),
        })
    };
    for e in &r.extracted {
        let f = &e.factors;
        let p = format!("base_model.model.{}", e.module);
        match e.kind {
            ModuleKind::Linear => {
                push(
                    format!("{p}.lora_A.weight"),
                    f.dtype,
                    vec![f.rank, f.n],
                    &f.a,
                );
                push(
                    format!("{p}.lora_B.weight"),
                    f.dtype,
                    vec![f.m, f.rank],
                    &f.b,
                );
            }
            ModuleKind::Conv1d => {
                // Conv1D stores W as [in, out] and PEFT (fan_in_fan_out) adds (B·A)ᵀ:
                // with Δ = B'A' as stored, lora_A = B'ᵀ [r, in] and lora_B = A'ᵀ [out, r].
                let a = transpose(&f.b, f.m, f.rank);
                let b = transpose(&f.a, f.rank, f.n);
                push(format!("{p}.lora_A.weight"), f.dtype, vec![f.rank, f.m], &a);
                push(format!("{p}.lora_B.weight"), f.dtype, vec![f.n, f.rank], &b);
            }
            ModuleKind::Embedding => {
                // PEFT's embedding LoRA: ΔW[vocab, hidden] = lora_embedding_Aᵀ · lora_embedding_Bᵀ.
                let a = transpose(&f.b, f.m, f.rank);
                let b = transpose(&f.a, f.rank, f.n);
                push(
                    format!("{p}.lora_embedding_A"),
                    f.dtype,
                    vec![f.rank, f.m],
                    &a,
                );
                push(
                    format!("{p}.lora_embedding_B"),
                    f.dtype,
                    vec![f.n, f.rank],
                    &b,
                );
            }
        }
        if let Some(bias) = &e.bias {
            push(format!("{p}.lora_B.bias"), f.dtype, vec![bias.len()], bias);
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

/// `adapter_config.json`.
pub fn config(r: &LoraReport) -> Value {
    let rank = default_rank(r);
    let mut rank_pattern = Map::new();
    let mut alpha_pattern = Map::new();
    for e in r.extracted.iter().filter(|e| e.factors.rank != rank) {
        rank_pattern.insert(escape(&e.module), json!(e.factors.rank));
        alpha_pattern.insert(escape(&e.module), json!(e.factors.rank));
    }
    let fan_in_fan_out = r.extracted.iter().any(|e| e.kind == ModuleKind::Conv1d);
    json!({
        "peft_type": "LORA",
        "task_type": r.facts.task_type.map(|t| t.as_str()),
        "base_model_name_or_path": r.base_model,
        "r": rank,
        "lora_alpha": rank,
        "target_modules": r.target_modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": if r.modules_to_save.is_empty() { Value::Null } else { json!(r.modules_to_save) },
        "bias": "none",
        "lora_bias": r.lora_bias,
        "lora_dropout": 0.0,
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": false,
        "use_dora": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "layers_to_transform": null,
        "layers_pattern": null,
        "revision": r.base_revision,
    })
}
