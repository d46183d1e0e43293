//! Are the two models a base and a derivative at all? Asked before any low-rank verdict.
//!
//! A fine-tune keeps its base's architecture (nearly every tensor pairs with an equal
//! shape; a resized vocabulary or an added head leaves the rest) and stays close to its
//! weights: the cosine similarity of paired weights is near 1, where independently
//! initialised or trained weights give about 0. The evidence:
//!
//! - the share of names, and of parameters, that pair with equal shapes (before
//!   `--include`/`--exclude`): [`Overlap`], gathered when the pairs are made;
//! - the parameter-weighted cosine similarity of the compared tensors,
//!   Σ nᵢ·cosᵢ / Σ nᵢ (nᵢ elements of tensor i), and the whole-model relative change
//!   ‖Δ‖/‖W‖ = √(Σ‖Δᵢ‖²) / √(Σ‖Wᵢ‖²) over the same tensors;
//! - the configs' architecture and size keys.
//!
//! [`crate::lowrank::detect::relation_verdict`] turns it into `nothing_compared`,
//! `different_architecture` or `unrelated`, or lets the low-rank verdict follow.

use crate::checkpoint::Checkpoint;
use crate::comparison::{Comparison, Overlap};
use crate::lowrank::detect::{Relation, Verdict, VerdictKind, relation_verdict};
use crate::pairing::{MismatchKind, Pairing, TensorPair};
use serde::Serialize;

/// Config keys compared as evidence of architecture and size (Llama/Qwen/BERT names, then
/// GPT-2's and T5's).
pub const CONFIG_KEYS: &[&str] = &[
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "n_embd",
    "n_layer",
    "n_head",
    "d_model",
    "num_layers",
];

/// The structural evidence of two opened models and their pairing.
pub fn overlap(base: &Checkpoint, ft: &Checkpoint, paired: &Pairing) -> Overlap {
    let params = |ck: &Checkpoint| ck.tensors().values().map(|t| t.numel()).sum::<u64>();
    let mut config_differences = std::collections::BTreeMap::new();
    if let (Some(a), Some(b)) = (&base.config, &ft.config) {
        for k in CONFIG_KEYS {
            let (x, y) = (&a[*k], &b[*k]);
            if x != y {
                config_differences.insert(k.to_string(), [x.clone(), y.clone()]);
            }
        }
    }
    Overlap {
        base_tensors: base.tensors().len(),
        finetuned_tensors: ft.tensors().len(),
        paired_tensors: paired.pairs.len(),
        base_parameters: params(base),
        finetuned_parameters: params(ft),
        paired_parameters: paired.pairs.iter().map(TensorPair::compared_elements).sum(),
        config_differences,
        same_model: same_files(base, ft),
        low_rank_delta: false,
    }
}

/// Whether the two models can only be judged unrelated after the low-rank stage: their
/// verdict is `unrelated` by cosine alone, which a merged LoRA larger than the weights
/// also gives. The caller then runs the stage and [`settle`]s.
pub fn needs_low_rank_evidence(c: &Comparison) -> bool {
    assess(c)
        .verdict
        .is_some_and(|v| v.kind == VerdictKind::Unrelated)
}

/// Settles an `unrelated` verdict with the low-rank stage's: a merged LoRA makes the
/// models a base and a derivative (`low_rank_delta`) and its report stays; otherwise the
/// report is dropped (nothing is extracted from unrelated models).
pub fn settle(c: &mut Comparison) {
    let lora = c
        .lora
        .as_ref()
        .is_some_and(|l| l.verdict.kind == VerdictKind::MergedLora);
    c.overlap.low_rank_delta = lora;
    if !lora {
        c.lora = None;
    }
}

/// Both checkpoints read the same files, as far as the OS can tell.
fn same_files(base: &Checkpoint, ft: &Checkpoint) -> bool {
    let canon = |ck: &Checkpoint| -> Option<Vec<std::path::PathBuf>> {
        ck.shard_paths()
            .map(|p| std::fs::canonicalize(p).ok())
            .collect()
    };
    let a = canon(base);
    a.as_ref().is_some_and(|a| !a.is_empty()) && a == canon(ft)
}

