//! `comparison_report.txt`: what changed, where, how much, and what was written.

use super::lora::{LoraDocs, LoraMetadata};
use super::{fmt_bytes, fmt_opt, sci};
use crate::comparison::Comparison;
use crate::lowrank::detect::{Verdict, VerdictKind};
use crate::pairing::{MismatchKind, layer_index, module_type};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::PathBuf;

/// Renders `comparison_report.txt`.
/// `lora` holds the LoRA stage's documents when it ran.
pub fn render(c: &Comparison, lora: Option<&LoraDocs>, written: &[PathBuf], top: usize) -> String {
    let mut s = String::new();
    let w = &mut s;
    let modified = c.modified();
    let identical = c.results.iter().filter(|(_, m)| m.identical).count();
    let _ = writeln!(w, "weightdiff comparison report");
    let _ = writeln!(w, "============================\n");
    let _ = writeln!(w, "Base:       {}", c.base.describe());
    let _ = writeln!(w, "Fine-tuned: {}", c.finetuned.describe());
    if !c.complete {
        let _ = writeln!(
            w,
            "\nTHIS RUN DID NOT COMPLETE: the figures cover the tensors compared before it stopped."
        );
    }
    let _ = writeln!(w, "\nWhat changed");
    let _ = writeln!(w, "------------");
    let _ = writeln!(
        w,
        "{} of {} compared tensors were modified (|d| > {} somewhere); {identical} are byte-identical.",
        modified.len(),
        c.results.len(),
        sci(c.threshold, 1)
    );
    let changed_params: u64 = c
        .results
        .iter()
        .filter(|(_, m)| m.is_modified())
        .map(|(_, m)| m.num_elements)
        .sum();
    let all_params: u64 = c.results.iter().map(|(_, m)| m.num_elements).sum();
    if all_params > 0 {
        let _ = writeln!(
            w,
            "Modified tensors hold {changed_params} of {all_params} compared parameters ({:.1} %).",
            100.0 * changed_params as f64 / all_params as f64
        );
    }
    let quant = super::quantization::by_storage(c);
    if !quant.is_empty() {
        let _ = writeln!(
            w,
            "\nQuantization error (the two store tensors differently; Δ relative to the base)"
        );
        for l in super::quantization::lines(&quant) {
            let _ = writeln!(w, "  {l}");
        }
        let _ = writeln!(w);
    }
    let related = crate::relatedness::assess(c);
    let _ = writeln!(
        w,
        "Whole model: ‖Δ‖/‖W‖ {}, parameter-weighted cosine similarity {} (over the compared tensors).",
        fmt_opt(related.relative_diff),
        related
            .cosine_similarity
            .map_or("n/a".to_string(), |x| format!("{x:.4}"))
    );
    relatedness_section(w, &related);

    // Where: by module type and by layer.
    let mut by_module: BTreeMap<String, (usize, usize, f64)> = BTreeMap::new();
    let mut by_layer: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
    for (name, m) in &c.results {
        let e = by_module.entry(module_type(name)).or_default();
        e.0 += 1;
        if m.is_modified() {
            e.1 += 1;
            e.2 = e.2.max(m.relative_diff.unwrap_or(0.0));
        }
        if let Some(l) = layer_index(name) {
            let e = by_layer.entry(l).or_default();
            e.0 += 1;
            e.1 += m.is_modified() as usize;
        }
    }
    let _ = writeln!(
        w,
        "\nBy module type (modified / total, largest relative diff):"
    );
    for (module, (total, modn, maxrel)) in &by_module {
        let _ = writeln!(
            w,
            "  {module:<28} {modn:>4} / {total:<4} {}",
            sci(*maxrel, 3)
        );
    }
    if !by_layer.is_empty() {
        let touched: Vec<String> = by_layer
            .iter()
            .filter(|(_, (_, m))| *m > 0)
            .map(|(l, _)| l.to_string())
            .collect();
        let _ = writeln!(
            w,
            "\nLayers with modified tensors: {} of {}{}",
            touched.len(),
            by_layer.len(),
            if touched.is_empty() {
                String::new()
            } else {
                format!(" ({})", touched.join(", "))
            }
        );
    }

    if let Some(docs) = lora.filter(|_| related.verdict.is_none()) {
        lora_section(w, c, docs);
    } else if let Some(q) = super::quantization::dominates(c) {
        let _ = writeln!(w, "\n{}", super::quantization::skipped_sentence(&q));
    }

    let _ = writeln!(w, "\nMost modified (by relative diff)");
    let _ = writeln!(w, "--------------------------------");
    for (i, (name, m)) in c.top_modified(top).into_iter().enumerate() {
        let _ = writeln!(
            w,
            "{:3}. {name}  rel {}  cos {}",
            i + 1,
            fmt_opt(m.relative_diff),
            fmt_opt(m.cosine_similarity)
        );
    }
    if modified.is_empty() {
        let _ = writeln!(w, "(none)");
    }

    let _ = writeln!(w, "\nStructure");
    let _ = writeln!(w, "---------");
    let _ = writeln!(w, "Only in base: {}", summarise_names(&c.only_in_base));
    let _ = writeln!(
        w,
        "Only in fine-tuned: {}",
        summarise_names(&c.only_in_finetuned)
    );
    if c.mismatches.len() > LIST_FIRST {
        for kind in [MismatchKind::Shape, MismatchKind::Dtype] {
            let names: Vec<String> = c
                .mismatches
                .iter()
                .filter(|m| m.kind == kind)
                .map(|m| m.name.clone())
                .collect();
            if !names.is_empty() {
                let _ = writeln!(w, "{kind} mismatches: {}", summarise_names(&names));
            }
        }
        let _ = writeln!(
            w,
            "The first {LIST_FIRST} (all in weight_differences.json):"
        );
    }
    for m in c.mismatches.iter().take(LIST_FIRST) {
        let _ = writeln!(
            w,
            "{} mismatch: {} base {:?} {} vs fine-tuned {:?} {}; compared {}",
            m.kind,
            m.name,
            m.base_shape,
            m.base_dtype,
            m.finetuned_shape,
            m.finetuned_dtype,
            m.compared
        );
    }
    if let Some(p) = &c.prefix {
        let _ = writeln!(
            w,
            "Names aligned by stripping `{}` from the {} side ({} more pairs).",
            p.prefix,
            if p.side == crate::pairing::Side::Base {
                "base"
            } else {
                "fine-tuned"
            },
            p.pairs_gained
        );
    }

    let _ = writeln!(w, "\nProblems");
    let _ = writeln!(w, "--------");
    let warnings: Vec<&String> = c
        .base
        .warnings
        .iter()
        .chain(&c.finetuned.warnings)
        .collect();
    if let Some(v) = &related.verdict {
        let _ = writeln!(
            w,
            "not a base and its fine-tune ({}): {}",
            v.kind,
            v.reason.as_deref().unwrap_or("")
        );
    } else if c.errors.is_empty() && warnings.is_empty() {
        let _ = writeln!(w, "none");
    }
    for (name, e) in c.errors.iter().take(LIST_FIRST) {
        let _ = writeln!(w, "error: {name}: {e}");
    }
    if c.errors.len() > LIST_FIRST {
        let names: Vec<String> = c.errors.keys().cloned().collect();
        let _ = writeln!(
            w,
            "errors in all: {} (every message in weight_differences.json)",
            summarise_names(&names)
        );
    }
    for wn in warnings.iter().take(LIST_FIRST) {
        let _ = writeln!(w, "warning: {wn}");
    }
    if warnings.len() > LIST_FIRST {
        let _ = writeln!(
            w,
            "… and {} more warnings (all in weight_differences.json)",
            warnings.len() - LIST_FIRST
        );
    }

    let p = &c.performance;
    let _ = writeln!(w, "\nPerformance");
    let _ = writeln!(w, "-----------");
    let _ = writeln!(
        w,
        "{} read in {:.3}s ({:.2} GB/s, {} threads).",
        fmt_bytes(p.bytes_read),
        p.total_time,
        p.throughput_gbps,
        p.threads
    );
    if let Some(d) = &p.lowrank_during_diff {
        let _ = writeln!(
            w,
            "That time includes the low-rank analysis of {} matrices, run as each was compared ({:.3}s of worker time).",
            d.matrices, d.worker_time
        );
    }

    let _ = writeln!(w, "\nOutputs");
    let _ = writeln!(w, "-------");
    for f in written {
        let _ = writeln!(w, "{}", f.display());
    }
    s
}

