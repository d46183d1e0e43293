//! `architecture_comparison.json`: the two models' structure side by side.

use crate::comparison::{Comparison, ModelInfo};
use crate::pairing::{Mismatch, MismatchKind, PrefixAlignment, layer_index, module_type};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// `architecture_comparison.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArchitectureComparison {
    pub base: ModelStructure,
    pub finetuned: ModelStructure,
    pub same_parameter_count: bool,
    pub same_layer_count: bool,
    pub same_model_type: bool,
    /// The prefix stripped to align the two models' names, if one was.
    pub name_alignment: Option<PrefixAlignment>,
    pub shape_mismatches: Vec<Mismatch>,
    pub dtype_mismatches: Vec<Mismatch>,
    pub only_in_base: Vec<String>,
    pub only_in_finetuned: Vec<String>,
}

/// Structure of one model, from its headers and config (also `inspect --json`'s
/// `structure`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelStructure {
    /// The model argument as given.
    pub source: String,
    /// Weight files.
    pub files: usize,
    pub tensor_count: usize,
    pub parameter_count: u64,
    /// Bytes of tensor data as stored.
    pub bytes: u64,
    /// Tensors per stored dtype.
    pub dtype_histogram: BTreeMap<String, u64>,
    /// `config.json`'s `model_type`, as written.
    pub model_type: Option<Value>,
    /// `config.json`'s `architectures`, as written.
    pub architectures: Option<Value>,
    /// `num_hidden_layers`, or one more than the largest layer index in the names.
    pub layer_count: Option<u64>,
    pub module_types: BTreeMap<String, ModuleCount>,
}

/// Tensors and parameters of one module type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleCount {
    pub tensors: u64,
    pub parameters: u64,
}

/// Structure of one model, from its headers and config.
pub fn model_structure(m: &ModelInfo) -> ModelStructure {
    let mut dtype_histogram: BTreeMap<String, u64> = BTreeMap::new();
    let mut module_types: BTreeMap<String, ModuleCount> = BTreeMap::new();
    let mut parameter_count = 0u64;
    let mut bytes = 0u64;
    let mut max_layer: Option<usize> = None;
    for t in &m.tensors {
        let n: u64 = t.shape.iter().map(|&d| d as u64).product();
        parameter_count += n;
        bytes += t.nbytes;
        *dtype_histogram.entry(t.dtype.clone()).or_default() += 1;
        if let Some(l) = layer_index(&t.name) {
            max_layer = Some(max_layer.map_or(l, |x| x.max(l)));
        }
        let e = module_types.entry(module_type(&t.name)).or_default();
        e.tensors += 1;
        e.parameters += n;
    }
    let cfg = m.config.as_ref();
    let layer_count = cfg
        .and_then(|c| c.get("num_hidden_layers"))
        .and_then(Value::as_u64)
        .or(max_layer.map(|l| l as u64 + 1));
    ModelStructure {
        source: m.source.clone(),
        files: m.files.len(),
        tensor_count: m.tensors.len(),
        parameter_count,
        bytes,
        dtype_histogram,
        model_type: cfg.and_then(|c| c.get("model_type")).cloned(),
        architectures: cfg.and_then(|c| c.get("architectures")).cloned(),
        layer_count,
        module_types,
    }
}

/// Renders `architecture_comparison.json`.
pub fn render(c: &Comparison) -> ArchitectureComparison {
    let base = model_structure(&c.base);
    let finetuned = model_structure(&c.finetuned);
    let of_kind = |k: MismatchKind| {
        c.mismatches
            .iter()
            .filter(|m| m.kind == k)
            .cloned()
            .collect()
    };
    ArchitectureComparison {
        same_parameter_count: base.parameter_count == finetuned.parameter_count,
        same_layer_count: base.layer_count == finetuned.layer_count,
        same_model_type: base.model_type == finetuned.model_type,
        base,
        finetuned,
        name_alignment: c.prefix.clone(),
        shape_mismatches: of_kind(MismatchKind::Shape),
        dtype_mismatches: of_kind(MismatchKind::Dtype),
        only_in_base: c.only_in_base.clone(),
        only_in_finetuned: c.only_in_finetuned.clone(),
    }
}
