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

use crate::checkpoint::dtype::DType;
use crate::comparison::{LoraReport, ModuleKind};
use crate::synthetic::encode;
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

/// The adapter's tensors, with PEFT key names, in key order.
pub fn tensors(r: &LoraReport) -> Vec<AdapterTensor> {
    let mut out = Vec::new();
    for e in &r.extracted {
        let f = &e.factors;
        let p = format!("base_model.model.{}", e.module);
        match e.kind {
            ModuleKind::Linear => {
                out.push(AdapterTensor {
                    key: format!("{p}.lora_A.weight"),
                    dtype: f.dtype,
                    shape: vec![f.rank, f.n],
                    bytes: encode(f.dtype, &f.a),
                });
                out.push(AdapterTensor {
                    key: format!("{p}.lora_B.weight"),
                    dtype: f.dtype,
                    shape: vec![f.m, f.rank],
                    bytes: encode(f.dtype, &f.b),
                });
            }
            ModuleKind::Embedding => {
                // PEFT's embedding LoRA: ΔW[vocab, hidden] = lora_embedding_Aᵀ · lora_embedding_Bᵀ.
                out.push(AdapterTensor {
                    key: format!("{p}.lora_embedding_A"),
                    dtype: f.dtype,
                    shape: vec![f.rank, f.m],
                    bytes: encode(f.dtype, &transpose(&f.b, f.m, f.rank)),
                });
                out.push(AdapterTensor {
                    key: format!("{p}.lora_embedding_B"),
                    dtype: f.dtype,
                    shape: vec![f.n, f.rank],
                    bytes: encode(f.dtype, &transpose(&f.a, f.rank, f.n)),
                });
            }
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
    out
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

/// The default rank: the most common one (ties to the larger).
pub fn default_rank(r: &LoraReport) -> usize {
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
    let mut targets: Vec<String> = r
        .extracted
        .iter()
        .map(|e| crate::pairing::module_type(&e.tensor))
        .collect();
    targets.sort();
    targets.dedup();
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": r.base_model,
        "r": rank,
        "lora_alpha": rank,
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": if r.modules_to_save.is_empty() { Value::Null } else { json!(r.modules_to_save) },
        "bias": "none",
        "lora_bias": false,
        "lora_dropout": 0.0,
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "layers_to_transform": null,
        "layers_pattern": null,
        "revision": r.base_revision,
    })
}