/// Names listed in full up to this many; longer lists are summarised (count, module
/// types, the first names) and stay whole in the JSON reports.
pub(crate) const LIST_FIRST: usize = 10;

/// A list of tensor names for people: all of them when short, else the count, the count
/// per module type (most frequent first) and the first few names.
pub(crate) fn summarise_names(v: &[String]) -> String {
    if v.is_empty() {
        return "none".to_string();
    }
    if v.len() <= LIST_FIRST {
        return format!("{} ({})", v.len(), v.join(", "));
    }
    let mut by_module: BTreeMap<String, usize> = BTreeMap::new();
    for n in v {
        *by_module.entry(module_type(n)).or_default() += 1;
    }
    let mut groups: Vec<(String, usize)> = by_module.into_iter().collect();
    groups.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let shown: Vec<String> = groups
        .iter()
        .take(LIST_FIRST)
        .map(|(m, k)| format!("{m} {k}"))
        .collect();
    let more = groups.len().saturating_sub(LIST_FIRST);
    format!(
        "{} (by module type: {}{}; first: {}, …)",
        v.len(),
        shown.join(", "),
        if more > 0 {
            format!(", {more} more types")
        } else {
            String::new()
        },
        v[..3].join(", ")
    )
}

/// The relatedness evidence: shares paired, configs that differ, and the verdict when
/// the two are not a base and its fine-tune.
fn relatedness_section(w: &mut String, r: &crate::relatedness::Relatedness) {
    let o = &r.overlap;
    let _ = writeln!(w, "\nBase and fine-tune?");
    let _ = writeln!(w, "-------------------");
    let _ = writeln!(
        w,
        "{} of {} base and {} fine-tuned tensors pair with equal shapes ({:.1} % of names, {:.1} % of parameters).",
        o.paired_tensors,
        o.base_tensors,
        o.finetuned_tensors,
        100.0 * r.names_paired_share,
        100.0 * r.parameters_paired_share
    );
    for (k, [a, b]) in &o.config_differences {
        let _ = writeln!(w, "config {k}: {a} in the base, {b} in the fine-tune");
    }
    if o.same_model {
        let _ = writeln!(
            w,
            "Note: both arguments name the same model; every tensor is identical to itself."
        );
    }
    match &r.verdict {
        Some(v) => {
            let _ = writeln!(w, "{}", verdict_sentence(v));
            let _ = writeln!(
                w,
                "The low-rank analysis and extraction were skipped: a LoRA verdict or adapter would be meaningless here."
            );
        }
        None => {
            let _ = writeln!(
                w,
                "They look like a base and its derivative (same shapes, paired weights aligned)."
            );
        }
    }
}