/// The evidence and, when the two are not a base and a derivative, the verdict.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Relatedness {
    #[serde(flatten)]
    pub overlap: Overlap,
    /// paired_tensors / the larger side's tensor count.
    pub names_paired_share: f64,
    /// paired_parameters / the larger side's parameter count.
    pub parameters_paired_share: f64,
    /// Elements of the compared tensors.
    pub compared_parameters: u64,
    /// Parameter-weighted cosine similarity of the compared tensors (null: none defined).
    pub cosine_similarity: Option<f64>,
    /// Whole-model ‖Δ‖/‖W‖ over the compared tensors (null: zero or overflowed base).
    pub relative_diff: Option<f64>,
    /// `nothing_compared`, `different_architecture` or `unrelated`; null when related.
    pub verdict: Option<Verdict>,
}

/// Gathers the evidence of `c` and decides. Pure: `weightdiff report DIR` gets the same
/// figures from the recorded comparison.
pub fn assess(c: &Comparison) -> Relatedness {
    let o = &c.overlap;
    let share = |part: f64, a: f64, b: f64| {
        let whole = a.max(b);
        if whole > 0.0 { part / whole } else { 0.0 }
    };
    let names_paired_share = share(
        o.paired_tensors as f64,
        o.base_tensors as f64,
        o.finetuned_tensors as f64,
    );
    let parameters_paired_share = share(
        o.paired_parameters as f64,
        o.base_parameters as f64,
        o.finetuned_parameters as f64,
    );
    // Sums in name order, whatever order the results come in (a merge, a re-read report).
    let mut results: Vec<&(String, crate::TensorMetrics)> = c.results.iter().collect();
    results.sort_by(|a, b| a.0.cmp(&b.0));
    let (mut weighted, mut weight, mut d2, mut w2, mut n) = (0.0, 0.0, 0.0, 0.0, 0u64);
    for (_, m) in results {
        n += m.num_elements;
        if let Some(cos) = m.cosine_similarity {
            weighted += cos * m.num_elements as f64;
            weight += m.num_elements as f64;
        }
        d2 += m.l2_diff * m.l2_diff;
        w2 += m.base_l2 * m.base_l2;
    }
    let cosine_similarity = (weight > 0.0).then(|| weighted / weight);
    let relative_diff = Some((d2 / w2).sqrt()).filter(|r| r.is_finite());
    let model_types = match o.config_differences.get("model_type") {
        Some([a, b]) => a.as_str().zip(b.as_str()),
        None => None,
    };
    // Reports of versions before this evidence have no overlap: no verdict from it.
    let recorded = o.base_tensors > 0 || o.finetuned_tensors > 0 || c.results.is_empty();
    let (names_share, parameters_share) = if recorded {
        (names_paired_share, parameters_paired_share)
    } else {
        (1.0, 1.0)
    };
    // An interrupted run has compared only some tensors: no verdict on what it left out.
    let verdict = if c.overlap.low_rank_delta {
        None
    } else if c.complete || !c.results.is_empty() {
        relation_verdict(&Relation {
            compared: c.results.len(),
            paired: o.paired_tensors,
            failed: c.errors.len(),
            shape_mismatches: c
                .mismatches
                .iter()
                .filter(|m| {
                    m.kind == MismatchKind::Shape && !c.results.iter().any(|(n, _)| n == &m.name)
                })
                .count(),
            filters: &c.filters,
            names_share,
            parameters_share,
            cosine: cosine_similarity,
            model_types,
        })
    } else {
        None
    };
    Relatedness {
        overlap: o.clone(),
        names_paired_share,
        parameters_paired_share,
        compared_parameters: n,
        cosine_similarity,
        relative_diff,
        verdict,
    }
}
