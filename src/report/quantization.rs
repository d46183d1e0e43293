//! The quantization error, when the two models store their tensors differently (a
//! bf16 original against its FP8 copy or its GGUF quants): per storage of the
//! fine-tuned side (`Q4_K`, `F8_E4M3, F32 scales 128×128`), over the tensors stored so:
//!
//! ```text
//! relative error  = sqrt(Σ‖Δ‖² / Σ‖W‖²)            (W: the base, i.e. the original)
//! SNR (dB)        = 10 · log10(Σ‖W‖² / Σ‖Δ‖²)      (= −20 · log10(relative error))
//! max |Δ|         = the largest over the group
//! ```
//!
//! plus the median of the tensors' own relative errors. The storages come from the
//! pairing's dtype mismatches, which name each side's storage.

use crate::comparison::Comparison;
use crate::pairing::MismatchKind;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The error of the tensors stored one way.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QuantGroup {
    /// The fine-tuned side's storage.
    pub storage: String,
    /// The base side's storages of these tensors.
    pub base_storage: Vec<String>,
    pub tensors: usize,
    pub parameters: u64,
    pub relative_error: Option<f64>,
    pub snr_db: Option<f64>,
    pub median_relative_error: Option<f64>,
    pub max_abs_diff: f64,
}

/// Tensor → (base storage, fine-tuned storage), for the pairs whose storages differ.
fn stored_differently(c: &Comparison) -> BTreeMap<&str, (&str, &str)> {
    c.mismatches
        .iter()
        .filter(|m| m.kind == MismatchKind::Dtype)
        .map(|m| {
            (
                m.name.as_str(),
                (m.base_dtype.as_str(), m.finetuned_dtype.as_str()),
            )
        })
        .collect()
}

/// One group per storage of the fine-tuned side that differs from the base's; empty when
/// both sides store every tensor alike.
pub fn by_storage(c: &Comparison) -> Vec<QuantGroup> {
    let storage = stored_differently(c);
    struct Acc<'a> {
        base: Vec<&'a str>,
        d2: f64,
        b2: f64,
        n: usize,
        params: u64,
        rel: Vec<f64>,
        max: f64,
    }
    let mut groups: BTreeMap<&str, Acc> = BTreeMap::new();
    for (name, m) in &c.results {
        let Some(&(base, ft)) = storage.get(name.as_str()) else {
            continue;
        };
        let g = groups.entry(ft).or_insert(Acc {
            base: Vec::new(),
            d2: 0.0,
            b2: 0.0,
            n: 0,
            params: 0,
            rel: Vec::new(),
            max: 0.0,
        });
        if !g.base.contains(&base) {
            g.base.push(base);
        }
        g.d2 += m.l2_diff * m.l2_diff;
        g.b2 += m.base_l2 * m.base_l2;
        g.n += 1;
        g.params += m.num_elements;
        g.rel.extend(m.relative_diff);
        g.max = g.max.max(m.max_abs_diff);
    }
    groups
        .into_iter()
        .map(|(storage, mut g)| {
            g.rel.sort_by(f64::total_cmp);
            let rel = (g.b2 > 0.0).then(|| (g.d2 / g.b2).sqrt());
            QuantGroup {
                storage: storage.to_string(),
                base_storage: g.base.iter().map(|s| s.to_string()).collect(),
                tensors: g.n,
                parameters: g.params,
                relative_error: rel,
                snr_db: (g.b2 > 0.0 && g.d2 > 0.0).then(|| 10.0 * (g.b2 / g.d2).log10()),
                median_relative_error: g.rel.get(g.rel.len() / 2).copied(),
                max_abs_diff: g.max,
            }
        })
        .collect()
}

/// When every modified matrix is stored differently by the two models, their
/// differences are quantization error, which would hide a fine-tune smaller than it: a
/// low-rank verdict or adapter would describe the quantization. Returns the storages and
/// their SNR, in words, for the message that says why the low-rank stage is skipped.
pub fn dominates(c: &Comparison) -> Option<String> {
    let groups = by_storage(c);
    if groups.is_empty() {
        return None;
    }
    let storage = stored_differently(c);
    let all = c
        .results
        .iter()
        .filter(|(_, m)| m.is_modified() && m.shape.len() >= 2)
        .all(|(n, _)| storage.contains_key(n.as_str()));
    all.then(|| {
        groups
            .iter()
            .map(|g| {
                format!(
                    "{} ({})",
                    g.storage,
                    g.snr_db
                        .map_or("exact".into(), |x| format!("SNR {x:.1} dB"))
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    })
}

/// The sentence the reports give when [`dominates`] skipped the low-rank stage.
pub fn skipped_sentence(storages: &str) -> String {
    format!(
        "No LoRA analysis: the two models store every modified matrix differently ({storages}), so their differences are quantization error, which hides any fine-tune smaller than it; a low-rank verdict or adapter would describe the quantization."
    )
}

/// The groups as lines of text (comparison_report.txt).
pub fn lines(groups: &[QuantGroup]) -> Vec<String> {
    let mut out = Vec::new();
    if groups.is_empty() {
        return out;
    }
    out.push(format!(
        "{:<34} {:>7} {:>12} {:>10} {:>9} {:>10}",
        "storage (fine-tuned side)", "tensors", "rel. error", "median", "SNR dB", "max |Δ|"
    ));
    for g in groups {
        out.push(format!(
            "{:<34} {:>7} {:>12} {:>10} {:>9} {:>10}",
            g.storage,
            g.tensors,
            g.relative_error.map_or("n/a".into(), |x| super::sci(x, 3)),
            g.median_relative_error
                .map_or("n/a".into(), |x| super::sci(x, 2)),
            g.snr_db.map_or("inf".into(), |x| format!("{x:.1}")),
            super::sci(g.max_abs_diff, 2)
        ));
    }
    out
}
