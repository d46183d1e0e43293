//! Merged-LoRA detection: is a delta low-rank, and of which rank?
//!
//! A LoRA of rank r merged into a weight and stored in a low-precision dtype leaves
//! Δ = BA + E, where E is the rounding error of the stored fine-tuned values. BA has r
//! non-zero singular values; E is close to an i.i.d. matrix whose entries are uniform
//! in ±ulp/2, so its largest singular value is about σ_E = s·(√m + √n) with
//! s² = mean(ulp²/12) (the Marchenko–Pastur edge). The spectrum of Δ therefore shows a
//! cliff: r values clearly above σ_E, then values at or below it.
//!
//! The rule: count the singular values above [`FLOOR_MARGIN`]·σ_E; that count r is the
//! detected rank when it is below the number of values computed and the cliff is sharp,
//! σ_r / σ_{r+1} ≥ [`MIN_GAP`]. Otherwise the delta is not low-rank within the analysed
//! range (`detected_rank: null`).
//!
//! A delta as large as the weights, merged in f32 or f16, also carries the rounding of
//! the merge arithmetic (B·A is rounded before the add): its tail sits a few times above
//! the storage prediction, while the cliff is orders of magnitude deep. So a second rule:
//! the deepest step σ_r / σ_{r+1} ≥ [`CLIFF_GAP`] whose tail σ_{r+1} is within
//! [`CLIFF_TAIL_MARGIN`] of the floor is a rank too. A dense fine-tune has no such step.
//!
//! A matrix whose smaller side is at most the number of values analysed (a [2, 384]
//! token-type table, a [32, 4] relative attention bias) has its whole spectrum computed;
//! when every value is above the floor ([`is_full_spectrum`]) a LoRA of rank ≥ its size
//! and a dense change look the same, so the verdict leaves it out.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Singular values up to this multiple of the predicted rounding floor still count as
/// noise: the Marchenko–Pastur edge is an expectation, and rounding errors are not
/// exactly i.i.d. (they scale with each weight's magnitude).
pub const FLOOR_MARGIN: f64 = 1.5;
/// The smallest ratio σ_r / σ_{r+1} accepted as a rank cliff.
pub const MIN_GAP: f64 = 2.0;
/// A step this deep is a rank cliff even when its tail is above [`FLOOR_MARGIN`]·floor.
pub const CLIFF_GAP: f64 = 1e3;
/// ... as long as the tail is within this multiple of the predicted floor.
pub const CLIFF_TAIL_MARGIN: f64 = 64.0;

/// Predicted top singular value of the rounding noise of an m × n delta whose
/// elements' squared rounding errors sum to `rounding_var_sum`.
pub fn noise_floor(m: usize, n: usize, rounding_var_sum: f64) -> f64 {
    let count = (m * n).max(1) as f64;
    (rounding_var_sum / count).sqrt() * ((m as f64).sqrt() + (n as f64).sqrt())
}

/// The evidence for one tensor.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Detection {
    pub detected_rank: Option<usize>,
    /// σ_r / σ_{r+1} at the detected cliff (or at the last value above the floor).
    pub gap_ratio: Option<f64>,
}

/// Applies the rule of the module docs to singular values `s` (non-increasing).
pub fn detect(s: &[f64], floor: f64) -> Detection {
    let tau = FLOOR_MARGIN * floor;
    let gap_at = |r: usize| {
        if s[r] > 0.0 {
            s[r - 1] / s[r]
        } else {
            f64::INFINITY
        }
    };
    let r = s.iter().take_while(|&&x| x > tau).count();
    if r > 0 && r < s.len() && gap_at(r) >= MIN_GAP {
        return Detection {
            detected_rank: Some(r),
            gap_ratio: Some(gap_at(r)),
        };
    }
    let deepest = (1..s.len())
        .filter(|&i| s[i] <= CLIFF_TAIL_MARGIN * floor && s[i - 1] > tau)
        .max_by(|&a, &b| gap_at(a).total_cmp(&gap_at(b)));
    if let Some(c) = deepest.filter(|&c| gap_at(c) >= CLIFF_GAP) {
        return Detection {
            detected_rank: Some(c),
            gap_ratio: Some(gap_at(c)),
        };
    }
    Detection {
        detected_rank: None,
        gap_ratio: (r > 0 && r < s.len()).then(|| gap_at(r)),
    }
}

