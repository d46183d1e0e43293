//! `trajectory.json` and `trajectory.txt`: how the difference from one base grows across
//! several fine-tuned checkpoints (the checkpoints of a training run, in the order given).

use super::sci;
use crate::comparison::{Comparison, SCHEMA_VERSION};
use serde_json::{Map, Value, json};
use std::fmt::Write;

/// Whole-model figures of one comparison: ‖Δ‖ over all compared tensors, relative to
/// ‖base‖, and the modified count.
fn overall(c: &Comparison) -> Value {
    let d2: f64 = c.results.iter().map(|(_, m)| m.l2_diff * m.l2_diff).sum();
    let b2: f64 = c.results.iter().map(|(_, m)| m.base_l2 * m.base_l2).sum();
    json!({
        "finetuned": c.finetuned.source,
        "modified": c.modified().len(),
        "compared": c.results.len(),
        "l2_diff": d2.sqrt(),
        "relative_diff": if b2 > 0.0 { Some((d2 / b2).sqrt()) } else { None },
        "errors": c.errors.len(),
        "verdict": c.lora.as_ref().map(|l| &l.verdict),
    })
}

/// Renders `trajectory.json`: per checkpoint the overall figures, and per tensor the
/// series of relative diff, L2 diff and changed ratio (null where a checkpoint lacks it).
pub fn render(cs: &[Comparison]) -> Value {
    let mut names: Vec<&str> = cs
        .iter()
        .flat_map(|c| c.results.iter().map(|(n, _)| n.as_str()))
        .collect();
    names.sort_by(|a, b| crate::pairing::natural_cmp(a, b));
    names.dedup();
    let mut tensors = Map::new();
    for name in names {
        let series = |f: &dyn Fn(&crate::TensorMetrics) -> Option<f64>| -> Vec<Option<f64>> {
            cs.iter()
                .map(|c| {
                    c.results
                        .iter()
                        .find(|(n, _)| n == name)
                        .and_then(|(_, m)| f(m))
                })
                .collect()
        };
        tensors.insert(
            name.to_string(),
            json!({
                "relative_diff": series(&|m| m.relative_diff),
                "l2_diff": series(&|m| Some(m.l2_diff)),
                "changed_ratio": series(&|m| Some(m.changed_ratio)),
            }),
        );
    }
    json!({
        "schema_version": SCHEMA_VERSION,
        "base": cs.first().map(|c| c.base.source.clone()),
        "finetuned": cs.iter().map(|c| c.finetuned.source.clone()).collect::<Vec<_>>(),
        "overall": cs.iter().map(overall).collect::<Vec<_>>(),
        "tensors": tensors,
    })
}

/// Renders `trajectory.txt`: the overall series as a table.
pub fn render_text(cs: &[Comparison]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Trajectory from {}",
        cs.first().map_or("", |c| c.base.source.as_str())
    );
    let _ = writeln!(
        s,
        "{:<4} {:>9} {:>14} {:>14}  checkpoint",
        "#", "modified", "l2_diff", "relative"
    );
    for (i, c) in cs.iter().enumerate() {
        let o = overall(c);
        let _ = writeln!(
            s,
            "{:<4} {:>9} {:>14} {:>14}  {}",
            i + 1,
            o["modified"],
            sci(o["l2_diff"].as_f64().unwrap_or(0.0), 4),
            o["relative_diff"]
                .as_f64()
                .map_or("n/a".to_string(), |x| sci(x, 4)),
            c.finetuned.source
        );
    }
    s
}
