//! The quantization error, when the two models store their tensors differently (a
//! bf16 original against its FP8 copy or its GGUF quants): per storage of the
//! fine-tuned side (`Q4_K`, `F8_E4M3, F32 scales 128×128`), over the tensors stored so:
//!
//! ```text
//! relative error  = sqrt(Σ‖Δ‖² / Σ‖W‖²)            (W: the base, i.e. the original)
//! SNR (dB)        = 10 · log10(Σ‖W‖² / Σ‖Δ‖²)      (= −20 · log10(relative error))
//! max |Δ|         = the largest over the group
//! max error steps = max over the group's tensors of max |Δ| / Δq
//! ```
//!
//! plus the median of the tensors' own relative errors, and the same figures per module
//! type (`q_proj`, `down_proj`, …) within each storage. Δq is the quantization step of
//! the encoded side at each element (its definition per format is in
//! [`crate::checkpoint::encoding`]); `max error steps` is computed by the diff for a pair
//! of which exactly one side is encoded (`max_error_steps` of each tensor row), and is
//! null for a group with no such tensor (two quantized sides, or plain floats of another
//! dtype). It tells a faithful quant from other weights: round-to-nearest quantization of
//! *this* base gives ≤ 0.5 (plus |q|·u for a scale stored to relative precision u, e.g.
//! 127·2⁻¹¹ ≈ 0.06 for Q8_0's f16 scale; and up to 1 for Q4_0 / Q5_0, whose reference
//! quantizer maps a block's signed extreme to −8 / −16 and clips the opposite one at
//! +7 / +15), while a quant of another model, or of this one after any change larger
//! than the step, gives more.
//!
//! The storages come from the pairing's dtype mismatches, which name each side's storage.

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
    /// The largest `max_error_steps` of the group's tensors (null when none has one).
    pub max_error_steps: Option<f64>,
    /// The same figures per module type, in name order.
    pub modules: Vec<QuantModule>,
}

/// The error of one module type's tensors within a storage group.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QuantModule {
    /// The module type (`q_proj`, `embed_tokens`, …; [`crate::pairing::module_type`]).
    pub module: String,
    pub tensors: usize,
    pub parameters: u64,
    pub relative_error: Option<f64>,
    pub snr_db: Option<f64>,
    pub max_abs_diff: f64,
    pub max_error_steps: Option<f64>,
}

/// Sums over some tensors of a group.
#[derive(Default)]
struct Sums {
    d2: f64,
    b2: f64,
    n: usize,
    params: u64,
    max: f64,
    steps: Option<f64>,
}

impl Sums {
    fn add(&mut self, m: &crate::comparison::TensorMetrics) {
        self.d2 += m.l2_diff * m.l2_diff;
        self.b2 += m.base_l2 * m.base_l2;
        self.n += 1;
        self.params += m.num_elements;
        self.max = self.max.max(m.max_abs_diff);
        if let Some(x) = m.max_error_steps {
            self.steps = Some(self.steps.map_or(x, |s: f64| s.max(x)));
        }
    }
    fn relative_error(&self) -> Option<f64> {
        (self.b2 > 0.0).then(|| (self.d2 / self.b2).sqrt())
    }
    fn snr_db(&self) -> Option<f64> {
        (self.b2 > 0.0 && self.d2 > 0.0).then(|| 10.0 * (self.b2 / self.d2).log10())
    }
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
        all: Sums,
        rel: Vec<f64>,
        modules: BTreeMap<String, Sums>,
    }
    let mut groups: BTreeMap<&str, Acc> = BTreeMap::new();
    for (name, m) in &c.results {
        let Some(&(base, ft)) = storage.get(name.as_str()) else {
            continue;
        };
        let g = groups.entry(ft).or_insert(Acc {
            base: Vec::new(),
            all: Sums::default(),
            rel: Vec::new(),
            modules: BTreeMap::new(),
        });
        if !g.base.contains(&base) {
            g.base.push(base);
        }
        g.all.add(m);
        g.rel.extend(m.relative_diff);
        g.modules
            .entry(crate::pairing::module_type(name))
            .or_default()
            .add(m);
    }
    groups
        .into_iter()
        .map(|(storage, mut g)| {
            g.rel.sort_by(f64::total_cmp);
            QuantGroup {
                storage: storage.to_string(),
                base_storage: g.base.iter().map(|s| s.to_string()).collect(),
                tensors: g.all.n,
                parameters: g.all.params,
                relative_error: g.all.relative_error(),
                snr_db: g.all.snr_db(),
                median_relative_error: g.rel.get(g.rel.len() / 2).copied(),
                max_abs_diff: g.all.max,
                max_error_steps: g.all.steps,
                modules: g
                    .modules
                    .into_iter()
                    .map(|(module, m)| QuantModule {
                        module,
                        tensors: m.n,
                        parameters: m.params,
                        relative_error: m.relative_error(),
                        snr_db: m.snr_db(),
                        max_abs_diff: m.max,
                        max_error_steps: m.steps,
                    })
                    .collect(),
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

/// `max_error_steps` as the reports print it.
pub fn steps_text(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |x| format!("{x:.3}"))
}

/// The groups as lines of text (comparison_report.txt): a line per storage, then one per
/// module type under it.
pub fn lines(groups: &[QuantGroup]) -> Vec<String> {
    let mut out = Vec::new();
    if groups.is_empty() {
        return out;
    }
    out.push(format!(
        "{:<34} {:>7} {:>12} {:>10} {:>9} {:>10} {:>10}",
        "storage (fine-tuned side)",
        "tensors",
        "rel. error",
        "median",
        "SNR dB",
        "max |Δ|",
        "max steps"
    ));
    for g in groups {
        out.push(format!(
            "{:<34} {:>7} {:>12} {:>10} {:>9} {:>10} {:>10}",
            g.storage,
            g.tensors,
            g.relative_error.map_or("n/a".into(), |x| super::sci(x, 3)),
            g.median_relative_error
                .map_or("n/a".into(), |x| super::sci(x, 2)),
            g.snr_db.map_or("inf".into(), |x| format!("{x:.1}")),
            super::sci(g.max_abs_diff, 2),
            steps_text(g.max_error_steps)
        ));
        for m in &g.modules {
            out.push(format!(
                "{:<34} {:>7} {:>12} {:>10} {:>9} {:>10} {:>10}",
                format!("  {}", m.module),
                m.tensors,
                m.relative_error.map_or("n/a".into(), |x| super::sci(x, 3)),
                "",
                m.snr_db.map_or("inf".into(), |x| format!("{x:.1}")),
                super::sci(m.max_abs_diff, 2),
                steps_text(m.max_error_steps)
            ));
        }
    }
    out
}