/// Whether `s`, the top singular values of an m × n delta, is its whole spectrum
/// (min(m, n) values) with every value above the floor: a thin matrix changed in every
/// direction, whose spectrum cannot tell a LoRA of rank ≥ min(m, n) from a dense change.
pub fn is_full_spectrum(s: &[f64], floor: f64, m: usize, n: usize) -> bool {
    let full = m.min(n);
    full > 0 && s.len() == full && s.last().is_some_and(|&x| x > FLOOR_MARGIN * floor)
}

/// What the fine-tune is: `merged_lora`, `full_finetune`, `unchanged` or `mixed` from
/// the low-rank stage; before it, `unrelated`, `different_architecture` or
/// `nothing_compared` when the two are not a base and a derivative ([`relation_verdict`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerdictKind {
    MergedLora,
    FullFinetune,
    Unchanged,
    Mixed,
    Unrelated,
    DifferentArchitecture,
    NothingCompared,
}

impl VerdictKind {
    /// The name the reports and the JSON use (`merged_lora`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            VerdictKind::MergedLora => "merged_lora",
            VerdictKind::FullFinetune => "full_finetune",
            VerdictKind::Unchanged => "unchanged",
            VerdictKind::Mixed => "mixed",
            VerdictKind::Unrelated => "unrelated",
            VerdictKind::DifferentArchitecture => "different_architecture",
            VerdictKind::NothingCompared => "nothing_compared",
        }
    }
}

impl std::fmt::Display for VerdictKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The overall verdict of `lora_analysis.json`, or of the relatedness check that comes
/// before it ([`relation_verdict`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Verdict {
    pub kind: VerdictKind,
    /// The LoRA rank (the most common detected rank), for `merged_lora` and `mixed`.
    pub rank: Option<usize>,
    /// Leaf module names whose deltas are low-rank.
    pub target_modules: Vec<String>,
    /// Share of the modified tensors consistent with the verdict, in [0, 1].
    pub confidence: f64,
    /// Why, in words, for the verdicts of the relatedness check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Below this share of names or of parameters paired with equal shapes, the two models
/// are `different_architecture`: a fine-tune (even with a resized vocabulary or an added
/// head) keeps nearly all of its base's tensors.
pub const MIN_PAIRED_SHARE: f64 = 0.5;
/// Below this parameter-weighted cosine similarity of the paired weights, the two are
/// `unrelated`. Fine-tuning moves weights by a few percent of their norm (cosine ≈ 0.99+);
/// independently initialised or trained weights are nearly orthogonal (cosine ≈ 0).
pub const MIN_RELATED_COSINE: f64 = 0.5;

/// What the relatedness check sees (module [`crate::relatedness`] gathers it).
pub struct Relation<'a> {
    /// Tensors compared (after filters).
    pub compared: usize,
    /// Tensors that paired before filters.
    pub paired: usize,
    /// Tensors that failed.
    pub failed: usize,
    /// Names on both sides whose shapes differ (and were not compared).
    pub shape_mismatches: usize,
    /// `--include`/`--exclude` as given (`include RE`).
    pub filters: &'a [String],
    pub names_share: f64,
    pub parameters_share: f64,
    /// Parameter-weighted cosine similarity of the compared weights.
    pub cosine: Option<f64>,
    /// `model_type` of both configs, when both say and they differ.
    pub model_types: Option<(&'a str, &'a str)>,
}

