//! `architecture_comparison.json`: the two models' structure side by side.

use crate::comparison::{Comparison, ModelInfo};
use crate::pairing::{MismatchKind, layer_index, module_type};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// Structure of one model, from its headers and config.
pub fn model_structure(m: &ModelInfo) -> Value {
    let mut dtypes: BTreeMap<&str, u64> = BTreeMap::new();
    let mut modules: BTreeMap<String, Value> = BTreeMap::new();
    let mut params = 0u64;
    let mut bytes = 0u64;
    let mut max_layer: Option<usize> = None;
    for t in &m.tensors {
        let n: u64 = t.shape.iter().map(|&d| d as u64).product();
        params += n;
        bytes += t.nbytes;
        *dtypes.entry(t.dtype.as_str()).or_default() += 1;
        if let Some(l) = layer_index(&t.name) {
            max_layer = Some(max_layer.map_or(l, |x| x.max(l)));
        }
        let e = modules
            .entry(module_type(&t.name))
            .or_insert_with(|| json!({"tensors": 0, "parameters": 0}));
        e["tensors"] = json!(e["tensors"].as_u64().unwrap_or(0) + 1);
        e["parameters"] = json!(e["parameters"].as_u64().unwrap_or(0) + n);
    }
    let cfg = m.config.as_ref();
    let layers = cfg
        .and_then(|c| c.get("num_hidden_layers"))
        .and_then(Value::as_u64)
        .or(max_layer.map(|l| l as u64 + 1));
    json!({
        "source": m.source,
        "files": m.files.len(),
        "tensor_count": m.tensors.len(),
        "parameter_count": params,
        "bytes": bytes,
        "dtype_histogram": dtypes,
        "model_type": cfg.and_then(|c| c.get("model_type")).cloned(),
        "architectures": cfg.and_then(|c| c.get("architectures")).cloned(),
        "layer_count": layers,
        "module_types": modules,
    })
}

/// Renders `architecture_comparison.json`.
pub fn render(c: &Comparison) -> Value {
    let base = model_structure(&c.base);
    let ft = model_structure(&c.finetuned);
    let same = |k: &str| base[k] == ft[k];
    json!({
        "base": base,
        "finetuned": ft,
        "same_parameter_count": same("parameter_count"),
        "same_layer_count": same("layer_count"),
        "same_model_type": same("model_type"),
        "name_alignment": c.prefix,
        "shape_mismatches": c.mismatches.iter().filter(|m| m.kind == MismatchKind::Shape).collect::<Vec<_>>(),
        "dtype_mismatches": c.mismatches.iter().filter(|m| m.kind == MismatchKind::Dtype).collect::<Vec<_>>(),
        "only_in_base": c.only_in_base,
        "only_in_finetuned": c.only_in_finetuned,
    })
}
