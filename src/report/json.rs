//! `weight_differences.json` (SPEC §4 schema).

use crate::comparison::{Comparison, SCHEMA_VERSION};
use serde_json::{Map, Value, json};

/// Renders `weight_differences.json`.
pub fn render(c: &Comparison) -> Value {
    let mut all = Map::new();
    let mut layer_times = Map::new();
    for (name, m) in &c.results {
        all.insert(
            name.clone(),
            serde_json::to_value(m).expect("metrics serialize"),
        );
        let mut t = json!({"total_time": m.total_time, "compute_time": m.compute_time});
        if let Some(r) = m.reference_time {
            t["reference_time"] = json!(r);
        }
        layer_times.insert(name.clone(), t);
    }
    let mut perf = serde_json::to_value(&c.performance).expect("performance serializes");
    perf["layer_times"] = Value::Object(layer_times);
    json!({
        "schema_version": SCHEMA_VERSION,
        "complete": c.complete,
        "base": c.base.source,
        "finetuned": c.finetuned.source,
        "threshold": c.threshold,
        "verify": c.verify,
        "filters": c.filters,
        "name_alignment": c.prefix,
        "modified_layers": c.modified(),
        "all_differences": all,
        "only_in_base": c.only_in_base,
        "only_in_finetuned": c.only_in_finetuned,
        "mismatches": c.mismatches,
        "errors": c.errors,
        "warnings": {"base": c.base.warnings, "finetuned": c.finetuned.warnings},
        "performance": perf,
    })
}