/// `nothing_compared`, `different_architecture` or `unrelated` when the two models are
/// not a base and a derivative; `None` when they are (the low-rank verdict follows).
pub fn relation_verdict(r: &Relation<'_>) -> Option<Verdict> {
    let v = |kind, confidence: f64, reason: String| Verdict {
        kind,
        rank: None,
        target_modules: Vec::new(),
        confidence: confidence.clamp(0.0, 1.0),
        reason: Some(reason),
    };
    if r.compared == 0 && r.paired == 0 && r.shape_mismatches > 0 {
        return Some(v(
            VerdictKind::DifferentArchitecture,
            1.0,
            format!(
                "no tensor pairs with an equal shape: the {} names both have differ in shape",
                r.shape_mismatches
            ),
        ));
    }
    if r.compared == 0 {
        let why = if r.paired == 0 {
            "the two models have no tensor name and shape in common".to_string()
        } else if r.failed > 0 {
            format!("every tensor that pairs failed ({} errors)", r.failed)
        } else if !r.filters.is_empty() {
            let flags: Vec<String> = r.filters.iter().map(|f| format!("--{f}")).collect();
            format!(
                "{} left none of the {} paired tensors to compare",
                flags.join(" "),
                r.paired
            )
        } else {
            "no tensor was compared".to_string()
        };
        return Some(v(VerdictKind::NothingCompared, 1.0, why));
    }
    if let Some((a, b)) = r.model_types {
        return Some(v(
            VerdictKind::DifferentArchitecture,
            1.0,
            format!("the configs name different model types: {a} and {b}"),
        ));
    }
    let share = r.names_share.min(r.parameters_share);
    if share < MIN_PAIRED_SHARE {
        return Some(v(
            VerdictKind::DifferentArchitecture,
            1.0 - share,
            format!(
                "only {:.0} % of the tensors and {:.0} % of the parameters pair with equal shapes",
                100.0 * r.names_share,
                100.0 * r.parameters_share
            ),
        ));
    }
    match r.cosine {
        Some(cos) if cos < MIN_RELATED_COSINE => Some(v(
            VerdictKind::Unrelated,
            1.0 - cos.max(0.0),
            format!(
                "the paired weights are uncorrelated: parameter-weighted cosine similarity {cos:.3}, \
                 where a fine-tune keeps it near 1"
            ),
        )),
        _ => None,
    }
}

/// A modified tensor as the verdict sees it.
pub struct Evidence<'a> {
    pub module: &'a str,
    /// 2-D tensors can be low-rank; others (norms, biases) cannot.
    pub is_matrix: bool,
    pub detected_rank: Option<usize>,
}

/// Share of modified matrices that must be low-rank for `merged_lora` (and at most
/// 1 − this share for `full_finetune`).
pub const VERDICT_SHARE: f64 = 0.9;