/// The lines a finished comparison ends with on the terminal: counts and speed, the
/// low-rank stage's time, the whole-model figures, the verdict and where the reports are.
pub fn run_summary(c: &Comparison, out: &std::path::Path) -> Vec<String> {
    let p = &c.performance;
    let mut lines = vec![format!(
        "compared {} tensors in {:.2}s ({:.2} GB/s): {} modified, {} identical, {} failed",
        c.results.len(),
        p.total_time,
        p.throughput_gbps,
        c.modified().len(),
        c.results.iter().filter(|(_, m)| m.identical).count(),
        c.errors.len()
    )];
    if let Some(l) = &c.lora {
        lines.push(lowrank_time(l));
    }
    let related = crate::relatedness::assess(c);
    lines.push(format!(
        "whole model: ‖Δ‖/‖W‖ {}, parameter-weighted cosine {}",
        related
            .relative_diff
            .map_or("n/a".into(), |r| format!("{r:.3e}")),
        related
            .cosine_similarity
            .map_or("n/a".into(), |r| format!("{r:.4}"))
    ));
    if let Some(v) = &related.verdict {
        lines.push(format!(
            "verdict: {} ({})",
            v.kind,
            v.reason.as_deref().unwrap_or("")
        ));
    } else if let Some(l) = &c.lora {
        let v = &l.verdict;
        lines.push(format!(
            "verdict: {}{}{} (confidence {:.2}); {} modules extracted",
            v.kind,
            v.rank.map_or(String::new(), |r| format!(", rank {r}")),
            if v.target_modules.is_empty() {
                String::new()
            } else {
                format!(" on {}", v.target_modules.join(", "))
            },
            v.confidence,
            l.extracted.len()
        ));
        let kept = adapter_kept_share(
            c,
            l.extracted
                .iter()
                .map(|e| (e.tensor.as_str(), e.factors.residual_stored)),
        );
        let rank = crate::peft::adapter::default_rank(l);
        if let Some(caveat) = kept.and_then(|k| low_rank_caveat(k, rank)) {
            lines.push(caveat);
        }
    }
    lines.push(format!("reports written to {}", out.display()));
    lines
}

