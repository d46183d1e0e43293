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
    let mut doc = json!({
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
        "relatedness": crate::relatedness::assess(c),
        "warnings": {"base": c.base.warnings, "finetuned": c.finetuned.warnings},
        "performance": perf,
    });
    if c.base.hub.is_some() || c.finetuned.hub.is_some() {
        doc["hub"] = json!({"base": c.base.hub, "finetuned": c.finetuned.hub});
    }
    doc
}

/// Reads a comparison back from the `weight_differences.json` document `v` (read from
/// `path`), for `weightdiff report DIR`. The per-model file lists, configs and tensor
/// lists are not in that document; the text and HTML reports do not need them.
pub fn parse(v: &Value, path: &std::path::Path) -> crate::error::Result<Comparison> {
    use crate::comparison::ModelInfo;
    use crate::error::Error;
    let bad = |reason: String| Error::InvalidJson {
        path: path.to_path_buf(),
        reason,
    };
    let field = |k: &str| v.get(k).ok_or_else(|| bad(format!("missing `{k}`")));
    let take = |k: &str| -> crate::error::Result<Value> { Ok(field(k)?.clone()) };
    // Keys added after the first schema: absent in older files, so defaulted.
    let or = |k: &str, d: Value| v.get(k).cloned().unwrap_or(d);
    fn from<T: serde::de::DeserializeOwned>(
        x: Value,
        k: &str,
        bad: &dyn Fn(String) -> crate::error::Error,
    ) -> crate::error::Result<T> {
        serde_json::from_value(x).map_err(|e| bad(format!("`{k}`: {e}")))
    }
    let version = field("schema_version")?.as_u64();
    if version != Some(SCHEMA_VERSION as u64) {
        return Err(bad(format!(
            "schema_version {version:?}, this weightdiff reads {SCHEMA_VERSION}"
        )));
    }
    let model = |k: &str| -> crate::error::Result<ModelInfo> {
        Ok(ModelInfo {
            source: from(take(k)?, k, &bad)?,
            files: Vec::new(),
            config: None,
            generation_config: None,
            tensors: Vec::new(),
            hub: from(
                v.pointer(&format!("/hub/{k}"))
                    .cloned()
                    .unwrap_or(Value::Null),
                "hub",
                &bad,
            )?,
            warnings: from(
                v.pointer(&format!("/warnings/{k}"))
                    .cloned()
                    .unwrap_or(Value::Array(Vec::new())),
                "warnings",
                &bad,
            )?,
        })
    };
    let all: Map<String, Value> = from(take("all_differences")?, "all_differences", &bad)?;
    let mut results = Vec::with_capacity(all.len());
    for (name, m) in all {
        let metrics = from(m, &format!("all_differences.{name}"), &bad)?;
        results.push((name, metrics));
    }
    Ok(Comparison {
        base: model("base")?,
        finetuned: model("finetuned")?,
        threshold: from(take("threshold")?, "threshold", &bad)?,
        verify: from(or("verify", Value::Bool(false)), "verify", &bad)?,
        filters: from(or("filters", json!([])), "filters", &bad)?,
        prefix: from(or("name_alignment", Value::Null), "name_alignment", &bad)?,
        results,
        only_in_base: from(take("only_in_base")?, "only_in_base", &bad)?,
        only_in_finetuned: from(take("only_in_finetuned")?, "only_in_finetuned", &bad)?,
        mismatches: from(take("mismatches")?, "mismatches", &bad)?,
        errors: from(take("errors")?, "errors", &bad)?,
        filtered_out: 0,
        performance: from(take("performance")?, "performance", &bad)?,
        complete: from(take("complete")?, "complete", &bad)?,
        overlap: from(or("relatedness", json!({})), "relatedness", &bad)?,
        lora: None,
    })
}