/// Decides the verdict from the modified tensors.
pub fn verdict(modified: &[Evidence<'_>]) -> Verdict {
    if modified.is_empty() {
        return Verdict {
            kind: VerdictKind::Unchanged,
            rank: None,
            target_modules: Vec::new(),
            confidence: 1.0,
            reason: None,
        };
    }
    let matrices: Vec<&Evidence> = modified.iter().filter(|e| e.is_matrix).collect();
    let low: Vec<&Evidence> = matrices
        .iter()
        .copied()
        .filter(|e| e.detected_rank.is_some())
        .collect();
    let others = modified.len() - matrices.len();
    let mut ranks: BTreeMap<usize, usize> = BTreeMap::new();
    for e in &low {
        *ranks.entry(e.detected_rank.expect("filtered")).or_default() += 1;
    }
    // Most common rank; ties go to the larger rank.
    let mode = ranks
        .iter()
        .max_by_key(|(r, c)| (**c, **r))
        .map(|(r, _)| *r);
    let mut modules: Vec<String> = low.iter().map(|e| e.module.to_string()).collect();
    modules.sort();
    modules.dedup();
    let share = if matrices.is_empty() {
        0.0
    } else {
        low.len() as f64 / matrices.len() as f64
    };
    if !matrices.is_empty() && share >= VERDICT_SHARE && others == 0 {
        let agree = mode.map_or(0, |r| ranks[&r]) as f64 / modified.len() as f64;
        Verdict {
            kind: VerdictKind::MergedLora,
            rank: mode,
            target_modules: modules,
            confidence: agree,
            reason: None,
        }
    } else if share <= 1.0 - VERDICT_SHARE {
        let consistent = (matrices.len() - low.len() + others) as f64 / modified.len() as f64;
        Verdict {
            kind: VerdictKind::FullFinetune,
            rank: None,
            target_modules: Vec::new(),
            confidence: consistent,
            reason: None,
        }
    } else {
        Verdict {
            kind: VerdictKind::Mixed,
            rank: mode,
            target_modules: modules,
            confidence: share.max(1.0 - share),
            reason: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cliff_above_the_floor_is_a_rank() {
        let s = [10.0, 9.0, 8.0, 7.0, 0.011, 0.010, 0.009];
        assert_eq!(detect(&s, 0.01).detected_rank, Some(4));
        // A flat spectrum above the floor is not low-rank in the analysed range.
        assert_eq!(detect(&[5.0, 4.9, 4.8], 0.01).detected_rank, None);
        // A shallow step is not a cliff.
        assert_eq!(
            detect(&[1.0, 0.9, 0.02, 0.014, 0.01], 0.01).detected_rank,
            None
        );
        // Noise only.
        assert_eq!(detect(&[0.012, 0.01], 0.01).detected_rank, None);
    }

    #[test]
    fn a_deep_cliff_is_a_rank_when_merge_rounding_lifts_the_tail() {
        // An f32 merge of a delta larger than the weights: tail at twice the floor.
        let s = [2.5, 2.2, 1.4, 1.2, 6.3e-8, 5.2e-8, 5.0e-8, 4.7e-8];
        assert_eq!(detect(&s, 3.4e-8).detected_rank, Some(4));
        // A dense spectrum with a tail far above the floor has no such cliff.
        let dense = [2.5, 2.2, 1.4, 1.2, 1.0, 0.9, 0.8, 0.7];
        assert_eq!(detect(&dense, 3.4e-8).detected_rank, None);
        // A deep step whose tail is signal (far above the floor) is not rounding.
        let step = [2.5, 2.2, 1e-3, 9e-4, 8e-4];
        assert_eq!(detect(&step, 1e-9).detected_rank, None);
    }

    #[test]
    fn a_thin_matrix_changed_everywhere_has_a_full_spectrum() {
        assert!(is_full_spectrum(&[23.0, 14.0], 6e-7, 2, 32));
        // Not when only part of the spectrum was computed.
        assert!(!is_full_spectrum(&[23.0, 14.0], 6e-7, 64, 32));
        // Not when its tail is noise.
        assert!(!is_full_spectrum(&[23.0, 14.0, 1e-9], 1e-8, 3, 32));
    }

    #[test]
    fn relation_verdicts_come_before_the_low_rank_one() {
        let filters = ["include nothing".to_string()];
        let r = |compared, names_share, cosine| Relation {
            compared,
            paired: 10,
            failed: 0,
            shape_mismatches: 0,
            filters: &filters,
            names_share,
            parameters_share: 1.0,
            cosine,
            model_types: None,
        };
        let kind = |r: Relation| relation_verdict(&r).map(|v| v.kind);
        assert_eq!(kind(r(0, 1.0, None)), Some(VerdictKind::NothingCompared));
        assert_eq!(
            kind(r(3, 0.1, Some(1.0))),
            Some(VerdictKind::DifferentArchitecture)
        );
        assert_eq!(kind(r(10, 1.0, Some(0.01))), Some(VerdictKind::Unrelated));
        assert_eq!(kind(r(10, 1.0, Some(0.999))), None);
        let mut bert_albert = r(10, 1.0, Some(0.999));
        bert_albert.model_types = Some(("bert", "albert"));
        assert_eq!(kind(bert_albert), Some(VerdictKind::DifferentArchitecture));
    }

    #[test]
    fn verdict_names_the_rank_and_modules() {
        let ev = |m: &'static str, r| Evidence {
            module: m,
            is_matrix: true,
            detected_rank: r,
        };
        let v = verdict(&[
            ev("q_proj", Some(8)),
            ev("v_proj", Some(8)),
            ev("q_proj", Some(8)),
        ]);
        assert_eq!((v.kind, v.rank), (VerdictKind::MergedLora, Some(8)));
        assert_eq!(v.target_modules, ["q_proj", "v_proj"]);
        assert_eq!(v.confidence, 1.0);
        assert_eq!(
            verdict(&[ev("q_proj", None), ev("up_proj", None)]).kind,
            VerdictKind::FullFinetune
        );
        assert_eq!(
            verdict(&[ev("q_proj", Some(4)), ev("up_proj", None)]).kind,
            VerdictKind::Mixed
        );
        assert_eq!(verdict(&[]).kind, VerdictKind::Unchanged);
        let norm = Evidence {
            module: "norm",
            is_matrix: false,
            detected_rank: None,
        };
        assert_eq!(
            verdict(&[ev("q_proj", Some(4)), norm]).kind,
            VerdictKind::Mixed
        );
    }
}