/// Share of ‖Δ‖ the extracted adapter keeps over its modules: 1 − ‖Δ − BA‖/‖Δ‖, with both
/// norms summed over the modules (Σ‖Δᵢ − BᵢAᵢ‖² and Σ‖Δᵢ‖², each residual as stored).
/// `modules` gives (tensor, residual); the ‖Δᵢ‖ come from the comparison.
pub fn adapter_kept_share<'a>(
    c: &Comparison,
    modules: impl Iterator<Item = (&'a str, f64)>,
) -> Option<f64> {
    let (mut err2, mut d2) = (0.0, 0.0);
    for (tensor, residual) in modules {
        let Some((_, m)) = c.results.iter().find(|(n, _)| n == tensor) else {
            continue;
        };
        err2 += (residual * m.l2_diff).powi(2);
        d2 += m.l2_diff * m.l2_diff;
    }
    (d2 > 0.0 && d2.is_finite()).then(|| 1.0 - (err2 / d2).sqrt())
}

/// The caveat of an adapter that keeps less than half of the change it stands for.
pub fn low_rank_caveat(kept: f64, rank: usize) -> Option<String> {
    (kept < 0.5).then(|| {
        format!(
            "This fine-tune is not low-rank: the rank-{rank} adapter keeps {:.0} % of ‖Δ‖ \
             (1 − ‖Δ − BA‖/‖Δ‖ over its modules); base + adapter is far from the fine-tune.",
            100.0 * kept.max(0.0)
        )
    })
}

/// [`adapter_kept_share`] of the modules a `lora_metadata.json` lists.
pub(crate) fn metadata_kept_share(c: &Comparison, m: &LoraMetadata) -> Option<f64> {
    adapter_kept_share(
        c,
        m.modules
            .0
            .iter()
            .map(|(_, e)| (e.tensor.as_str(), e.residual_stored)),
    )
}

/// The verdict in words, from `lora_analysis.json`'s `verdict`.
pub(crate) fn verdict_sentence(v: &Verdict) -> String {
    let rank = v.rank.map_or("?".to_string(), |r| r.to_string());
    let modules = v.target_modules.join(", ");
    let confidence = v.confidence;
    let reason = v.reason.as_deref().unwrap_or("");
    match v.kind {
        VerdictKind::MergedLora => format!(
            "The fine-tune looks like a merged LoRA of rank {rank} on {modules} (confidence {confidence:.2})."
        ),
        VerdictKind::FullFinetune => format!(
            "The fine-tune looks like a full fine-tune: its deltas are not low-rank (confidence {confidence:.2})."
        ),
        VerdictKind::Mixed => format!(
            "The fine-tune mixes low-rank deltas (rank {rank}) on {modules} with other changes (confidence {confidence:.2})."
        ),
        VerdictKind::Unrelated => format!(
            "These are not a base and its fine-tune: they share an architecture but not their weights; {reason}."
        ),
        VerdictKind::DifferentArchitecture => format!(
            "These are not a base and its fine-tune: they have different architectures; {reason}."
        ),
        VerdictKind::NothingCompared => {
            format!("Nothing was compared, so there is no verdict: {reason}.")
        }
        VerdictKind::Unchanged => {
            "The fine-tune is unchanged: no tensor differs beyond the threshold.".to_string()
        }
    }
}

fn lora_section(w: &mut String, c: &Comparison, docs: &LoraDocs) {
    let a = &docs.analysis;
    let _ = writeln!(w, "\nLoRA verdict");
    let _ = writeln!(w, "------------");
    let _ = writeln!(w, "{}", verdict_sentence(&a.verdict));
    let low = a
        .tensors
        .0
        .iter()
        .filter(|(_, s)| s.detected_rank.is_some())
        .count();
    let _ = writeln!(
        w,
        "{low} of {} analysed matrices have a clear rank cliff above the storage rounding floor.",
        a.tensors.0.len()
    );
    if let Some(m) = &docs.metadata {
        let modules = m.modules.0.len();
        if modules > 0 {
            let _ = writeln!(
                w,
                "Extracted {modules} modules as a PEFT adapter (default rank {}), mean relative reconstruction error {}.",
                m.default_rank,
                sci(m.mean_residual_stored.unwrap_or(0.0), 3)
            );
            if let Some(caveat) =
                metadata_kept_share(c, m).and_then(|kept| low_rank_caveat(kept, m.default_rank))
            {
                let _ = writeln!(w, "{caveat}");
            }
            let _ = writeln!(
                w,
                "Adapter task type: {} (profile {}).",
                m.task_type.map_or("none", |t| t.as_str()),
                m.profile.as_str()
            );
        }
        for n in &m.notes {
            let _ = writeln!(w, "note: {n}");
        }
    }
    // Not extracted, grouped by reason: one line per reason, not per tensor.
    let mut by_reason: Vec<(&str, Vec<String>)> = Vec::new();
    for s in &a.skipped {
        match by_reason.iter_mut().find(|(r, _)| *r == s.reason) {
            Some((_, v)) => v.push(s.tensor.clone()),
            None => by_reason.push((&s.reason, vec![s.tensor.clone()])),
        }
    }
    for (reason, names) in by_reason {
        let _ = writeln!(w, "not extracted: {reason}: {}", summarise_names(&names));
    }
    for (n, e) in &a.errors {
        let _ = writeln!(w, "analysis error: {n}: {e}");
    }
}

/// Where the low-rank stage's time went: the matrices analysed during the diff (their
/// time is in the diff's wall time above, so its GB/s is not the read speed alone) and
/// the stage after it.
fn lowrank_time(l: &crate::comparison::LoraReport) -> String {
    let (during, secs) = l.during_diff;
    if during == 0 {
        return format!(
            "low-rank stage: {} matrices in {:.2}s",
            l.spectra.len(),
            l.total_time
        );
    }
    format!(
        "low-rank stage: {} matrices, {during} of them analysed during the diff ({secs:.2}s of \
         worker time, within the diff's time) and the rest in {:.2}s after it",
        l.spectra.len(),
        l.total_time
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_verdict_reads_as_a_sentence() {
        let v = |kind: &str| {
            verdict_sentence(
                &serde_json::from_value(serde_json::json!({
                    "kind": kind, "rank": 8, "target_modules": ["q_proj"], "confidence": 0.9,
                    "reason": "the paired weights are uncorrelated"
                }))
                .unwrap(),
            )
        };
        assert_eq!(
            v("merged_lora"),
            "The fine-tune looks like a merged LoRA of rank 8 on q_proj (confidence 0.90)."
        );
        assert_eq!(
            v("unchanged"),
            "The fine-tune is unchanged: no tensor differs beyond the threshold."
        );
        for kind in [
            "full_finetune",
            "mixed",
            "unrelated",
            "different_architecture",
            "nothing_compared",
        ] {
            let s = v(kind);
            assert!(!s.contains("looks like mixed") && !s.contains(kind), "{s}");
            assert!(s.ends_with('.'), "{s}");
        }
    }

    #[test]
    fn long_name_lists_are_counted_grouped_and_cut() {
        let names: Vec<String> = (0..300)
            .map(|i| format!("model.layers.{i}.mlp.up_proj.weight"))
            .chain((0..5).map(|i| format!("model.layers.{i}.input_layernorm.weight")))
            .collect();
        let s = summarise_names(&names);
        assert!(
            s.starts_with("305 (by module type: up_proj 300, input_layernorm 5;"),
            "{s}"
        );
        assert!(s.len() < 250, "{s}");
        assert_eq!(
            summarise_names(&names[..2]),
            format!("2 ({}, {})", names[0], names[1])
        );
    }
}
